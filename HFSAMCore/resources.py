"""Where the extension-level Resources/ folder is (catalogs, class presets, terminology).

In a checkout and in the Slicer extension it sits beside the HFSAMCore package;
in a wheel it is packaged inside it as HFSAMCore/Resources. $HFSAM_RESOURCES wins.
"""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def resources_dir() -> Path:
    env = os.environ.get("HFSAM_RESOURCES")
    if env:
        return Path(env)
    beside = _PACKAGE.parent / "Resources"
    return beside if beside.is_dir() else _PACKAGE / "Resources"
