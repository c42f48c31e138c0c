"""What a run writes: claimed before any work, held for the whole run, taken back together on failure.

Every command that writes files declares them here first, with the run's inputs, so that the
rules of "nothing lost" live in one place and hold for every command and every flag:

* **An output never replaces an input of the run**, with or without ``--overwrite``: not the
  image, the labels, any file of a DICOM folder, a detached header's data file, the adapter or the
  checkpoint. Compared by what the paths *are*, not how they are spelled: ``os.path.samefile``
  (hard links, symlinks, case-insensitive file systems) and resolved real paths (a not yet
  existing output in a folder reached through a link).
* **Two outputs of one run are never one file** (compared case-insensitively, since the file
  system may be): ``-o`` and the library entry, a label volume and its sidecar.
* **A label volume's sidecar belongs to it alone**: ``seg.nrrd`` and ``seg.nii.gz`` would share
  ``seg.json``, so a second one in the folder is refused.
* **The name says what it is** (``.safetensors`` for an adapter, an image ending for a label
  volume), the folder exists and is writable, a folder is never an output, and an existing file
  is replaced only with ``--overwrite``: all before the model is loaded, so that no work is lost.
* While the run lasts each output is locked (``.NAME.lock``, see store/locks.entry_lock): a second
  run writing the same file is refused at once.
* Several outputs are committed together: when a later write fails, the earlier ones are taken
  back (the previous file restored, or the new one removed), so a failed run changes nothing.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import InputError

ADAPTER_SUFFIX = ".safetensors"


def _real(path: Path) -> str:
    return os.path.normcase(os.path.realpath(path))


def same_file(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` are one file: the same inode (hard link, symlink, another spelling
    on a case-insensitive file system) or the same resolved path."""
    try:
        if os.path.samefile(a, b):
            return True
    except OSError:
        pass
    return _real(a) == _real(b)


class Claims:
    """The inputs and outputs of one run (see the module docstring).

    Add the inputs first (``inputs``), then each output (``output``, ``image_output``,
    ``library_entry``): every output is checked at once, so the first problem is reported
    before anything is read or computed. ``hold()`` then locks them for the run.
    """

    def __init__(self, *, overwrite: bool):
        self.overwrite = overwrite
        self._inputs: list[tuple[str, Path]] = []
        self._outputs: list[tuple[str, Path]] = []
        self._locks: list[tuple[Path, str, str]] = []  # (folder, lock name, what) for store/locks.entry_lock

    # -- declaring ----------------------------------------------------------------------
    def inputs(self, what: str, paths: Iterable[str | os.PathLike]) -> None:
        """Files the run reads; ``what`` names them in messages ("the input image"). Outputs claimed
        already are checked against them too."""
        added = [(what, Path(p).expanduser()) for p in paths]
        self._inputs += added
        for label, path in self._outputs:
            _check_not_input(path, label, added)

    def output(self, path: str | os.PathLike, *, kind: str = "file", what: str = "output") -> Path:
        """Check one output file; ``kind``: "adapter" (.safetensors), "image" (a label volume) or "file"."""
        if not str(path).strip():
            raise InputError(f"the {what} name is empty: give a file name")
        path = Path(path).expanduser()
        _check_not_input(path, what, self._inputs)
        self._check_not_claimed(path, what)
        if kind == "adapter" and not path.name.endswith(ADAPTER_SUFFIX):
            raise InputError(
                f"adapter files end in {ADAPTER_SUFFIX}, not {path.name!r}; rename the output "
                f"(e.g. {path.name.split('.')[0] or 'adapter'}{ADAPTER_SUFFIX})"
            )
        if kind == "image":
            from .read import IMAGE_SUFFIXES, image_suffix

            if image_suffix(path) is None:
                raise InputError(f"cannot write {path.name}: a label volume is one of {', '.join(IMAGE_SUFFIXES)}")
        derived = what != "output"  # a sidecar or data file, named after the output the user gave
        if path.is_dir():
            raise InputError(
                f"{what} {path} is a folder: move it away or choose another output name"
                if derived
                else f"{path} is a folder; give a file name (e.g. {path / _example(kind)})"
            )
        if os.path.lexists(path) and not self.overwrite:
            raise InputError(
                f"{path} already exists{f' ({what})' if derived else ''}; pass --overwrite to replace "
                "it or choose another name"
            )
        _check_folder(path.parent if str(path.parent) else Path("."))
        self._outputs.append((what, path))
        self._locks.append((path.parent, path.name, "output"))
        return path

    def image_output(self, path: str | os.PathLike) -> tuple[Path, Path]:
        """A label volume and its JSON sidecar, which must belong to this volume alone."""
        from .read import image_suffix
        from .write import data_files, sidecar_path

        output = self.output(path, kind="image")
        sidecar = sidecar_path(output)
        with contextlib.suppress(OSError):
            for other in output.parent.iterdir():
                if other.name.casefold() == output.name.casefold() or image_suffix(other) is None:
                    continue
                if sidecar_path(other).name.casefold() == sidecar.name.casefold():
                    raise InputError(
                        f"{sidecar.name} is already the sidecar (class names) of {other}: two label "
                        f"volumes in one folder cannot share it; choose another output name than "
                        f"{output.name}"
                    )
        self.output(sidecar, what=f"the sidecar of {output.name}")
        for data in data_files(output):  # a detached header's voxels go to a second file
            self.output(data, what=f"the data file of {output.name}")
        return output, sidecar

    def library_entry(self, library, name: str) -> Path:
        """Entry ``name`` of the model library as an output (locked as the library locks it)."""
        from ..store.library import validate_name

        path = library.adapter_path(validate_name(name))
        what = f"library entry {name!r}"
        _check_not_input(path, what, self._inputs)
        self._check_not_claimed(path, what)
        if path.exists() and not self.overwrite:
            raise InputError(
                f"the library already has an adapter named {name!r}; pass --overwrite or choose another name"
            )
        self._outputs.append((what, path))
        self._locks.append((path.parent, name, "library entry"))
        return path

    def _check_not_claimed(self, path: Path, what: str) -> None:
        for label, other in self._outputs:
            if same_file(path, other) or _real(path).casefold() == _real(other).casefold():
                raise InputError(f"{what} {path} and {label} {other} are the same file: give them different names")

    # -- the run ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def hold(self) -> Iterator[Writes]:
        """Lock every output for the run; yields ``Writes``, which takes back what was written when
        the run fails (or is cancelled) after some of its outputs were written."""
        from ..store.locks import entry_lock

        for folder, name, _ in self._locks:
            lock = folder / f".{name}.lock"
            for label, source in self._inputs:
                if same_file(lock, source):
                    raise InputError(f"{label} {source} has the name of this run's lock file; rename it")
        with contextlib.ExitStack() as stack:
            for folder, name, what in self._locks:
                if what == "library entry":
                    try:
                        folder.mkdir(parents=True, exist_ok=True)
                    except OSError as exc:
                        raise InputError(
                            f"cannot create the model library folder {folder}: {exc.strerror or exc}"
                        ) from None
                stack.enter_context(entry_lock(folder, name, what=what))
            writes = Writes()
            try:
                yield writes
            except BaseException:
                writes.take_back()
                raise
            writes.keep()


