"""HFSAMCore: the HF-SAM engine (model, volume pipeline, fine-tuning, model library).

Plain Python + torch; never imports slicer, qt or vtk. Heavy modules (torch,
segment_anything) are imported by the submodules that need them, so that
``import HFSAMCore`` stays cheap.
"""

__version__ = "0.1.0"
