"""Read, check and write volumes; compare geometry; bring label maps onto an image grid.

Everything here speaks SimpleITK images, so that geometry (origin, spacing,
direction) travels with the voxels from the file to the model and back. Three
rules shape the code:

* Refuse bad input early with one line that says what to do (``InputError``):
  a 4D, RGB or 2D image, NaN voxels or a blank volume would otherwise fail deep
  inside the model with a message nobody can act on.
* Labels are matched to images by PHYSICAL position, never by array index: two
  files of the same patient may store their axes in different orders or
  directions (the sample DICOM labels have a flipped y axis), and pairing arrays
  silently mirrors every slice.
* Outputs are written atomically (temp name in the same folder, fsync,
  ``os.replace``) and never overwrite unless asked, so a crash, a full disk or
  a cancelled run never leaves a half-written file under the final name.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .data_size import check_data_size, check_nifti_complete, non_finite
from .dicom import SERIES_SEP, read_dicom_file_series, read_dicom_folder
from .formats import Warn, check_file
from .geometry import labels_onto_image
from .header_geometry import check_geometry, check_nifti_geometry, check_no_geometry
from .reader_messages import (
    captured_stderr,
    display_path,
    first_line,
    itk_warnings_on,
    pass_on,
    python_warning,
    read_error,
    reader_warnings,
)

#: File name endings SimpleITK reads and writes for us (longest first so that
#: ".nii.gz" wins over ".gz").
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def read_image(path: str | os.PathLike, *, warn: Warn | None = None) -> sitk.Image:
    """Read a 3D scalar image: NIfTI, NRRD, MHA/MHD, or a folder holding a DICOM series.

    ``"folder::SERIES_UID"`` picks one series from a folder that holds several.
    A single DICOM file reads the whole series it belongs to. The pixel type
    of the file is kept. For DICOM the modality (0008|0060) is stored as image
    metadata ``hfsam_modality`` so that the intensity preset can be chosen from it.
    Every file passes the integrity checks (``formats``, ``data_size``, ``header_geometry``,
    ``dicom``: what it is, complete data, geometry as the header states it); what the reader
    only warned about goes to ``warn`` (default: Python's ``warnings``), never nowhere.
    """
    image = _drop_single_time_point(_read_any(path, warn))
    _check_scalar_3d(image, display_path(path))
    arr = sitk.GetArrayViewFromImage(image)
    _check_finite(arr, display_path(path))
    lo, hi = _min_max(arr)
    if lo == hi:
        raise InputError(
            f"{display_path(path)} is blank (every voxel is {lo:g}): choose the volume that holds the scan"
        )
    return image


def read_labels(path: str | os.PathLike, *, warn: Warn | None = None) -> sitk.Image:
    """Read an integer label map (0 = background) with the same checks as ``read_image``.

    Differences: a label map may be all zero (a volume with nothing labelled
    yet); float files are accepted when every value is a whole number (some
    tools save labels as float); negative values, and more than ``MAX_LABEL_VALUES``
    different values (an image, not a label map), are refused. The result is
    always unsigned: UInt8 when the largest label is below 256, else UInt16
    (UInt32 above 65535), so that later code needs no pixel-type cases.
    """
    image = _drop_single_time_point(_read_any(path, warn))
    name = display_path(path)
    _check_scalar_3d(image, name)
    return _as_label_image(image, name)


def read_label_volumes(paths: Iterable[str | os.PathLike], *, warn: Warn | None = None) -> sitk.Image:
    """Merge several binary volumes (one per class) into one label map.

    Class ``i + 1`` is the non-zero voxels of ``paths[i]``. Every volume is
    brought onto the FIRST volume's grid by physical position (nearest
    neighbour), so the files may differ in grid and axis order. Where classes
    overlap, the LATER class wins (the voxel gets the larger class value),
    exactly as if the volumes were painted one after another.
    """
    paths = list(paths)
    if not paths:
        raise InputError("no label volumes given: pass one binary volume per class")
    reference: sitk.Image | None = None
    merged: np.ndarray | None = None
    for i, p in enumerate(paths):
        img = read_labels(p, warn=warn)
        if reference is None or merged is None:  # the first volume: both are set together
            reference = img
            merged = np.zeros(sitk.GetArrayViewFromImage(img).shape, dtype=np.uint16)
        else:
            img = labels_onto_image(img, reference)
        mask = sitk.GetArrayViewFromImage(img) != 0
        merged[mask] = i + 1
    assert reference is not None and merged is not None
    out = sitk.GetImageFromArray(merged.astype(np.uint8 if len(paths) < 256 else np.uint16))
    out.CopyInformation(reference)
    return out


def _read_any(path: str | os.PathLike, warn: Warn | None) -> sitk.Image:
    """Dispatch on what ``path`` is: a file, a DICOM folder, or ``folder::UID``."""
    text = os.fspath(path)
    uid: str | None = None
    if not os.path.lexists(text) and SERIES_SEP in text:
        text, uid = text.rsplit(SERIES_SEP, 1)
    p = Path(text)
    if not os.path.lexists(p):
        raise InputError(f"{text} does not exist: check the path")
    if p.is_dir():
        return read_dicom_folder(p, uid, warn)
    if uid is not None:
        raise InputError(f"{text} is a file; the '::SERIES_UID' form needs a DICOM folder")
    fmt = check_file(p)
    if fmt == "DICOM":
        return read_dicom_file_series(p, warn)
    with captured_stderr() as said, itk_warnings_on():
        try:
            image, error = sitk.ReadImage(str(p)), None
        except RuntimeError as exc:
            image, error = None, exc
    captured = "".join(said)
    if error is not None:
        raise read_error(p, fmt, first_line(error), captured) from None
    assert image is not None  # ReadImage returned
    check_geometry(image, text)
    if fmt == "NIfTI":
        check_nifti_complete(p, image)
        check_nifti_geometry(p, image, warn or python_warning)
    else:
        size = image.GetSize()
        slice_bytes = int(np.prod(size[:2])) * image.GetNumberOfComponentsPerPixel() * image.GetSizeOfPixelComponent()
        check_data_size(p, fmt, slice_bytes)
        check_no_geometry(p, fmt, warn or python_warning)
    pass_on(reader_warnings(captured), p, warn)
    return image


def _drop_single_time_point(image: sitk.Image) -> sitk.Image:
    """A 4D file with one time point is a 3D volume in disguise (NRRD keeps the size-1
    axis, NIfTI drops it): treat both alike."""
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        size = list(image.GetSize()[:3]) + [0]
        return sitk.Extract(image, size, [0, 0, 0, 0], sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
    return image


def _check_scalar_3d(image: sitk.Image, name: str) -> None:
    dim = image.GetDimension()
    if dim == 4:
        raise InputError(f"{name} is a 4D image (a time series?): extract one 3D volume first")
    if dim == 2:
        raise InputError(f"{name} is a 2D image: HF-SAM needs a 3D volume (NIfTI, NRRD or a DICOM series)")
    if dim != 3:
        raise InputError(f"{name} has {dim} dimensions: HF-SAM needs a 3D volume")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{name} has {image.GetNumberOfComponentsPerPixel()} components per voxel (RGB/vector): "
            "convert it to a single grey-level volume first"
        )
    if sum(s > 1 for s in image.GetSize()) < 2:
        raise InputError(f"{name} has size {image.GetSize()}: it needs at least two voxels along two axes")


def _check_finite(arr: np.ndarray, name: str) -> None:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise non_finite(name)


def _min_max(arr: np.ndarray) -> tuple[float, float]:
    return float(arr.min()), float(arr.max())


#: A label map with more different values than this is an image (a CT has thousands), not a label map.
MAX_LABEL_VALUES = 1000


def _as_label_image(image: sitk.Image, name: str) -> sitk.Image:
    """Check label values and cast to the smallest unsigned type that holds them."""
    arr = sitk.GetArrayViewFromImage(image)
    if arr.dtype.kind == "f":
        _check_finite(arr, name)
    elif arr.dtype.kind not in "iu":
        raise InputError(f"{name} has pixel type {image.GetPixelIDTypeAsString()}: a label map must be integer")
    lo, hi = _min_max(arr)
    count = _count_values(arr)
    if count > MAX_LABEL_VALUES:
        raise InputError(
            f"{name} is an image, not a label map: it holds {count} different values (from {lo:g} to "
            f"{hi:g}); pass the label map (segmentation) instead"
        )
    if arr.dtype.kind == "f" and not np.array_equal(arr, np.round(arr)):
        raise InputError(f"{name} has non-integer values, so it is not a label map: pass an integer label volume")
    if lo < 0:
        raise InputError(f"{name} has negative label values (min {lo:g}): labels must be 0 (background) or positive")
    pixel = _label_pixel_type(hi)
    if image.GetPixelID() == pixel:
        return image
    out = sitk.Cast(image, pixel)
    return out


def _count_values(arr: np.ndarray) -> int:
    """How many different values ``arr`` holds (8/16-bit integers: one histogram, no copy)."""
    if arr.dtype.kind in "iu" and arr.dtype.itemsize <= 2:
        flat = np.ascontiguousarray(arr).ravel().view(np.uint8 if arr.dtype.itemsize == 1 else np.uint16)
        return int(np.count_nonzero(np.bincount(flat)))
    sample = np.unique(arr.ravel()[:: max(1, arr.size // 4_000_000)])
    return len(sample) if len(sample) > MAX_LABEL_VALUES else len(np.unique(arr))


def label_values(image: sitk.Image) -> list[int]:
    """The non-zero values of a label map, sorted."""
    arr = sitk.GetArrayViewFromImage(image)
    if arr.dtype.kind == "u" and arr.dtype.itemsize <= 2:
        return [int(v) for v in np.flatnonzero(np.bincount(arr.ravel())) if v]
    return [int(v) for v in np.unique(arr) if v]


def _label_pixel_type(max_value: float) -> int:
    if max_value < 256:
        return sitk.sitkUInt8
    if max_value < 65536:
        return sitk.sitkUInt16
    return sitk.sitkUInt32


def image_suffix(path: Path) -> str | None:
    """The image ending of ``path`` in lower case (".nii.gz", ...), or None when it has none."""
    name = path.name.lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s) and len(name) > len(s)), None)
