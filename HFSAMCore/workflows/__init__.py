"""The product's jobs end to end, for the command line, the Slicer module and Python users alike.

Each workflow checks everything that needs no model first (before torch is imported), claims its
outputs, computes, writes atomically, and returns its result::

    from HFSAMCore.workflows import ModelOptions, TrainingOptions, finetune_adapter, segment_file

    finetune_adapter("ct.nii.gz", ["liver.nii.gz"], name="liver5", training=TrainingOptions(classes="liver"))
    segment_file("ct.nii.gz", "seg.nrrd", model=ModelOptions(adapter="liver5"))

The demo (``workflows.demo.run_demo``) is imported on its own: it needs numpy and SimpleITK at once.
"""

from .evaluate_files import evaluate_files
from .evaluate_test_set import TestSet, evaluate_test_set
from .finetune_adapter import TrainingOptions, finetune_adapter
from .options import ModelOptions, RunOptions
from .segment_file import segment_file

__all__ = [
    "ModelOptions",
    "RunOptions",
    "TestSet",
    "TrainingOptions",
    "evaluate_files",
    "evaluate_test_set",
    "finetune_adapter",
    "segment_file",
]
