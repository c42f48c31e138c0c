"""Locks on library entries and outputs: one writer at a time, released by the OS when a writer dies.

``entry_lock`` holds ``folder/.<name>.lock`` with an OS file lock (``filelock``: flock on Unix,
msvcrt locking on Windows), so a writer that crashes or is killed never leaves a lock behind that
blocks the next run, whatever its pid, user or host. The lock file itself is removed on release,
so outputs and the library are left as the user expects them, with no hidden files beside them.

Removing a lock file is only safe if every locker checks, once it holds the lock, that the file it
locked is still the one at the path (a waiter may have opened the file just before its holder
removed it). filelock does not check this on every version we support (Slicer 5.8 has Python 3.9,
whose last filelock is 3.x), so ``_acquire`` does: it compares the path's file before and after
taking the lock, and starts again when they differ.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import InputError

# Locks this process holds: a command may claim an entry for its whole run (so that a second
# process fails at once, not after an hour of training) and then save it. OS locks are per open
# file, so a second acquire from this process would wait for itself: it re-enters instead.
_HELD: set[Path] = set()
_MAX_TRIES = 50  # each try that finds the lock file replaced is a writer that just finished


@contextlib.contextmanager
def entry_lock(folder: Path, name: str, *, what: str = "library entry", wait: float = 0.0) -> Iterator[Path]:
    """Hold ``folder/.<name>.lock`` while writing entry ``name``.

    Re-entrant within one process; ``what`` names the thing in the error message (outputs are
    locked this way too: ``what="output"``). ``wait`` is how many seconds to wait for another
    writer: 0 (fail at once) where the second writer would clobber the first; longer where both
    would write the same bytes (a bundled checkpoint or a sample file two runs fetch on first
    use), so that the second simply finds the first one's result.
    """
    lock = folder / f".{name}.lock"
    if lock in _HELD:
        yield lock
        return
    held = _acquire(lock, name, what=what, wait=wait)
    _HELD.add(lock)
    try:
        yield lock
    finally:
        _HELD.discard(lock)
        _release(held, lock)


def _acquire(lock: Path, name: str, *, what: str, wait: float):
    import filelock

    deadline = time.monotonic() + wait
    busy = f"{what} '{name}' is being written by another process; wait for it to finish"
    for _ in range(_MAX_TRIES):
        before = _stat(lock)
        timeout = max(0.0, deadline - time.monotonic())
        held: filelock.BaseFileLock = _native_lock(filelock, lock, timeout)
        try:
            try:
                held.acquire(poll_interval=0.2)
            except (NotImplementedError, OSError) as exc:
                if isinstance(exc, OSError) and exc.errno != errno.ENOSYS:
                    raise
                # A file system without flock (some network and FUSE mounts): a lock file created
                # exclusively instead, which a killed writer leaves behind (the message says so). The
                # file the failed attempt created is ours to remove; one that was there is a holder's.
                if before is None:
                    with contextlib.suppress(FileNotFoundError):
                        lock.unlink()
                held = filelock.SoftFileLock(os.fspath(lock), timeout=timeout)
                held.acquire(poll_interval=0.2)
                return held  # a soft lock is the file's existence: nothing to compare
        except filelock.Timeout:
            soft = isinstance(held, filelock.SoftFileLock)
            raise InputError(busy + (f" (if no HF-SAM is running, delete {lock})" if soft else "")) from None
        except OSError as exc:
            where = "the model library " if what == "library entry" else ""
            raise InputError(f"cannot write in {where}{lock.parent}: {exc.strerror or exc}") from None
        after = _stat(lock)
        if before is not None and after is not None and os.path.samestat(before, after):
            return held
        # The file at the path changed while we took the lock (or we created it): what we hold may be
        # a file its holder has just removed. Let it go, without removing anything, and lock again.
        held.release()
    raise InputError(busy)


def _native_lock(filelock, lock: Path, timeout: float):
    try:  # filelock 4 would quietly fall back to a soft lock where flock is missing: we choose ourselves
        return filelock.FileLock(os.fspath(lock), timeout=timeout, fallback_to_soft=False)
    except TypeError:  # filelock 3 has no fallback: it raises NotImplementedError there
        return filelock.FileLock(os.fspath(lock), timeout=timeout)


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _release(held, lock: Path) -> None:
    # Removed while still held, so that no other process can have locked this file under its name in
    # between; a waiter that opened it before the removal sees the path change and locks again.
    # Windows cannot remove an open file; its lock backend removes the file on release itself.
    if os.name != "nt":
        import filelock

        if not isinstance(held, filelock.SoftFileLock):  # a soft lock removes its file on release
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
    held.release()
