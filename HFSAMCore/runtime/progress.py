"""Progress events and cancellation.

Two audiences read progress: a person at a terminal (a bar on stderr) and a parent
process such as the Slicer module (one JSON object per line on stdout, see
docs/design.md, "Progress protocol"). Human-readable logs always go to stderr so that
stdout stays machine-readable in JSON mode.

Cancellation is cooperative: SIGINT/SIGTERM set a flag, and long loops call
``Progress.check_cancelled()`` between steps, which raises ``Cancelled``. Nothing
is then written under a final name (writers are atomic), so a cancelled run
leaves no half-written file.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from typing import IO, Any

from ..errors import Cancelled
from ..model.registry import PROGRESS_MODES

MODES = PROGRESS_MODES


def _jsonable(value: Any) -> Any:
    """Make numpy/torch scalars and non-finite floats safe for strict JSON."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            pass
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class Progress:
    """Reports events as JSON lines, a terminal bar, or not at all."""

    def __init__(self, mode: str = "auto", out: IO[str] | None = None, err: IO[str] | None = None):
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {MODES}, not {mode!r}")
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        if mode == "auto":
            mode = "tty" if getattr(self.err, "isatty", lambda: False)() else "none"
        self.mode = mode
        self._cancel = threading.Event()
        self._stage_start: dict[str, float] = {}
        self._bar_open = False

    # -- events ---------------------------------------------------------------
    def emit(self, event: str, **fields: Any) -> None:
        """Write one event; in JSON mode a single line on stdout, flushed at once."""
        if self.mode == "json":
            record = {"event": event, **_jsonable(fields)}
            self.out.write(json.dumps(record, allow_nan=False) + "\n")
            self.out.flush()

    def progress(self, stage: str, done: int, total: int, **extra: Any) -> None:
        now = time.monotonic()
        start = self._stage_start.setdefault(stage, now)
        eta = None
        if 0 < done < total:
            eta = (now - start) / done * (total - done)
        if self.mode == "json":
            fields = {"stage": stage, "done": done, "total": total, **extra}
            if eta is not None:
                fields["eta_s"] = round(eta, 1)
            self.emit("progress", **fields)
        elif self.mode == "tty":
            self._bar(stage, done, total, eta, extra)
        if done >= total:
            self._stage_start.pop(stage, None)

    def metric(self, **values: Any) -> None:
        self.emit("metric", **values)

    def result(self, **values: Any) -> None:
        self.finish_bar()
        self.emit("result", **values)

    def error(self, message: str, exit_code: int = 1) -> None:
        self.finish_bar()
        self.emit("error", message=message, exit_code=exit_code)

    def log(self, message: str) -> None:
        """A human-readable line on stderr (never on stdout)."""
        self.finish_bar()
        self.err.write(message.rstrip("\n") + "\n")
        self.err.flush()

    def warn(self, message: str) -> None:
        self.log(f"warning: {message}")
        self.emit("warning", message=message)

    # -- terminal bar ---------------------------------------------------------
    def _bar(self, stage: str, done: int, total: int, eta: float | None, extra: dict) -> None:
        width = 30
        frac = done / total if total else 1.0
        filled = int(round(frac * width))
        tail = "".join(f" {k}={v:.4g}" if isinstance(v, float) else f" {k}={v}" for k, v in extra.items())
        eta_text = f" eta {eta:4.0f}s" if eta is not None else ""
        self.err.write(f"\r{stage:>10} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}{eta_text}{tail}   ")
        self.err.flush()
        self._bar_open = True
        if done >= total:
            self.finish_bar()

    def finish_bar(self) -> None:
        if self._bar_open:
            self.err.write("\n")
            self.err.flush()
            self._bar_open = False

    # -- cancellation ---------------------------------------------------------
    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise Cancelled("cancelled; nothing was written")

    def install_signal_handlers(self) -> None:
        """Turn SIGINT/SIGTERM into a cooperative cancel (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):  # noqa: ARG001 - signal API
            if self._cancel.is_set():
                # A second signal means "now": stop at once. Writers are atomic, so
                # this still leaves no partial file under a final name.
                raise KeyboardInterrupt
            self._cancel.set()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
