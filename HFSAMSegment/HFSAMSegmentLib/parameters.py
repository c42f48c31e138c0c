"""The panel's state, saved with the scene: Slicer's parameterNodeWrapper (Slicer only).

Widgets of the .ui with a "SlicerParameterName" property are bound to the field
of that name (``panel.parameter_widgets``); Testing/test_ui.py checks that every
binding names a field below with a matching type.
"""

from typing import Annotated

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper

from .engine_command import DEVICES


@parameterNodeWrapper
class HFSAMSegmentParameterNode:
    """
    inputVolume - the volume to segment (and the one the labeled slices belong to).
    model - selector key of the model to segment with ("adapter:NAME", "file:PATH", "test:tiny").
    device - auto, cuda or cpu.
    outputSegmentation - None: a new segmentation node per run; a node: the user chose to write into it.
    trainingSegmentation, trainingSegmentIDs - the painted segments to learn from.
    baseModel - what fine-tuning starts from ("base:BACKBONE" or "adapter:NAME"); "" until the panel has read
        the model library and picked the registry's default (LiteMedSAM without a SAM ViT checkpoint).
    adapterName, steps - the new adapter's library name and training length.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    model: str = ""
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    outputSegmentation: vtkMRMLSegmentationNode
    trainingSegmentation: vtkMRMLSegmentationNode
    trainingSegmentIDs: list[str]
    baseModel: str = ""
    adapterName: str = ""
    steps: Annotated[int, WithinRange(1, 100000)] = 300
