"""The human-readable half of progress: log lines and a progress bar, both on stderr."""

from __future__ import annotations

from typing import IO, Any


class Terminal:
    """Log lines always; the bar only when ``bar`` (a terminal). A log line first closes an open bar."""

    def __init__(self, err: IO[str], bar: bool):
        self.err, self.show_bar = err, bar
        self._bar_open = False

    def line(self, message: str) -> None:
        self.finish_bar()
        self.err.write(message.rstrip("\n") + "\n")
        self.err.flush()

    def bar(self, stage: str, done: int, total: int, eta: float | None, extra: dict[str, Any]) -> None:
        if not self.show_bar:
            return
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
