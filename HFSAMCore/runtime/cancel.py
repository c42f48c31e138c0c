"""Cooperative cancellation: SIGINT/SIGTERM set a flag, long loops check it between steps.

A cancelled run raises ``Cancelled`` at the next check; nothing is then written under a final
name (writers are atomic), so a cancelled run leaves no half-written file.
"""

from __future__ import annotations

import signal
import threading

from ..errors import Cancelled


class CancelToken:
    def __init__(self) -> None:
        self._set = threading.Event()

    def cancel(self) -> None:
        self._set.set()

    @property
    def cancelled(self) -> bool:
        return self._set.is_set()

    def check(self) -> None:
        if self._set.is_set():
            raise Cancelled("cancelled; nothing was written")

    def install_signal_handlers(self) -> None:
        """Turn SIGINT/SIGTERM into a cooperative cancel (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            if self._set.is_set():
                # A second signal means "now": stop at once. Writers are atomic, so
                # this still leaves no partial file under a final name.
                raise KeyboardInterrupt
            self._set.set()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
