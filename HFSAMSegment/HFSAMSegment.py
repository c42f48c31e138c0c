"""HF-SAM Segment: few-shot segmentation with a LoRA-tuned Segment Anything Model, in 3D Slicer.

Only the four classes Slicer looks for, each a few lines; what they do lives in
HFSAMSegmentLib (panel.py: the GUI logic; logic.py: the logic; selftest.py:
the self-test), where CI tests reach it. The engine (HFSAMCore, torch, SAM)
never runs in Slicer's process: jobs start ``PythonSlicer -m HFSAMCore`` as a
child process. Slicer imports every scripted module at start-up, so nothing
heavy is imported here.
"""

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

from HFSAMSegmentLib.logic import ModuleLogic
from HFSAMSegmentLib.terminology import register_terminology

CITATION = (
    'Liu &amp; Xu, "Multi-scale feature fusion based SAM for high-quality few-shot medical image segmentation", '
    "Computer Vision and Image Understanding 258 (2025) 104389"
)
SAM_CITATION = 'Kirillov et al., "Segment Anything", ICCV 2023'


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
            "code and checkpoints by Meta AI, Apache-2.0) and LiteMedSAM (Ma et al., MedSAM, Nature Communications "
            "2024). Sample data: TotalSegmentator (Wasserthal et al., Radiology: AI 2023)."
        )
        # Our terminology must be known before a saved scene with our segments is opened (as TotalSegmentator does).
        slicer.app.connect("startupCompleted()", register_terminology)


class HFSAMSegmentWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        from HFSAMSegmentLib.slicer_host import create_panel

        ScriptedLoadableModuleWidget.setup(self)
        self.logic = HFSAMSegmentLogic()
        self.panel = create_panel(self, self.logic)  # the .ui, wired to HFSAMSegmentLib.panel.Panel

    def enter(self):
        self.panel.enter()

    def exit(self):
        self.panel.exit()

    def cleanup(self):
        if getattr(self, "panel", None):
            self.panel.cleanup()

    def onReload(self):
        import HFSAMSegmentLib

        HFSAMSegmentLib.reload_all()  # edits to the Lib take effect without a restart (cleanup() runs first)
        ScriptedLoadableModuleWidget.onReload(self)


class HFSAMSegmentLogic(ScriptedLoadableModuleLogic, ModuleLogic):
    """Segment / fine-tune from Python: see HFSAMSegmentLib/logic.py."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        ModuleLogic.__init__(self, temp_root=slicer.app.temporaryPath)

    def getParameterNode(self):
        from HFSAMSegmentLib.parameters import HFSAMSegmentParameterNode

        return HFSAMSegmentParameterNode(super().getParameterNode())


class HFSAMSegmentTest(ScriptedLoadableModuleTest):
    """The scenarios of HFSAMSegmentLib/selftest.py (the ones CI runs against slicer-core) on Slicer's own scene."""

    def runTest(self):
        from HFSAMSegmentLib import selftest

        selftest.run_all(slicer.mrmlScene, HFSAMSegmentLogic(), log=self.delayDisplay)
