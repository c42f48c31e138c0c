"""That the geometry ITK returns is the one the file's header states (spacing, direction, NIfTI sform/qform)."""

from __future__ import annotations

import contextlib
import zlib
from pathlib import Path

import numpy as np

from ..errors import InputError
from .formats import NIFTI_HEADER_SIZES, Warn, header_lines, open_maybe_gzip


def check_geometry(image, name: str) -> None:
    """Every format: spacing finite and positive, origin finite, a non-singular direction matrix."""
    spacing = np.asarray(image.GetSpacing(), float)
    origin = np.asarray(image.GetOrigin(), float)
    n = image.GetDimension()
    direction = np.asarray(image.GetDirection(), float).reshape(n, n)
    if not (np.isfinite(spacing).all() and (spacing > 0).all()):
        raise InputError(
            f"{name} has the voxel spacing {tuple(spacing)}: spacings must be positive numbers; fix the header"
        )
    if not (np.isfinite(origin).all() and np.isfinite(direction).all()) or abs(np.linalg.det(direction)) < 1e-6:
        raise InputError(f"{name} has an invalid origin or direction matrix in its header: fix the header")


def nifti_header_geometry(path: Path) -> dict | None:
    """qform and sform of a NIfTI-1/2 header as 4x4 voxel-to-RAS matrices (None where the code is 0),
    and pixdim; None when the header cannot be parsed."""
    try:
        with open_maybe_gzip(path) as fh:
            head = fh.read(540)
    except (OSError, EOFError, zlib.error):
        return None
    if len(head) < 348:
        return None
    for order in "<>":
        size = int(np.frombuffer(head[:4], order + "i4")[0])
        if size in NIFTI_HEADER_SIZES:
            break
    else:
        return None
    if size == 348:
        f, i2 = order + "f4", order + "i2"
        pixdim = np.frombuffer(head[76:108], f).astype(float)
        qcode, scode = (int(v) for v in np.frombuffer(head[252:256], i2))
        quat = np.frombuffer(head[256:280], f).astype(float)
        srow = np.frombuffer(head[280:328], f).astype(float).reshape(3, 4)
    else:
        if len(head) < 540:
            return None
        f, i4 = order + "f8", order + "i4"
        pixdim = np.frombuffer(head[104:168], f).astype(float)
        qcode, scode = (int(v) for v in np.frombuffer(head[344:352], i4))
        quat = np.frombuffer(head[352:400], f).astype(float)
        srow = np.frombuffer(head[400:496], f).astype(float).reshape(3, 4)
    out = {"pixdim": pixdim, "qform": None, "sform": None}
    if scode > 0:
        out["sform"] = np.vstack([srow, [0, 0, 0, 1]])
    if qcode > 0:
        b, c, d = quat[:3]
        a = np.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
        rot = np.array(
            [
                [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
            ]
        )
        qfac = -1.0 if pixdim[0] < 0 else 1.0
        affine = np.eye(4)
        affine[:3, :3] = rot @ np.diag([abs(pixdim[1]), abs(pixdim[2]), qfac * abs(pixdim[3])])  # as nifticlib
        affine[:3, 3] = quat[3:6]
        out["qform"] = affine
    return out


def image_affine_ras(image) -> np.ndarray:
    """ITK's geometry (LPS) as a 4x4 voxel-to-RAS matrix, comparable with a NIfTI header's."""
    n = image.GetDimension()  # a 4D image: its first three axes
    direction = np.asarray(image.GetDirection(), float).reshape(n, n)[:3, :3]
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(image.GetSpacing()[:3])
    affine[:3, 3] = image.GetOrigin()[:3]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def max_displacement_mm(a: np.ndarray, b: np.ndarray, size) -> float:
    """How far apart two voxel-to-world matrices put the corner voxels of a grid of ``size``, in mm."""
    corners = np.array(np.meshgrid(*[[0.0, max(0, s - 1)] for s in size[:3]], indexing="ij")).reshape(3, -1)
    points = np.vstack([corners, np.ones(corners.shape[1])])
    return float(np.abs((a @ points) - (b @ points))[:3].max())


#: Geometry that differs by less than this (in mm, at the volume's corners) is the same: float32
#: storage in NIfTI rounds a few tenths of a micrometre.
GEOMETRY_TOLERANCE_MM = 1e-3


def check_nifti_geometry(path: Path, image, warn: Warn | None) -> None:
    """The geometry ITK returns must be the one the header states, and the header must not
    contradict itself. ITK quietly prefers the sform over a disagreeing qform, replaces a zero or
    NaN spacing by 1 mm, and orthonormalises what it cannot represent."""
    header = nifti_header_geometry(path)
    if header is None or image.GetDimension() < 3:
        return
    size = image.GetSize()
    name = str(path)
    sform, qform = header["sform"], header["qform"]
    pixdim = header["pixdim"][1:4]
    if (qform is not None or sform is None) and not (np.isfinite(pixdim).all() and (pixdim != 0).all()):
        raise InputError(
            f"{name}'s header gives the voxel spacing {tuple(float(v) for v in pixdim)} (pixdim): "
            "spacings must be positive numbers, and ITK would replace this one by 1 mm; fix the header"
        )
    for what, affine in (("sform", sform), ("qform", qform)):
        if affine is not None and not np.isfinite(affine).all():
            raise InputError(f"{name}'s header has a {what} with NaN or infinite values: fix the header")
    if sform is not None and qform is not None:
        apart = max_displacement_mm(sform, qform, size)
        if apart > GEOMETRY_TOLERANCE_MM:
            raise InputError(
                f"{name}'s header contradicts itself: its qform and sform place the volume up to "
                f"{apart:.3g} mm apart, so no reader can know which is right; fix the header "
                "(e.g. set the wrong one's code to 0) or export the volume again"
            )
    stated = sform if sform is not None else qform
    if stated is None:
        if warn:
            warn(
                f"{name} has no orientation in its header (qform and sform codes are 0): its voxel axes are "
                "taken as the patient axes, which may be mirrored or rotated; check it in 3D Slicer"
            )
        return
    off = max_displacement_mm(image_affine_ras(image), stated, size)
    if off > GEOMETRY_TOLERANCE_MM:
        which = "sform" if sform is not None else "qform"
        raise InputError(
            f"{name}'s header cannot be read as it states its geometry (its {which} with pixdim "
            f"{tuple(float(v) for v in pixdim)}): ITK would place voxels up to {off:.3g} mm away from "
            "where the header puts them; fix the header or export the volume as NRRD"
        )


def check_no_geometry(path: Path, fmt: str, warn: Warn | None) -> None:
    """NRRD/MetaImage without any spacing or orientation: ITK assumes 1 mm voxels at the origin."""
    if warn is None or fmt not in ("NRRD", "MetaImage"):
        return
    with contextlib.suppress(OSError):
        text = "\n".join(header_lines(path, 1 << 14)).lower()
        keys = ("space directions", "spacings") if fmt == "NRRD" else ("elementspacing", "elementsize")
        if not any(k in text for k in keys):
            warn(
                f"{path} has no voxel spacing in its header: it is read as 1 mm voxels at the origin, so "
                "distances (HD95 in mm) and overlays with other scans are wrong unless that is true"
            )
