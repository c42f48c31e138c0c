"""The few-shot training set: a volume's labeled slices as model-ready tensors on the device."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
from torch.nn import functional as F

from ..errors import InputError
from ..io.geometry import labels_onto_image
from ..io.slices import (
    SliceView,
    choose_preset,
    choose_training_slices,
    normalize,
    volume_stats,
)
from ..model.inference import to_model_input


@dataclass
class TrainingSet:
    """Slices ready for the model: images [N,1,S,S] in [0,1], labels [N,S,S] (long)."""

    images: torch.Tensor
    labels: torch.Tensor
    slices: list[int]  # indices along the image's own slice axis (what the user sees)
    preset: str
    num_classes: int


def prepare_training_set(
    image: sitk.Image,
    labels: sitk.Image,
    *,
    num_classes: int,
    img_size: int,
    slices: list[int] | str = "auto",
    axis: str = "axial",
    preset: str = "auto",
    device: torch.device | str = "cpu",
    label_values: list[int] | None = None,
) -> TrainingSet:
    """Bring LABELS onto IMAGE's grid by physical position and take the chosen slices.

    ``label_values``: the label-map value that paints each class, in class order (see
    classes.classes_for_labels); None: class k is label value k.
    """
    device = torch.device(device)
    labels = labels_onto_image(labels, image)
    view = SliceView.from_image(image, axis)
    array = sitk.GetArrayViewFromImage(image)
    image_stack = view.to_slices(array)
    label_stack = view.to_slices(sitk.GetArrayViewFromImage(labels))
    label_stack = _classes_of(label_stack, num_classes, label_values)
    chosen = choose_training_slices(view, label_stack, slices)
    preset = choose_preset(image) if preset == "auto" else preset
    stats = volume_stats(array, preset)
    images = to_model_input(normalize(image_stack[chosen], preset, stats=stats), img_size, device)
    lab = torch.from_numpy(np.ascontiguousarray(label_stack[chosen], dtype=np.int64)).to(device)
    lab = resize_labels(lab, (img_size, img_size))
    return TrainingSet(images, lab, [view.original_index(s) for s in chosen], preset, num_classes)


def resize_labels(labels: torch.Tensor, size) -> torch.Tensor:
    """[B,h,w] integer labels -> [B,*size], nearest neighbour on the same pixel grid as the images.

    torch's "nearest" picks source pixel floor(i * scale), a grid shifted by half a source
    pixel against the bilinear resize of the images (align_corners=False, pixel centres at
    (i + 0.5) * scale - 0.5): at 101 -> 256 px the labels would sit 0.75 px off the anatomy.
    "nearest-exact" takes floor((i + 0.5) * scale), the source pixel whose area holds the centre.
    """
    out = F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest-exact")
    return out[:, 0].to(labels.dtype)


def _classes_of(label_stack: np.ndarray, num_classes: int, label_values: list[int] | None) -> np.ndarray:
    """Label values -> class indices 1..K (0 stays background); refuses values no class has."""
    top = int(label_stack.max()) if label_stack.size else 0
    if label_values is None:
        if top > num_classes:
            raise InputError(
                f"the labels contain class {top} but only {num_classes} class name(s) were given; "
                "pass one name per label value with --classes"
            )
        return label_stack
    lut = np.zeros(max(top, max(label_values)) + 1, dtype=np.uint8)
    lut[list(label_values)] = np.arange(1, len(label_values) + 1)
    present = np.flatnonzero(np.bincount(label_stack.ravel(), minlength=1)) if top < 1 << 16 else np.unique(label_stack)
    unknown = [int(v) for v in present if v and v not in set(label_values)]
    if unknown:
        raise InputError(
            f"the labels contain value {unknown[-1]}, which no class paints; pass one name per label "
            "value with --classes"
        )
    return lut[label_stack]
