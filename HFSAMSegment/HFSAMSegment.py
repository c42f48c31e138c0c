"""HF-SAM Segment: few-shot segmentation with a LoRA-tuned Segment Anything Model, in 3D Slicer.

Thin on purpose (Slicer's scripted-module template): Module (metadata), Widget
(GUI wiring), Logic (a facade over HFSAMSegmentLib) and Test (the scenarios of
HFSAMSegmentLib.selftest, which CI also runs). The engine (HFSAMCore, torch,
SAM) never runs in Slicer's process: jobs start ``PythonSlicer -m HFSAMCore``
as a child process. Module import stays cheap because Slicer imports every
scripted module at start-up: everything beyond engine_command is imported
inside the functions that need it.
"""

import importlib
import logging
import sys
from typing import Annotated

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

from HFSAMSegmentLib.engine_command import Engine

CITATION = (
    'Liu &amp; Xu, "Multi-scale feature fusion based SAM for high-quality few-shot medical image segmentation", '
    "Computer Vision and Image Understanding 258 (2025) 104389"
)
SAM_CITATION = 'Kirillov et al., "Segment Anything", ICCV 2023'


#
# HFSAMSegment
#


class HFSAMSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("HF-SAM Segment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["HF-SAM for 3D Slicer contributors"]
        self.parent.helpText = _(
            "Segment a CT or MR volume slice by slice with HF-SAM, a Segment Anything Model tuned with LoRA, "
            "an adaptive weighted feature-fusion module and a two-step skip-fusion decoder. "
            "Paint a few slices of the structures you need and click <b>Fine-tune on these N labeled slices</b> "
            "to train your own adapter, then segment the whole volume with it. "
            "Models run in a background process on the CUDA GPU, or on the CPU. "
            'See the <a href="https://github.com/hfsam-slicer/SlicerHFSAM">documentation</a>.'
        )
        self.parent.acknowledgementText = _(
            "Method: " + CITATION + ". Built on the Segment Anything Model (" + SAM_CITATION + "; "
            "code and checkpoints by Meta AI, Apache-2.0). Sample data: TotalSegmentator (Wasserthal et al., "
            "Radiology: AI 2023)."
        )


#
# Parameter node: the panel state, saved with the scene
#


@parameterNodeWrapper
class HFSAMSegmentParameterNode:
    """
    inputVolume - the volume to segment (and the one the labeled slices belong to).
    model - selector key of the model to segment with ("adapter:NAME", "file:PATH", "test:tiny").
    device - auto, cuda or cpu.
    outputSegmentation - None: a new segmentation node per run; a node: the user chose to write into it.
    trainingSegmentation, trainingSegmentIDs - the painted segments to learn from.
    baseModel - what fine-tuning starts from ("base:vit_b" or "adapter:NAME").
    adapterName, steps - the new adapter's library name and training length.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    model: str = ""
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    outputSegmentation: vtkMRMLSegmentationNode
    trainingSegmentation: vtkMRMLSegmentationNode
    trainingSegmentIDs: list[str]
    baseModel: str = "base:vit_b"
    adapterName: str = ""
    steps: Annotated[int, WithinRange(1, 100000)] = 300


#
# HFSAMSegmentWidget
#


class HFSAMSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None  # the running SegmentJob / FinetuneJob, if any
        self._jobKind = None
        self._download = None  # the running checkpoint download/import, if any
        self._adapters = []
        self._dependenciesOk = False
        self._observedSegmentation = None
        self._choices = {}  # model selector key -> ModelChoice (segment)
        self._baseChoices = {}  # "start from" selector key -> ModelChoice (fine-tune)
        self._fileChoices = []  # adapters picked as files this session
        self._labeled = None  # TrainingLabels of the current training selection
        self._lastDice = None  # latest held-out Dice of the running fine-tune

    # -- set-up -------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/HFSAMSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = HFSAMSegmentLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetuneButton)
        self.ui.adapterFileButton.connect("clicked(bool)", self.onAdapterFileButton)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.baseModelSelector.connect("currentIndexChanged(int)", self.onBaseModelSelected)
        self.ui.trainingSegmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onTrainingSegmentationChanged)
        self.ui.trainingSegmentSelector.connect("segmentSelectionChanged(QStringList)", self.onTrainingSegmentsChanged)
        self.ui.refreshLibraryButton.connect("clicked(bool)", self.refreshLibrary)
        self.ui.importAdapterButton.connect("clicked(bool)", self.onImportAdapter)
        self.ui.exportAdapterButton.connect("clicked(bool)", self.onExportAdapter)
        self.ui.removeAdapterButton.connect("clicked(bool)", self.onRemoveAdapter)
        self.ui.downloadCheckpointButton.connect("clicked(bool)", self.onDownloadCheckpoint)
        self.ui.importCheckpointButton.connect("clicked(bool)", self.onImportCheckpoint)
        self.ui.libraryCollapsibleButton.connect("contentsCollapsed(bool)", self.onLibraryCollapsed)

        # Jobs report through ProcessRunner queues; this timer delivers them in the GUI thread.
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(100)
        self._pollTimer.connect("timeout()", self.onPollTimer)
        # Painting fires many events; recount labeled slices once the user pauses.
        self._slicesTimer = qt.QTimer()
        self._slicesTimer.setSingleShot(True)
        self._slicesTimer.setInterval(500)
        self._slicesTimer.connect("timeout()", self.updateLabeledSlices)

        self.ui.progressBar.setValue(0)
        self.refreshLibrary()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        for job in (self._job, self._download):
            if job is not None:
                job.cancel()
        self._pollTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume:
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a "SlicerParameterName" property in the .ui are bound here.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            self._ensureModelChoice()
            self.updateGUIFromParameterNode()
            self.updateLabeledSlices()

    # -- GUI state --------------------------------------------------------------------
    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        self._selectKey(self.ui.modelSelector, p.model)
        self._selectKey(self.ui.baseModelSelector, p.baseModel)
        wasBlocked = self.ui.trainingSegmentSelector.blockSignals(True)
        self.ui.trainingSegmentSelector.setCurrentNode(p.trainingSegmentation)
        self.ui.trainingSegmentSelector.setSelectedSegmentIDs(list(p.trainingSegmentIDs))
        self.ui.trainingSegmentSelector.blockSignals(wasBlocked)
        self._observeTrainingSegmentation(p.trainingSegmentation)
        output = p.outputSegmentation
        self.ui.outputWarningLabel.text = (
            _("Segments of '{name}' that have the model's class names will be replaced; other segments are kept.").format(
                name=output.GetName()
            )
            if output
            else ""
        )
        self.updateButtons()

    def updateButtons(self) -> None:
        p = self._parameterNode
        busy = self._job is not None
        segmenting = busy and self._jobKind == "segment"
        training = busy and self._jobKind == "finetune"
        self.ui.segmentButton.text = _("Cancel") if segmenting else _("Segment")
        self.ui.segmentButton.enabled = segmenting or (not busy and bool(p and p.inputVolume and self._choice(p.model)))
        count = len(self._labeled.slices) if self._labeled else 0
        self.ui.finetuneButton.text = _("Cancel") if training else _("Fine-tune on these {n} labeled slices").format(n=count)
        self.ui.finetuneButton.enabled = training or (
            not busy and bool(p and p.inputVolume and count > 0 and p.adapterName.strip())
        )

    def _selectKey(self, combo, key) -> None:
        index = combo.findData(key)
        if index >= 0 and index != combo.currentIndex:
            wasBlocked = combo.blockSignals(True)
            combo.currentIndex = index
            combo.blockSignals(wasBlocked)

    def _choice(self, key):
        return self._choices.get(key) if key else None

    def log(self, text) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    # -- model selectors -------------------------------------------------------------
    def _fillModelSelectors(self) -> None:
        from HFSAMSegmentLib.library_bridge import model_choices

        developer = slicer.util.settingsValue("Developer/DeveloperMode", False, converter=slicer.util.toBool)
        segmentChoices = model_choices(self._adapters, developer=developer)
        baseChoices = model_choices(self._adapters, for_finetune=True, developer=developer)
        extra = self._fileChoices
        self._choices = {c.key: c for c in segmentChoices + extra}
        self._baseChoices = {c.key: c for c in baseChoices}
        for combo, choices in ((self.ui.modelSelector, segmentChoices + extra), (self.ui.baseModelSelector, baseChoices)):
            wasBlocked = combo.blockSignals(True)
            combo.clear()
            for choice in choices:
                combo.addItem(choice.label, choice.key)
            if not choices:
                combo.addItem(_("(no adapter yet: fine-tune one or import one)"), "")
            combo.blockSignals(wasBlocked)
        self._ensureModelChoice()
        self.updateGUIFromParameterNode()

    def _ensureModelChoice(self) -> None:
        """A saved scene may name an adapter that is gone: fall back to what the selector shows."""
        p = self._parameterNode
        if p is not None and not self._choice(p.model):
            key = self.ui.modelSelector.itemData(0)
            if key:
                p.model = key

    def onModelSelected(self, index) -> None:
        if self._parameterNode:
            self._parameterNode.model = self.ui.modelSelector.itemData(index) or ""

    def onBaseModelSelected(self, index) -> None:
        if self._parameterNode:
            self._parameterNode.baseModel = self.ui.baseModelSelector.itemData(index) or "base:vit_b"

    def onAdapterFileButton(self) -> None:
        from HFSAMSegmentLib.library_bridge import adapter_file_choice

        path = qt.QFileDialog.getOpenFileName(self.parent, _("Adapter file"), "", _("HF-SAM adapter (*.safetensors)"))
        if not path:
            return
        choice = adapter_file_choice(path)
        self._fileChoices = [c for c in self._fileChoices if c.key != choice.key] + [choice]
        self._fillModelSelectors()
        self._parameterNode.model = choice.key

    # -- dependencies (first use, never at start-up) ---------------------------------------
    def ensureDependencies(self) -> bool:
        """True when the engine's packages are present, after asking to install them if not."""
        if self._dependenciesOk:
            return True
        plan = self.logic.installPlan()
        if not plan.empty:
            if not slicer.util.confirmYesNoDisplay(plan.describe(), windowTitle=_("HF-SAM: install Python packages")):
                self.setStatus(_("HF-SAM needs these packages; nothing was installed."))
                return False
            with slicer.util.tryWithErrorDisplay(_("Installing the packages failed."), waitCursor=True):
                self.logic.installDependencies(plan, log=self.log)
            if not self.logic.installPlan().empty:
                return False
        self._dependenciesOk = True
        return True

    # -- Segment ----------------------------------------------------------------------------
    def onSegmentButton(self) -> None:
        if self._job is not None and self._jobKind == "segment":
            self._job.cancel()
            self.setStatus(_("Cancelling..."))
            return
        self.startSegmentation()

    def startSegmentation(self) -> None:
        p = self._parameterNode
        choice = self._choice(p.model)
        if choice is None or not p.inputVolume:
            return
        if p.outputSegmentation and not slicer.util.confirmYesNoDisplay(
            _("Write the result into '{name}'? Its segments named like the model's classes are replaced; "
              "its other segments are kept.").format(name=p.outputSegmentation.GetName()),
            windowTitle=_("HF-SAM: existing segmentation"),
        ):
            return
        if not self.ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("Could not start the segmentation."), waitCursor=True):
            self._startJob(
                "segment",
                self.logic.startSegmentation(
                    p.inputVolume, choice.args, device=p.device, outputNode=p.outputSegmentation,
                    on_event=self.onJobEvent, on_log=self.log, on_done=self.onJobDone,
                ),
            )
            self.setStatus(_("Segmenting {name} with {model}...").format(name=p.inputVolume.GetName(), model=choice.label))

    # -- Fine-tune ----------------------------------------------------------------------------
    def onTrainingSegmentationChanged(self, node) -> None:
        if self._parameterNode:
            self._parameterNode.trainingSegmentation = node
            self._observeTrainingSegmentation(node)
            self.updateLabeledSlices()

    def onTrainingSegmentsChanged(self, segmentIds) -> None:
        if self._parameterNode:
            self._parameterNode.trainingSegmentIDs = list(segmentIds)
            self.updateLabeledSlices()

    # Painting changes the segmentation's source labelmap; adding/removing segments changes the list.
    _PAINT_EVENTS = ("SourceRepresentationModified", "SegmentAdded", "SegmentRemoved")

    def _observeTrainingSegmentation(self, node) -> None:
        segmentation = node.GetSegmentation() if node is not None else None
        if segmentation is self._observedSegmentation:
            return
        if self._observedSegmentation is not None:
            for event in self._PAINT_EVENTS:
                self.removeObserver(self._observedSegmentation, getattr(slicer.vtkSegmentation, event),
                                    self.onTrainingSegmentationModified)
        self._observedSegmentation = segmentation
        if segmentation is not None:
            for event in self._PAINT_EVENTS:
                self.addObserver(segmentation, getattr(slicer.vtkSegmentation, event), self.onTrainingSegmentationModified)

    def onTrainingSegmentationModified(self, caller=None, event=None) -> None:
        self._slicesTimer.start()  # restart: recount once painting pauses

    def updateLabeledSlices(self) -> None:
        """Show which slices are labeled (N and their indices) before training starts."""
        p = self._parameterNode
        self._labeled = None
        if p and p.inputVolume and p.trainingSegmentation and p.trainingSegmentIDs:
            try:
                self._labeled = self.logic.labeledSlices(p.trainingSegmentation, list(p.trainingSegmentIDs), p.inputVolume)
            except ValueError as exc:  # UserInputError: e.g. a segment was deleted meanwhile
                self.ui.labeledSlicesLabel.text = str(exc)
        if self._labeled is not None:
            slices = self._labeled.slices
            axis = "IJK"[self._labeled.axis]
            shown = ", ".join(str(s) for s in slices) if slices else _("none: paint a few slices first")
            self.ui.labeledSlicesLabel.text = _("{n} slices ({axis} index): {list}").format(n=len(slices), axis=axis, list=shown)
        elif not (p and p.trainingSegmentation and p.trainingSegmentIDs):
            self.ui.labeledSlicesLabel.text = _("(pick a segmentation and segments)")
        self.updateButtons()

    def onFinetuneButton(self) -> None:
        if self._job is not None and self._jobKind == "finetune":
            self._job.cancel()
            self.setStatus(_("Cancelling..."))
            return
        p = self._parameterNode
        self.updateLabeledSlices()
        if not self._labeled or not self._labeled.slices:
            return
        base = self._baseChoices.get(p.baseModel)
        if base is not None and base.key == "base:vit_b" and self.logic.checkpointPath("vit_b") is None:
            slicer.util.errorDisplay(
                _("Fine-tuning starts from the SAM ViT-B checkpoint, which is not in the model library yet. "
                  "Download it (or import it) in the Model library section first.")
            )
            self.ui.libraryCollapsibleButton.collapsed = False
            return
        if not self.ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("Could not start fine-tuning."), waitCursor=True):
            self._startJob(
                "finetune",
                self.logic.startFinetune(
                    p.inputVolume, p.trainingSegmentation, list(p.trainingSegmentIDs), p.adapterName.strip(),
                    model_args=base.args if base else (), steps=p.steps, device=p.device,
                    on_event=self.onJobEvent, on_log=self.log, on_done=self.onJobDone,
                ),
            )
            self.ui.lossLabel.text = ""
            self.setStatus(_("Fine-tuning on {n} labeled slices...").format(n=len(self._labeled.slices)))

    # -- running jobs -----------------------------------------------------------------------
    def _startJob(self, kind, job) -> None:
        self._job, self._jobKind = job, kind
        self._lastDice = None
        self.ui.progressBar.setValue(0)
        self._pollTimer.start()
        self.updateButtons()

    def onPollTimer(self) -> None:
        for job in (self._job, self._download):
            if job is not None:
                job.poll()
        if self._job is None and self._download is None:
            self._pollTimer.stop()

    def onJobEvent(self, event) -> None:
        from HFSAMSegmentLib.progress_parser import describe

        kind = event["event"]
        if kind == "progress":
            if event["fraction"] is not None:
                self.ui.progressBar.setValue(int(round(100 * event["fraction"])))
            if "loss" in event:
                text = _("step {step}: loss {loss:.4f}").format(step=event["done"], loss=float(event["loss"]))
                if self._lastDice is not None:
                    text += _(", held-out Dice {dice:.3f}").format(dice=self._lastDice)
                self.ui.lossLabel.text = text
            self.setStatus(describe(event))
        elif kind == "metric" and "heldout_dice" in event:
            self._lastDice = event["heldout_dice"]  # every few steps; shown with each later loss
        elif kind in ("warning", "error"):
            self.log(f"{kind}: {event['message']}")

    def onJobDone(self, outcome) -> None:
        kind = self._jobKind
        self._job, self._jobKind = None, None
        self.updateButtons()
        if outcome.status == "cancelled":
            self.ui.progressBar.setValue(0)
            self.setStatus(_("Cancelled; nothing was written."))
            return
        if not outcome.ok:
            self.setStatus(outcome.message)
            details = outcome.run.stderr_tail if outcome.run else ""
            slicer.util.errorDisplay(outcome.message, windowTitle=_("HF-SAM"), detailedText=details)
            return
        self.ui.progressBar.setValue(100)
        if kind == "segment":
            node = outcome.segmentation_node
            slicer.util.setSliceViewerLayers(background=self._parameterNode.inputVolume)
            self.setStatus(_("Done: '{name}' has {n} segments.").format(
                name=node.GetName(), n=node.GetSegmentation().GetNumberOfSegments()))
        else:
            self.onFinetuneDone(outcome)

    def onFinetuneDone(self, outcome) -> None:
        name = outcome.adapter_name
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in outcome.metrics.items() if isinstance(v, (int, float)))
        self.setStatus(_("Adapter '{name}' stored in the model library ({metrics}).").format(name=name, metrics=metrics))
        self.refreshLibrary()
        self._parameterNode.model = f"adapter:{name}"
        volume = self._parameterNode.inputVolume
        if volume and slicer.util.confirmYesNoDisplay(
            _("Segment '{volume}' with the new adapter '{name}' now?").format(volume=volume.GetName(), name=name),
            windowTitle=_("HF-SAM"),
        ):
            self.startSegmentation()

    def setStatus(self, text) -> None:
        self.ui.statusLabel.text = text
        if text:
            logging.info(f"HF-SAM: {text}")

    # -- model library ----------------------------------------------------------------------
    def onLibraryCollapsed(self, collapsed) -> None:
        if not collapsed:
            self.refreshLibrary()
            self.updateCheckpointStatus()

    def refreshLibrary(self) -> None:
        try:
            self._adapters = self.logic.library.list_adapters()
            self.ui.libraryPathLabel.text = _("Library folder: {path}").format(path=self.logic.library.library_path())
        except Exception as exc:  # noqa: BLE001 - the panel must open even when the engine cannot run yet
            self._adapters = []
            self.ui.libraryPathLabel.text = _("The model library cannot be read yet ({error}). "
                                              "Click Segment or Fine-tune to check the Python packages.").format(error=exc)
        table = self.ui.adaptersTable
        table.setRowCount(len(self._adapters))
        for row, entry in enumerate(self._adapters):
            cells = [entry.get("name", ""), entry.get("backbone", "?"), ", ".join(entry.get("classes", [])),
                     entry.get("created", "") if "error" not in entry else _("unreadable: ") + entry["error"]]
            for column, text in enumerate(cells):
                table.setItem(row, column, qt.QTableWidgetItem(str(text)))
        table.resizeColumnsToContents()
        self._fillModelSelectors()

    def _selectedAdapter(self):
        row = self.ui.adaptersTable.currentRow()
        if row < 0 or row >= len(self._adapters):
            slicer.util.warningDisplay(_("Select an adapter in the table first."))
            return None
        return self._adapters[row]["name"]

    def onImportAdapter(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.parent, _("Import adapter"), "", _("HF-SAM adapter (*.safetensors)"))
        if path:
            with slicer.util.tryWithErrorDisplay(_("Import failed."), waitCursor=True):
                name = self.logic.library.import_adapter(path)
                self.setStatus(_("Imported '{name}'.").format(name=name))
            self.refreshLibrary()

    def onExportAdapter(self) -> None:
        name = self._selectedAdapter()
        if not name:
            return
        path = qt.QFileDialog.getSaveFileName(self.parent, _("Export adapter"), f"{name}.safetensors",
                                              _("HF-SAM adapter (*.safetensors)"))
        if path:
            # The save dialog already asked whether to replace an existing file.
            with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
                written = self.logic.library.export_adapter(name, path, overwrite=True)
                self.setStatus(_("Exported '{name}' to {path}.").format(name=name, path=written))

    def onRemoveAdapter(self) -> None:
        name = self._selectedAdapter()
        if name and slicer.util.confirmYesNoDisplay(_("Delete adapter '{name}' from the model library?").format(name=name)):
            with slicer.util.tryWithErrorDisplay(_("Remove failed."), waitCursor=True):
                self.logic.library.remove_adapter(name)
            self.refreshLibrary()

    def updateCheckpointStatus(self) -> None:
        try:
            path = self.logic.checkpointPath("vit_b")
        except Exception as exc:  # noqa: BLE001
            path, error = None, str(exc)
        else:
            error = ""
        self.ui.checkpointStatusLabel.text = (
            _("Base SAM checkpoint (ViT-B): {path}").format(path=path) if path
            else _("Base SAM checkpoint (ViT-B): not in the library (needed to fine-tune). {error}").format(error=error)
        )
        self.ui.downloadCheckpointButton.enabled = path is None

    def onDownloadCheckpoint(self) -> None:
        if not self.ensureDependencies():
            return
        self._runCheckpointTask(_("Downloading the SAM ViT-B checkpoint (checked by SHA256)..."),
                                lambda **cb: self.logic.library.download_checkpoint("vit_b", **cb))

    def onImportCheckpoint(self) -> None:
        path = self.ui.checkpointPathLineEdit.currentPath
        if not path:
            slicer.util.warningDisplay(_("Choose the sam_vit_b_01ec64.pth file first."))
            return
        if not self.ensureDependencies():
            return
        self._runCheckpointTask(_("Importing {path} (checking its SHA256)...").format(path=path),
                                lambda **cb: self.logic.library.import_checkpoint(path, **cb))

    def _runCheckpointTask(self, label, start) -> None:
        dialog = slicer.util.createProgressDialog(parent=self.parent, value=0, maximum=100, labelText=label,
                                                  windowTitle=_("HF-SAM model library"))

        def onEvent(event):
            if event["event"] == "progress" and event["fraction"] is not None:
                dialog.setValue(int(round(100 * event["fraction"])))
                if event.get("eta_s") is not None:
                    from HFSAMSegmentLib.progress_parser import format_seconds

                    dialog.setLabelText(f"{label}\n" + _("about {eta} left").format(eta=format_seconds(event["eta_s"])))

        def onFinished(result):
            self._download = None
            dialog.close()
            self.updateCheckpointStatus()
            if result.status == "cancelled":
                self.setStatus(_("Cancelled; a partial download is kept and resumed next time."))
            elif not result.ok:
                slicer.util.errorDisplay(result.message, windowTitle=_("HF-SAM model library"), detailedText=result.stderr_tail)
            else:
                self.setStatus(_("Base checkpoint ready."))

        with slicer.util.tryWithErrorDisplay(_("Could not start."), waitCursor=True):
            self._download = start(on_event=onEvent, on_finished=onFinished)
            dialog.connect("canceled()", self._download.cancel)
            self._pollTimer.start()

    # -- reload (developer) -------------------------------------------------------------------
    def onReload(self) -> None:
        """Reload HFSAMSegmentLib too, dependencies first, so edits to it take effect without a restart."""
        for name in ("errors", "progress_parser", "engine_command", "process_runner", "terminology", "mrml_adapter",
                     "jobs", "library_bridge", "installer", "selftest"):
            module = sys.modules.get(f"HFSAMSegmentLib.{name}")
            if module is not None:
                importlib.reload(module)
        ScriptedLoadableModuleWidget.onReload(self)


