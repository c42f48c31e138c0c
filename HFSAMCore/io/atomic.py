"""Atomic file writes: a temp file beside the target, fsync, then one rename.

Every writer of the engine goes through here (or, for multi-file image formats,
through volume.write_image, which uses the same rename rules), so a crash, a kill
or a full disk never leaves a half-written file under a final name.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable

from ..errors import InputError


def fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); directories cannot be opened on Windows."""
    if os.name == "nt":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(dest: Path, suffix: str = ".tmp") -> Path:
    """A hidden, unique temp name beside ``dest`` (same folder, so rename is atomic)."""
    return dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")


def publish(tmp: Path, dest: Path, *, overwrite: bool) -> Path:
    """Rename a finished temp file to ``dest`` atomically.

    Without ``overwrite`` a hard link is used: it fails if ``dest`` appeared in
    the meantime, so two writers can never silently replace each other's file
    (a plain exists()-then-rename check has a race). Filesystems without hard
    links fall back to that check.
    """
    tmp, dest = Path(tmp), Path(dest)
    if overwrite:
        os.replace(tmp, dest)
    else:
        try:
            os.link(tmp, dest)
        except FileExistsError:
            _unlink(tmp)
            raise InputError(f"{dest} already exists; choose another name or pass --overwrite") from None
        except (OSError, NotImplementedError, AttributeError):
            if dest.exists():
                _unlink(tmp)
                raise InputError(f"{dest} already exists; choose another name or pass --overwrite") from None
            os.replace(tmp, dest)
        else:
            _unlink(tmp)
    fsync_dir(dest.parent)
    return dest


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def atomic_write(dest: str | os.PathLike, write: Callable[[BinaryIO], object], *, overwrite: bool = False) -> Path:
    """Write ``dest`` through ``write(fh)`` into a temp file, fsync, then rename into place.

    Any failure (including a cancel or a full disk) removes the temp file and
    leaves ``dest`` as it was. OSErrors become InputError with one line.
    """
    dest = Path(dest)
    folder = dest.parent
    if not folder.is_dir():
        raise InputError(f"folder {folder} does not exist; create it first or choose another output path")
    if dest.is_dir():
        raise InputError(f"{dest} is a folder; give a file name")
    if dest.exists() and not overwrite:
        raise InputError(f"{dest} already exists; choose another name or pass --overwrite")
    tmp = temp_path(dest)
    try:
        # O_EXCL: never follow or reuse a file someone planted under our temp name.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as exc:
        raise InputError(f"cannot write in folder {folder}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        return publish(tmp, dest, overwrite=overwrite)
    except OSError as exc:
        _unlink(tmp)
        raise InputError(f"cannot write {dest}: {exc.strerror or exc}") from None
    except BaseException:
        _unlink(tmp)
        raise


def atomic_write_bytes(dest: str | os.PathLike, data: bytes, *, overwrite: bool = False) -> Path:
    """``atomic_write`` of bytes already in memory (no closure over a caller's loop variable)."""
    return atomic_write(dest, lambda fh: fh.write(data), overwrite=overwrite)
