"""Run the engine as a child process: progress events in, Cancel out.

Why a child process and not a thread (docs/design.md): the GUI stays responsive,
Cancel can kill the whole process tree, a CUDA out-of-memory or a crash cannot
take Slicer down, and GPU memory is returned after each run.

Threading model: two reader threads drain the child's stdout/stderr (a full pipe
would block the child) and a waiter thread waits for its exit; all three only
put messages on a queue. Callbacks (``on_event``, ``on_log``, ``on_finished``)
run only inside ``poll()``/``wait()``, i.e. in the caller's thread. The Slicer
widget calls ``poll()`` from a QTimer, so MRML and Qt are touched from the main
thread only, and this module needs no Qt (CI tests it without Slicer).

Cancel: the child is started in its own session / process group. ``cancel()``
sends SIGTERM to the group (the engine turns it into a clean ``Cancelled``, exit
130, after removing its temporary files), and SIGKILL to the group after a grace
period if anything is left. On Windows ``taskkill /T /F`` kills the tree at once.
Either way the engine writes outputs atomically, so no half-written file is left
under a final name.

Lifeline: the child's stdin is a pipe this runner holds open and never writes
to, so a child started through ``parent_watch.py`` sees end-of-file, and
stops, only when this process is gone (exit or crash). Children get no console
window on Windows (``child_process.popen_options``).
"""

from __future__ import annotations

import collections
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Callable

from .child_process import popen_options
from .progress_parser import parse_line

# Exit codes of the engine's command line (docs/design.md).
STATUS_BY_EXIT_CODE = {0: "done", 2: "bad_input", 130: "cancelled"}
STATUSES = ("done", "bad_input", "cancelled", "error")


def status_for_exit_code(exit_code: int | None, cancel_requested: bool = False) -> str:
    """0 done, 2 bad input, 130 cancelled, anything else error.

    After the user pressed Cancel, a child killed by a signal (negative code on
    POSIX, 1 from taskkill on Windows) is "cancelled" too; a child that finished
    (0) before the cancel arrived is still "done": its output is complete.
    """
    if exit_code == 0:
        return "done"
    if cancel_requested:
        return "cancelled"
    return STATUS_BY_EXIT_CODE.get(exit_code, "error")


@dataclass
class RunResult:
    """How a run ended."""

    status: str  # one of STATUSES
    exit_code: int | None
    result: dict | None = None  # the engine's {"event": "result", ...} if it sent one
    message: str = ""  # one line for the user when status != "done"
    stderr_tail: str = ""  # the last lines of stderr, for a "details" box
    events: list = field(default_factory=list)  # every event, in order (small: progress is per slice/step)

    @property
    def ok(self) -> bool:
        return self.status == "done"


