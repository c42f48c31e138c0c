"""What a run reports and how it is stopped: one object handed down every workflow.

``Progress`` puts together the three parts a run talks through: the event sink (JSON lines on
stdout for a parent process such as the Slicer module, ``events.py``), the terminal (log lines and
a bar on stderr, ``terminal.py``), and the cancel token (``cancel.py``). Human-readable logs always
go to stderr, so stdout stays machine-readable in JSON mode.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

from ..errors import one_line
from ..model.registry import PROGRESS_MODES
from .cancel import CancelToken
from .events import EventSink
from .terminal import Terminal

MODES = PROGRESS_MODES


class Progress:
    """Reports events as JSON lines, a terminal bar, or not at all; carries the run's cancel token."""

    def __init__(self, mode: str = "auto", out: IO[str] | None = None, err: IO[str] | None = None):
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {MODES}, not {mode!r}")
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        if mode == "auto":
            mode = "tty" if getattr(self.err, "isatty", lambda: False)() else "none"
        self.mode = mode
        self.events = EventSink(self.out, enabled=mode == "json")
        self.terminal = Terminal(self.err, bar=mode == "tty")
        self.cancel_token = CancelToken()
        self._stage_start: dict[str, float] = {}

    # -- events ---------------------------------------------------------------
    def emit(self, event: str, **fields: Any) -> None:
        """Write one event; in JSON mode a single line on stdout, flushed at once."""
        self.events.emit(event, **fields)

    def progress(self, stage: str, done: int, total: int, **extra: Any) -> None:
        now = time.monotonic()
        start = self._stage_start.setdefault(stage, now)
        eta = (now - start) / done * (total - done) if 0 < done < total else None
        fields = {"stage": stage, "done": done, "total": total, **extra}
        if eta is not None:
            fields["eta_s"] = round(eta, 1)
        self.events.emit("progress", **fields)
        self.terminal.bar(stage, done, total, eta, extra)
        if done >= total:
            self._stage_start.pop(stage, None)

    def metric(self, **values: Any) -> None:
        self.emit("metric", **values)

    def result(self, **values: Any) -> None:
        self.terminal.finish_bar()
        self.emit("result", **values)

    def error(self, message: str, exit_code: int = 1) -> None:
        self.terminal.finish_bar()
        self.emit("error", message=message, exit_code=exit_code)

    def log(self, message: str) -> None:
        """A human-readable line on stderr (never on stdout)."""
        self.terminal.line(message)

    def warn(self, message: str) -> None:
        message = one_line(message)  # a warning may quote a file: one line here and in the Slicer panel's log
        self.log(f"warning: {message}")
        self.emit("warning", message=message)

    def finish_bar(self) -> None:
        self.terminal.finish_bar()

    # -- cancellation ---------------------------------------------------------
    def cancel(self) -> None:
        self.cancel_token.cancel()

    @property
    def cancelled(self) -> bool:
        return self.cancel_token.cancelled

    def check_cancelled(self) -> None:
        self.cancel_token.check()

    def install_signal_handlers(self) -> None:
        """Turn SIGINT/SIGTERM into a cooperative cancel (main thread only)."""
        self.cancel_token.install_signal_handlers()