#
# HFSAMSegmentLogic: a facade over HFSAMSegmentLib, usable without the GUI
#


class HFSAMSegmentLogic(ScriptedLoadableModuleLogic):
    """Segment / fine-tune from Python (``slicer.util.getModuleLogic("HFSAMSegment")``), e.g.::

        logic = HFSAMSegmentLogic()
        job = logic.startSegmentation(volumeNode, ["--adapter", "liver5"])
        outcome = job.wait()           # or poll() from a QTimer
        outcome.segmentation_node
    """

    def __init__(self, engine=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        from HFSAMSegmentLib.library_bridge import LibraryBridge

        self.engine = engine or Engine.locate()
        self.library = LibraryBridge(self.engine)
        self._terminology = None

    def getParameterNode(self):
        return HFSAMSegmentParameterNode(super().getParameterNode())

    def terminology(self):
        """The class terminology (Resources/HFSAM.term.json), also loaded into Slicer's Terminologies module once."""
        if self._terminology is None:
            from HFSAMSegmentLib.terminology import Terminology, find_term_file

            path = find_term_file()
            self._terminology = Terminology.from_file(path) if path else False
            terminologies = getattr(slicer.modules, "terminologies", None)
            if path and terminologies is not None:
                logic = terminologies.logic()
                if not logic.IsTerminologyContextLoaded(self._terminology.context):
                    logic.LoadTerminologyFromFile(str(path))
        return self._terminology or None

    def installPlan(self):
        from HFSAMSegmentLib import installer

        return installer.plan_install(
            installer.missing_requirements(), python=self.engine.python,
            torch_utils_available=installer.pytorch_utils_logic() is not None,
        )

    def installDependencies(self, plan, log=logging.info) -> None:
        from HFSAMSegmentLib import installer

        installer.run_install(plan, log=log)

    def checkpointPath(self, backbone="vit_b"):
        return self.library.checkpoint_status(backbone)

    def labeledSlices(self, segmentationNode, segmentIds, volumeNode):
        from HFSAMSegmentLib import mrml_adapter

        return mrml_adapter.labeled_slices(segmentationNode, segmentIds, volumeNode)

    def startSegmentation(self, volumeNode, modelArgs, device="auto", outputNode=None, **callbacks):
        """Start a background segmentation; returns the running SegmentJob."""
        from HFSAMSegmentLib.jobs import SegmentJob

        job = SegmentJob(self.engine, volumeNode.GetScene() or slicer.mrmlScene, volumeNode, modelArgs, device=device,
                         output_node=outputNode, terminology=self.terminology(), **callbacks)
        job.start()
        return job

    def startFinetune(self, volumeNode, segmentationNode, segmentIds, adapterName, model_args=(), steps=None,
                      device="auto", **callbacks):
        """Start background fine-tuning that stores adapter ``adapterName`` in the library; returns the FinetuneJob."""
        from HFSAMSegmentLib.jobs import FinetuneJob

        job = FinetuneJob(self.engine, volumeNode, segmentationNode, segmentIds, adapterName, model_args=model_args,
                          steps=steps, device=device, **callbacks)
        job.start()
        return job


#
# HFSAMSegmentTest: the CI scenarios, inside a real Slicer
#


class HFSAMSegmentTest(ScriptedLoadableModuleTest):
    """Runs HFSAMSegmentLib.selftest (the scenarios Testing/test_mrml_adapter.py and test_runner.py run in CI)."""

    def setUp(self):
        import tempfile

        self.tearDown()  # setUp runs again per scenario in runTest: never leak a folder
        slicer.mrmlScene.Clear()
        self.folder = tempfile.mkdtemp(prefix="hfsam-selftest-")

    def tearDown(self):
        import shutil

        if getattr(self, "folder", None):
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def runTest(self):
        for test in (self.test_GeometryRoundTrip, self.test_LabelImport, self.test_LabeledSlices, self.test_TinySegmentRun):
            self.setUp()
            try:
                test()
            finally:
                self.tearDown()

    def test_GeometryRoundTrip(self):
        from HFSAMSegmentLib import selftest

        self.delayDisplay("Volume node -> NRRD -> volume node: geometry to 1e-6 mm")
        selftest.geometry_round_trip(slicer.mrmlScene, self.folder)

    def test_LabelImport(self):
        from HFSAMSegmentLib import selftest

        self.delayDisplay("Engine label file + sidecar -> segmentation node next to the volume")
        selftest.label_import(slicer.mrmlScene, self.folder, HFSAMSegmentLogic().terminology())

    def test_LabeledSlices(self):
        from HFSAMSegmentLib import selftest

        self.delayDisplay("Painted slices -> labeled slice indices and training label file")
        selftest.labeled_slices(slicer.mrmlScene, self.folder)

    def test_TinySegmentRun(self):
        from HFSAMSegmentLib import installer, selftest

        missing = installer.missing_requirements()
        if missing:
            self.delayDisplay("Skipping the engine run: missing " + ", ".join(m.describe() for m in missing))
            return
        self.delayDisplay("A short engine run (random tiny model) through the background runner")
        selftest.tiny_segment_run(slicer.mrmlScene, HFSAMSegmentLogic().engine)
        self.delayDisplay("Test passed")
