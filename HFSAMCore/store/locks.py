"""Locks on library entries and outputs: one writer at a time, stale locks of dead processes cleared."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from ..errors import InputError


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if os.name == "nt":
        # os.kill(pid, 0) would send CTRL_C_EVENT on Windows: ask the kernel instead.
        import ctypes

        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() == 5  # access denied: it exists
        try:
            code = ctypes.c_ulong()
            kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
            return code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _lock_is_stale(lock: Path) -> bool:
    """A lock is stale only when we can prove its writer is gone (same host, dead pid)."""
    try:
        fields = lock.read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return False
    if len(fields) < 2 or not fields[0].isdigit():
        return False  # being written right now, or not ours: leave it
    return fields[1] == socket.gethostname() and not _pid_alive(int(fields[0]))


# Locks this process holds: a command may claim an entry for its whole run (so that a
# second process fails at once, not after an hour of training) and then save it.
_HELD: set[Path] = set()


@contextlib.contextmanager
def entry_lock(folder: Path, name: str, *, what: str = "library entry", wait: float = 0.0) -> Iterator[Path]:
    """Hold ``folder/.<name>.lock`` while writing entry ``name`` (see the module docstring).

    Re-entrant within one process; ``what`` names the thing in the error message
    (the CLI also locks its output files this way: ``what="output"``). ``wait`` is how
    many seconds to wait for another live writer: 0 (fail at once) where the second
    writer would clobber the first; longer where both would write the same bytes (a
    bundled checkpoint or a sample file two runs fetch on first use), so that the
    second simply finds the first one's result.
    """
    import time

    lock = folder / f".{name}.lock"
    if lock in _HELD:
        yield lock
        return
    deadline = time.monotonic() + wait
    stale_cleared = False
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not stale_cleared and _lock_is_stale(lock):
                stale_cleared = True
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
                continue
            if time.monotonic() < deadline:
                time.sleep(0.2)
                stale_cleared = False  # a later lock is a new writer: judge it afresh
                continue
            raise InputError(
                f"{what} '{name}' is being written by another process; wait for it to finish "
                f"(if no HF-SAM is running, delete {lock})"
            ) from None
        except OSError as exc:
            where = "the model library " if what == "library entry" else ""
            raise InputError(f"cannot write in {where}{folder}: {exc.strerror or exc}") from None
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(f"{os.getpid()} {socket.gethostname()}\n")
        break
    _HELD.add(lock)
    try:
        yield lock
    finally:
        _HELD.discard(lock)
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
