"""When Slicer goes away in the middle of a run: real parent processes that exit or are killed.

- Slicer crashes (SIGKILL) mid-run: the real engine notices through parent_watch.py (its stdin
  lifeline ends), stops, and removes the job's temporary folder itself.
- Slicer exits mid-run: jobs.stop_all() (atexit; also on aboutToQuit) stops the child and
  removes the folder before the interpreter ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from process_helpers import alive

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "HFSAMSegment"

pytest.importorskip("slicer")
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="kills processes with POSIX signals")

PARENT = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, sys.argv[1])
    from HFSAMSegmentLib import selftest
    from HFSAMSegmentLib.engine_command import Engine
    from HFSAMSegmentLib.jobs import SegmentJob
    from HFSAMSegmentLib.library_bridge import TINY_TEST_ARGS

    engine_dir, temp_root, how = sys.argv[2], sys.argv[3], sys.argv[4]
    scene, keep = selftest.make_bare_scene()
    volume, _ = selftest.make_volume(scene, shape=(200, 40, 48))
    started = []
    job = SegmentJob(Engine(sys.executable, engine_dir), scene, volume, TINY_TEST_ARGS, device="cpu", batch_size=1,
                     temp_root=temp_root, on_event=lambda e: started.append(e) if e["event"] == "progress" else None)
    job.start()
    while not started:
        job.poll()
        time.sleep(0.05)
    print(json.dumps({"pid": job.runner.pid, "workdir": str(job.workdir)}), flush=True)
    if how == "exit":
        sys.exit(0)  # a normal exit in the middle of the run: atexit must clean up
    time.sleep(600)  # killed by the test meanwhile
    """
)

# A stand-in engine for the exit test (no torch start-up): progress lines, a temporary file in the
# job's folder, and the engine's cooperative SIGTERM/SIGINT cancel.
FAKE_ENGINE = textwrap.dedent(
    """
    import json, os, signal, sys, time
    out = sys.argv[sys.argv.index("-o") + 1]
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(130))
    with open(out + ".tmp", "wb") as fh:
        for i in range(100000):
            print(json.dumps({"event": "progress", "stage": "segment", "done": i, "total": 100000}), flush=True)
            fh.write(b"x")
            time.sleep(0.05)
    """
)


def _start_parent(engine_dir, temp_root, how):
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(MODULE_DIR), str(engine_dir), str(temp_root), how],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = parent.stdout.readline()
    assert line, parent.stderr.read()
    return parent, json.loads(line)


def _wait_gone(pid, seconds):
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not alive(pid)


def test_a_crashed_slicer_leaves_no_engine_running_and_no_files(tmp_path):
    parent, info = _start_parent(REPO, tmp_path, "crash")
    workdir = Path(info["workdir"])
    assert workdir.parent == tmp_path and (workdir / "image.nrrd").is_file() and alive(info["pid"])
    os.kill(parent.pid, signal.SIGKILL)  # Slicer crashes: no atexit, no cleanup of its own
    parent.wait(30)
    assert _wait_gone(info["pid"], 60), "the engine kept running after its parent died"
    deadline = time.monotonic() + 10
    while workdir.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not workdir.exists(), f"{workdir} (a full copy of the volume) was left behind"


def test_slicer_exiting_mid_run_stops_the_child_and_removes_its_folder(tmp_path):
    engine_dir = tmp_path / "fake engine"
    (engine_dir / "HFSAMCore").mkdir(parents=True)
    (engine_dir / "HFSAMCore" / "__init__.py").write_text("")
    (engine_dir / "HFSAMCore" / "__main__.py").write_text(FAKE_ENGINE)
    temp_root = tmp_path / "temp"
    temp_root.mkdir()
    parent, info = _start_parent(engine_dir, temp_root, "exit")
    assert parent.wait(60) == 0, parent.stderr.read()
    assert not alive(info["pid"]), "the child outlived Slicer's exit"
    assert list(temp_root.iterdir()) == [], "the job's folder outlived Slicer's exit"


def test_parent_watch_keeps_the_exit_code_and_refuses_a_bad_command_line(tmp_path):
    watch = MODULE_DIR / "HFSAMSegmentLib" / "parent_watch.py"
    bad = subprocess.run(
        [sys.executable, str(watch), "HFSAMCore"], stdin=subprocess.PIPE, capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.startswith("usage: parent_watch.py")
    module = tmp_path / "exits_with.py"
    module.write_text("import sys; sys.exit(int(sys.argv[1]))")
    for code in (0, 2, 130):
        child = subprocess.Popen(
            [sys.executable, str(watch), "-m", "exits_with", str(code)],
            stdin=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(tmp_path)},
        )
        assert child.wait(60) == code  # stdin (the lifeline) stays open, as the runner keeps it
        child.stdin.close()
    # The working folder is not on the engine's path (unlike `python -m`): a stray module there shadows nothing.
    hidden = subprocess.Popen(
        [sys.executable, str(watch), "-m", "exits_with", "0"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    assert hidden.wait(60) == 1 and "No module named exits_with" in hidden.stderr.read()
    hidden.stdin.close()
