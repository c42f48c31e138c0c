"""The module panel's behaviour: what every button does, what the panel shows, and when.

``HFSAMSegmentWidget`` (HFSAMSegment.py) only loads the .ui and hands it to
``Panel`` together with three small things, so that CI drives this same class
with the real .ui (loaded by PySide6) and real MRML (slicer-core):

- ``ui``: the named widgets of Resources/UI/HFSAMSegment.ui;
- ``logic``: a ``ModuleLogic`` with ``getParameterNode()`` (Slicer's
  parameterNodeWrapper; the fields are in ``parameters.py``);
- ``host``: the Slicer application: dialogs, timers, settings, the temporary
  folder (``slicer_host.SlicerHost``).

Widgets are used only through calls that mean the same in Slicer's PythonQt
and in PySide6 (setters, ``findData``/``itemData``, ``currentRow()``); signals
are connected through ``host.connect``. Nothing here blocks the GUI thread on
an engine process: jobs and library commands run as child processes whose
results arrive through one poll timer.
"""

from __future__ import annotations

import contextlib
import logging
import traceback

import vtk
from slicer.util import VTKObservationMixin

from . import backbones, library_bridge
from .errors import UserInputError
from .library_section import ADAPTER_FILTER, LibrarySection
from .progress_parser import describe

# Painting changes the segmentation's source labelmap; adding/removing segments changes the list.
PAINT_EVENTS = ("SourceRepresentationModified", "SegmentAdded", "SegmentRemoved")