class ProcessRunner:
    """Start ``argv``; parse progress JSON lines from stdout; keep stderr; cancel the tree."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        on_event: Callable[[dict], None] | None = None,
        on_log: Callable[[str], None] | None = None,
        on_finished: Callable[[RunResult], None] | None = None,
        stderr_lines: int = 200,
        cancel_grace_s: float = 10.0,
    ):
        self.argv = [str(a) for a in argv]
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.on_event = on_event
        self.on_log = on_log
        self.on_finished = on_finished
        self.cancel_grace_s = cancel_grace_s
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=stderr_lines)
        self._queue: queue.Queue = queue.Queue()
        self._proc: subprocess.Popen | None = None
        self._started = False
        self._cancel_requested = threading.Event()
        self._exited = threading.Event()
        self._result: RunResult | None = None
        self._events: list[dict] = []
        self._last_result_event: dict | None = None
        self._last_error_event: dict | None = None

    # -- state ----------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self._started

    @property
    def finished(self) -> bool:
        """True once on_finished has been delivered (by poll() or wait())."""
        return self._result is not None

    @property
    def result(self) -> RunResult | None:
        return self._result

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    # -- start ----------------------------------------------------------------
    def start(self) -> None:
        if self.started:
            raise RuntimeError("this runner was already started; make a new one for a new run")
        self._started = True
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")  # lines must arrive while the run goes on
        env.setdefault("PYTHONIOENCODING", "utf-8")
        try:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE,  # the lifeline (see the module docstring); never written to
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=self.cwd,
                **popen_options(own_group=True),  # own process group: cancel reaches grandchildren too
            )
        except OSError as exc:
            # Same path as any other failure, so the GUI has one place to handle it.
            self._queue.put(("finished", RunResult("error", None, message=f"could not start {self.argv[0]}: {exc}")))
            self._exited.set()
            return
        out = threading.Thread(target=self._read_stdout, name="hfsam-stdout", daemon=True)
        err = threading.Thread(target=self._read_stderr, name="hfsam-stderr", daemon=True)
        out.start()
        err.start()
        threading.Thread(target=self._wait_child, args=(out, err), name="hfsam-wait", daemon=True).start()

    def _read_stdout(self) -> None:
        assert self._proc and self._proc.stdout
        for raw in iter(self._proc.stdout.readline, b""):
            event = parse_line(raw)
            if event is not None:
                self._queue.put(("event", event))
            else:
                text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                if text.strip():
                    self._queue.put(("log", text))
        self._proc.stdout.close()

    def _read_stderr(self) -> None:
        assert self._proc and self._proc.stderr
        for raw in iter(self._proc.stderr.readline, b""):
            # A terminal progress bar rewrites one line with \r; keep its last state.
            text = raw.decode("utf-8", errors="replace").rstrip("\r\n").split("\r")[-1]
            if text.strip():
                self._stderr_tail.append(text)
                self._queue.put(("log", text))
        self._proc.stderr.close()

    def _wait_child(self, out: threading.Thread, err: threading.Thread) -> None:
        assert self._proc
        code = self._proc.wait()
        self._exited.set()
        self._close_lifeline()
        if self._cancel_requested.is_set():
            self._kill_tree(force=True)  # helpers the engine started may outlive it
        # A leftover grandchild holding the pipes open must not keep the run "running".
        out.join(timeout=5)
        err.join(timeout=5)
        if out.is_alive() or err.is_alive():
            self._kill_tree(force=True)
            out.join()
            err.join()
        self._queue.put(("exit", code))

    def _close_lifeline(self) -> None:
        stdin = self._proc.stdin if self._proc else None
        if stdin is not None:
            try:
                stdin.close()
            except OSError:
                pass

    # -- cancel ---------------------------------------------------------------
    def cancel(self) -> None:
        """Stop the run and everything it started. Safe to call at any time, more than once."""
        if self._proc is None or self._exited.is_set():
            self._cancel_requested.set()
            return
        first = not self._cancel_requested.is_set()
        self._cancel_requested.set()
        if sys.platform == "win32" or not first:
            self._kill_tree(force=True)
            return
        self._kill_tree(force=False)
        timer = threading.Timer(self.cancel_grace_s, self._kill_tree, kwargs={"force": True})
        timer.daemon = True
        timer.start()

    def _kill_tree(self, force: bool) -> None:
        proc = self._proc
        if proc is None:
            return
        if sys.platform == "win32":
            if proc.poll() is None:
                subprocess.run(
                    ["taskkill", "/PID", str(proc.pid), "/T", "/F"],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    check=False,
                    **popen_options(),
                )
            return
        try:
            # pid == process group id because of start_new_session=True.
            os.killpg(proc.pid, signal.SIGKILL if force else signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass  # the whole group is already gone

    def stop(self, grace_s: float = 5.0) -> None:
        """Cancel and wait (at most ``grace_s``) until the child is gone, killing its tree if it lingers.

        For shutdown (Slicer exits, the scene closes): nothing is delivered, no callback runs.
        """
        self.cancel()
        if self._proc is None or self._exited.wait(grace_s):
            return
        self._kill_tree(force=True)
        self._exited.wait(grace_s)

    # -- delivery (caller's thread) -------------------------------------------
    def poll(self) -> bool:
        """Deliver what arrived so far; True while the run is not finished."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return not self.finished
            self._dispatch(item)

    def wait(self, timeout: float | None = None) -> RunResult:
        """Block until the run ends, delivering callbacks on the way; TimeoutError after ``timeout`` s."""
        if not self.started:
            raise RuntimeError("start() the runner before waiting for it")
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"{self.argv[0]} still running after {timeout} s")
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            self._dispatch(item)
        assert self._result is not None
        return self._result

    def _dispatch(self, item: tuple) -> None:
        kind, payload = item
        if kind == "event":
            self._events.append(payload)
            if payload["event"] == "result":
                self._last_result_event = payload
            elif payload["event"] == "error":
                self._last_error_event = payload
            if self.on_event:
                self.on_event(payload)
        elif kind == "log":
            if self.on_log:
                self.on_log(payload)
        elif kind == "exit":
            self._finish(self._make_result(payload))
        elif kind == "finished":
            self._finish(payload)

    def _finish(self, result: RunResult) -> None:
        self._result = result
        if self.on_finished:
            self.on_finished(result)

    def _make_result(self, exit_code: int) -> RunResult:
        status = status_for_exit_code(exit_code, self._cancel_requested.is_set())
        tail = "\n".join(self._stderr_tail)
        message = ""
        if status == "cancelled":
            message = "cancelled; nothing was written"
        elif status != "done":
            if self._last_error_event:
                message = self._last_error_event["message"]
            else:
                lines = [line.strip() for line in self._stderr_tail if line.strip()]
                message = lines[-1] if lines else f"the engine stopped with exit code {exit_code}"
        return RunResult(
            status=status,
            exit_code=exit_code,
            result=self._last_result_event if status == "done" else None,
            message=message,
            stderr_tail=tail,
            events=list(self._events),
        )
