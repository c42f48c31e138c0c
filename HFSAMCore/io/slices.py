"""Volume <-> model-ready 2D slices: canonical orientation, intensity presets, slice lists.

Why a canonical orientation: the model learns what a liver looks like in an
axial slice with the patient's front at the top and the patient's right on the
image's left (the radiological display). Files store the same anatomy with
any voxel order and any axis flips (the sample DICOM and its label NIfTI differ
by a y flip), so an adapter trained on one file would see mirrored anatomy in
another. ``SliceView`` therefore reorders and flips the voxel array, from the
image's direction matrix, into one fixed patient orientation. It never
resamples: it only permutes and flips axes (numpy views), so it is exact,
cheap and perfectly invertible, and every canonical slice is one original slice.

Canonical orientations (LPS patient axes: +x left, +y posterior, +z superior):

=========  =====================  ==========================  ===========================
axis       slice index runs to    rows run                    columns run
=========  =====================  ==========================  ===========================
axial      superior (S)           anterior -> posterior (P)   right -> left (L)
coronal    posterior (P)          superior -> inferior (I)    right -> left (L)
sagittal   left (L)               superior -> inferior (I)    anterior -> posterior (P)
=========  =====================  ==========================  ===========================

The axial case equals the numpy array [z, y, x] of an image with identity
direction, as SimpleITK reads it.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..model.registry import AXES, INTENSITY_PRESETS

# (physical LPS axis, sign) for the slice axis, the rows and the columns.
_CANONICAL = {
    "axial": ((2, +1), (1, +1), (0, +1)),
    "coronal": ((1, +1), (2, -1), (0, +1)),
    "sagittal": ((0, +1), (2, -1), (1, +1)),
}

#: Synapse convention (TransUNet, SAMed, H-SAM, HF-SAM): abdominal soft-tissue window.
CT_WINDOW = (-125.0, 275.0)
#: MR: robust range over the whole volume (percentiles), so one bright vessel or
#: artefact does not squash the contrast of everything else.
MR_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class SliceView:
    """How one image's voxel array maps onto a stack of canonical 2D slices.

    Build it with ``SliceView.from_image(image, axis)``. ``numpy_axes`` is the
    order of the sitk array's axes ([k, j, i]) that makes the canonical stack,
    ``flips`` says which canonical axes are then reversed.
    """

    axis: str
    numpy_axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    array_shape: tuple[int, int, int]  # the sitk array's shape, [k, j, i]
    spacing: tuple[float, float, float]  # the image's spacing, ITK order (i, j, k)

    @classmethod
    def from_image(cls, image: sitk.Image | sitk.ImageFileReader, axis: str = "axial") -> SliceView:
        if axis not in _CANONICAL:
            raise InputError(f"unknown slice axis {axis!r}: use one of {', '.join(AXES)}")
        if image.GetDimension() != 3:
            raise InputError("slicing needs a 3D volume")
        direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
        # direction[p, j]: cosine between index axis j (i, j, k) and physical axis p (x, y, z).
        # Pick the one-to-one pairing with the largest total |cosine|; plain per-axis argmax
        # could give two physical axes the same index axis for a 45-degree oblique scan.
        pairing = max(
            itertools.permutations(range(3)),
            key=lambda perm: sum(abs(direction[p, perm[p]]) for p in range(3)),
        )
        numpy_axes, flips = [], []
        for physical, wanted_sign in _CANONICAL[axis]:
            index_axis = pairing[physical]
            numpy_axes.append(2 - index_axis)  # sitk arrays are [k, j, i]
            actual_sign = 1 if direction[physical, index_axis] >= 0 else -1
            flips.append(actual_sign != wanted_sign)
        size, spacing = image.GetSize(), image.GetSpacing()
        return cls(
            axis=axis,
            numpy_axes=(numpy_axes[0], numpy_axes[1], numpy_axes[2]),
            flips=(flips[0], flips[1], flips[2]),
            array_shape=(size[2], size[1], size[0]),
            spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        )

    # ------------------------------------------------------------------ arrays

    def to_slices(self, array: np.ndarray) -> np.ndarray:
        """sitk array [k, j, i] -> canonical stack [n, h, w] (a view: copy before writing)."""
        self._check_shape(array.shape, self.array_shape, "array")
        out = np.transpose(array, self.numpy_axes)
        flip_axes = tuple(a for a, f in enumerate(self.flips) if f)
        return np.flip(out, flip_axes) if flip_axes else out

    def from_slices(self, stack: np.ndarray) -> np.ndarray:
        """Exact inverse of ``to_slices``: canonical stack -> contiguous sitk array [k, j, i]."""
        self._check_shape(stack.shape, self.stack_shape, "slice stack")
        flip_axes = tuple(a for a, f in enumerate(self.flips) if f)
        out = np.flip(stack, flip_axes) if flip_axes else stack
        return np.ascontiguousarray(np.transpose(out, np.argsort(self.numpy_axes)))

    @staticmethod
    def _check_shape(got: tuple, want: tuple, what: str) -> None:
        if tuple(got) != tuple(want):
            raise InputError(f"{what} has shape {tuple(got)}, expected {tuple(want)} for this volume")

    # ------------------------------------------------------------------ indices and sizes

    @property
    def stack_shape(self) -> tuple[int, int, int]:
        shape, (a, b, c) = self.array_shape, self.numpy_axes
        return (shape[a], shape[b], shape[c])

    @property
    def n_slices(self) -> int:
        return self.stack_shape[0]

    @property
    def slice_shape(self) -> tuple[int, int]:
        return self.stack_shape[1], self.stack_shape[2]

    @property
    def original_axis(self) -> int:
        """ITK index axis (0 = i, 1 = j, 2 = k) the slices run along."""
        return 2 - self.numpy_axes[0]

    def original_index(self, s: int) -> int:
        """Canonical slice ``s`` -> index along ``original_axis`` (Slicer's slice number)."""
        self._check_index(s)
        return self.n_slices - 1 - s if self.flips[0] else s

    def canonical_index(self, k: int) -> int:
        """Index ``k`` along ``original_axis`` -> canonical slice number (the inverse)."""
        self._check_index(k)
        return self.n_slices - 1 - k if self.flips[0] else k

    def _check_index(self, s: int) -> None:
        if not 0 <= s < self.n_slices:
            raise InputError(f"slice {s} is outside the volume (0..{self.n_slices - 1})")

    @property
    def slice_spacing_mm(self) -> tuple[float, float]:
        """In-plane spacing of the canonical slices: (rows, columns)."""
        return self.spacing[2 - self.numpy_axes[1]], self.spacing[2 - self.numpy_axes[2]]

    @property
    def slice_thickness_mm(self) -> float:
        """Distance between neighbouring slices."""
        return self.spacing[self.original_axis]


#: A slice with fewer voxels than this along a side is a strip, not an image: resized to the model's
#: square input it would be one or two rows stretched over the whole picture.
MIN_SLICE_VOXELS = 16


def check_slices_are_images(image: sitk.Image, axis: str, name: str) -> SliceView:
    """The view of ``image`` along ``axis``, refused when its slices are too thin to be images
    (naming the axes whose slices would do)."""
    view = SliceView.from_image(image, axis)
    h, w = view.slice_shape
    if min(h, w) >= MIN_SLICE_VOXELS:
        return view
    others = []
    for other in AXES:
        oh, ow = SliceView.from_image(image, other).slice_shape
        if other != axis and min(oh, ow) >= MIN_SLICE_VOXELS:
            others.append(f"--axis {other} ({ow} x {oh})")
    hint = f"use {' or '.join(others)}" if others else "this volume has no direction with image-sized slices"
    raise InputError(
        f"{name}'s {axis} slices are {w} x {h} voxels, too thin to be images (HF-SAM needs at least "
        f"{MIN_SLICE_VOXELS} x {MIN_SLICE_VOXELS}): {hint}"
    )


def choose_training_slices(view: SliceView, label_stack: np.ndarray, slices) -> list[int]:
    """Canonical indices of the slices to train on: every labeled one for "auto", else the given
    ones (indices along the image's own slice axis), each of which must carry a label."""
    labeled = labeled_slices(label_stack)
    if not labeled:
        raise InputError("the labels have no labeled voxel on the image grid: paint at least one slice")
    if slices == "auto":
        return labeled
    chosen = [view.canonical_index(k) for k in slices]
    empty = [view.original_index(s) for s in chosen if s not in set(labeled)]
    if empty:
        raise InputError(
            f"slice(s) {', '.join(map(str, empty))} carry no label; labeled slices are "
            f"{', '.join(str(view.original_index(s)) for s in labeled)}"
        )
    return chosen


# --------------------------------------------------------------------------- intensity


def choose_preset(image: sitk.Image) -> Literal["ct", "mr"]:
    """Pick the intensity preset: "ct" or "mr".

    1. DICOM modality kept by ``io/read.read_image`` (``hfsam_modality``): CT -> "ct", MR -> "mr".
    2. Otherwise the values: a CT in Hounsfield units has air near -1000, which no
       MR has (MR values are >= 0, or small after normalisation). Rule: "ct" when
       at least 0.1 % of the voxels lie in the air range [-1100, -500] HU and the
       99th percentile is below 4000 (bulk tissue, not raw scanner counts).
       Padding values (-2048, -3024, -32768) are ignored by this rule. A CT
       stored without its rescale (air = 0) is taken as "mr"; pass the preset
       explicitly then.
    """
    if image.HasMetaDataKey("hfsam_modality"):
        modality = image.GetMetaData("hfsam_modality").strip().upper()
        if modality == "CT":
            return "ct"
        if modality == "MR":
            return "mr"
    arr = sitk.GetArrayViewFromImage(image)
    sample = arr.ravel()[:: max(1, arr.size // 2_000_000)]  # a regular subsample is plenty
    air = np.count_nonzero((sample >= -1100) & (sample <= -500))
    if air >= 0.001 * sample.size and float(np.percentile(sample, 99)) < 4000:
        return "ct"
    return "mr"


def volume_stats(array: np.ndarray, preset: str) -> tuple[float, float]:
    """The intensity window (lo, hi) for ``preset``, computed once per volume.

    "ct" is the fixed Synapse window; "mr" is the 0.5 and 99.5 percentiles of
    the WHOLE volume, so that every batch of slices is scaled alike.
    """
    _check_preset(preset)
    if preset == "ct":
        return CT_WINDOW
    arr = np.asarray(array)
    if arr.size == 0:
        return 0.0, 0.0
    lo, hi = np.percentile(arr, MR_PERCENTILES)
    return float(lo), float(hi)


def normalize(stack: np.ndarray, preset: str, *, stats: tuple[float, float] | None = None) -> np.ndarray:
    """Clip to the preset's window and scale to float32 in [0, 1].

    Pass ``stats`` from ``volume_stats`` of the whole volume when normalising
    slices in batches (needed for "mr"; without it the window is taken from
    ``stack`` alone). A window of zero width (a constant volume) gives zeros.
    """
    _check_preset(preset)
    lo, hi = stats if stats is not None else volume_stats(stack, preset)
    x = np.asarray(stack, dtype=np.float32)
    if not hi > lo:
        return np.zeros(x.shape, dtype=np.float32)
    out = (np.clip(x, lo, hi) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)  # float rounding may step a hair outside


def _check_preset(preset: str) -> None:
    if preset not in INTENSITY_PRESETS:
        raise InputError(f"unknown intensity preset {preset!r}: use one of {', '.join(INTENSITY_PRESETS)}")


# --------------------------------------------------------------------------- slice lists


def labeled_slices(label_stack: np.ndarray) -> list[int]:
    """Canonical slice indices whose labels are not all background."""
    flat = np.asarray(label_stack).reshape(label_stack.shape[0], -1)
    return np.flatnonzero(flat.any(axis=1)).tolist()


_ITEM = re.compile(r"([0-9]+)(?:\s*-\s*([0-9]+))?")


def parse_slice_list(text: str, n_slices: int) -> list[int] | Literal["auto"]:
    """Parse a user's slice list: "12,15,20", ranges "10-14", or "auto".

    Returns sorted unique indices (0-based) or the string "auto". Anything else
    (empty, not a number, reversed range, outside 0..n_slices-1) raises
    ``InputError`` with a one-line message; no other exception for any string.
    """
    if not isinstance(text, str):
        raise InputError(f"slice list must be text like '10-14,20', got {type(text).__name__}")
    if not isinstance(n_slices, int) or n_slices < 1:
        raise InputError(f"the volume has no slices to choose from (n_slices={n_slices!r})")
    body = text.strip()
    if not body:
        raise InputError("no slices given: write e.g. '10-14,20' or 'auto'")
    if body.lower() == "auto":
        return "auto"
    last = n_slices - 1
    chosen: set[int] = set()
    for item in body.split(","):
        item = item.strip()
        match = _ITEM.fullmatch(item)
        if not match:
            shown = _shorten(item) if item else "an empty item"
            raise InputError(f"cannot read {shown} in the slice list: write slice numbers and ranges like '10-14,20'")
        start = _slice_number(match.group(1), last)
        stop = _slice_number(match.group(2), last) if match.group(2) is not None else start
        if stop < start:
            raise InputError(f"range {start}-{stop} is reversed: write {stop}-{start}")
        for s in (start, stop):
            if s > last:
                raise InputError(f"slice {s} is outside the volume (0..{last})")
        chosen.update(range(start, stop + 1))
    return sorted(chosen)


def _slice_number(digits: str, last: int) -> int:
    # int() refuses strings over 4300 digits (ValueError): no volume has 10**12 slices anyway.
    if len(digits) > 12:
        raise InputError(f"slice {_shorten(digits)} is outside the volume (0..{last})")
    return int(digits)


def _shorten(item: str) -> str:
    """Quote user text safely on one line (repr escapes newlines and control characters)."""
    return repr(item if len(item) <= 30 else item[:30] + "...")
