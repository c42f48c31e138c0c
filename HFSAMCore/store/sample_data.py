"""The demo's data: a small abdominal CT with Synapse-8 organ labels.

Where it comes from (first that applies):

1. ``shared``: ``<data>/ct_abdomen_3mm/{image,labels_synapse8}.nii.gz`` where
   ``<data>`` is the ``data_dir`` argument, ``$HFSAM_DATA``, or
   ``../shared/data`` beside the repository (the CI layout);
2. ``download``: the same public files of the TotalSegmentator repository
   (``tests/reference_files/``, Apache-2.0, pinned to a commit), fetched once
   into ``<library root>/sample_data/<sample>/`` and verified by SHA256. The
   published label map uses TotalSegmentator's ids, so after download it is
   remapped to the Synapse order (the ``remap`` table of
   ``Resources/sample_data.json``) and written as ``labels_synapse8.nii.gz``.

The catalog is ``Resources/sample_data.json`` or ``$HFSAM_SAMPLE_CATALOG``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import InputError
from ..io import atomic as _atomic
from ..runtime.progress import Progress
from . import download as _download

SAMPLE = "ct_abdomen_3mm"
# How long a run waits for another one downloading the same sample (a few MB).
SAMPLE_WAIT_S = 900.0
SAMPLE_HINT = (
    "set HFSAM_DATA to a folder holding ct_abdomen_3mm/image.nii.gz and labels_synapse8.nii.gz, "
    "or download {url} yourself"
)


def repo_data_dir() -> Path:
    """``$HFSAM_DATA`` or ``../shared/data`` relative to the repository root."""
    env = os.environ.get("HFSAM_DATA")
    repo = Path(__file__).resolve().parents[2]  # <repo>/HFSAMCore/store/sample_data.py
    return Path(env) if env else repo.parent / "shared" / "data"


def load_sample_catalog(path: str | os.PathLike | None = None) -> dict:
    path = Path(path or os.environ.get("HFSAM_SAMPLE_CATALOG") or _download.resources_dir() / "sample_data.json")
    try:
        catalog = json.loads(path.read_text(encoding="utf-8"))
        catalog["samples"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"sample data catalog {path} cannot be read ({exc}); reinstall HF-SAM") from None
    return catalog


def remap_labels(src: Path, dest: Path, remap: dict[str, int]) -> Path:
    """Write ``src``'s label map with values mapped by ``remap`` (others -> 0), atomically, same geometry."""
    import numpy as np
    import SimpleITK as sitk

    labels = sitk.ReadImage(str(src))
    array = sitk.GetArrayViewFromImage(labels)
    if array.min() < 0 or array.max() > 65535:
        raise InputError(f"{src} is not a label map (values outside 0..65535)")
    table = np.zeros(int(array.max()) + 1, dtype=np.uint8)
    for old, new in remap.items():
        if int(old) < table.size:
            table[int(old)] = new
    out = sitk.GetImageFromArray(table[array.astype(np.int64)])
    out.CopyInformation(labels)
    # SimpleITK picks the format from the extension, so the temp name keeps it.
    tmp = _atomic.temp_path(dest, ".tmp.nii.gz")
    try:
        sitk.WriteImage(out, str(tmp), True)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        return _atomic.publish(tmp, dest, overwrite=True)
    finally:
        if tmp.exists():
            tmp.unlink()


def _shared(data_dir: Path, name: str) -> dict | None:
    folder = data_dir / name
    image, labels = folder / "image.nii.gz", folder / "labels_synapse8.nii.gz"
    if image.is_file() and labels.is_file():
        return {"image": image, "labels": labels, "source": "shared"}
    return None


def locate_sample(
    progress: Progress | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    library_root: str | os.PathLike | None = None,
    catalog: str | os.PathLike | None = None,
    name: str = SAMPLE,
) -> dict:
    """{"image": Path, "labels": Path (Synapse-8 label map), "source": "shared" | "download"}.

    Downloads happen once; later calls find the verified files (and redo only
    what is missing). Offline with no local copy -> InputError saying so.
    """
    found = _shared(Path(data_dir) if data_dir else repo_data_dir(), name)
    if found:
        return found
    from .library import ModelLibrary
    from .locks import entry_lock

    progress = progress or Progress("none")
    spec = load_sample_catalog(catalog)["samples"].get(name)
    if spec is None:
        raise InputError(f"unknown sample {name!r}")
    lib = ModelLibrary(library_root)
    folder = lib.ensure_folder(lib.sample_data_dir / name)
    # Two demos starting together must not share .part files: the second waits for the
    # first's download, then finds the verified files.
    with entry_lock(folder, name, wait=SAMPLE_WAIT_S):
        paths = {}
        for key, item in spec["files"].items():
            paths[key] = folder / item["filename"]
            if not paths[key].is_file():
                progress.log(f"downloading sample data {item['filename']} from {item['url']}")
            _download.download(
                item["url"], paths[key], item["sha256"], size=item.get("size"), progress=progress, hint=SAMPLE_HINT
            )
        labels_spec = spec["labels"]
        labels = folder / labels_spec["filename"]
        if not labels.is_file():
            remap_labels(paths[labels_spec["from"]], labels, labels_spec["remap"])
    return {"image": paths["image"], "labels": labels, "source": "download"}