class Writes:
    """The outputs a run has written so far, with what they replaced, so that they can be taken back."""

    def __init__(self) -> None:
        self._done: list[tuple[Path, Path | None]] = []  # (output, hidden copy of what it replaced)

    def replacing(self, *paths: Path) -> None:
        """Call before writing ``paths``: keeps a hidden copy of each that exists (a hard link when the
        file system has them, so no data is copied)."""
        for path in paths:
            backup = None
            if path.is_file():
                backup = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.bak")
                try:
                    os.link(path, backup)
                except OSError:
                    shutil.copy2(path, backup)
            self._done.append((path, backup))

    def take_back(self) -> None:
        for path, backup in reversed(self._done):
            with contextlib.suppress(OSError):  # best effort: the original error is what the user must see
                if backup is not None and path.exists() and same_file(backup, path):
                    backup.unlink()  # never replaced (rename between two links of one file does nothing)
                elif backup is not None:
                    os.replace(backup, path)
                else:
                    path.unlink(missing_ok=True)
        self._done.clear()

    def keep(self) -> None:
        for _, backup in self._done:
            if backup is not None:
                with contextlib.suppress(OSError):
                    backup.unlink()
        self._done.clear()


def _check_not_input(path: Path, what: str, inputs: list[tuple[str, Path]]) -> None:
    for label, source in inputs:
        if same_file(path, source):
            shown = "" if source.name == path.name else f" ({source})"
            raise InputError(
                f"{what} {path} is {label}{shown}: an output never replaces an input of the run; choose another name"
            )


def _example(kind: str) -> str:
    return {"adapter": "adapter.safetensors", "image": "seg.nrrd"}.get(kind, "out")


def _check_folder(folder: Path) -> None:
    if not folder.exists():
        raise InputError(f"the output folder {folder} does not exist; create it first")
    if not folder.is_dir():
        raise InputError(f"{folder} is a file, not a folder: the output needs a folder to go in")
    if not os.access(folder, os.W_OK):
        raise InputError(f"the output folder {folder} is not writable; choose another place")
