"""Writing volumes and JSON: atomically, never over an existing file unless asked, read back."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .atomic import fsync_dir
from .data_size import check_nifti_complete
from .geometry import grid_moved_mm, image_affine
from .header_geometry import GEOMETRY_TOLERANCE_MM, max_displacement_mm
from .read import IMAGE_SUFFIXES, image_suffix
from .reader_messages import c_stderr_silenced, first_line, quiet_itk


def write_image(
    image: sitk.Image,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    compress: bool = True,
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
        raise InputError(f"cannot write {target.name}: use one of {', '.join(IMAGE_SUFFIXES)}")
    side_text = None if sidecar is None else _json_text(sidecar)
    # ITK picks its writer by the lower-case ending: write under that name, rename to the user's.
    itk_name = target.name[: -len(suffix)] + suffix

    def produce(tmp: Path) -> None:
        if side_text is not None:
            (tmp / sidecar_path(target).name).write_text(side_text, encoding="utf-8")
        written = tmp / itk_name
        # MetaImage warns about every NIfTI header field it cannot store; nifticlib prints its
        # own "** ERROR" lines for a short write. We report failures ourselves, in one line.
        with quiet_itk(), c_stderr_silenced():
            sitk.WriteImage(image, str(written), useCompression=compress)
            # ITK's NIfTI writer ignores failed writes (full disk): read the file back, which
            # fails on a short file, so that a damaged file never reaches the final name.
            try:
                back = sitk.ReadImage(str(written))
            except RuntimeError as exc:
                raise OSError(f"the written file does not read back ({first_line(exc)})") from None
        if suffix in (".nii", ".nii.gz"):
            try:
                check_nifti_complete(written, back)
            except InputError:
                raise OSError("the written file is incomplete (disk full?)") from None
        moved = grid_moved_mm(image, back)
        if moved > GEOMETRY_TOLERANCE_MM:
            raise OSError(
                f"{_FORMAT_OF[suffix]} cannot store this volume's geometry (voxels would move up to "
                f"{moved:.3g} mm); write .nrrd or .mha instead"
            )
        if not np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image)):
            raise OSError("the written file does not hold the voxels it was given")

    return _atomic_write(target, produce, overwrite=overwrite, names={itk_name: target.name})


_FORMAT_OF = {
    ".nii.gz": "NIfTI",
    ".nii": "NIfTI",
    ".nrrd": "NRRD",
    ".nhdr": "NRRD",
    ".mha": "MetaImage",
    ".mhd": "MetaImage",
}


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
    if moved > GEOMETRY_TOLERANCE_MM:
        fits = [s for s in (".nrrd", ".mha") if _probe_format(image, s) <= GEOMETRY_TOLERANCE_MM]
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
            with quiet_itk(), c_stderr_silenced():
                sitk.WriteImage(probe, file)
                back = sitk.ReadImage(file)
        except RuntimeError:
            return float("inf")
    scale = np.diag([(s - 1) / 1.0 for s in image.GetSize()] + [1.0])  # the probe's corners -> the volume's
    return max_displacement_mm(image_affine(probe) @ scale, image_affine(back) @ scale, (2, 2, 2))


def _why_not(image: sitk.Image) -> str:
    d = np.asarray(image.GetDirection(), float).reshape(3, 3)
    worst = max(
        abs(90.0 - np.degrees(np.arccos(np.clip(abs(d[:, i] @ d[:, j]), -1, 1))))
        for i in range(3)
        for j in range(i + 1, 3)
    )
    return (
        f"its axes are {worst:.3g} degrees from perpendicular, as with a gantry tilt"
        if worst > 1e-3
        else "its geometry does not survive the format"
    )


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
            raise InputError(f"could not write {target}: {first_line(exc)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _fsync_file(path: Path) -> None:
    # "rb+": Windows' fsync (_commit) needs a handle with write access; on "rb" it fails with EBADF.
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())
