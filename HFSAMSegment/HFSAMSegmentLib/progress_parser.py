"""One line of the engine's stdout -> one event dict, or None.

The engine (``python -m HFSAMCore ... --progress json``) writes one JSON object
per line on stdout (docs/design.md, "Progress protocol"). The panel reads those lines
while the child runs, so this parser sits between an untrusted byte stream and
the GUI: it must never raise, whatever arrives (a torch warning printed to
stdout, a truncated line, binary garbage, a JSON bomb). Anything that is not a
well-formed event is simply "not an event" (None) and is shown as a log line.

Returned events always have a string ``"event"`` and, per kind, fields with
checked types, so the GUI code can use them without further checks:

- progress: stage (str), done/total (int >= 0), fraction (0..1 or None), eta_s (float >= 0 or None)
- metric:   every finite number kept as float, the rest dropped; step (int) if present
- warning/log: message (str)
- error:    message (str), exit_code (int or None)
- result:   the object as sent (the caller knows the command it ran)
- anything else with an "event" string: passed through (forward compatible)
"""

from __future__ import annotations

import json
import math
from typing import Any

# Lines longer than this are logs or garbage, never events; refusing them early
# keeps a runaway child from making the GUI thread parse megabytes of JSON.
MAX_LINE = 1_000_000


def _number(value: Any) -> float | None:
    """A finite float from an int/float JSON value; None for anything else (bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except (OverflowError, ValueError):  # ints too large for a float
        return None
    return number if math.isfinite(number) else None


def _count(value: Any) -> int | None:
    number = _number(value)
    if number is None or number < 0:
        return None
    return int(number)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ("" if value is None else str(value))


def _progress(raw: dict) -> dict:
    done, total = _count(raw.get("done")), _count(raw.get("total"))
    fraction = None
    if done is not None and total:
        fraction = min(1.0, done / total)
    eta = _number(raw.get("eta_s"))
    event = {k: v for k, v in raw.items() if k not in ("done", "total", "eta_s", "stage")}
    event.update(
        event="progress",
        stage=_text(raw.get("stage")),
        done=done if done is not None else 0,
        total=total if total is not None else 0,
        fraction=fraction,
        eta_s=eta if eta is not None and eta >= 0 else None,
    )
    return event


def _metric(raw: dict) -> dict:
    event: dict[str, Any] = {"event": "metric"}
    for key, value in raw.items():
        if key == "event":
            continue
        number = _number(value)
        if number is not None:
            event[key] = number
    if "step" in event:
        event["step"] = int(event["step"])
    return event


def _error(raw: dict) -> dict:
    code = raw.get("exit_code")
    return {
        "event": "error",
        "message": _text(raw.get("message")) or "the engine reported an error without a message",
        "exit_code": code if isinstance(code, int) and not isinstance(code, bool) else None,
    }


def _parse(line: str | bytes | bytearray) -> dict | None:
    if isinstance(line, (bytes, bytearray)):
        line = bytes(line).decode("utf-8", errors="replace")
    if not isinstance(line, str):
        return None
    line = line.strip()
    if not line.startswith("{") or len(line) > MAX_LINE:
        return None
    raw = json.loads(line)
    if not isinstance(raw, dict):
        return None
    kind = raw.get("event")
    if not isinstance(kind, str) or not kind:
        return None
    if kind == "progress":
        return _progress(raw)
    if kind == "metric":
        return _metric(raw)
    if kind in ("warning", "log"):
        return {"event": kind, "message": _text(raw.get("message"))}
    if kind == "error":
        return _error(raw)
    return dict(raw)


def parse_line(line: str | bytes | bytearray) -> dict | None:
    """The event on this line, or None when the line is not an event. Never raises."""
    try:
        return _parse(line)
    except Exception:  # noqa: BLE001 - by contract: bad input is "not an event", never a crash
        # json.loads raises ValueError for bad JSON and RecursionError for deep
        # nesting; str() of odd values could raise anything. None of that may
        # reach the GUI thread.
        return None


def describe(event: dict | None) -> str:
    """A short status-bar text for an event ("segment 37/120, about 13 s left"). Never raises."""
    try:
        if not event:
            return ""
        kind = event.get("event")
        if kind == "progress":
            text = f"{event.get('stage') or 'working'} {event.get('done', 0)}/{event.get('total', 0)}"
            eta = event.get("eta_s")
            if isinstance(eta, (int, float)) and math.isfinite(eta):
                text += f", about {format_seconds(eta)} left"
            return text
        if kind == "metric":
            parts = [f"step {event['step']}"] if "step" in event else []
            parts += [f"{k} {v:.4g}" for k, v in event.items() if k not in ("event", "step")]
            return ", ".join(parts)
        if kind in ("warning", "error", "log"):
            return _text(event.get("message"))
        return _text(kind)
    except Exception:  # noqa: BLE001 - display text must never break the GUI
        return ""


def format_seconds(seconds: float) -> str:
    """12 -> '12 s', 75 -> '1 min 15 s', 3700 -> '1 h 2 min'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"
