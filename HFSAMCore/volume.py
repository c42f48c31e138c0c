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

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import SimpleITK as sitk

from . import integrity
from .atomic import fsync_dir
from .errors import InputError
from .integrity import Warn

#: File name endings SimpleITK reads and writes for us (longest first so that
#: ".nii.gz" wins over ".gz").
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Metadata key under which the DICOM modality (0008|0060) is kept on the image.
MODALITY_KEY = "hfsam_modality"
_SERIES_SEP = "::"


# --------------------------------------------------------------------------- reading


def read_image(path: str | os.PathLike, *, warn: Warn | None = None) -> sitk.Image:
    """Read a 3D scalar image: NIfTI, NRRD, MHA/MHD, or a folder holding a DICOM series.

    ``"folder::SERIES_UID"`` picks one series from a folder that holds several.
    A single DICOM file reads the whole series it belongs to. The pixel type
    of the file is kept. For DICOM the modality (0008|0060) is stored as image
    metadata ``hfsam_modality`` so that the intensity preset can be chosen from it.
    Every file passes the integrity checks of ``integrity.py`` (what it is, complete data,
    geometry as the header states it); what the reader only warned about goes to ``warn``
    (default: Python's ``warnings``), never nowhere.
    """
    image = _drop_single_time_point(_read_any(path, warn))
    _check_scalar_3d(image, _display(path))
    arr = sitk.GetArrayViewFromImage(image)
    _check_finite(arr, _display(path))
    lo, hi = _min_max(arr)
    if lo == hi:
        raise InputError(
            f"{_display(path)} is blank (every voxel is {lo:g}): choose the volume that holds the scan"
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
    name = _display(path)
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
        if reference is None:
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
    if not os.path.lexists(text) and _SERIES_SEP in text:
        text, uid = text.rsplit(_SERIES_SEP, 1)
    p = Path(text)
    if not os.path.lexists(p):
        raise InputError(f"{text} does not exist: check the path")
    if p.is_dir():
        return _read_dicom_folder(p, uid, warn)
    if uid is not None:
        raise InputError(f"{text} is a file; the '::SERIES_UID' form needs a DICOM folder")
    fmt = integrity.check_file(p)
    if fmt == "DICOM":
        return _read_dicom_file_series(p, warn)
    with integrity.captured_stderr() as said, _itk_warnings_on():
        try:
            image, error = sitk.ReadImage(str(p)), None
        except RuntimeError as exc:
            image, error = None, exc
    captured = "".join(said)
    if error is not None:
        raise integrity.read_error(p, fmt, _first_line(error), captured) from None
    integrity.check_geometry(image, text)
    if fmt == "NIfTI":
        integrity.check_nifti_complete(p, image)
        integrity.check_nifti_geometry(p, image, warn or _python_warning)
    else:
        size = image.GetSize()
        slice_bytes = int(np.prod(size[:2])) * image.GetNumberOfComponentsPerPixel() * image.GetSizeOfPixelComponent()
        integrity.check_data_size(p, fmt, slice_bytes)
        integrity.check_no_geometry(p, fmt, warn or _python_warning)
    _pass_on(integrity.reader_warnings(captured), p, warn)
    return image


def _pass_on(messages: list[str], source, warn: Warn | None) -> None:
    """What the reader only warned about reaches the user, one line each."""
    for message in messages:
        (warn or _python_warning)(f"reading {source}: {message}")


def _python_warning(message: str) -> None:
    import warnings

    from .errors import HFSAMWarning

    warnings.warn(message, HFSAMWarning, stacklevel=3)


def _read_dicom_folder(folder: Path, uid: str | None, warn: Warn | None) -> sitk.Image:
    series = _list_series(folder)
    if not series:
        hint = " (it holds sub-folders: pass the one with the .dcm files)" if any(
            c.is_dir() for c in folder.iterdir()
        ) else ""
        raise InputError(
            f"no DICOM series in {folder}{hint}; for a NIfTI/NRRD file pass the file itself"
        )
    if uid is not None:
        if uid not in series:
            raise InputError(
                f"series {uid!r} is not in {folder}; it holds: {_describe_series(series)}"
            )
        return _read_series(folder, uid, series, warn)
    if len(series) > 1:
        raise InputError(
            f"{folder} holds {len(series)} DICOM series: {_describe_series(series)}; "
            f"pass the series' own folder or '{folder}::SERIES_UID'"
        )
    return _read_series(folder, next(iter(series)), series, warn)


def _read_dicom_file_series(file: Path, warn: Warn | None) -> sitk.Image:
    """A single DICOM file stands for the whole series it belongs to."""
    target = file.resolve()
    series = _list_series(file.parent)
    for uid, files in series.items():
        if any(Path(f).resolve() == target for f in files):
            return _read_series(file.parent, uid, series, warn)
    raise InputError(f"cannot read {file}: it is a DICOM file but not a readable image (damaged, truncated, or "
                     "not an image object such as a report or structure set)")


def _list_series(folder: Path) -> dict[str, tuple[str, ...]]:
    """Series UID -> sorted file names (GDCM sorts by position along the normal)."""
    reader = sitk.ImageSeriesReader
    try:
        with _quiet_itk():  # GDCM warns "No Series were found" on stderr for a plain folder
            uids = reader.GetGDCMSeriesIDs(str(folder))
        return {uid: tuple(reader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in uids}
    except RuntimeError as exc:
        raise InputError(f"cannot scan {folder} for DICOM: {_first_line(exc)}") from None


def _series_geometry(reader: sitk.ImageSeriesReader, image: sitk.Image, name: str, warn: Warn | None) -> sitk.Image:
    """Check the slice positions (Image Position (Patient)) against the geometry ITK gave the series.

    * ITK gives a series one slice spacing even when slices are missing or doubled, which
      silently stretches the anatomy: refuse such a series.
    * ITK takes the slice direction from the in-plane axes (their cross product), so a series
      acquired with a gantry tilt, whose slices step sideways as well, comes back as a straight
      box with every slice but the first moved (by centimetres at the top of a long scan). The
      true step between slices is used instead (a sheared direction matrix, as NRRD and MHA store
      it), so every voxel stays where the scanner put it; NIfTI outputs are then refused.
    """
    n = image.GetDepth()
    if n < 2:
        return image
    try:
        positions = np.array(
            [[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")] for i in range(n)]
        )
    except (RuntimeError, ValueError):
        return image  # no Image Position (Patient) on every slice: nothing to check against
    if positions.shape != (n, 3) or not np.isfinite(positions).all():
        return image
    gaps = np.linalg.norm(np.diff(positions, axis=0), axis=1)
    typical = float(np.median(gaps))
    step = (positions[-1] - positions[0]) / (n - 1)
    off_line = np.linalg.norm(positions - (positions[0] + np.outer(np.arange(n), step)), axis=1)
    bad = np.flatnonzero(np.abs(gaps - typical) > max(0.01 * typical, 1e-3))
    if typical == 0 or bad.size or off_line.max() > max(0.01 * typical, 1e-3):
        where = int(bad[0]) if bad.size else int(np.argmax(np.abs(gaps - typical)))
        raise InputError(
            f"{name} has unevenly spaced slices (gap of {gaps[where]:.3g} mm after slice {where}, "
            f"typical {typical:.3g} mm): slices are missing or doubled; export the complete series"
        )
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    true = direction.copy()
    true[:, 2] = step / np.linalg.norm(step)
    spacing = (*image.GetSpacing()[:2], float(np.linalg.norm(step)))
    moved = integrity.max_displacement_mm(_affine_of(image.GetOrigin(), image.GetSpacing(), direction),
                                          _affine_of(positions[0], spacing, true), image.GetSize())
    if moved <= integrity.GEOMETRY_TOLERANCE_MM:
        return image
    tilt = float(np.degrees(np.arccos(np.clip(abs(true[:, 2] @ direction[:, 2]), -1.0, 1.0))))
    image.SetOrigin(tuple(positions[0]))
    image.SetSpacing(spacing)
    image.SetDirection(tuple(true.ravel()))
    (warn or _python_warning)(
        f"{name} was acquired with a gantry tilt of {tilt:.3g} degrees: it is read with its true, sheared "
        f"geometry (ITK alone would move voxels up to {moved:.3g} mm); write results as NRRD or MHA, since "
        "NIfTI cannot store it")
    return image


def _affine_of(origin, spacing, direction) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = np.asarray(direction, float).reshape(3, 3) @ np.diag(spacing)
    m[:3, 3] = origin
    return m


def _describe_series(series: dict[str, tuple[str, ...]]) -> str:
    """One line per series is too long for a one-line error: join them with '; '."""
    parts = []
    for uid, files in series.items():
        desc = _dicom_tag(files[0], "0008|103e")
        label = uid if uid else "(no series UID)"
        parts.append(f"{label} ({len(files)} files{', ' + desc if desc else ''})")
    return "; ".join(parts)


def _dicom_tag(file: str, tag: str) -> str:
    """Read one tag from a file header only (cheap); '' when absent or unreadable."""
    try:
        r = sitk.ImageFileReader()
        r.SetFileName(file)
        r.ReadImageInformation()
        return r.GetMetaData(tag).strip() if r.HasMetaDataKey(tag) else ""
    except RuntimeError:
        return ""


def _read_series(folder: Path, uid: str, series: dict[str, tuple[str, ...]], warn: Warn | None) -> sitk.Image:
    files = series[uid]
    label = uid or "(no series UID)"
    every_listed = {f for listed in series.values() for f in listed}
    integrity.check_dicom_leftovers(folder, every_listed, _dicom_tag(files[0], "0008|0016") or None)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(files))
    reader.MetaDataDictionaryArrayUpdateOn()  # per-slice positions, to check the spacing below
    with integrity.captured_stderr() as said, _itk_warnings_on():
        try:
            image, error = reader.Execute(), None
        except RuntimeError as exc:
            image, error = None, exc
    if error is not None:
        raise InputError(f"cannot read DICOM series {label} in {folder}: {_first_line(error)}") from None
    name = f"DICOM series {label} in {folder}"
    integrity.check_geometry(image, name)
    image = _series_geometry(reader, image, name, warn)
    # ITK's own note on uneven slices is what _series_geometry refuses; anything else is passed on.
    _pass_on([w for w in integrity.reader_warnings("".join(said)) if "sampling" not in w.lower()], name, warn)
    modality = _dicom_tag(files[0], "0008|0060").upper()
    if modality:
        image.SetMetaData(MODALITY_KEY, modality)
    return image


# --------------------------------------------------------------------------- checks


def _drop_single_time_point(image: sitk.Image) -> sitk.Image:
    """A 4D file with one time point is a 3D volume in disguise (NRRD keeps the size-1
    axis, NIfTI drops it): treat both alike."""
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        size = list(image.GetSize()[:3]) + [0]
        return sitk.Extract(
            image, size, [0, 0, 0, 0], sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX
        )
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
        raise integrity.non_finite(name)


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
        raise InputError(f"{name} is an image, not a label map: it holds {count} different values (from {lo:g} to "
                         f"{hi:g}); pass the label map (segmentation) instead")
    if arr.dtype.kind == "f" and not np.array_equal(arr, np.round(arr)):
        raise InputError(
            f"{name} has non-integer values, so it is not a label map: pass an integer label volume"
        )
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


# --------------------------------------------------------------------------- geometry


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
    to_world = _affine(labels)
    to_grid = np.linalg.inv(_affine(grid))
    size = np.asarray(grid.GetSize(), float)[:, None]
    outside = total = 0
    for k0 in range(0, arr.shape[0], 16):
        kk, jj, ii = np.nonzero(arr[k0:k0 + 16])
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
    return (f"{100 * outside / total:.1f} % of {what} ({outside} of {total} labeled voxels) lie outside {where} "
            "and are ignored")


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
            return f"{what} differs: {_fmt(va)} vs {_fmt(vb)}"
    return None


def same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-6) -> bool:
    """True when ``a`` and ``b`` lie on the same voxel grid (see ``geometry_mismatch``)."""
    return geometry_mismatch(a, b, tol) is None


# --------------------------------------------------------------------------- writing


def write_image(
    image: sitk.Image, path: str | os.PathLike, *, overwrite: bool = False, compress: bool = True,
    sidecar: Any = None,
) -> Path:
    """Write ``image`` atomically to ``path`` (.nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd; any case).

    SimpleITK writes into a private temp folder next to the target (same file
    system, so the final ``os.replace`` is atomic); every file it produced is
    fsynced and moved into place, data files before the header of a detached
    format (.nhdr/.mhd), so the header never points at a missing file. On any
    failure (disk full, no permission) the temp folder is removed and nothing
    appears under the final name.

    The written file is read back and must hold the same voxels on the same grid: a format
    that cannot store the geometry (NIfTI and sheared axes) or a short write is an error,
    never a file that looks right. ``check_can_store`` says so before any work.

    ``sidecar``: a JSON-ready object written as ``sidecar_path(path)`` in the same
    step, completed before anything is renamed and renamed just before the image:
    a crash or a kill never leaves one without the other being complete, and the
    image's existence implies its sidecar's.
    """
    target = Path(path)
    suffix = image_suffix(target)
    if suffix is None:
        raise InputError(
            f"cannot write {target.name}: use one of {', '.join(IMAGE_SUFFIXES)}"
        )
    side_text = None if sidecar is None else _json_text(sidecar)
    # ITK picks its writer by the lower-case ending: write under that name, rename to the user's.
    itk_name = target.name[: -len(suffix)] + suffix

    def produce(tmp: Path) -> None:
        if side_text is not None:
            (tmp / sidecar_path(target).name).write_text(side_text, encoding="utf-8")
        written = tmp / itk_name
        # MetaImage warns about every NIfTI header field it cannot store; nifticlib prints its
        # own "** ERROR" lines for a short write. We report failures ourselves, in one line.
        with _quiet_itk(), _c_stderr_silenced():
            sitk.WriteImage(image, str(written), useCompression=compress)
            # ITK's NIfTI writer ignores failed writes (full disk): read the file back, which
            # fails on a short file, so that a damaged file never reaches the final name.
            try:
                back = sitk.ReadImage(str(written))
            except RuntimeError as exc:
                raise OSError(f"the written file does not read back ({_first_line(exc)})") from None
        if suffix in (".nii", ".nii.gz"):
            try:
                integrity.check_nifti_complete(written, back)
            except InputError:
                raise OSError("the written file is incomplete (disk full?)") from None
        moved = _grid_moved_mm(image, back)
        if moved > integrity.GEOMETRY_TOLERANCE_MM:
            raise OSError(f"{_FORMAT_OF[suffix]} cannot store this volume's geometry (voxels would move up to "
                          f"{moved:.3g} mm); write .nrrd or .mha instead")
        if not np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image)):
            raise OSError("the written file does not hold the voxels it was given")

    return _atomic_write(target, produce, overwrite=overwrite, names={itk_name: target.name})


