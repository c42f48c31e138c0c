"""The local model library: named adapters and the base checkpoints (SAM ViT, LiteMedSAM).

Where it lives (first that applies):

1. the ``root`` argument (``--library DIR`` on the command line);
2. ``$HFSAM_HOME``;
3. ``~/.hfsam`` on Linux and macOS, ``%LOCALAPPDATA%\\HFSAM`` on Windows
   (a per-user, non-roaming folder: checkpoints are up to 2.5 GB).

Layout::

    <root>/adapters/<name>.safetensors     adapters (see adapters.py for the format)
    <root>/checkpoints/<filename>          base checkpoints, names from the catalog
    <root>/sample_data/                    the demo's data when downloaded (sample_data.py)

Entry names are 1..64 characters of ``[A-Za-z0-9._-]`` not starting with '.',
so a name is always one plain file name inside the library: it can never reach
outside it, never collide with the hidden temp and lock files (which start
with '.'), and is portable to Windows.

Two processes writing the same entry: each holds ``.<name>.lock`` (an OS file
lock, store/locks.py) while it writes; the second gets a clear InputError, or
waits for the first where both would write the same bytes (a bundled
checkpoint registered on first use). A writer that dies releases its lock
with it. Writes themselves are atomic (temp file + rename), so the entry is
always one whole file, and without ``overwrite`` a second rename fails cleanly.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..io import atomic as _atomic
from . import adapters as _adapters
from . import download as _download
from .base_checkpoints import BaseCheckpoints
from .locks import entry_lock

ADAPTER_SUFFIX = ".safetensors"


_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")


# Names Windows reserves for devices, whatever the extension.
_WINDOWS_DEVICES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


def default_root() -> Path:
    """``$HFSAM_HOME``, else ``%LOCALAPPDATA%\\HFSAM`` on Windows, else ``~/.hfsam``."""
    env = os.environ.get("HFSAM_HOME")
    if env:
        return Path(env).expanduser()
    if os.name == "nt":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "HFSAM"
    return Path.home() / ".hfsam"


def validate_name(name: Any) -> str:
    """Return ``name`` if it is a valid library entry name, else raise InputError."""
    ok = (
        isinstance(name, str)
        and _NAME.fullmatch(name) is not None
        and ".." not in name
        and not name.endswith(".")
        and name.split(".")[0].lower() not in _WINDOWS_DEVICES
    )
    if not ok:
        shown = repr(name)[:80]
        raise InputError(
            f"invalid library entry name {shown}: use 1-64 letters, digits, '.', '_' or '-' "
            "(not starting or ending with '.', no '..')"
        )
    return name


def _copy_file(src: Path, dest: Path, *, overwrite: bool) -> Path:
    def write(fh):
        with open(src, "rb") as source:
            shutil.copyfileobj(source, fh, 1 << 20)

    return _atomic.atomic_write(dest, write, overwrite=overwrite)


class ModelLibrary(BaseCheckpoints):
    """A folder of named adapters and base checkpoints (see the module docstring)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = (Path(root).expanduser() if root not in (None, "") else default_root()).resolve()
        if self.root.exists() and not self.root.is_dir():
            raise InputError(
                f"the model library {self.root} is a file, not a folder: pass --library FOLDER "
                "(or set HFSAM_HOME to one)"
            )

    def __repr__(self) -> str:
        return f"ModelLibrary({str(self.root)!r})"

    @property
    def adapters_dir(self) -> Path:
        return self.root / "adapters"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def sample_data_dir(self) -> Path:
        return self.root / "sample_data"

    def ensure_folder(self, folder: Path) -> Path:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create the model library folder {folder}: {exc.strerror or exc}") from None
        return folder

    # -- adapters -------------------------------------------------------------
    def adapter_path(self, name: str) -> Path:
        """Where entry ``name`` is (or would be) stored; the name is validated."""
        path = self.adapters_dir / f"{validate_name(name)}{ADAPTER_SUFFIX}"
        # Defence in depth: a valid name is one plain file name, so this cannot fail.
        if path.parent != self.adapters_dir:
            raise InputError(f"library entry name {name!r} points outside the library")
        return path

    def names(self) -> list[str]:
        if not self.adapters_dir.is_dir():
            return []
        return sorted(
            p.name[: -len(ADAPTER_SUFFIX)]
            for p in self.adapters_dir.iterdir()
            if p.name.endswith(ADAPTER_SUFFIX) and not p.name.startswith(".") and p.is_file()
        )

    def _missing(self, name: str) -> InputError:
        names = self.names()
        listing = (
            f"available: {', '.join(names)}"
            if names
            else ("the library is empty: train one with `hfsam finetune` or add one with `hfsam models import FILE`")
        )
        return InputError(f"no adapter named '{name}' in the model library {self.root}; {listing}")

    def _existing(self, name: str) -> Path:
        path = self.adapter_path(name)
        if not path.is_file():
            raise self._missing(name)
        return path

    def list_adapters(self) -> list[dict]:
        """One summary per adapter; an unreadable one carries an "error" field instead of crashing."""
        entries = []
        for name in self.names():
            path = self.adapters_dir / f"{name}{ADAPTER_SUFFIX}"
            entry: dict[str, Any] = {"name": name, "path": str(path), "size": path.stat().st_size}
            try:
                validate_name(name)
                meta = _adapters.read_metadata(path)
            except InputError as exc:
                entry["error"] = str(exc)
            else:
                entry.update(_summary(meta))
            entries.append(entry)
        return entries

    def show(self, name: str) -> dict:
        """Everything about one adapter: its full metadata plus name, path, size and SHA256."""
        path = self._existing(name)
        meta = _adapters.read_metadata(path)
        return {
            "name": name,
            "path": str(path),
            "size": path.stat().st_size,
            "sha256": _download.sha256_file(path),
            "metadata": meta,
        }

    def resolve_adapter(self, name_or_path: str | os.PathLike) -> Path:
        """An existing file path wins; otherwise a library name; unknown -> InputError listing names."""
        text = os.fspath(name_or_path)
        candidate = Path(text).expanduser()
        if candidate.is_file():
            return candidate.resolve()
        if candidate.is_dir():
            raise InputError(
                f"--adapter {candidate} is a folder; give an adapter file (.safetensors) or a "
                "library name (`hfsam models list`)"
            )
        if "/" in text or os.sep in text or text.endswith(ADAPTER_SUFFIX):
            raise InputError(f"adapter file {candidate} does not exist; check the path or use `hfsam models list`")
        return self._existing(text)

    def save_adapter(self, name: str, tensors: Mapping, metadata: Mapping, *, overwrite: bool = False) -> Path:
        """Store tensors + metadata as entry ``name`` (atomic, locked)."""
        path = self.adapter_path(name)
        folder = self.ensure_folder(self.adapters_dir)
        with entry_lock(folder, name):
            return _adapters.save_adapter(path, tensors, metadata, overwrite=overwrite)

    def import_adapter(self, file: str | os.PathLike, name: str | None = None, *, overwrite: bool = False) -> str:
        """Copy an adapter file into the library after validating its metadata; returns the entry name.

        The name defaults to the adapter's own metadata name when that is a valid
        entry name, else to the file name without ``.safetensors``.
        """
        src = Path(file).expanduser()
        meta = _adapters.read_metadata(src)  # refuses anything that is not a valid adapter
        _adapters.check_finite_tensors(src)  # ... or a broken one
        if name is None:
            stem = src.name[: -len(ADAPTER_SUFFIX)] if src.name.endswith(ADAPTER_SUFFIX) else src.stem
            for candidate in (meta["name"], stem):
                try:
                    name = validate_name(candidate)
                    break
                except InputError:
                    continue
            else:
                raise InputError(f"cannot derive a library name from {src.name!r}; give one with --name")
        dest = self.adapter_path(name)
        if dest.exists() and dest.resolve() == src.resolve():
            return name  # importing an entry onto itself: nothing to do
        folder = self.ensure_folder(self.adapters_dir)
        with entry_lock(folder, name):
            _copy_file(src, dest, overwrite=overwrite)
        return name

    def export_adapter(self, name: str, dest: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Copy entry ``name`` to ``dest`` (a file, or a folder to put ``<name>.safetensors`` in)."""
        from ..io.outputs import Claims

        src = self._existing(name)
        dest = Path(dest).expanduser()
        if dest.is_dir():
            dest = dest / src.name
        claims = Claims(overwrite=overwrite)
        claims.inputs("the library entry itself", [src])
        claims.output(dest, kind="adapter")  # .safetensors only: an export never replaces a scan
        return _copy_file(src, dest, overwrite=overwrite)

    def remove_adapter(self, name: str) -> None:
        path = self._existing(name)
        with entry_lock(self.adapters_dir, name):
            try:
                path.unlink()
            except FileNotFoundError:
                raise self._missing(name) from None
            except OSError as exc:
                raise InputError(f"cannot remove {path}: {exc.strerror or exc}") from None


def _summary(meta: dict) -> dict:
    return {
        "title": meta["name"],
        "backbone": meta["backbone"],
        "img_size": meta["img_size"],
        "rank": meta["rank"],
        "fusion": meta["fusion"],
        "classes": [c["name"] for c in meta["classes"]],
        "intensity_preset": meta["intensity_preset"],
        "created": meta["created"],
        "metrics": meta["metrics"],
        "description": meta["description"],
    }
