"""Reading DICOM series: choosing the series, its geometry from the headers, and the files left out."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .formats import Warn, files_in
from .geometry import affine_of
from .header_geometry import GEOMETRY_TOLERANCE_MM, check_geometry, max_displacement_mm
from .reader_messages import (
    captured_stderr,
    first_line,
    itk_warnings_on,
    pass_on,
    python_warning,
    quiet_itk,
    reader_warnings,
)

#: Metadata key under which the DICOM modality (0008|0060) is kept on the image.
MODALITY_KEY = "hfsam_modality"


SERIES_SEP = "::"


def read_dicom_folder(folder: Path, uid: str | None, warn: Warn | None) -> sitk.Image:
    series = _list_series(folder)
    if not series:
        hint = (
            " (it holds sub-folders: pass the one with the .dcm files)"
            if any(c.is_dir() for c in folder.iterdir())
            else ""
        )
        raise InputError(f"no DICOM series in {folder}{hint}; for a NIfTI/NRRD file pass the file itself")
    if uid is not None:
        if uid not in series:
            raise InputError(f"series {uid!r} is not in {folder}; it holds: {_describe_series(series)}")
        return _read_series(folder, uid, series, warn)
    if len(series) > 1:
        raise InputError(
            f"{folder} holds {len(series)} DICOM series: {_describe_series(series)}; "
            f"pass the series' own folder or '{folder}::SERIES_UID'"
        )
    return _read_series(folder, next(iter(series)), series, warn)


def read_dicom_file_series(file: Path, warn: Warn | None) -> sitk.Image:
    """A single DICOM file stands for the whole series it belongs to."""
    target = file.resolve()
    series = _list_series(file.parent)
    for uid, files in series.items():
        if any(Path(f).resolve() == target for f in files):
            return _read_series(file.parent, uid, series, warn)
    raise InputError(
        f"cannot read {file}: it is a DICOM file but not a readable image (damaged, truncated, or "
        "not an image object such as a report or structure set)"
    )


def _list_series(folder: Path) -> dict[str, tuple[str, ...]]:
    """Series UID -> sorted file names (GDCM sorts by position along the normal)."""
    reader = sitk.ImageSeriesReader
    try:
        with quiet_itk():  # GDCM warns "No Series were found" on stderr for a plain folder
            uids = reader.GetGDCMSeriesIDs(str(folder))
        return {uid: tuple(reader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in uids}
    except RuntimeError as exc:
        raise InputError(f"cannot scan {folder} for DICOM: {first_line(exc)}") from None


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
        positions = np.array([[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")] for i in range(n)])
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
    moved = max_displacement_mm(
        affine_of(image.GetOrigin(), image.GetSpacing(), direction),
        affine_of(positions[0], spacing, true),
        image.GetSize(),
    )
    if moved <= GEOMETRY_TOLERANCE_MM:
        return image
    tilt = float(np.degrees(np.arccos(np.clip(abs(true[:, 2] @ direction[:, 2]), -1.0, 1.0))))
    image.SetOrigin(tuple(positions[0]))
    image.SetSpacing(spacing)
    image.SetDirection(tuple(true.ravel()))
    (warn or python_warning)(
        f"{name} was acquired with a gantry tilt of {tilt:.3g} degrees: it is read with its true, sheared "
        f"geometry (ITK alone would move voxels up to {moved:.3g} mm); write results as NRRD or MHA, since "
        "NIfTI cannot store it"
    )
    return image


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
    check_dicom_leftovers(folder, every_listed, _dicom_tag(files[0], "0008|0016") or None)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(files))
    reader.MetaDataDictionaryArrayUpdateOn()  # per-slice positions, to check the spacing below
    with captured_stderr() as said, itk_warnings_on():
        try:
            image, error = reader.Execute(), None
        except RuntimeError as exc:
            image, error = None, exc
    if error is not None:
        raise InputError(f"cannot read DICOM series {label} in {folder}: {first_line(error)}") from None
    name = f"DICOM series {label} in {folder}"
    check_geometry(image, name)
    image = _series_geometry(reader, image, name, warn)
    # ITK's own note on uneven slices is what _series_geometry refuses; anything else is passed on.
    pass_on([w for w in reader_warnings("".join(said)) if "sampling" not in w.lower()], name, warn)
    modality = _dicom_tag(files[0], "0008|0060").upper()
    if modality:
        image.SetMetaData(MODALITY_KEY, modality)
    return image


# Media Storage SOP Class UIDs of image objects: a file of such a class left out of the series is a lost slice.
def _sop_class(path: Path) -> str | None:
    """(0002,0002) Media Storage SOP Class UID from a Part 10 file's meta header (explicit VR LE)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(2048)
    except OSError:
        return None
    if head[128:132] != b"DICM":
        return None
    pos = 132
    while pos + 8 <= len(head):
        group, element = (
            int.from_bytes(head[pos : pos + 2], "little"),
            int.from_bytes(head[pos + 2 : pos + 4], "little"),
        )
        if group != 2:
            return None
        vr = head[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            length, start = int.from_bytes(head[pos + 8 : pos + 12], "little"), pos + 12
        else:
            length, start = int.from_bytes(head[pos + 6 : pos + 8], "little"), pos + 8
        if element == 2:
            return head[start : start + length].rstrip(b"\0 ").decode("ascii", errors="replace").strip()
        pos = start + length
    return None


def check_dicom_leftovers(folder: Path, series_files: set[str], series_class: str | None) -> None:
    """GDCM silently leaves out of a series the files it cannot parse (a truncated copy, a damaged
    disk), which drops slices from the middle (caught by the spacing check) or, worse, from the ends
    of the volume. A DICOM file of the folder with the series' own SOP class that is in no series
    is such a lost slice: refuse, naming it."""
    listed = {os.path.normcase(os.path.abspath(f)) for f in series_files}
    series_class = (series_class or "").rstrip("\0 ") or None
    lost = []
    for f in files_in(folder):
        if f.name.startswith(".") or f.name.upper() == "DICOMDIR":
            continue
        if os.path.normcase(os.path.abspath(f)) in listed:
            continue
        cls = _sop_class(f)
        if cls is not None and (series_class is None or cls == series_class):
            lost.append(f.name)
    if lost:
        more = f" and {len(lost) - 1} more" if len(lost) > 1 else ""
        raise InputError(
            f"{len(lost)} DICOM image file(s) in {folder} could not be read ({lost[0]}{more}): they "
            "are damaged or truncated and would be missing from the volume; copy the series again"
        )