_FORMAT_OF = {".nii.gz": "NIfTI", ".nii": "NIfTI", ".nrrd": "NRRD", ".nhdr": "NRRD", ".mha": "MetaImage",
              ".mhd": "MetaImage"}


def _affine(image: sitk.Image) -> np.ndarray:
    return _affine_of(image.GetOrigin(), image.GetSpacing(), image.GetDirection())


def _grid_moved_mm(a: sitk.Image, b: sitk.Image) -> float:
    """How far ``b``'s grid puts ``a``'s corner voxels from where ``a`` has them (inf: another size)."""
    if a.GetDimension() != 3 or b.GetDimension() != 3 or a.GetSize() != b.GetSize():
        return float("inf")
    return integrity.max_displacement_mm(_affine(a), _affine(b), a.GetSize())


def data_files(path: str | os.PathLike, *, compress: bool = True) -> list[Path]:
    """The data files ``write_image`` writes beside a detached header (.nhdr, .mhd), named as ITK
    names them: outputs too, so they are claimed like the header (outputs.Claims)."""
    target = Path(path)
    suffix = image_suffix(target)
    stem = target.name[: -len(suffix)] if suffix else target.name
    ending = {".nhdr": ".raw.gz" if compress else ".raw", ".mhd": ".zraw" if compress else ".raw"}.get(suffix or "")
    return [target.with_name(stem + ending)] if ending else []