class Panel(VTKObservationMixin):
    def __init__(self, ui, logic, host, scene) -> None:
        VTKObservationMixin.__init__(self)
        self.ui = ui
        self.logic = logic
        self.host = host
        self.scene = scene
        self.p = None  # the parameter node wrapper
        self._gui_tag = None
        self._shown = False
        self._job = None  # the running SegmentJob / FinetuneJob, if any
        self._job_kind = None
        self._tasks = []  # running library commands and checkpoint downloads
        self._installing = False
        self._dependencies_ok = False
        self.library = LibrarySection(self)
        self._choices = {}  # model selector key -> ModelChoice (segment)
        self._base_choices = {}  # "start from" selector key -> ModelChoice (fine-tune)
        self._file_choices = []  # adapters picked as files this session
        self._observed_segmentation = None
        self._labeled = None  # TrainingLabels of the current training selection
        self._counted_selection = None  # the selection _labeled was counted for
        self._last_dice = None  # latest held-out Dice of the running fine-tune

    # -- life cycle (called by HFSAMSegmentWidget) ------------------------------------------------
    def setup(self) -> None:
        ui, connect = self.ui, self.host.connect
        self.addObserver(self.scene, self.scene.StartCloseEvent, self.on_scene_start_close)
        self.addObserver(self.scene, self.scene.EndCloseEvent, self.on_scene_end_close)
        connect(ui.segmentButton, "clicked(bool)", lambda *_: self.on_segment_clicked())
        connect(ui.finetuneButton, "clicked(bool)", lambda *_: self.on_finetune_clicked())
        connect(ui.adapterFileButton, "clicked(bool)", lambda *_: self.on_adapter_file())
        connect(ui.modelSelector, "currentIndexChanged(int)", self.on_model_selected)
        connect(ui.baseModelSelector, "currentIndexChanged(int)", self.on_base_model_selected)
        connect(ui.trainingSegmentSelector, "currentNodeChanged(vtkMRMLNode*)", self.on_training_segmentation_changed)
        connect(ui.trainingSegmentSelector, "segmentSelectionChanged(QStringList)", self.on_training_segments_changed)
        self.library.connect()
        # Jobs and library commands report through queues; this timer delivers them in the GUI thread.
        self._poll_timer = self.host.timer(100, self.on_poll)
        # Painting fires many events; recount labeled slices once the user pauses.
        self._slices_timer = self.host.timer(500, self._recount_labeled_slices, single_shot=True)
        ui.progressBar.setValue(0)
        self._fill_model_selectors()
        self.library.refresh()
        self.initialize_parameter_node()

    def enter(self) -> None:
        self._shown = True
        self.initialize_parameter_node()

    def exit(self) -> None:
        """The user left the module: stop listening to the GUI and to painting (the Segment Editor is in use)."""
        self._shown = False
        self.set_parameter_node(None)
        self._observe_training_segmentation(None)
        self._slices_timer.stop()

    def cleanup(self) -> None:
        """Slicer closes (or the module is reloaded): stop everything we started, remove the temporary files."""
        for job in (self._job, *self._tasks):
            if job is not None:
                job.stop()
        self._job = self.library.download = None
        self.library.close_dialog()
        self._tasks = []
        self._poll_timer.stop()
        self._slices_timer.stop()
        self.set_parameter_node(None)
        self.removeObservers()

    # -- parameter node -------------------------------------------------------------------------------
    def initialize_parameter_node(self) -> None:
        self.set_parameter_node(self.logic.getParameterNode())
        if not self.p.inputVolume:
            volume = first_grey_level_volume(self.scene)
            if volume is not None:
                self.p.inputVolume = volume

    def set_parameter_node(self, parameter_node) -> None:
        if self.p is not None:
            if self._gui_tag is not None:
                self.p.disconnectGui(self._gui_tag)
            self._gui_tag = None
            self.removeObserver(self.p, vtk.vtkCommand.ModifiedEvent, self.update_gui)
        self.p = parameter_node
        if self.p is None:
            return
        # connectParametersToGui returns the tag on every Slicer (connectGui returns None on 5.8, so
        # disconnectGui would do nothing and each visit would stack one more connector).
        self._gui_tag = self.p.connectParametersToGui(parameter_widgets(self.ui))
        self.addObserver(self.p, vtk.vtkCommand.ModifiedEvent, self.update_gui)
        self._ensure_model_choices()
        self.update_gui()
        self.update_labeled_slices()

    # -- GUI state ------------------------------------------------------------------------------------
    def update_gui(self, caller=None, event=None) -> None:
        p = self.p
        if p is None:
            return
        self._select_key(self.ui.modelSelector, p.model)
        self._select_key(self.ui.baseModelSelector, p.baseModel)
        selector = self.ui.trainingSegmentSelector
        was_blocked = selector.blockSignals(True)
        selector.setCurrentNode(p.trainingSegmentation)
        selector.setSelectedSegmentIDs(list(p.trainingSegmentIDs))
        selector.blockSignals(was_blocked)
        self._observe_training_segmentation(p.trainingSegmentation if self._shown else None)
        if self._shown and self._training_selection() != self._counted_selection:
            self._slices_timer.start()  # chosen from Python or a reopened scene: count soon
        output = p.outputSegmentation
        self.ui.outputWarningLabel.setText(
            (
                f"Segments of '{output.GetName()}' that have the model's class names will be replaced; "
                "other segments are kept."
            )
            if output
            else ""
        )
        self.library.update_checkpoint_status()
        self.update_buttons()

    def update_buttons(self) -> None:
        p = self.p
        busy = self._job is not None or self._installing
        segmenting = self._job is not None and self._job_kind == "segment"
        training = self._job is not None and self._job_kind == "finetune"
        self.ui.segmentButton.setText("Cancel" if segmenting else "Segment")
        self.ui.segmentButton.setEnabled(
            segmenting or (not busy and bool(p and p.inputVolume and self._choices.get(p.model)))
        )
        count = len(self._labeled.slices) if self._labeled else 0
        self.ui.finetuneButton.setText("Cancel" if training else f"Fine-tune on these {count} labeled slices")
        self.ui.finetuneButton.setEnabled(
            training or (not busy and bool(p and p.inputVolume and count > 0 and p.adapterName.strip()))
        )

    @staticmethod
    def _select_key(combo, key) -> None:
        index = combo.findData(key)
        if index >= 0:
            was_blocked = combo.blockSignals(True)
            combo.setCurrentIndex(index)
            combo.blockSignals(was_blocked)

    def log(self, text) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    def set_status(self, text) -> None:
        self.ui.statusLabel.setText(text)
        if text:
            logging.info(f"HF-SAM: {text}")

    @contextlib.contextmanager
    def reported(self, what: str, busy: bool = True):
        """Run a slot's body; show any error in a message box and the log, and never let it escape into Qt
        (slicer.util.tryWithErrorDisplay re-raises, so the traceback would reach the console and the caller).
        ``busy``: with the wait cursor (clicks), not for timer ticks."""
        try:
            with self.host.busy() if busy else contextlib.nullcontext():
                yield
        except UserInputError as exc:
            self.set_status(str(exc))
            self.host.error(f"{what}\n\n{exc}")
        except Exception as exc:  # noqa: BLE001 - a bug: shown with its traceback, never raised into Qt
            details = traceback.format_exc()
            logging.error(details)
            self.log(details)
            self.set_status(f"{what} {type(exc).__name__}: {exc}")
            self.host.error(f"{what}\n\n{type(exc).__name__}: {exc}", details=details)

    # -- model selectors ---------------------------------------------------------------------------------
    def _fill_model_selectors(self) -> None:
        developer = self.host.developer_mode()
        segment = library_bridge.model_choices(self.library.adapters, developer=developer) + self._file_choices
        base = library_bridge.model_choices(self.library.adapters, for_finetune=True, developer=developer)
        self._choices = {c.key: c for c in segment}
        self._base_choices = {c.key: c for c in base}
        for combo, choices in ((self.ui.modelSelector, segment), (self.ui.baseModelSelector, base)):
            was_blocked = combo.blockSignals(True)
            combo.clear()
            for choice in choices:
                combo.addItem(choice.label, choice.key)
            if not choices:
                combo.addItem("(no adapter yet: fine-tune one or import one)", "")
            combo.blockSignals(was_blocked)
        self._ensure_model_choices()
        self.update_gui()

    def _ensure_model_choices(self) -> None:
        """A saved scene may name an adapter that is gone, and a new scene names none: fall back to the defaults."""
        p = self.p
        if p is None:
            return
        if not self._choices.get(p.model):
            key = self.ui.modelSelector.itemData(0)
            if key:
                p.model = key
        if not self._base_choices.get(p.baseModel) and self.library.path is not None:
            # The default depends on which checkpoints the library has, so it waits for `models path`.
            p.baseModel = library_bridge.default_base_key(self.library.installed_checkpoints)
            self._apply_recipe_steps()

    def on_model_selected(self, index) -> None:
        if self.p is not None:
            self.p.model = self.ui.modelSelector.itemData(index) or ""

    def on_base_model_selected(self, index) -> None:
        if self.p is None:
            return
        key = self.ui.baseModelSelector.itemData(index) or self.p.baseModel
        if key != self.p.baseModel:
            self.p.baseModel = key
            self._apply_recipe_steps()

    def _apply_recipe_steps(self) -> None:
        """A new "start from" brings its backbone's few-shot recipe (the registry's), as `hfsam finetune` does;
        the user may still change the steps afterwards. A saved scene keeps its own choice."""
        info = backbones.info(self.base_backbone() or "")
        if info is not None:
            self.p.steps = info.recipe.steps

    def on_adapter_file(self) -> None:
        path = self.host.open_file("Adapter file", ADAPTER_FILTER)
        if not path:
            return
        choice = library_bridge.adapter_file_choice(path)
        self._file_choices = [c for c in self._file_choices if c.key != choice.key] + [choice]
        self._fill_model_selectors()
        if self.p is not None:
            self.p.model = choice.key

    # -- dependencies (first use, never at start-up) ---------------------------------------------------------
    def ensure_dependencies(self) -> bool:
        """True when the engine's packages are present, after asking to install them if not."""
        if self._dependencies_ok:
            return True
        if self._installing:
            self.set_status("Python packages are being installed; wait until that has finished.")
            return False
        plan = self.logic.installPlan()
        if plan.blocked:
            self.host.error(plan.describe(), title="HF-SAM: Python packages")
            return False
        if not plan.empty:
            if not self.host.confirm(plan.describe(self.logic.engine.python), title="HF-SAM: install Python packages"):
                self.set_status("HF-SAM needs these packages; nothing was installed.")
                return False
            self._installing = True
            self.update_buttons()
            self.set_status("Installing Python packages (see the Python console for pip's output)...")
            try:
                with self.reported("Installing the packages failed."):
                    self.logic.installDependencies(plan, log=self.log)
            finally:
                self._installing = False
                self.update_buttons()
            if not self.logic.installPlan().empty:
                return False
            self.set_status("Python packages installed.")
            self.library.refresh()  # the library may not have been readable before
        self._dependencies_ok = True
        return True

    # -- Segment -------------------------------------------------------------------------------------------
    def on_segment_clicked(self) -> None:
        if self._job is not None and self._job_kind == "segment":
            self._job.cancel()
            self.set_status("Cancelling...")
            return
        self.start_segmentation()

    def start_segmentation(self) -> None:
        p = self.p
        choice = self._choices.get(p.model) if p is not None else None
        if choice is None or not p.inputVolume or self._job is not None:
            return
        if p.outputSegmentation and not self.host.confirm(
            f"Write the result into '{p.outputSegmentation.GetName()}'? "
            "Its segments named like the model's classes are replaced; its other segments are kept.",
            title="HF-SAM: existing segmentation",
        ):
            return
        if not self.ensure_dependencies():
            return
        with self.reported("Could not start the segmentation."):
            job = self.logic.startSegmentation(
                p.inputVolume,
                choice.args,
                device=p.device,
                outputNode=p.outputSegmentation,
                on_event=self.on_job_event,
                on_log=self.log,
                on_done=self.on_job_done,
            )
            self._start_job("segment", job)
            self.set_status(f"Segmenting {p.inputVolume.GetName()} with {choice.label}...")

    # -- Fine-tune ----------------------------------------------------------------------------------------------
    def on_training_segmentation_changed(self, node) -> None:
        if self.p is not None:
            self.p.trainingSegmentation = node
            self.update_labeled_slices()

    def on_training_segments_changed(self, segment_ids) -> None:
        if self.p is not None:
            self.p.trainingSegmentIDs = list(segment_ids)
            self.update_labeled_slices()

    def _observe_training_segmentation(self, node) -> None:
        segmentation = node.GetSegmentation() if node is not None else None
        if segmentation is self._observed_segmentation:
            return
        if self._observed_segmentation is not None:
            for event in PAINT_EVENTS:
                self.removeObserver(
                    self._observed_segmentation,
                    getattr(self._observed_segmentation, event),
                    self.on_training_segmentation_modified,
                )
        self._observed_segmentation = segmentation
        if segmentation is not None:
            for event in PAINT_EVENTS:
                self.addObserver(segmentation, getattr(segmentation, event), self.on_training_segmentation_modified)

    def on_training_segmentation_modified(self, caller=None, event=None) -> None:
        self._slices_timer.start()  # restart: recount once painting pauses

    def _recount_labeled_slices(self) -> None:
        with self.reported("Counting the labeled slices failed.", busy=False):
            self.update_labeled_slices()

    def _training_selection(self):
        p = self.p
        if p is None:
            return None
        nodes = (p.inputVolume, p.trainingSegmentation)
        return tuple(n.GetID() if n is not None else None for n in nodes) + tuple(p.trainingSegmentIDs)

    def update_labeled_slices(self) -> None:
        """Show which slices are labeled (N and their indices) before training starts."""
        p = self.p
        self._counted_selection = self._training_selection()
        self._labeled = None
        if p and p.inputVolume and p.trainingSegmentation and p.trainingSegmentIDs:
            try:
                self._labeled = self.logic.labeledSlices(
                    p.trainingSegmentation, list(p.trainingSegmentIDs), p.inputVolume
                )
            except UserInputError as exc:  # e.g. a segment was deleted meanwhile
                self.ui.labeledSlicesLabel.setText(str(exc))
        if self._labeled is not None:
            slices = self._labeled.slices
            shown = ", ".join(str(s) for s in slices) if slices else "none: paint a few slices first"
            self.ui.labeledSlicesLabel.setText(f"{len(slices)} slices ({'IJK'[self._labeled.axis]} index): {shown}")
        elif not (p and p.trainingSegmentation and p.trainingSegmentIDs):
            self.ui.labeledSlicesLabel.setText("(pick a segmentation and segments)")
        self.update_buttons()

    def base_backbone(self):
        """The backbone the selected "start from" needs (a base model's, or the adapter's)."""
        key = self.p.baseModel if self.p is not None else ""
        backbone = library_bridge.backbone_of_key(key)
        if backbone is None and key.startswith("adapter:"):
            name = key[len("adapter:") :]
            backbone = next((a.get("backbone") for a in self.library.adapters if a.get("name") == name), None)
        return backbone

    def on_finetune_clicked(self) -> None:
        if self._job is not None and self._job_kind == "finetune":
            self._job.cancel()
            self.set_status("Cancelling...")
            return
        p = self.p
        if p is None or self._job is not None:
            return
        self.update_labeled_slices()
        if not self._labeled or not self._labeled.slices:
            return
        base = self._base_choices.get(p.baseModel)
        if not self.ensure_dependencies():
            return
        backbone = self.base_backbone()
        library_path = self.library.path
        if backbone and library_path is not None and not self.logic.checkpointAvailable(backbone, library_path):
            info = backbones.info(backbone)
            self.host.error(
                f"Fine-tuning from {info.title if info else backbone} needs its checkpoint, which is not in the "
                "model library yet. Download it (or import it) in the Model library section first."
            )
            self.ui.libraryCollapsibleButton.setCollapsed(False)
            return
        with self.reported("Could not start fine-tuning."):
            job = self.logic.startFinetune(
                p.inputVolume,
                p.trainingSegmentation,
                list(p.trainingSegmentIDs),
                p.adapterName.strip(),
                model_args=base.args if base else (),
                steps=p.steps,
                device=p.device,
                on_event=self.on_job_event,
                on_log=self.log,
                on_done=self.on_job_done,
            )
            self._start_job("finetune", job)
            self.ui.lossLabel.setText("")
            self.set_status(f"Fine-tuning on {len(self._labeled.slices)} labeled slices...")

    # -- running jobs ------------------------------------------------------------------------------------------------
    def _start_job(self, kind, job) -> None:
        self._job, self._job_kind = job, kind
        self._last_dice = None
        self.ui.progressBar.setValue(0)
        self._poll_timer.start()
        self.update_buttons()

    def run_in_background(self, runner) -> None:
        """Deliver a started ProcessRunner's callbacks from the poll timer, until it has finished."""
        self._tasks.append(runner)
        self._poll_timer.start()

    def on_poll(self) -> None:
        for runner in (self._job, *self._tasks):
            if runner is not None:
                with self.reported("Handling the engine's answer failed.", busy=False):
                    runner.poll()
        self._tasks = [t for t in self._tasks if not t.finished]
        if self._job is None and not self._tasks:
            self._poll_timer.stop()

    def on_job_event(self, event) -> None:
        kind = event["event"]
        if kind == "progress":
            if event["fraction"] is not None:
                self.ui.progressBar.setValue(int(round(100 * event["fraction"])))
            if "loss" in event:
                text = f"step {event['done']}: loss {float(event['loss']):.4f}"
                if self._last_dice is not None:
                    text += f", held-out Dice {self._last_dice:.3f}"
                self.ui.lossLabel.setText(text)
            self.set_status(describe(event))
        elif kind == "metric" and "heldout_dice" in event:
            self._last_dice = event["heldout_dice"]  # every few steps; shown with each later loss
        elif kind in ("warning", "error"):
            self.log(f"{kind}: {event['message']}")

    def on_job_done(self, outcome) -> None:
        kind = self._job_kind
        self._job, self._job_kind = None, None
        self.update_buttons()
        if outcome.status == "cancelled":
            self.ui.progressBar.setValue(0)
            self.set_status(f"Cancelled: {outcome.message}" if outcome.message else "Cancelled; nothing was written.")
            return
        if not outcome.ok:
            self.set_status(outcome.message)
            details = outcome.run.stderr_tail if outcome.run else ""
            self.host.error(outcome.message, details=details)
            return
        self.ui.progressBar.setValue(100)
        if kind == "segment":
            node = outcome.segmentation_node
            self.host.show_volume(node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()))
            self.set_status(f"Done: '{node.GetName()}' has {node.GetSegmentation().GetNumberOfSegments()} segments.")
        else:
            self.on_finetune_done(outcome)

    def on_finetune_done(self, outcome) -> None:
        name = outcome.adapter_name
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in outcome.metrics.items() if isinstance(v, (int, float)))
        self.set_status(f"Adapter '{name}' stored in the model library ({metrics}).")
        self._file_choices = [c for c in self._file_choices if c.key != f"adapter:{name}"]
        self.library.refresh(select=f"adapter:{name}", then_offer_segment=name)

    # -- scene close ------------------------------------------------------------------------------------------------
    def on_scene_start_close(self, caller=None, event=None) -> None:
        """The scene closes: a running job's nodes go away, so cancel it (it imports nothing into the next scene)."""
        if self._job is not None:
            self._job.cancel()
            self.set_status("Cancelling: the scene is being closed.")
        self._observe_training_segmentation(None)
        self.set_parameter_node(None)

    def on_scene_end_close(self, caller=None, event=None) -> None:
        if self._shown:
            self.initialize_parameter_node()

    # -- news from the library section -----------------------------------------------------------------------------
    def on_library_read(self) -> None:
        """The adapters or the library folder are known (again): the selectors and the defaults follow."""
        self._fill_model_selectors()

    def after_library_read(self, select, offer) -> None:
        if select and select in self._choices and self.p is not None:
            self.p.model = select
        volume = self.p.inputVolume if self.p is not None else None
        if offer and volume and self.host.confirm(f"Segment '{volume.GetName()}' with the new adapter '{offer}' now?"):
            self.start_segmentation()


def parameter_widgets(ui) -> dict:
    """parameter name -> widget, for every widget of the .ui that has a "SlicerParameterName" property."""
    mapping = {}
    for widget in vars(ui).values():
        name = widget.property("SlicerParameterName") if hasattr(widget, "property") else None
        if name:
            mapping[str(name)] = widget
    return mapping


def first_grey_level_volume(scene):
    """The first scalar volume of the scene that is not a labelmap (labelmaps are scalar volumes too), or None."""
    nodes = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        if not node.IsA("vtkMRMLLabelMapVolumeNode"):
            return node
    return None
