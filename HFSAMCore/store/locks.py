"""Locks on library entries and outputs: one writer at a time, released by the OS when a writer dies.

``entry_lock`` holds ``folder/.<name>.lock`` with an OS file lock (``filelock``: flock on Unix,
LockFileEx on Windows), so a writer that crashes or is killed can never leave a lock behind that
blocks the next run, whatever its pid, user or host. The lock file itself is removed on release:
outputs and the library are left as the user expects them, with no hidden files beside them.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import InputError

# Locks this process holds: a command may claim an entry for its whole run (so that a second
# process fails at once, not after an hour of training) and then save it. OS locks are per open
# file, so a second acquire from this process would wait for itself: it re-enters instead.
_HELD: set[Path] = set()


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
    while True:
        locked: list[os.stat_result] = []

        def note(fd: int, locked: list[os.stat_result] = locked) -> None:
            locked.append(os.fstat(fd))

        timeout = max(0.0, deadline - time.monotonic())
        held = filelock.FileLock(os.fspath(lock), timeout=timeout, poll_interval=0.2, on_acquired=note)
        try:
            held.acquire()
        except filelock.Timeout:
            raise InputError(f"{what} '{name}' is being written by another process; wait for it to finish") from None
        except OSError as exc:
            where = "the model library " if what == "library entry" else ""
            raise InputError(f"cannot write in {where}{lock.parent}: {exc.strerror or exc}") from None
        if _names_locked_file(lock, locked):
            return held
        # The previous holder removed the file between our open and our lock: we hold a file that is
        # no longer at the path, and a third process may hold the one that is. Start again.
        held.release()


def _names_locked_file(lock: Path, locked: list[os.stat_result]) -> bool:
    if not locked:
        return True  # a lock backend that gives no descriptor (soft lock): it owns the path itself
    try:
        now = os.stat(lock)
    except FileNotFoundError:
        return False
    return os.path.samestat(now, locked[-1])


def _release(held, lock: Path) -> None:
    # Removed while still held, so that no other process can have locked this file under its name
    # in between; a waiter that opened it before the removal notices (_names_locked_file) and retries.
    # Windows cannot remove an open file; its lock backend removes the file on release.
    if os.name != "nt":
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
    held.release()
