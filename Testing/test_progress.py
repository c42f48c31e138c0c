"""Progress: the event sink (JSON lines on stdout), the terminal (logs and a bar on stderr), the cancel token."""

from __future__ import annotations

import io
import json
import os
import signal

import numpy as np
import pytest

from HFSAMCore.errors import Cancelled
from HFSAMCore.runtime.cancel import CancelToken
from HFSAMCore.runtime.events import EventSink
from HFSAMCore.runtime.progress import Progress


def test_json_mode_keeps_stdout_for_events_and_stderr_for_people():
    out, err = io.StringIO(), io.StringIO()
    p = Progress("json", out=out, err=err)
    p.progress("segment", 0, 4)
    p.metric(step=3, loss=np.float32(0.25), dice=float("nan"))
    p.warn("a warning")
    p.log("a log line")
    p.result(output="seg.nrrd", classes=[{"value": np.int64(1)}])
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["progress", "metric", "warning", "result"]
    assert events[0] == {"event": "progress", "stage": "segment", "done": 0, "total": 4}  # no eta before a rate
    assert events[1] == {"event": "metric", "step": 3, "loss": 0.25, "dice": None}  # strict JSON: NaN is null
    assert events[3]["classes"] == [{"value": 1}]
    assert err.getvalue() == "warning: a warning\na log line\n"


def test_tty_mode_draws_a_bar_that_a_log_line_closes_and_writes_nothing_on_stdout():
    out, err = io.StringIO(), io.StringIO()
    p = Progress("tty", out=out, err=err)
    p.progress("finetune", 5, 10, loss=0.5)
    p.log("half way")
    p.progress("finetune", 10, 10)
    assert out.getvalue() == ""
    text = err.getvalue()
    assert text.startswith("\r  finetune [###############...............] 5/10")
    assert " loss=0.5" in text and "\nhalf way\n" in text
    assert text.endswith("10/10   \n")  # the bar is closed when the stage is done


def test_none_mode_is_silent_but_logs():
    out, err = io.StringIO(), io.StringIO()
    p = Progress("none", out=out, err=err)
    p.progress("segment", 1, 2)
    p.result(x=1)
    p.log("still said")
    assert out.getvalue() == "" and err.getvalue() == "still said\n"


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="progress mode must be one of"):
        Progress("loud")


def test_the_event_sink_writes_one_whole_line_per_event():
    out = io.StringIO()
    EventSink(out, enabled=True).emit("result", text="two\nlines")
    assert out.getvalue().count("\n") == 1 and json.loads(out.getvalue())["text"] == "two\nlines"
    EventSink(out, enabled=False).emit("result")
    assert out.getvalue().count("\n") == 1


def test_the_first_signal_asks_to_stop_the_second_stops_at_once():
    token = CancelToken()
    token.check()  # nothing asked yet
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        token.install_signal_handlers()
        os.kill(os.getpid(), signal.SIGTERM)
        assert token.cancelled
        with pytest.raises(Cancelled, match="cancelled; nothing was written"):
            token.check()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])
