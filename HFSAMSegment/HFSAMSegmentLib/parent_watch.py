"""Run a Python module as Slicer's child, and stop it when Slicer is gone.

    PythonSlicer parent_watch.py [--remove DIR] -m HFSAMCore segment ...

The module starts the engine through this script (``Engine.argv``). The parent
keeps the child's stdin open as a lifeline and never writes to it; the read
end sees end-of-file only when every write end is closed, i.e. when Slicer has
exited or crashed (the operating system closes a dead process's handles; this
works the same on Windows, macOS and Linux). Then this script

1. interrupts the engine's main thread: the engine's SIGINT handler turns that
   into its ordinary cancel (temporary files removed, nothing half-written,
   exit 130);
2. removes DIR, the job's private folder with the copy of the volume, which
   the dead parent can no longer remove;
3. exits hard if the engine has not stopped within GRACE_S seconds.

Everything else is the engine's business: its output, exit code and signals
are untouched. Standard library only, and runnable on Slicer 5.8's Python 3.9:
it is executed as a file, outside the HFSAMSegmentLib package.
"""

import _thread
import os
import runpy
import shutil
import sys
import threading

GRACE_S = 20.0
USAGE = "usage: parent_watch.py [--remove DIR] -m MODULE [ARGS...]"


def _watch(orphaned: threading.Event, finished: threading.Event, remove) -> None:
    # os.read on the file descriptor, not sys.stdin: a daemon thread blocked inside a buffered reader holds
    # its lock, and Python aborts at exit when it cannot take that lock ("could not acquire lock for <stdin>").
    try:
        while os.read(0, 4096):
            pass  # nobody writes; data would only mean a confused parent
    except OSError:
        pass  # stdin closed or invalid: the lifeline is gone either way
    orphaned.set()
    if finished.is_set():
        return  # the engine is done; the end of its run is not a cancel
    _thread.interrupt_main()
    timer = threading.Timer(GRACE_S, _hard_exit, args=(remove,))
    timer.daemon = True
    timer.start()


def _hard_exit(remove) -> None:
    if remove:
        shutil.rmtree(remove, ignore_errors=True)
    os._exit(130)


def main(argv) -> int:
    remove = None
    if argv[:1] == ["--remove"] and len(argv) >= 2:
        remove, argv = argv[1], argv[2:]
    if len(argv) < 2 or argv[0] != "-m":
        print(USAGE, file=sys.stderr)
        return 2
    module, args = argv[1], argv[2:]
    orphaned, finished = threading.Event(), threading.Event()
    threading.Thread(target=_watch, args=(orphaned, finished, remove), name="parent-watch", daemon=True).start()
    # Neither this file's folder (HFSAMSegmentLib's module names must not shadow anything the engine imports)
    # nor, unlike `python -m`, the working folder heads sys.path: the engine comes from PYTHONPATH.
    del sys.path[0]
    sys.argv = [module, *args]
    code = 1  # anything but SystemExit/KeyboardInterrupt propagating is a failure
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = 0 if exc.code is None else exc.code
    except KeyboardInterrupt:
        code = 130
    finally:
        finished.set()
        # A dead parent can also show first as a broken stdout pipe (the engine fails writing progress, exit 1):
        # after such a failure, give the watcher a moment to see the end-of-file too.
        if remove and (orphaned.is_set() or (code not in (0, 2, 130) and orphaned.wait(2.0))):
            shutil.rmtree(remove, ignore_errors=True)
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