def check_can_store(image: sitk.Image, path: str | os.PathLike) -> None:
    """Refuse, before any work, an output whose format cannot store ``image``'s geometry.

    A tiny volume with the same origin, spacing and direction is written in that format and
    read back (in a private temp folder): exactly what the real write will do, so the rule is
    ITK's own (NIfTI orthonormalises sheared axes, e.g. a CT with gantry tilt read from NRRD or
    DICOM) and no list of rules here can fall out of date.
    """
    target = Path(path)
    suffix = image_suffix(target)
    if suffix is None:
        raise InputError(f"cannot write {target.name}: use one of {', '.join(IMAGE_SUFFIXES)}")
    moved = _probe_format(image, suffix)
    if moved > integrity.GEOMETRY_TOLERANCE_MM:
        fits = [s for s in (".nrrd", ".mha") if _probe_format(image, s) <= integrity.GEOMETRY_TOLERANCE_MM]
        raise InputError(
            f"{target.name}: {_FORMAT_OF[suffix]} cannot store this volume's geometry ({_why_not(image)}); it "
            f"would move voxels up to {moved:.3g} mm from the anatomy they label: write "
            f"{' or '.join(fits) or 'another format'} instead"
        )


def _probe_format(image: sitk.Image, suffix: str) -> float:
    probe = sitk.Image([2, 2, 2], sitk.sitkUInt8)
    probe.SetOrigin(image.GetOrigin())
    probe.SetSpacing(image.GetSpacing())
    probe.SetDirection(image.GetDirection())
    with tempfile.TemporaryDirectory(prefix="hfsam-probe-") as folder:
        file = str(Path(folder) / f"probe{suffix}")
        try:
            with _quiet_itk(), _c_stderr_silenced():
                sitk.WriteImage(probe, file)
                back = sitk.ReadImage(file)
        except RuntimeError:
            return float("inf")
    scale = np.diag([(s - 1) / 1.0 for s in image.GetSize()] + [1.0])  # the probe's corners -> the volume's
    return integrity.max_displacement_mm(_affine(probe) @ scale, _affine(back) @ scale, (2, 2, 2))


