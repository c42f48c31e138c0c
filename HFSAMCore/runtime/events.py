"""The machine-readable half of progress: one JSON event per line on stdout (``--progress json``).

The protocol is in docs/design.md ("Progress protocol"); the Slicer module reads it.
"""

from __future__ import annotations

import json
import math
from typing import IO, Any


def jsonable(value: Any) -> Any:
    """Make numpy/torch scalars and non-finite floats safe for strict JSON."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            pass
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


class EventSink:
    """Writes events as JSON lines to ``out`` when ``enabled``, else drops them."""

    def __init__(self, out: IO[str], enabled: bool):
        self.out, self.enabled = out, enabled

    def emit(self, event: str, **fields: Any) -> None:
        if self.enabled:
            record = {"event": event, **jsonable(fields)}
            self.out.write(json.dumps(record, allow_nan=False) + "\n")
            self.out.flush()  # one whole line at once: the parent reads line by line
