"""The Slicer module's background machinery, without Slicer: progress parsing (fuzzed),
the process runner against real child processes, the engine's real command line through
the runner (progress, cancel), the model library bridge and the installer's plan.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "HFSAMSegment"))

from HFSAMSegmentLib import installer, progress_parser  # noqa: E402
from HFSAMSegmentLib.engine_command import Engine, find_engine_dir  # noqa: E402
from HFSAMSegmentLib.errors import UserInputError  # noqa: E402
from HFSAMSegmentLib.library_bridge import TINY_TEST_ARGS, LibraryBridge, model_choices  # noqa: E402
from HFSAMSegmentLib.process_runner import ProcessRunner, status_for_exit_code  # noqa: E402

# -- progress_parser -----------------------------------------------------------------------


def test_parse_progress_line_normalises_fields():
    event = progress_parser.parse_line('{"event":"progress","stage":"segment","done":37,"total":120,"eta_s":12.5}\n')
    assert event == {"event": "progress", "stage": "segment", "done": 37, "total": 120,
                     "fraction": pytest.approx(37 / 120), "eta_s": 12.5}
    assert progress_parser.describe(event) == "segment 37/120, about 12 s left"


def test_parse_finetune_progress_keeps_loss_and_metric_numbers():
    event = progress_parser.parse_line(b'{"event":"progress","stage":"finetune","done":3,"total":300,"loss":0.41}')
    assert event["loss"] == 0.41 and event["fraction"] == pytest.approx(0.01) and event["eta_s"] is None
    metric = progress_parser.parse_line('{"event":"metric","step":40,"loss":0.31,"heldout_dice":0.7,"note":"x","nan":null}')
    assert metric == {"event": "metric", "step": 40, "loss": 0.31, "heldout_dice": 0.7}


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"event":"error","message":"no such file","exit_code":2}', {"event": "error", "message": "no such file", "exit_code": 2}),
        ('{"event":"error"}', {"event": "error", "message": "the engine reported an error without a message", "exit_code": None}),
        ('{"event":"warning","message":"random model"}', {"event": "warning", "message": "random model"}),
        ('{"event":"result","output":"/x/seg.nrrd","classes":[]}', {"event": "result", "output": "/x/seg.nrrd", "classes": []}),
    ],
)
def test_parse_other_events(line, expected):
    assert progress_parser.parse_line(line) == expected


@pytest.mark.parametrize(
    "line",
    ["", "   ", "Traceback (most recent call last):", "[1,2,3]", '"text"', "{not json", '{"no_event":1}',
     '{"event":5}', '{"event":""}',
     '{"event":"x","deep":' + "[" * 100000 + "]" * 100000 + "}",  # RecursionError inside json
     '{"event":"progress","done":' + "9" * 5000 + "}",  # int beyond Python's conversion limit
     b"\xff\xfe{\x00garbage", None, 42],
)
def test_not_an_event_is_none(line):
    assert progress_parser.parse_line(line) is None


def test_progress_with_bad_numbers_is_clamped():
    event = progress_parser.parse_line('{"event":"progress","stage":3,"done":-4,"total":true,"eta_s":-1}')
    assert event["stage"] == "3" and event["done"] == 0 and event["total"] == 0
    assert event["fraction"] is None and event["eta_s"] is None
    over = progress_parser.parse_line('{"event":"progress","stage":"s","done":12,"total":10}')
    assert over["fraction"] == 1.0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
event_objects = st.dictionaries(
    st.sampled_from(["event", "stage", "done", "total", "eta_s", "loss", "step", "message", "exit_code"]) | st.text(max_size=6),
    json_values | st.sampled_from(["progress", "metric", "error", "warning", "result"]),
    max_size=7,
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(), st.binary(), event_objects.map(lambda d: json.dumps(d, allow_nan=True))))
def test_parser_never_raises(line):
    event = progress_parser.parse_line(line)
    assert event is None or (isinstance(event, dict) and isinstance(event["event"], str) and event["event"])
    if event and event["event"] == "progress":
        assert isinstance(event["done"], int) and isinstance(event["total"], int) and event["done"] >= 0
        assert event["fraction"] is None or 0.0 <= event["fraction"] <= 1.0
    assert isinstance(progress_parser.describe(event), str)


# -- ProcessRunner against real child processes --------------------------------------------------

CHILD = textwrap.dedent(
    """
    import json, os, signal, sys, tempfile, time
    mode, out = sys.argv[1], sys.argv[2]
    tmp = None

    def on_term(signum, frame):
        if mode == "stubborn":
            return                      # ignores SIGTERM: only SIGKILL stops it
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)              # like the engine: nothing half-written stays
        print(json.dumps({"event": "error", "message": "cancelled; nothing was written", "exit_code": 130}), flush=True)
        sys.exit(130)

    signal.signal(signal.SIGTERM, on_term)
    if mode == "stubborn":
        import subprocess
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        print(json.dumps({"event": "log", "message": f"grandchild {grandchild.pid}"}), flush=True)
    if mode == "bad":
        print(json.dumps({"event": "error", "message": "input.nrrd does not exist; check the path", "exit_code": 2}), flush=True)
        print("hfsam: error: input.nrrd does not exist; check the path", file=sys.stderr)
        sys.exit(2)
    if mode == "crash":
        raise RuntimeError("CUDA out of memory (simulated)")
    print("a log line that is not JSON", flush=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(out), suffix=".tmp")
    total = 5 if mode == "ok" else 400
    for i in range(total + 1):
        print(json.dumps({"event": "progress", "stage": "segment", "done": i, "total": total}), flush=True)
        print(f"working on {i}", file=sys.stderr, flush=True)
        os.write(fd, b"x" * 100)
        time.sleep(0.01 if mode == "ok" else 0.05)
    os.close(fd)
    os.replace(tmp, out)
    print(json.dumps({"event": "result", "output": out}), flush=True)
    """
)


@pytest.fixture()
def child(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    return lambda mode: [sys.executable, str(script), mode, str(out_dir / "result.bin")]


def test_runner_delivers_events_in_order_in_the_callers_thread(child, tmp_path):
    events, logs, finished, threads = [], [], [], set()

    def on_event(e):
        threads.add(threading.get_ident())
        events.append(e)

    runner = ProcessRunner(child("ok"), on_event=on_event, on_log=logs.append, on_finished=finished.append)
    runner.start()
    result = runner.wait(60)
    assert result.status == "done" and result.exit_code == 0 and result.ok
    assert [e["done"] for e in events if e["event"] == "progress"] == [0, 1, 2, 3, 4, 5]
    assert result.result == {"event": "result", "output": str(tmp_path / "out" / "result.bin")}
    assert (tmp_path / "out" / "result.bin").stat().st_size == 600
    assert "a log line that is not JSON" in logs and "working on 5" in logs
    assert finished == [result] and threads == {threading.get_ident()}
    assert "working on 5" in result.stderr_tail
    assert runner.poll() is False  # finished: nothing more to deliver


@pytest.mark.parametrize(
    "mode, status, code, message",
    [
        ("bad", "bad_input", 2, "input.nrrd does not exist; check the path"),
        ("crash", "error", 1, "RuntimeError: CUDA out of memory (simulated)"),
    ],
)
def test_runner_maps_exit_codes_and_keeps_the_message(child, mode, status, code, message):
    result = ProcessRunner(child(mode))
    result.start()
    outcome = result.wait(60)
    assert (outcome.status, outcome.exit_code, outcome.message) == (status, code, message)
    assert outcome.result is None


def test_exit_code_table():
    assert [status_for_exit_code(c) for c in (0, 1, 2, 130, -9, 3)] == ["done", "error", "bad_input", "cancelled", "error", "error"]
    assert status_for_exit_code(-15, cancel_requested=True) == "cancelled"
    assert status_for_exit_code(0, cancel_requested=True) == "done"  # finished before the cancel arrived


def test_cancel_leaves_no_output_and_no_temp_file(child, tmp_path):
    events = []
    runner = ProcessRunner(child("slow"), on_event=events.append)
    runner.start()
    deadline = time.monotonic() + 30
    while len([e for e in events if e["event"] == "progress"]) < 3 and time.monotonic() < deadline:
        runner.poll()  # the child is now mid-write into its temp file
        time.sleep(0.02)
    assert [f.suffix for f in (tmp_path / "out").iterdir()] == [".tmp"]
    runner.cancel()
    result = runner.wait(30)
    assert result.status == "cancelled" and result.exit_code == 130
    assert result.message == "cancelled; nothing was written"
    assert list((tmp_path / "out").iterdir()) == []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")  # a zombie is dead


@pytest.mark.skipif(sys.platform == "win32", reason="process groups are POSIX; Windows uses taskkill /T /F")
def test_cancel_kills_the_whole_tree_even_when_sigterm_is_ignored(child):
    logs = []
    runner = ProcessRunner(child("stubborn"), on_event=lambda e: logs.append(e.get("message", "")), cancel_grace_s=0.5)
    runner.start()
    deadline = time.monotonic() + 30
    while not any(m.startswith("grandchild") for m in logs) and time.monotonic() < deadline:
        runner.poll()
        time.sleep(0.02)
    grandchild = int(next(m for m in logs if m.startswith("grandchild")).split()[1])
    assert _alive(grandchild)
    runner.cancel()
    result = runner.wait(30)
    assert result.status == "cancelled" and result.exit_code == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild), "the grandchild survived the cancel"


def test_runner_reports_a_program_that_cannot_start(tmp_path):
    runner = ProcessRunner([str(tmp_path / "no-such-python"), "-c", "pass"])
    runner.start()
    result = runner.wait(10)
    assert result.status == "error" and result.exit_code is None
    assert result.message.startswith(f"could not start {tmp_path / 'no-such-python'}")


# -- the real engine through the runner ------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    if not (REPO / "HFSAMCore" / "cli.py").is_file():
        pytest.skip("the engine's command line (HFSAMCore/cli.py) is not in this tree")
    return Engine(sys.executable, find_engine_dir(), tmp_path_factory.mktemp("library"))


def test_engine_is_found_beside_the_module():
    assert find_engine_dir() == REPO
    env = Engine(sys.executable, REPO).env({"PYTHONPATH": "/elsewhere"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO), "/elsewhere"]
    assert env["PYTHONUNBUFFERED"] == "1"


def test_engine_segment_progress_and_result(engine, ct3mm, tmp_path):
    out = tmp_path / "seg.nrrd"
    argv = engine.segment(ct3mm / "image.nii.gz", out, TINY_TEST_ARGS + ("--classes", "synapse"), device="cpu", batch_size=8)
    events = []
    runner = ProcessRunner(argv, env=engine.env(), on_event=events.append)
    runner.start()
    result = runner.wait(300)
    assert result.ok, result.stderr_tail
    progress = [e for e in events if e["event"] == "progress" and e["stage"] == "segment"]
    assert progress[0]["done"] == 0 and progress[-1]["done"] == progress[-1]["total"] == 30
    assert len(progress) >= 3
    assert result.result["output"] == str(out) and Path(result.result["sidecar"]) == tmp_path / "seg.json"
    assert [c["name"] for c in result.result["classes"]][:2] == ["spleen", "right kidney"]
    assert out.is_file() and (tmp_path / "seg.json").is_file()


def test_engine_cancel_leaves_no_output(engine, ct3mm, tmp_path):
    out = tmp_path / "seg.nrrd"
    argv = engine.segment(ct3mm / "image.nii.gz", out, TINY_TEST_ARGS + ("--classes", "synapse"), device="cpu", batch_size=1)
    cancelled = []

    def on_event(event):
        # Cancel as soon as slices start to flow: the engine is mid-run.
        if event["event"] == "progress" and event["done"] >= 1 and not cancelled:
            cancelled.append(event["done"])
            runner.cancel()

    runner = ProcessRunner(argv, env=engine.env(), on_event=on_event)
    runner.start()
    result = runner.wait(300)
    assert cancelled and result.status == "cancelled", (result.status, result.message, result.stderr_tail)
    assert list(tmp_path.iterdir()) == [], "a cancelled run left files behind"


def test_engine_bad_input_is_status_bad_input(engine, tmp_path):
    argv = engine.segment(tmp_path / "missing.nrrd", tmp_path / "seg.nrrd", TINY_TEST_ARGS, device="cpu")
    runner = ProcessRunner(argv, env=engine.env())
    runner.start()
    result = runner.wait(120)
    assert result.status == "bad_input" and result.exit_code == 2
    assert "missing.nrrd" in result.message and "\n" not in result.message
    assert list(tmp_path.iterdir()) == []


# -- fine-tune -> library -> segment, the panel's whole loop --------------------------------------


def test_finetune_store_export_import_remove_and_segment(engine, ct3mm, tmp_path):
    from HFSAMSegmentLib import mrml_adapter, selftest
    from HFSAMSegmentLib.jobs import FinetuneJob, SegmentJob

    scene, _keep = selftest.make_bare_scene()
    volume = mrml_adapter.import_volume(ct3mm / "image.nii.gz", scene, name="ct")
    # The reference labels stand in for the user's painting: liver and spleen on three slices.
    labels = mrml_adapter.import_segmentation(
        ct3mm / "labels_synapse8.nii.gz", scene, volume,
        sidecar={"classes": [{"value": 1, "name": "spleen"}, {"value": 5, "name": "liver"}]},
    )
    seg = labels.GetSegmentation()
    keep = [10, 14, 18]
    for name in ("liver", "spleen"):
        sid = seg.GetSegmentIdBySegmentName(name)
        mask = mrml_adapter.merged_labels(labels, [sid], volume)
        mask[[k for k in range(mask.shape[0]) if k not in keep]] = 0
        painted = selftest.paint_mask(labels, sid, volume, mask)
        assert painted > 0 and selftest.segment_voxel_count(labels, sid, volume) == painted
    ids = [seg.GetSegmentIdBySegmentName("liver"), seg.GetSegmentIdBySegmentName("spleen")]
    assert mrml_adapter.labeled_slices(labels, ids, volume).slices == keep

    events = []
    job = FinetuneJob(engine, volume, labels, ids, "liver_spleen_test", model_args=TINY_TEST_ARGS, steps=1,
                      device="cpu", seed=0, on_event=events.append)
    job.start()
    outcome = job.wait(300)
    assert outcome.ok, (outcome.message, outcome.run.stderr_tail)
    assert outcome.adapter_name == "liver_spleen_test" and outcome.slices == keep
    assert outcome.metrics["steps"] == 1 and outcome.metrics["final_loss"] > 0
    assert [e["done"] for e in events if e["event"] == "progress" and e["stage"] == "finetune"] == [1]
    assert not job.workdir.exists()

    bridge = LibraryBridge(engine)
    entries = bridge.list_adapters()
    assert [(e["name"], e["classes"], e["backbone"]) for e in entries] == [("liver_spleen_test", ["liver", "spleen"], "tiny")]
    exported = bridge.export_adapter("liver_spleen_test", tmp_path / "shared.safetensors")
    assert exported == tmp_path / "shared.safetensors" and exported.stat().st_size == entries[0]["size"]
    with pytest.raises(UserInputError, match="already"):
        bridge.import_adapter(exported, "liver_spleen_test")
    assert bridge.import_adapter(exported, "copy_of_it") == "copy_of_it"
    bridge.remove_adapter("copy_of_it")
    assert [e["name"] for e in bridge.list_adapters()] == ["liver_spleen_test"]
    assert bridge.library_path() == engine.library.resolve()
    with pytest.raises(UserInputError):
        bridge.remove_adapter("never_existed")

    choice = next(c for c in model_choices(entries) if c.key == "adapter:liver_spleen_test")
    assert choice.args == ("--adapter", "liver_spleen_test") and choice.classes == ("liver", "spleen")
    segment = SegmentJob(engine, scene, volume, choice.args, device="cpu", batch_size=8)
    segment.start()
    result = segment.wait(300)
    assert result.ok, (result.message, result.run.stderr_tail)
    names = [result.segmentation_node.GetSegmentation().GetNthSegment(i).GetName()
             for i in range(result.segmentation_node.GetSegmentation().GetNumberOfSegments())]
    assert names == ["liver", "spleen"]


def test_selftest_tiny_segment_run_passes_in_ci(engine):
    from HFSAMSegmentLib import selftest

    scene, _keep = selftest.make_bare_scene()
    result = selftest.tiny_segment_run(scene, engine)
    assert result["segmentation"].GetSegmentation().GetNumberOfSegments() >= 8


def test_model_choices_for_segment_and_finetune():
    adapters = [{"name": "liver5", "backbone": "vit_b", "classes": ["liver"]},
                {"name": "broken", "path": "/x", "error": "not a safetensors file"}]
    assert [(c.key, c.args) for c in model_choices(adapters)] == [("adapter:liver5", ("--adapter", "liver5"))]
    finetune = model_choices(adapters, for_finetune=True)
    assert [c.key for c in finetune] == ["base:vit_b", "adapter:liver5"]
    assert finetune[0].args == ("--backbone", "vit_b") and finetune[1].label.startswith("continue training liver5")
    developer = model_choices([], developer=True)
    assert [(c.key, c.args) for c in developer] == [("test:tiny", TINY_TEST_ARGS + ("--classes", "synapse"))]


# -- installer ---------------------------------------------------------------------------------


def test_nothing_is_missing_in_this_environment():
    assert installer.missing_requirements() == []
    assert installer.plan_install([]).empty


def test_missing_and_too_old_packages_give_the_exact_pip_command():
    missing = installer.missing_requirements(["numpy>=999", "hfsam-no-such-package>=1.0", "safetensors>=0.4"])
    assert [(m.name, m.installed is None) for m in missing] == [("numpy", False), ("hfsam-no-such-package", True)]
    plan = installer.plan_install(missing, python="/opt/slicer/bin/PythonSlicer")
    assert plan.pip_command == ["/opt/slicer/bin/PythonSlicer", "-m", "pip", "install", "numpy>=999", "hfsam-no-such-package>=1.0"]
    text = plan.describe()
    assert "numpy>=999 (installed: " in text and "hfsam-no-such-package>=1.0 (not installed)" in text
    assert "/opt/slicer/bin/PythonSlicer -m pip install 'numpy>=999' 'hfsam-no-such-package>=1.0'" in text


def test_torch_goes_through_pytorch_utils_when_present():
    missing = [installer.Missing("torch>=2.1", "torch", None), installer.Missing("torchvision>=0.16", "torchvision", None),
               installer.Missing("safetensors>=0.4", "safetensors", None)]
    with_utils = installer.plan_install(missing, python="py", torch_utils_available=True)
    assert with_utils.torch_via_pytorch_utils and with_utils.torch_requirement == "torch>=2.1"
    assert with_utils.pip_command == ["py", "-m", "pip", "install", "safetensors>=0.4"]
    assert "PyTorch extension" in with_utils.describe()
    without = installer.plan_install(missing, python="py", torch_utils_available=False)
    assert not without.torch_via_pytorch_utils
    assert without.pip_command == ["py", "-m", "pip", "install", "torch>=2.1", "torchvision>=0.16", "safetensors>=0.4"]


def test_run_install_runs_the_command_only_when_called_and_reports_failure():
    lines = []
    ok = installer.InstallPlan([installer.Missing("x", "x", None)], [sys.executable, "-c", "print('installed x')"])
    installer.run_install(ok, log=lines.append)
    assert any("installed x" in line for line in lines)
    bad = installer.InstallPlan([installer.Missing("x", "x", None)],
                                [sys.executable, "-c", "import sys; print('no matching distribution', file=sys.stderr); sys.exit(1)"])
    with pytest.raises(RuntimeError, match="exit code 1.*no matching distribution"):
        installer.run_install(bad, log=lines.append)


# -- base checkpoint: download with progress, import, SHA256 refusal ------------------------------


@pytest.fixture()
def checkpoint_server(tmp_path, monkeypatch):
    """A real HTTP server on loopback serving a 1.5 MB 'checkpoint', and a catalog that points at it."""
    import functools
    import hashlib
    import http.server

    served = tmp_path / "served"
    served.mkdir()
    payload = os.urandom(1_500_000)
    (served / "sam_test.pth").write_bytes(payload)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def catalog(sha256):
        path = tmp_path / f"catalog_{sha256[:8]}.json"
        entry = {"filename": "sam_vit_b_test.pth", "url": f"http://127.0.0.1:{server.server_port}/sam_test.pth",
                 "sha256": sha256, "size": len(payload)}
        path.write_text(json.dumps({"format_version": 1, "checkpoints": {"vit_b": entry}}))
        monkeypatch.setenv("HFSAM_CATALOG", str(path))
        return path

    yield {"payload": payload, "sha256": hashlib.sha256(payload).hexdigest(), "catalog": catalog, "file": served / "sam_test.pth"}
    server.shutdown()


def test_checkpoint_download_through_the_bridge(engine, checkpoint_server, tmp_path):
    bridge = LibraryBridge(Engine(engine.python, engine.engine_dir, tmp_path / "library"))
    checkpoint_server["catalog"]("0" * 64)  # a catalog whose SHA256 does not match the served bytes
    runner = bridge.download_checkpoint("vit_b")
    refused = runner.wait(120)
    assert refused.status == "bad_input" and "SHA256" in refused.message.upper(), refused.message
    assert bridge.checkpoint_status("vit_b") is None

    checkpoint_server["catalog"](checkpoint_server["sha256"])
    events = []
    runner = bridge.download_checkpoint("vit_b", on_event=events.append)
    done = runner.wait(120)
    assert done.ok, (done.message, done.stderr_tail)
    downloads = [e for e in events if e["event"] == "progress" and e["stage"] == "download"]
    assert downloads and downloads[-1]["fraction"] == 1.0
    path = bridge.checkpoint_status("vit_b")
    assert path == (tmp_path / "library").resolve() / "checkpoints" / "sam_vit_b_test.pth"
    assert path.read_bytes() == checkpoint_server["payload"]


def test_checkpoint_import_through_the_bridge(engine, checkpoint_server, tmp_path):
    bridge = LibraryBridge(Engine(engine.python, engine.engine_dir, tmp_path / "library"))
    checkpoint_server["catalog"](checkpoint_server["sha256"])
    with pytest.raises(UserInputError, match="does not exist"):
        bridge.import_checkpoint(tmp_path / "nowhere.pth")
    result = bridge.import_checkpoint(checkpoint_server["file"]).wait(120)
    assert result.ok, (result.message, result.stderr_tail)
    assert bridge.checkpoint_status("vit_b").read_bytes() == checkpoint_server["payload"]