def _why_not(image: sitk.Image) -> str:
    d = np.asarray(image.GetDirection(), float).reshape(3, 3)
    worst = max(abs(90.0 - np.degrees(np.arccos(np.clip(abs(d[:, i] @ d[:, j]), -1, 1))))
                for i in range(3) for j in range(i + 1, 3))
    return f"its axes are {worst:.3g} degrees from perpendicular, as with a gantry tilt" if worst > 1e-3 \
        else "its geometry does not survive the format"


def write_json(obj: Any, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``obj`` as strict JSON (no NaN/Infinity: a ValueError means the caller
    forgot to turn them into null) with the same atomic rules as ``write_image``."""
    text = _json_text(obj)
    target = Path(path)

    def produce(tmp: Path) -> None:
        (tmp / target.name).write_text(text, encoding="utf-8")

    return _atomic_write(target, produce, overwrite=overwrite)


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, allow_nan=False, sort_keys=False) + "\n"


def sidecar_path(output: str | os.PathLike) -> Path:
    """The JSON sidecar (class names, colours, model) beside a label volume:
    `seg.nrrd` -> `seg.json`, `seg.nii.gz` -> `seg.json`."""
    output = Path(output)
    name = output.name
    for ext in (".nii.gz", ".seg.nrrd", ".nrrd", ".nii", ".mha", ".mhd", ".nhdr"):
        if name.lower().endswith(ext):
            return output.with_name(name[: -len(ext)] + ".json")
    return output.with_name(output.stem + ".json")


def _atomic_write(target: Path, produce, *, overwrite: bool, names: dict[str, str] | None = None) -> Path:
    """``produce(tmp)`` fills a temp folder; its files are moved into ``target``'s folder, the ones
    named in ``names`` under their final name, ``target`` itself last."""
    names = names or {}
    folder = target.parent
    if not folder.is_dir():
        raise InputError(f"cannot write {target}: folder {folder} does not exist")
    if target.exists() and not overwrite:
        raise InputError(f"{target} already exists: choose another name or allow overwriting")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder))
    except OSError as exc:
        raise InputError(f"cannot write in {folder}: {exc.strerror or exc}") from None
    try:
        try:
            produce(tmp)
            written = sorted(tmp.iterdir(), key=lambda f: names.get(f.name, f.name) == target.name)  # header last
            if not overwrite:
                clash = [names.get(f.name, f.name) for f in written if (folder / names.get(f.name, f.name)).exists()]
                if clash:
                    raise InputError(f"{folder / clash[0]} already exists: choose another name or allow overwriting")
            for f in written:
                _fsync_file(f)
            for f in written:
                os.replace(f, folder / names.get(f.name, f.name))
            fsync_dir(folder)
        except (OSError, RuntimeError) as exc:
            raise InputError(f"could not write {target}: {_first_line(exc)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _fsync_file(path: Path) -> None:
    # "rb+": Windows' fsync (_commit) needs a handle with write access; on "rb" it fails with EBADF.
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


# --------------------------------------------------------------------------- small helpers


def image_suffix(path: Path) -> str | None:
    """The image ending of ``path`` in lower case (".nii.gz", ...), or None when it has none."""
    name = path.name.lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s) and len(name) > len(s)), None)


def _display(path: str | os.PathLike) -> str:
    return os.fspath(path)


@contextlib.contextmanager
def _itk_warnings(shown: bool):
    """ITK's warnings shown (to be captured: integrity.captured_stderr) or silenced for one call.
    A process-wide flag, restored afterwards."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def _itk_warnings_on():
    return _itk_warnings(True)


def _quiet_itk():
    """Silence ITK's stderr warnings for one call: they are noise to a user, and stderr
    carries our own log lines."""
    return _itk_warnings(False)


@contextlib.contextmanager
def _c_stderr_silenced():
    """Point file descriptor 2 at the null device for one call: C libraries under SimpleITK
    (nifticlib) print straight to it, past Python and past ITK's warning switch. Process-wide,
    like ``_quiet_itk``: fine for the engine, which runs in its own process."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable fd 2 (e.g. a GUI process)
        saved = None
    if saved is None:
        yield
        return
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, 2)
        finally:
            os.close(null)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _uninformative(detail: str) -> bool:
    """ITK details that would mislead a user more than help (e.g. a truncated .mha
    reports 'No such file or directory')."""
    return any(s in detail for s in ("No such file", "Unable to determine ImageIO reader"))


def _first_line(exc: BaseException) -> str:
    """SimpleITK errors span many lines with C++ file names; keep the telling part."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:  # ITK puts the human sentence after "Description:" or on its own line
        if ln.lower().startswith("description:"):
            return ln.split(":", 1)[1].strip()
    useful = [ln for ln in lines if not ln.startswith(("/", "itk::", "sitk::")) and ".cxx" not in ln]
    return (useful or lines or [type(exc).__name__])[-1][:200]


def _fmt(values: Iterable[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"
