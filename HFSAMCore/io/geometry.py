"""Geometry: comparing grids, and bringing label maps onto an image grid by physical position."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .header_geometry import max_displacement_mm
from .reader_messages import format_vector


def affine_of(origin, spacing, direction) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = np.asarray(direction, float).reshape(3, 3) @ np.diag(spacing)
    m[:3, 3] = origin
    return m


def labels_onto_image(labels: sitk.Image, image: sitk.Image) -> sitk.Image:
    """Resample a label map onto ``image``'s grid by physical position (nearest neighbour).

    Voxels outside the label map become 0. The result has the image's origin,
    spacing, direction and size, and pixel type UInt8 (UInt16 when a label is
    256 or more). Refuses label maps whose physical box does not meet the
    image's at all: they belong to another scan or another coordinate frame.
    """
    if labels.GetDimension() != 3 or image.GetDimension() != 3:
        raise InputError("labels and image must both be 3D volumes")
    if labels.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("the label map has several components per voxel: pass a scalar label volume")
    if not _boxes_overlap(_physical_box(labels), _physical_box(image)):
        raise InputError(
            "the label map and the image do not overlap in physical space: "
            "they come from different scans or coordinate frames"
        )
    hi = float(sitk.GetArrayViewFromImage(labels).max()) if labels.GetNumberOfPixels() else 0.0
    pixel = sitk.sitkUInt8 if hi < 256 else sitk.sitkUInt16
    if hi >= 65536:
        pixel = sitk.sitkUInt32
    return sitk.Resample(labels, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, pixel)


def labels_outside(labels: sitk.Image, grid: sitk.Image) -> tuple[int, int]:
    """(labeled voxels of ``labels`` whose centres fall outside ``grid``, all labeled voxels).

    What ``labels_onto_image`` drops without a word: a label file shifted against its image, or a
    reference that reaches beyond a prediction, loses those voxels. Counted slab by slab, so the
    cost is one pass over the label map.
    """
    arr = sitk.GetArrayViewFromImage(labels)
    to_world = image_affine(labels)
    to_grid = np.linalg.inv(image_affine(grid))
    size = np.asarray(grid.GetSize(), float)[:, None]
    outside = total = 0
    for k0 in range(0, arr.shape[0], 16):
        kk, jj, ii = np.nonzero(arr[k0 : k0 + 16])
        if not kk.size:
            continue
        points = np.vstack([ii, jj, kk + k0, np.ones_like(ii)]).astype(float)
        index = (to_grid @ to_world @ points)[:3]
        inside = ((index > -0.5) & (index < size - 0.5)).all(axis=0)
        total += kk.size
        outside += int(kk.size - np.count_nonzero(inside))
    return outside, total


def describe_outside(outside: int, total: int, what: str, where: str) -> str | None:
    """The warning for ``labels_outside``'s count (None when nothing meaningful is lost: under 0.5 %)."""
    if not total or outside / total < 0.005:
        return None
    return (
        f"{100 * outside / total:.1f} % of {what} ({outside} of {total} labeled voxels) lie outside {where} "
        "and are ignored"
    )


def _physical_box(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned physical box around the voxel EDGES (centres +- half a voxel)."""
    size = np.asarray(image.GetSize(), dtype=float)
    corners = np.array(np.meshgrid(*[[-0.5, s - 0.5] for s in size], indexing="ij")).reshape(3, -1).T
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    points = np.asarray(image.GetOrigin(), dtype=float) + (direction @ (corners * spacing).T).T
    return points.min(axis=0), points.max(axis=0)


def _boxes_overlap(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> bool:
    return bool(np.all(a[0] < b[1]) and np.all(b[0] < a[1]))


def geometry_mismatch(a: sitk.Image, b: sitk.Image, tol: float = 1e-6) -> str | None:
    """None when ``a`` and ``b`` share size, origin, spacing and direction (within ``tol``),
    else a short message naming what differs."""
    if a.GetDimension() != b.GetDimension():
        return f"dimension differs: {a.GetDimension()} vs {b.GetDimension()}"
    if a.GetSize() != b.GetSize():
        return f"size differs: {a.GetSize()} vs {b.GetSize()}"
    for what, va, vb in (
        ("origin", a.GetOrigin(), b.GetOrigin()),
        ("spacing", a.GetSpacing(), b.GetSpacing()),
        ("direction", a.GetDirection(), b.GetDirection()),
    ):
        if np.max(np.abs(np.subtract(va, vb))) > tol:
            return f"{what} differs: {format_vector(va)} vs {format_vector(vb)}"
    return None


def same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-6) -> bool:
    """True when ``a`` and ``b`` lie on the same voxel grid (see ``geometry_mismatch``)."""
    return geometry_mismatch(a, b, tol) is None


def image_affine(image: sitk.Image) -> np.ndarray:
    return affine_of(image.GetOrigin(), image.GetSpacing(), image.GetDirection())


def grid_moved_mm(a: sitk.Image, b: sitk.Image) -> float:
    """How far ``b``'s grid puts ``a``'s corner voxels from where ``a`` has them (inf: another size)."""
    if a.GetDimension() != 3 or b.GetDimension() != 3 or a.GetSize() != b.GetSize():
        return float("inf")
    return max_displacement_mm(image_affine(a), image_affine(b), a.GetSize())
