"""Issue 12, "no silent wrong answer, nothing lost": the kinds of failure a hostile test found.

Every kind of the issue is a row of docs/robustness.md pointing here. Each bad input is built at
run time from ../shared/data (or from scratch). Two ways to run the real command line:

* ``test_refused`` / ``test_warned``: the cases that need no model run in ONE child process
  (``DRIVER``), each through ``cli.main`` with its own stdout/stderr files (file descriptors, so
  that what C libraries print is caught too). Per case it asserts the exit code, the one error
  line and the JSON error event, that the case folder (its own copies of inputs, its output
  folder, its library) is byte for byte as before (nothing replaced, no output, no partial file,
  no temp file, no lock), that the shared inputs are unchanged, and that torch was never imported:
  every refusal that needs no model comes before the model.
* The cases that need a model use the tiny random-init model in this process (``main()``
  called in-process), or a real child process where signals matter.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
TINY = ("--checkpoint", "none", "--backbone", "tiny", "--img-size", "64")
NO_JSON = ("evaluate",)  # cases that read what the command prints (not JSON events)


# =============================================================================== building bad inputs
def _write(img: sitk.Image, path: Path, compress: bool = False) -> Path:
    sitk.WriteImage(img, str(path), useCompression=compress)
    return path


def _like(array: np.ndarray, ref: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.CopyInformation(ref)
    return img


def _edit_header(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert old in data, (path, old)
    path.write_bytes(data.replace(old, new, 1))


def _cut(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _nifti1(path: Path, edit: Callable[[bytearray], None]) -> Path:
    """Edit the raw NIfTI-1 header of an uncompressed .nii (offsets from nifti1.h)."""
    data = bytearray(path.read_bytes())
    edit(data)
    path.write_bytes(bytes(data))
    return path


def _set(data: bytearray, offset: int, fmt: str, *values) -> None:
    raw = np.array(values, dtype=fmt).tobytes()
    data[offset : offset + len(raw)] = raw


def _adapter(path: Path, *, axis="axial", preset="ct", fill=None, nan=False) -> Path:
    """A valid adapter for the tiny random-init model (64 px, rank 2, one class 'liver'), untrained."""
    import torch
    from safetensors.torch import save

    from HFSAMCore.model.hfsam import ModelSpec, build_hfsam
    from HFSAMCore.store.adapter_metadata import validate_metadata
    from HFSAMCore.store.adapters import save_adapter

    spec = ModelSpec("tiny", 64, 1, 2).resolved()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        tensors = build_hfsam(spec).trainable_state_dict()
    if fill is not None:
        tensors = {k: torch.full_like(v, fill) for k, v in tensors.items()}
    meta = {
        "name": path.stem,
        **spec.as_dict(),
        "base_checkpoint": {"name": "random-init", "sha256": None, "seed": 0},
        "classes": [{"value": 1, "name": "liver", "color": [221, 130, 101]}],
        "intensity_preset": preset,
        "axis": axis,
    }
    meta.pop("num_classes")
    if nan:  # save_adapter refuses it (that is tested below), so write the file the way a broken tool would
        tensors = {k: v.clone() for k, v in tensors.items()}
        next(iter(tensors.values())).view(-1)[0] = float("nan")
        from HFSAMCore.store.adapter_metadata import METADATA_KEY

        path.write_bytes(save(tensors, metadata={METADATA_KEY: json.dumps(validate_metadata(meta))}))
        return path
    save_adapter(path, tensors, meta)
    return path


@pytest.fixture(scope="module")
def shared(tmp_path_factory, ct3mm, ctdicom) -> Path:
    """Bad inputs every case may read (none is ever written by a case)."""
    s = tmp_path_factory.mktemp("shared")
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # MetaImage's writer lists the NIfTI fields it drops
    ct = sitk.ReadImage(str(ct3mm / "image.nii.gz"))
    synapse = sitk.ReadImage(str(ct3mm / "labels_synapse8.nii.gz"))
    syn = sitk.GetArrayFromImage(synapse)
    arr = sitk.GetArrayFromImage(ct)

    # geometry: the CT with a 5 degree gantry tilt (sheared k axis), as NRRD keeps it
    tilt = sitk.Image(ct)
    t = np.radians(5)
    d = np.asarray(ct.GetDirection()).reshape(3, 3) @ np.array([[1, 0, 0], [0, 1, np.sin(t)], [0, 0, np.cos(t)]])
    tilt.SetDirection(d.ravel().tolist())
    _write(tilt, s / "tilt.nrrd")

    # NaN voxels in every format
    nan = arr.astype(np.float32)
    nan[15, 50, 60] = np.nan
    for name in ("nan.nrrd", "nan.mha", "nan.nhdr", "nan.nii"):
        _write(_like(nan, ct), s / name)
    _write(_like(nan, ct), s / "nan_labels.mha")

    # truncated and oversized data, every format and layout
    for name, compress in (
        ("trunc_raw.nrrd", False),
        ("trunc_gz.nrrd", True),
        ("trunc.mha", False),
        ("trunc_z.mha", True),
    ):
        _cut(_write(ct, s / name, compress))
    _write(ct, s / "trunc.mhd")
    _cut(s / "trunc.raw")
    _write(ct, s / "trunc_gz.nhdr", compress=True)
    _cut(s / "trunc_gz.raw.gz")
    _edit_header(_write(ct, s / "extra.nrrd"), b"sizes: 122 101 30", b"sizes: 122 101 29")
    _edit_header(_write(ct, s / "extra.mha"), b"DimSize = 122 101 30", b"DimSize = 122 101 29")

    # NIfTI headers ITK reads silently wrong: qform vs sform, zero spacing, shear
    _write(ct, s / "plain.nii")
    raw = (s / "plain.nii").read_bytes()
    assert np.frombuffer(raw[252:256], "<i2").tolist() == [1, 1]  # both qform and sform set
    srow = np.frombuffer(raw[280:328], "<f4").reshape(3, 4).copy()
    shifted = srow.copy()
    shifted[0, 3] += 50  # the sform puts the volume 50 mm off the qform
    for name, edit in (
        ("qform_vs_sform.nii", lambda h: _set(h, 280, "<f4", *shifted.ravel())),
        ("zero_spacing.nii", lambda h: _set(h, 80, "<f4", 0.0)),
        ("sheared_sform.nii", lambda h: (_set(h, 252, "<i2", 0), _set(h, 280 + 16 + 8, "<f4", 0.5))),
    ):
        (s / name).write_bytes(raw)
        _nifti1(s / name, edit)
    _edit_header(_write(ct, s / "zero_spacing.nrrd"), b"space directions: (-3,0,0)", b"space directions: (0,0,0)")

    # files that are not what their name says, or not images at all
    _write(ct, s / "nrrd_inside.nrrd")
    os.replace(s / "nrrd_inside.nrrd", s / "nrrd_named.nii.gz")
    _write(ct, s / "scan.vtk")
    _write(ct, s / "pair.hdr")
    (s / "empty.nii.gz").write_bytes(b"")
    os.mkfifo(s / "fifo.nii.gz")
    os.symlink(s / "no_such_target.nii.gz", s / "broken.nii.gz")
    (s / "a_folder").mkdir()

    # DICOM series with one damaged file: at the end (no gap: ITK would drop a slice unseen) and mid-way
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(ctdicom / "dicom"))
    for name, victim in (("dcm_last_cut", files[-1]), ("dcm_mid_cut", files[len(files) // 2])):
        (s / name).mkdir()
        for f in files:
            shutil.copy(f, s / name / Path(f).name)
        _cut(s / name / Path(victim).name, 0.7)

    # a DICOM series acquired with a 10 degree gantry tilt: every slice steps sideways as well
    (s / "dcm_tilt").mkdir()
    for k, f in enumerate(files):
        reader = sitk.ImageFileReader()
        reader.SetFileName(f)
        one = reader.Execute()
        copy = _like(sitk.GetArrayFromImage(one), one)
        position = np.array(one.GetOrigin()) + [0.0, k * 2.0 * np.tan(np.radians(10)), 0.0]
        copy.SetOrigin(tuple(position))
        for tag in ("0008|0060", "0008|103e"):
            copy.SetMetaData(tag, reader.GetMetaData(tag))
        copy.SetMetaData("0020|000e", "1.2.826.0.1.3680043.8.498.12")
        copy.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in position))
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(s / "dcm_tilt" / f"slice{k:03d}.dcm"))
        writer.Execute(copy)
    # a NIfTI-2 header (this ITK reads NIfTI-1 only), a text NRRD cut short, headers without their data
    n2 = bytearray(544)
    h1 = raw[:352]
    n2[0:4], n2[4:12] = np.int32(540).tobytes(), b"n+2\0\r\n\x1a\n"
    n2[12:16] = h1[70:74]
    n2[16:80] = np.frombuffer(h1[40:56], "<i2").astype("<i8").tobytes()
    n2[104:168] = np.frombuffer(h1[76:108], "<f4").astype("<f8").tobytes()
    n2[168:176] = np.int64(544).tobytes()
    (s / "nifti2.nii").write_bytes(bytes(n2) + raw[352:])
    small = sitk.Cast(ct[:, :, :2], sitk.sitkInt16)
    text = _write(small, s / "text_raw.nrrd").read_bytes()
    cut = text.index(b"\n\n")
    values = " ".join(map(str, sitk.GetArrayFromImage(small).ravel()[:1000])).encode()
    (s / "text_cut.nrrd").write_bytes(text[:cut].replace(b"encoding: raw", b"encoding: ascii") + b"\n\n" + values)
    for name, data in (("nodata.nhdr", "nodata.raw.gz"), ("nodata.mhd", "nodata.zraw")):
        _write(ct, s / name, compress=True)
        (s / data).unlink()
    _write(ct, s / "moved.nhdr", compress=True)  # a header whose data file is named after another header
    os.replace(s / "moved.raw.gz", s / "other.raw.gz")
    _edit_header(s / "moved.nhdr", b"data file: moved.raw.gz", b"data file: other.raw.gz")
    (s / "notes.txt").write_text("not a checkpoint\n")

    # volumes whose coronal slices are strips, and label maps that are not class maps
    _write(ct[:, :, :3], s / "thin.nrrd")
    liver = (syn == 5).astype(np.uint8)
    _write(_like(liver, synapse), s / "liver.nii.gz", True)
    _write(_like(liver * 255, synapse), s / "mask255.nii.gz", True)
    _write(_like(liver.astype(np.uint16) * 1000 + (syn == 1) * 2000, synapse), s / "values_1000.nii.gz", True)
    part = liver.copy()
    part[:10], part[20:] = 0, 0  # slices 10..19 painted
    shifted_labels = _like(part, synapse)
    spacing_x = synapse.GetSpacing()[0]
    direction_x = np.asarray(synapse.GetDirection()).reshape(3, 3)[:, 0]
    shifted_labels.SetOrigin(tuple(np.add(synapse.GetOrigin(), direction_x * spacing_x * 61)))  # half of 122
    _write(shifted_labels, s / "liver_shifted.nii.gz", True)
    _write(_like(part, synapse), s / "liver_part.nii.gz", True)
    positive_ct = _like((arr.astype(np.int32) + 1100).astype(np.int16), ct)
    _write(positive_ct, s / "ct_positive.nii.gz", True)
    _write(_like(syn.astype(np.float32) + 0.5, synapse), s / "float_labels.nrrd")
    _write(synapse[:, :, :15], s / "pred_half.nii.gz", True)  # a prediction covering half the slices
    _write(_like(liver, synapse), s / "pred_value1.nii.gz", True)
    nodir = sitk.GetImageFromArray(syn)  # label maps whose header has no spacing at all
    _write(nodir, s / "nodir_ref.nrrd")
    _edit_header(s / "nodir_ref.nrrd", b"space directions: (1,0,0) (0,1,0) (0,0,1)\n", b"")
    _edit_header(s / "nodir_ref.nrrd", b"space: left-posterior-superior\n", b"")
    _edit_header(s / "nodir_ref.nrrd", b"space origin: (0,0,0)\n", b"")

    # adapters
    _adapter(s / "liver.safetensors")
    _adapter(s / "coronal.safetensors", axis="coronal")
    _adapter(s / "nan.safetensors", nan=True)
    sitk.ProcessObject.SetGlobalWarningDisplay(True)
    return s


def shared_files(shared: Path, ct3mm: Path, ctdicom: Path) -> dict[str, str]:
    files = [p for p in shared.rglob("*") if p.is_file() and not p.is_symlink() and not _fifo(p)]
    files += [p for p in ct3mm.iterdir()] + sorted((ctdicom / "dicom").iterdir())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _fifo(p: Path) -> bool:
    import stat

    return stat.S_ISFIFO(p.lstat().st_mode)


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> SHA256 (or "link"/"dir") of everything below ``folder``, hidden files too."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = "link" if p.is_symlink() else "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# =============================================================================== per-case setups
def _copy_ct(c: Path, ct3mm: Path, name: str = "scan.nii.gz") -> Path:
    shutil.copy(ct3mm / "image.nii.gz", c / name)
    return c / name


def _library_with_liver(c: Path, s: Path) -> None:
    (c / "lib" / "adapters").mkdir(parents=True)
    shutil.copy(s / "liver.safetensors", c / "lib" / "adapters" / "liver.safetensors")


SETUPS: dict[str, Callable[[Path, Path, Path], None]] = {  # (case folder, shared inputs, ct_abdomen_3mm)
    "scan": lambda c, s, ct: _copy_ct(c, ct),
    "symlink": lambda c, s, ct: os.symlink(_copy_ct(c, ct), c / "link.nii.gz"),
    "hardlink": lambda c, s, ct: os.link(_copy_ct(c, ct), c / "hard.nii.gz"),
    "sub": lambda c, s, ct: (_copy_ct(c, ct), (c / "sub").mkdir()),
    "checkpoint-json": lambda c, s, ct: (c / "seg.json").write_bytes(b"PK\x03\x04 a checkpoint named like a sidecar"),
    "dicom-copy": lambda c, s, ct: _dicom_with_an_image_name(c, ct.parent / "ct_abdomen_dicom" / "dicom"),
    "library": lambda c, s, ct: _library_with_liver(c, s),
    "library-and-scan": lambda c, s, ct: (_library_with_liver(c, s), _copy_ct(c, ct)),
    "sidecar-taken": lambda c, s, ct: (
        (c / "out").mkdir(),
        (c / "out" / "seg.nrrd").write_bytes(b"a result"),
        (c / "out" / "seg.json").write_text('{"output": "seg.nrrd"}'),
    ),
    "demo-results": lambda c, s, ct: ((c / "demo").mkdir(), (c / "demo" / "dice.md").write_text("old results\n")),
    "folder-output": lambda c, s, ct: (c / "seg.nrrd").mkdir(),
    "moved-nhdr": lambda c, s, ct: [shutil.copy(s / n, c / n) for n in ("moved.nhdr", "other.raw.gz")],
    "library-file": lambda c, s, ct: (c / "library.txt").write_text("a file, not a folder\n"),
    "foreign-sidecar": lambda c, s, ct: (
        shutil.copy(ct / "labels_synapse8.nii.gz", c / "seg.nii.gz"),
        (c / "seg.json").write_text(json.dumps({"output": "seg.nrrd", "classes": [{"value": 1, "name": "WRONG"}]})),
    ),
}


def _dicom_with_an_image_name(c: Path, src: Path) -> None:
    """A DICOM series one of whose files is named like a label volume (x.nrrd): GDCM reads by content."""
    (c / "dcm").mkdir()
    for i, f in enumerate(sorted(src.iterdir())):
        shutil.copy(f, c / "dcm" / ("x.nrrd" if i == 3 else f.name))


# =============================================================================== the cases
@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple  # {c}: the case's own folder, {s}: shared inputs, {ct}: ct_abdomen_3mm
    error: tuple = ()  # fragments of the one error line (exit code 2)
    warn: tuple = ()  # fragments of the warning lines
    never: tuple = ()  # fragments that must not appear on stderr
    rc: int = 2
    setup: str | None = None


def seg(src: str, *more: str, out: str = "{c}/seg.nrrd") -> tuple:
    return ("segment", src, "-o", out, *TINY, *more)


def ft(labels: str, *more: str, image: str = "{ct}/image.nii.gz") -> tuple:
    return ("finetune", image, labels, "-o", "{c}/a.safetensors", *TINY, "--steps", "1", *more)


NOT_OVERWRITE = ("--overwrite",)
CASES = [
    # -- data loss: an output never replaces an input, whatever the flags ---------------------------
    Case(
        "out-is-the-input-image",
        seg("{c}/scan.nii.gz", "--overwrite", out="{c}/scan.nii.gz"),
        ("is the input image", "never replaces an input"),
        never=NOT_OVERWRITE,
        setup="scan",
    ),
    Case(
        "out-is-the-input-without-overwrite",
        seg("{c}/scan.nii.gz", out="{c}/scan.nii.gz"),
        ("is the input image",),
        never=NOT_OVERWRITE,
        setup="scan",
    ),
    Case(
        "out-is-a-symlink-to-the-input",
        seg("{c}/scan.nii.gz", "--overwrite", out="{c}/link.nii.gz"),
        ("is the input image",),
        never=NOT_OVERWRITE,
        setup="symlink",
    ),
    Case(
        "out-is-a-hard-link-to-the-input",
        seg("{c}/scan.nii.gz", "--overwrite", out="{c}/hard.nii.gz"),
        ("is the input image",),
        never=NOT_OVERWRITE,
        setup="hardlink",
    ),
    Case(
        "out-is-the-input-spelled-otherwise",
        seg("{c}/scan.nii.gz", "--overwrite", out="{c}/sub/../scan.nii.gz"),
        ("is the input image",),
        never=NOT_OVERWRITE,
        setup="sub",
    ),
    Case(
        "sidecar-is-the-checkpoint",
        (
            "segment",
            "{ct}/image.nii.gz",
            "-o",
            "{c}/seg.nrrd",
            "--checkpoint",
            "{c}/seg.json",
            "--backbone",
            "tiny",
            "--img-size",
            "64",
            "--overwrite",
        ),
        ("the sidecar of seg.nrrd", "is the checkpoint"),
        never=NOT_OVERWRITE,
        setup="checkpoint-json",
    ),
    Case(
        "out-is-a-file-of-the-dicom-folder",
        seg("{c}/dcm", "--overwrite", out="{c}/dcm/x.nrrd"),
        ("is the input image",),
        never=NOT_OVERWRITE,
        setup="dicom-copy",
    ),
    Case(
        "library-entry-is-the-adapter-it-continues",
        (
            "finetune",
            "{ct}/image.nii.gz",
            "{s}/liver.nii.gz",
            "--adapter",
            "liver",
            "--name",
            "liver",
            "--library",
            "{c}/lib",
            "--overwrite",
            "--steps",
            "1",
        ),
        ("library entry 'liver'", "is the adapter this run reads"),
        never=NOT_OVERWRITE,
        setup="library",
    ),
    Case(
        "out-and-library-entry-are-one-file",
        (
            "finetune",
            "{ct}/image.nii.gz",
            "{s}/liver.nii.gz",
            "-o",
            "{c}/lib/adapters/new.safetensors",
            "--name",
            "new",
            "--library",
            "{c}/lib",
            "--classes",
            "liver",
            *TINY,
            "--steps",
            "1",
        ),
        ("are the same file",),
        setup="library",
    ),
    Case(
        "export-onto-the-library-entry",
        ("models", "export", "liver", "{c}/lib/adapters/liver.safetensors", "--library", "{c}/lib", "--overwrite"),
        ("is the library entry itself",),
        never=NOT_OVERWRITE,
        setup="library",
    ),
    Case(
        "export-over-a-nifti",
        ("models", "export", "liver", "{c}/scan.nii.gz", "--library", "{c}/lib", "--overwrite"),
        ("adapter files end in .safetensors",),
        setup="library-and-scan",
    ),
    Case(
        "demo-over-earlier-results",
        ("demo", "--output", "{c}/demo", "--backbone", "tiny", "--steps", "1"),
        ("dice.md already exists", "--overwrite"),
        setup="demo-results",
    ),
    # -- geometry a format cannot store: refused before any work, naming the format that can ------
    Case(
        "nifti-cannot-store-a-gantry-tilt",
        seg("{s}/tilt.nrrd", out="{c}/seg.nii.gz"),
        ("NIfTI cannot store this volume's geometry", "5 degrees", "mm", "write .nrrd or .mha"),
    ),
    # -- the same integrity checks for every format ITK reads -----------------------------------
    *[
        Case(f"nan-voxels-{name.replace('.', '-')}", seg(f"{{s}}/{name}"), ("NaN or infinite",))
        for name in ("nan.nrrd", "nan.mha", "nan.nhdr", "nan.nii")
    ],
    Case("nan-voxels-in-labels-mha", ft("{s}/nan_labels.mha", "--classes", "liver"), ("NaN or infinite",)),
    *[
        Case(f"truncated-{name.replace('.', '-')}", seg(f"{{s}}/{name}"), ("the file is truncated (", "of", "bytes"))
        for name in ("trunc_raw.nrrd", "trunc_gz.nrrd", "trunc.mha", "trunc_z.mha", "trunc.mhd", "trunc_gz.nhdr")
    ],
    *[
        Case(
            f"more-data-than-header-{name.replace('.', '-')}",
            seg(f"{{s}}/{name}"),
            ("more than its header describes", "sizes in its header are wrong"),
        )
        for name in ("extra.nrrd", "extra.mha")
    ],
    Case("nifti-qform-contradicts-sform", seg("{s}/qform_vs_sform.nii"), ("contradicts itself", "50 mm")),
    Case(
        "nifti-zero-spacing", seg("{s}/zero_spacing.nii"), ("voxel spacing (0.0, 3.0, 3.0)", "replace this one by 1 mm")
    ),
    Case("nifti-sheared-sform", seg("{s}/sheared_sform.nii"), ("sheared or non-perpendicular axes", "NRRD")),
    Case("nrrd-zero-spacing", seg("{s}/zero_spacing.nrrd"), ("voxel spacing", "must be positive")),
    Case("nrrd-named-nii-gz", seg("{s}/nrrd_named.nii.gz"), ("is a NRRD file but is named '.nii.gz'", "rename")),
    Case("vtk-file", seg("{s}/scan.vtk"), ("a VTK file, which HF-SAM does not read", "convert it")),
    Case("analyze-pair", seg("{s}/pair.hdr"), ("Analyze/NIfTI .hdr/.img pair",)),
    Case("empty-file", seg("{s}/empty.nii.gz"), ("is empty (0 bytes)",)),
    Case("fifo-not-a-file", seg("{s}/fifo.nii.gz"), ("is a FIFO, not an image file",)),
    Case("broken-symlink", seg("{s}/broken.nii.gz"), ("is a broken link",)),
    Case(
        "dicom-last-file-damaged",
        seg("{s}/dcm_last_cut"),
        ("1 DICOM image file(s)", "could not be read", "damaged or truncated"),
    ),
    Case("dicom-middle-file-damaged", seg("{s}/dcm_mid_cut"), ("could not be read",), never=("unevenly",)),
    # -- an adapter fixes what the model sees -------------------------------------------------
    Case(
        "adapter-axis-contradicted",
        (
            "segment",
            "{ct}/image.nii.gz",
            "-o",
            "{c}/seg.nrrd",
            "--adapter",
            "{s}/coronal.safetensors",
            "--axis",
            "axial",
        ),
        ("axis coronal", "not --axis axial", "drop the option"),
    ),
    Case(
        "adapter-preset-contradicted",
        ("segment", "{ct}/image.nii.gz", "-o", "{c}/seg.nrrd", "--adapter", "{s}/liver.safetensors", "--preset", "mr"),
        ("preset ct", "not --preset mr"),
    ),
    Case(
        "evaluate-dataset-axis-contradicted",
        (
            "evaluate-dataset",
            "--dataset",
            "nifti",
            "--root",
            "{s}",
            "--adapter",
            "{s}/coronal.safetensors",
            "--axis",
            "axial",
            "-o",
            "{c}/results",
        ),
        ("trained with --axis coronal, not axial",),
    ),
    Case(
        "continued-training-axis-contradicted",
        (
            "finetune",
            "{ct}/image.nii.gz",
            "{s}/liver.nii.gz",
            "-o",
            "{c}/a.safetensors",
            "--adapter",
            "{s}/coronal.safetensors",
            "--axis",
            "sagittal",
            "--steps",
            "1",
        ),
        ("axis coronal", "not --axis sagittal"),
    ),
    # -- broken adapters ------------------------------------------------------------------------
    Case(
        "nan-adapter-segment",
        ("segment", "{ct}/image.nii.gz", "-o", "{c}/seg.nrrd", "--adapter", "{s}/nan.safetensors"),
        ("is a broken adapter", "NaN or infinite", "lower --lr"),
    ),
    Case(
        "nan-adapter-finetune",
        (
            "finetune",
            "{ct}/image.nii.gz",
            "{s}/liver.nii.gz",
            "-o",
            "{c}/a.safetensors",
            "--adapter",
            "{s}/nan.safetensors",
            "--steps",
            "1",
        ),
        ("is a broken adapter",),
    ),
    Case(
        "nan-adapter-import",
        ("models", "import", "{s}/nan.safetensors", "--library", "{c}/lib"),
        ("is a broken adapter",),
    ),
    # -- one sidecar for one output ----------------------------------------------------------
    Case(
        "sidecar-of-another-output",
        seg("{ct}/image.nii.gz", "--overwrite", out="{c}/out/seg.nii.gz"),
        ("seg.json is already the sidecar", "seg.nrrd", "choose another output name"),
        never=NOT_OVERWRITE,
        setup="sidecar-taken",
    ),
    Case(
        "evaluate-ignores-a-foreign-sidecar",
        ("evaluate", "--reference", "{ct}/labels_synapse8.nii.gz", "--prediction", "{c}/seg.nii.gz"),
        rc=0,
        warn=("ignoring", "sidecar of seg.nrrd"),
        never=("WRONG",),
        setup="foreign-sidecar",
    ),
    # -- slices too thin to be images ----------------------------------------------------------
    Case(
        "thin-coronal-slices-segment",
        seg("{s}/thin.nrrd", "--axis", "coronal"),
        ("coronal slices are 122 x 3 voxels", "too thin", "--axis axial (122 x 101)"),
    ),
    Case(
        "thin-sagittal-slices-finetune",
        ft("{s}/liver.nii.gz", "--classes", "liver", "--axis", "sagittal", image="{s}/thin.nrrd"),
        ("sagittal slices", "too thin"),
    ),
    # -- labels that only partly fit the image (a slice list that then fails, so no model runs) --
    Case(
        "labels-half-outside-the-image",
        ft("{s}/liver_shifted.nii.gz", "--classes", "liver", "--slices", "0"),
        ("slice(s) 0 carry no label",),
        warn=("of the labels", "lie outside the image"),
    ),
    # -- evaluate: partial coverage, not label maps, nothing in common ---------------------------
    Case(
        "evaluate-prediction-covers-half",
        ("evaluate", "--reference", "{ct}/labels_synapse8.nii.gz", "--prediction", "{s}/pred_half.nii.gz", "--json"),
        rc=0,
        warn=("of the reference", "outside the prediction's grid", "the scores cover only"),
    ),
    Case(
        "evaluate-ct-as-prediction",
        ("evaluate", "--reference", "{ct}/labels_synapse8.nii.gz", "--prediction", "{s}/ct_positive.nii.gz"),
        ("is an image, not a label map", "different values"),
    ),
    Case(
        "evaluate-ct-as-reference",
        ("evaluate", "--reference", "{ct}/image.nii.gz", "--prediction", "{ct}/labels_synapse8.nii.gz"),
        ("is an image, not a label map",),
    ),
    Case(
        "evaluate-float-labels",
        ("evaluate", "--reference", "{ct}/labels_synapse8.nii.gz", "--prediction", "{s}/float_labels.nrrd"),
        ("non-integer values", "not a label map"),
    ),
    Case(
        "evaluate-nothing-in-common",
        ("evaluate", "--reference", "{s}/mask255.nii.gz", "--prediction", "{s}/pred_value1.nii.gz"),
        rc=0,
        warn=("share no label value", "255"),
    ),
    Case(
        "evaluate-header-without-spacing",
        ("evaluate", "--reference", "{s}/nodir_ref.nrrd", "--prediction", "{s}/nodir_ref.nrrd"),
        rc=0,
        warn=("no voxel spacing in its header",),
    ),
    # -- label maps that are not class maps --------------------------------------------------------
    Case("labels-above-255", ft("{s}/values_1000.nii.gz"), ("label values above 255 (1000, 2000)", "relabel")),
    # -- every check that needs no model comes before it ------------------------------------------
    Case(
        "adapter-output-not-safetensors",
        ("finetune", "{ct}/image.nii.gz", "{s}/liver.nii.gz", "-o", "{c}/liver.bin", *TINY),
        ("adapter files end in .safetensors",),
    ),
    Case("segment-output-png", seg("{ct}/image.nii.gz", out="{c}/seg.png"), ("cannot write seg.png",)),
    Case(
        "output-is-a-folder",
        seg("{ct}/image.nii.gz", "--overwrite", out="{c}/seg.nrrd"),
        ("is a folder; give a file name",),
        never=NOT_OVERWRITE,
        setup="folder-output",
    ),
    *[
        Case(
            f"option-{opt.strip('-')}-{value.replace('-', 'minus-')}",
            ft("{s}/liver.nii.gz", "--classes", "liver", opt, value),
            (f"{opt} must be",),
        )
        for opt, value in (
            ("--minutes", "0"),
            ("--minutes", "-1"),
            ("--lr", "nan"),
            ("--lr", "-1"),
            ("--lr", "inf"),
            ("--steps", "0"),
            ("--batch-size", "0"),
            ("--holdout", "-1"),
            ("--img-size", "100"),
            ("--rank", "-1"),
            ("--low-level-dropout", "1"),
            ("--low-level-dropout", "-1"),
            ("--low-level-dropout", "nan"),
        )
    ],
    *[
        Case(
            f"option-slice-smoothing-{value.replace('-', 'minus-')}",
            seg("{ct}/image.nii.gz", "--slice-smoothing", value),
            ("--slice-smoothing must be a width in mm from 0 (off) to 50",),
        )
        for value in ("-1", "nan", "inf", "51")
    ],
    Case(
        "usage-error-is-one-line",
        ("segment", "{ct}/image.nii.gz", "-o", "{c}/seg.nrrd", "--axis", "diagonal"),
        ("invalid choice: 'diagonal'", "see `hfsam segment --help`"),
    ),
    Case(
        "adapter-is-a-folder",
        ("segment", "{ct}/image.nii.gz", "-o", "{c}/seg.nrrd", "--adapter", "{s}/a_folder"),
        ("is a folder; give an adapter file",),
    ),
    Case(
        "checkpoint-is-a-folder",
        ("segment", "{ct}/image.nii.gz", "-o", "{c}/seg.nrrd", "--checkpoint", "{s}/a_folder", "--backbone", "tiny"),
        ("is a folder; give the checkpoint file",),
    ),
]

# What the adversarial pass found (docs/robustness.md, "Adversarial pass"), each fixed and now a case here.
CASES += [
    Case(
        "dicom-gantry-tilt-is-read-sheared-not-moved",
        seg("{s}/dcm_tilt", out="{c}/seg.nii.gz"),
        ("NIfTI cannot store this volume's geometry", "10 degrees"),
        warn=("gantry tilt of 10 degrees", "true, sheared geometry"),
    ),
    Case(
        "output-data-file-is-an-input-data-file",
        seg("{c}/moved.nhdr", "--overwrite", out="{c}/other.nhdr"),
        ("the data file of other.nhdr", "is the input image"),
        never=NOT_OVERWRITE,
        setup="moved-nhdr",
    ),
    Case(
        "nifti-2-not-called-damaged",
        seg("{s}/nifti2.nii"),
        ("is NIfTI-2, which the installed ITK cannot read",),
        never=("damaged",),
    ),
    Case("text-nrrd-cut-short", seg("{s}/text_cut.nrrd"), ("voxel values end or break off after 1000 of 24644",)),
    *[
        Case(
            f"detached-header-without-data-{name.split('.')[1]}",
            seg(f"{{s}}/{name}"),
            ("is a header whose data file", "is not in"),
            never=("invalid",),
        )
        for name in ("nodata.nhdr", "nodata.mhd")
    ],
    Case("empty-class-list-is-not-synapse", seg("{ct}/image.nii.gz", "--classes", ""), ("empty name",)),
    Case(
        "adapter-classes-renamed",
        (
            "segment",
            "{ct}/image.nii.gz",
            "-o",
            "{c}/seg.nrrd",
            "--adapter",
            "{s}/liver.safetensors",
            "--classes",
            "spleen",
        ),
        ("cannot rename or change",),
    ),
    Case(
        "holdout-larger-than-the-slices",
        ft("{ct}/labels_synapse8.nii.gz", "--classes", "synapse", "--slices", "10,11,12", "--holdout", "3"),
        ("--holdout 3 must leave at least one",),
    ),
    Case(
        "library-is-a-file",
        ("segment", "{ct}/image.nii.gz", "-o", "{c}/seg.nrrd", "--adapter", "x", "--library", "{c}/library.txt"),
        ("is a file, not a folder",),
        never=("the library is empty",),
        setup="library-file",
    ),
    Case(
        "text-file-as-checkpoint",
        ("segment", "{ct}/image.nii.gz", "-o", "{c}/seg.nrrd", "--checkpoint", "{s}/notes.txt", "--backbone", "tiny"),
        ("is not a PyTorch or safetensors checkpoint",),
        never=("run code",),
    ),
    Case(
        "import-checkpoint-of-a-folder",
        ("models", "import-checkpoint", "{s}/a_folder", "--library", "{c}/lib"),
        ("is a folder; give the checkpoint file",),
        never=("does not exist",),
    ),
    Case("line-break-in-a-name", seg("{ct}/image.nii.gz", out="{c}/a\nb.png"), ("cannot write a\\nb.png",)),
    Case("empty-output-name", seg("{ct}/image.nii.gz", out=""), ("the output name is empty",)),
]

# The driver: every case through cli.main in this one process, with its own stdout/stderr files.
DRIVER = r"""
import json, os, sys
from HFSAMCore import cli
cases, results = json.load(open(sys.argv[1])), {}
for case in cases:
    with open(case["stdout"], "wb") as out, open(case["stderr"], "wb") as err:
        sys.stdout.flush(); sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1); os.dup2(err.fileno(), 2)
        try:
            rc = cli.main(case["argv"])
        except BaseException as exc:
            rc = f"raised {type(exc).__name__}: {exc}"
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os.dup2(saved[0], 1); os.dup2(saved[1], 2)
            os.close(saved[0]); os.close(saved[1])
    results[case["id"]] = {"rc": rc, "torch": "torch" in sys.modules}
json.dump(results, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def driven(shared, tmp_path_factory, ct3mm, ctdicom):
    """Run every case in one child process; returns case id -> (result, case folder, before, after)."""
    root = tmp_path_factory.mktemp("cases")
    shared_before = shared_files(shared, ct3mm, ctdicom)
    payload, folders, before = [], {}, {}
    for case in CASES:
        c = root / case.id
        c.mkdir()
        if case.setup:
            SETUPS[case.setup](c, shared, ct3mm)
        folders[case.id] = c
        before[case.id] = snapshot(c)
        argv = [str(a).format(c=c, s=shared, ct=ct3mm) for a in case.argv]
        if case.argv[0] not in NO_JSON:
            argv += ["--progress", "json"]
        payload.append(
            {
                "id": case.id,
                "argv": argv,
                "stdout": str(root / f"{case.id}.out"),
                "stderr": str(root / f"{case.id}.err"),
            }
        )
    (root / "cases.json").write_text(json.dumps(payload))
    probes = set(Path(tempfile.gettempdir()).glob("hfsam-probe-*"))
    env = dict(os.environ, HFSAM_HOME=str(root / "default-library"), PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, root / "cases.json", root / "results.json"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((root / "results.json").read_text())
    out = {}
    for case in CASES:
        out[case.id] = (
            results[case.id],
            folders[case.id],
            before[case.id],
            snapshot(folders[case.id]),
            (root / f"{case.id}.out").read_text(),
            (root / f"{case.id}.err").read_text(),
        )
    assert shared_files(shared, ct3mm, ctdicom) == shared_before  # no case touched a shared input
    assert set(Path(tempfile.gettempdir()).glob("hfsam-probe-*")) == probes  # no probe folder left
    assert not (root / "default-library").exists()  # nothing went to the default library
    return out


def _lines(stderr: str) -> tuple[list[str], list[str]]:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    warnings = [ln for ln in lines if ln.startswith("warning: ")]
    return warnings, [ln for ln in lines if not ln.startswith("warning: ")]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused_or_warned_before_any_work(case, driven):
    result, folder, before, after, stdout, stderr = driven[case.id]
    assert result["rc"] == case.rc, stderr
    assert result["torch"] is False, "torch was imported: a check that needs no model came after the model"
    warnings, others = _lines(stderr)
    assert "Traceback" not in stderr
    for fragment in case.never:
        assert fragment not in stderr and fragment not in stdout, stderr
    for fragment in case.warn:
        assert any(fragment in w for w in warnings), stderr
    if case.rc == 2:
        assert len(others) == 1 and others[0].startswith("hfsam: error: "), stderr
        message = others[0][len("hfsam: error: ") :]
        for fragment in case.error:
            assert fragment in message, message
        if case.argv[0] not in NO_JSON:
            assert json.loads(stdout.splitlines()[-1]) == {"event": "error", "message": message, "exit_code": 2}
    assert after == before  # inputs byte-identical, no output, no partial, temp or lock file


def test_the_warnings_give_the_true_shares(driven, shared, ct3mm):
    """The shares the warnings name are the real ones, computed here from the arrays."""
    liver = sitk.GetArrayFromImage(sitk.ReadImage(str(shared / "liver_part.nii.gz")))
    _, _, _, _, _, stderr = driven["labels-half-outside-the-image"]
    outside = int(liver[:, :, 61:].sum())  # the label map moved by 61 of 122 columns: its columns 61.. fall off
    assert f"({outside} of {int(liver.sum())} labeled voxels)" in stderr, stderr
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(ct3mm / "labels_synapse8.nii.gz")))
    _, _, _, _, stdout, stderr = driven["evaluate-prediction-covers-half"]
    ignored = int(np.count_nonzero(ref[15:]))
    assert f"({ignored} of {int(np.count_nonzero(ref))} labeled voxels)" in stderr, stderr
    result = json.loads(stdout[stdout.index("{") :])
    assert result["reference_outside_prediction"] == {
        "voxels": ignored,
        "of_labeled_voxels": int(np.count_nonzero(ref)),
    }


# =============================================================================== cases that need a model
def _events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def _array(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _one_error_line(stderr: str) -> str:
    errors = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith(("warning:", "training on"))]
    assert len(errors) == 1 and errors[0].startswith("hfsam: error: ") and "Traceback" not in stderr, stderr
    return errors[0]


def test_an_adapter_trained_on_coronal_slices_segments_coronal_slices(
    shared, ct3mm, tmp_path, cli_main, one_torch_thread, capsys
):
    """No --axis: the adapter's axis is used (and recorded), for segment and for continued training."""
    from HFSAMCore.io.read import read_image
    from HFSAMCore.model.inference import segment_image
    from HFSAMCore.model.loading import load_model
    from HFSAMCore.store.adapters import read_metadata
    from HFSAMCore.store.library import ModelLibrary

    out = tmp_path / "seg.nrrd"
    assert (
        cli_main(
            [
                "segment",
                ct3mm / "image.nii.gz",
                "-o",
                out,
                "--adapter",
                shared / "coronal.safetensors",
                "--batch-size",
                "16",
                "--precision",
                "fp32",
            ]
        )
        == 0
    ), capsys.readouterr().err
    sidecar = json.loads((tmp_path / "seg.json").read_text())
    assert sidecar["run"]["axis"] == "coronal" and sidecar["output"] == "seg.nrrd"
    lm = load_model(adapter=str(shared / "coronal.safetensors"), library=ModelLibrary(tmp_path / "lib"))
    image = read_image(ct3mm / "image.nii.gz")
    along = {
        axis: sitk.GetArrayFromImage(segment_image(image, lm.model, preset="ct", axis=axis, batch_size=16)[0])
        for axis in ("coronal", "axial")
    }
    assert np.array_equal(_array(out), along["coronal"]) and not np.array_equal(along["coronal"], along["axial"])

    assert (
        cli_main(
            [
                "finetune",
                ct3mm / "image.nii.gz",
                shared / "liver.nii.gz",
                "-o",
                tmp_path / "more.safetensors",
                "--adapter",
                shared / "coronal.safetensors",
                "--steps",
                "1",
                "--holdout",
                "0",
                "--batch-size",
                "2",
            ]
        )
        == 0
    ), capsys.readouterr().err
    assert read_metadata(tmp_path / "more.safetensors")["axis"] == "coronal"


def test_a_diverging_training_saves_nothing_and_says_try_a_lower_lr(
    shared, ct3mm, tmp_path, cli_main, one_torch_thread, capsys
):
    """--lr 1e30 --steps 1: the one loss is finite (it comes before the update), the weights after it are
    not usable: checked after the last update too. And a time budget too short for one step."""
    base = [
        "finetune",
        ct3mm / "image.nii.gz",
        shared / "liver.nii.gz",
        "-o",
        tmp_path / "a.safetensors",
        "--name",
        "x",
        "--library",
        tmp_path / "lib",
        "--classes",
        "liver",
        *TINY,
        "--holdout",
        "0",
        "--batch-size",
        "2",
        "--progress",
        "json",
    ]
    for more, said in (
        (["--lr", "1e30", "--steps", "1"], "after the last step"),
        (["--lr", "1e30", "--steps", "3"], "the loss became nan at step 2"),
        (["--minutes", "1e-9"], "ended before the first training step"),
    ):
        assert cli_main([*base, *more]) == 2
        captured = capsys.readouterr()
        line = _one_error_line(captured.err)
        assert said in line and ("try a lower --lr" in line or "--minutes" in line), line
        assert _events(captured.out)[-1]["exit_code"] == 2
        assert sorted(os.listdir(tmp_path)) == ["lib"] and os.listdir(tmp_path / "lib" / "adapters") == []


def test_non_finite_adapters_are_refused_on_save_and_on_load(shared, tmp_path):
    import torch

    from HFSAMCore.errors import InputError
    from HFSAMCore.store.adapters import load_adapter, read_metadata, save_adapter

    meta = read_metadata(shared / "liver.safetensors")
    with pytest.raises(InputError, match="NaN or infinite values"):
        save_adapter(tmp_path / "x.safetensors", {"w": torch.tensor([1.0, float("inf")])}, meta)
    with pytest.raises(InputError, match="is a broken adapter"):
        load_adapter(shared / "nan.safetensors")
    assert os.listdir(tmp_path) == []


def test_an_adapter_whose_output_is_not_finite_is_refused_not_read_as_empty(
    tmp_path, ct3mm, cli_main, one_torch_thread, capsys
):
    """Finite weights of 1e30 (what the last update of a diverged run gives) segment to NaN: an error,
    never "every voxel is background"."""
    huge = _adapter(tmp_path / "huge.safetensors", fill=1e30)
    out = tmp_path / "out"
    out.mkdir()
    assert cli_main(["segment", ct3mm / "image.nii.gz", "-o", out / "seg.nrrd", "--adapter", huge]) == 2
    assert "NaN or infinite on slices" in _one_error_line(capsys.readouterr().err)
    assert os.listdir(out) == []


def test_a_volume_that_comes_out_all_background_says_so_loudly(tmp_path, ct3mm, cli_main, one_torch_thread, capsys):
    zero = _adapter(tmp_path / "zero.safetensors", fill=0.0)  # every class logit equal: argmax is background
    out = tmp_path / "seg.nrrd"
    assert cli_main(["segment", ct3mm / "image.nii.gz", "-o", out, "--adapter", zero, "--progress", "json"]) == 0
    events = _events(capsys.readouterr().out)
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    assert any("EVERY VOXEL CAME OUT AS BACKGROUND" in w and "liver" in w for w in warnings), warnings
    assert events[-1]["event"] == "result" and events[-1]["labeled_voxels"] == 0
    assert not _array(out).any()


def test_binary_masks_and_sparse_values_become_the_classes_meant(
    shared, tmp_path, cli_main, one_torch_thread, capsys, ct3mm
):
    """A 0/255 mask for one named class is that class (value 1); without --classes the values present
    are the classes (255, not 255 classes), and segment writes exactly those values."""
    from HFSAMCore.store.adapters import read_metadata

    ft = [
        "finetune",
        ct3mm / "image.nii.gz",
        shared / "mask255.nii.gz",
        *TINY,
        "--steps",
        "1",
        "--holdout",
        "0",
        "--batch-size",
        "2",
        "--progress",
        "json",
    ]
    assert cli_main([*ft, "-o", tmp_path / "named.safetensors", "--classes", "liver"]) == 0
    warnings = [e["message"] for e in _events(capsys.readouterr().out) if e["event"] == "warning"]
    assert any("is a binary mask (0/255): reading value 255 as class 1 (liver)" in w for w in warnings), warnings
    assert [(c["value"], c["name"]) for c in read_metadata(tmp_path / "named.safetensors")["classes"]] == [(1, "liver")]

    assert cli_main([*ft, "-o", tmp_path / "plain.safetensors"]) == 0
    capsys.readouterr()
    classes = read_metadata(tmp_path / "plain.safetensors")["classes"]
    assert [(c["value"], c["name"]) for c in classes] == [(255, "label_255")]
    out = tmp_path / "seg.nrrd"
    assert cli_main(["segment", ct3mm / "image.nii.gz", "-o", out, "--adapter", tmp_path / "plain.safetensors"]) == 0
    values = set(np.unique(_array(out)).tolist())
    assert values == {0, 255}, values  # the class's own value, as the sidecar says
    assert [c["value"] for c in json.loads((tmp_path / "seg.json").read_text())["classes"]] == [255]


def test_names_in_any_case_and_tilted_volumes_are_written_as_asked(
    shared, ct3mm, tmp_path, cli_main, one_torch_thread, capsys
):
    from HFSAMCore.errors import InputError
    from HFSAMCore.io.write import write_image

    upper = tmp_path / "SEG.NII.GZ"
    assert cli_main(["segment", ct3mm / "image.nii.gz", "-o", upper, *TINY]) == 0, capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["SEG.NII.GZ", "SEG.json"]
    ct = sitk.ReadImage(str(ct3mm / "image.nii.gz"))
    back = sitk.ReadImage(str(upper))
    for a, b in (
        (back.GetOrigin(), ct.GetOrigin()),
        (back.GetSpacing(), ct.GetSpacing()),
        (back.GetDirection(), ct.GetDirection()),
    ):
        np.testing.assert_allclose(a, b, atol=1e-6)

    tilted = sitk.ReadImage(str(shared / "tilt.nrrd"))
    assert cli_main(["segment", shared / "tilt.nrrd", "-o", tmp_path / "tilt.nrrd", *TINY]) == 0
    seg = sitk.ReadImage(str(tmp_path / "tilt.nrrd"))
    np.testing.assert_allclose(seg.GetDirection(), tilted.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(seg.GetOrigin(), tilted.GetOrigin(), atol=1e-6)
    # The check after every write, for callers of the API that skip the check before the work:
    with pytest.raises(InputError, match="NIfTI cannot store this volume's geometry"):
        write_image(seg, tmp_path / "tilt.nii.gz")
    assert sorted(os.listdir(tmp_path)) == ["SEG.NII.GZ", "SEG.json", "tilt.json", "tilt.nrrd"]


def _cpu_oom_above(limit: int, calls: list):
    """The model's forward, which for batches over ``limit`` asks the real CPU allocator for 1 EiB
    (the allocator's own error, message and all, not a simulated one)."""
    import torch

    from HFSAMCore.model.hfsam import HFSAM

    real = HFSAM.forward

    def forward(self, images):
        calls.append(images.shape[0])
        if images.shape[0] > limit:
            torch.empty(1 << 60, dtype=torch.uint8)
        return real(self, images)

    return forward


def test_cpu_out_of_memory_is_recognised_backs_off_and_says_what_to_do(
    ct3mm, shared, tmp_path, monkeypatch, cli_main, one_torch_thread, capsys
):
    from HFSAMCore.model.hfsam import HFSAM

    calls: list[int] = []
    monkeypatch.setattr(HFSAM, "forward", _cpu_oom_above(2, calls))
    seg = ["segment", ct3mm / "image.nii.gz", *TINY, "--batch-size", "8", "--progress", "json"]
    assert cli_main([*seg, "-o", tmp_path / "a.nrrd"]) == 0
    warnings = [e["message"] for e in _events(capsys.readouterr().out) if e["event"] == "warning"]
    assert "out of memory: retrying with batch size 4" in warnings and calls[:3] == [8, 4, 2]
    assert (
        cli_main(
            [
                "finetune",
                ct3mm / "image.nii.gz",
                shared / "liver.nii.gz",
                "-o",
                tmp_path / "a.safetensors",
                "--classes",
                "liver",
                *TINY,
                "--steps",
                "2",
                "--holdout",
                "0",
                "--batch-size",
                "8",
                "--progress",
                "json",
            ]
        )
        == 0
    )
    warnings = [e["message"] for e in _events(capsys.readouterr().out) if e["event"] == "warning"]
    assert any("out of memory at batch size 8: retrying with batch size 4" in w for w in warnings), warnings

    monkeypatch.setattr(HFSAM, "forward", _cpu_oom_above(0, calls))
    assert cli_main([*seg, "-o", tmp_path / "b.nrrd"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "out of memory even at batch size 1 on the CPU" in line and "run on the CPU" not in line, line
    assert sorted(os.listdir(tmp_path)) == ["a.json", "a.nrrd", "a.safetensors"]


# =============================================================================== signals
def _child(args, home: Path) -> subprocess.Popen:
    env = dict(os.environ, HFSAM_HOME=str(home), PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "HFSAMCore", *map(str, args), "--progress", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


def _interrupt_at(proc: subprocess.Popen, wanted: Callable[[dict], bool], sig: int) -> tuple[int, list, str]:
    """Read events until ``wanted``; freeze the child there (so the signal lands right at that point), signal it."""
    events = []
    for line in proc.stdout:
        events.append(json.loads(line))
        if wanted(events[-1]):
            proc.send_signal(signal.SIGSTOP)
            proc.send_signal(sig)
            proc.send_signal(signal.SIGCONT)
            break
    rest, err = proc.communicate(timeout=300)
    events += [json.loads(line) for line in rest.splitlines() if line.strip()]
    return proc.returncode, events, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_evaluate_stops_when_cancelled(sig, ct3mm, tmp_path):
    """Slicer's Cancel (SIGTERM) and Ctrl-C stop an evaluation between classes, with exit code 130."""
    labels = ct3mm / "labels_synapse8.nii.gz"
    proc = _child(["evaluate", "--reference", labels, "--prediction", labels], tmp_path / "lib")
    code, events, err = _interrupt_at(proc, lambda e: e.get("stage") == "evaluate" and e.get("done") == 1, sig)
    assert code == 130, err
    assert events[-1] == {"event": "error", "message": "cancelled; nothing was written", "exit_code": 130}
    assert not any(e["event"] == "result" for e in events) and "Traceback" not in err


def test_the_demo_obeys_the_rules_a_cancelled_rerun_changes_nothing(
    tmp_path, cli_main, one_torch_thread, monkeypatch, capsys
):
    """A demo writes its six results together at the end; a rerun with --overwrite cancelled mid-training
    leaves them exactly as they were (no new adapter beside old results), and a demo that fails into a
    new folder leaves no folder."""
    from HFSAMCore.errors import InputError
    from HFSAMCore.store import sample_data
    from HFSAMCore.store.adapters import read_metadata

    out, home = tmp_path / "demo", tmp_path / "lib"
    args = ["demo", "--output", out, "--backbone", "tiny", "--device", "cpu", "--library", home]
    assert cli_main([*args, "--steps", "1"]) == 0, capsys.readouterr().err
    names = ["adapter.safetensors", "dice.json", "dice.md", "figure.png", "segmentation.json", "segmentation.nrrd"]
    assert sorted(os.listdir(out)) == names
    assert read_metadata(out / "adapter.safetensors")["training"]["steps"] == 1
    assert json.loads((out / "segmentation.json").read_text())["output"] == "segmentation.nrrd"
    before = snapshot(out)
    code, events, err = _interrupt_at(
        _child([*args, "--steps", "100000", "--overwrite"], home),
        lambda e: e.get("stage") == "finetune" and e.get("done") == 2,
        signal.SIGINT,
    )
    assert code == 130 and events[-1]["message"] == "cancelled; nothing was written", err
    assert snapshot(out) == before

    def offline(*a, **k):
        raise InputError("the sample data is not here and there is no network")

    monkeypatch.setattr(sample_data, "locate_sample", offline)
    fresh = tmp_path / "fresh"
    assert cli_main(["demo", "--output", fresh, "--backbone", "tiny"]) == 2
    assert not fresh.exists()


def test_a_tilted_dicom_series_keeps_every_slice_where_the_scanner_put_it(shared, tmp_path):
    """ITK alone reads a gantry-tilted series as a straight box (each slice moved sideways, up to 6.7 mm
    here); the engine keeps the true, sheared grid, and a NRRD result stores it exactly."""
    from HFSAMCore.io.read import read_image
    from HFSAMCore.io.write import write_image

    said: list[str] = []
    image = read_image(shared / "dcm_tilt", warn=said.append)
    assert any("gantry tilt of 10 degrees" in w for w in said), said
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(shared / "dcm_tilt"))
    itk_alone = sitk.ReadImage(files)
    for k in (1, len(files) // 2, len(files) - 1):
        reader = sitk.ImageFileReader()
        reader.SetFileName(files[k])
        reader.ReadImageInformation()
        position = [float(v) for v in reader.GetMetaData("0020|0032").split("\\")]
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((0, 0, k)), position, atol=1e-4)
        assert np.linalg.norm(np.subtract(itk_alone.TransformIndexToPhysicalPoint((0, 0, k)), position)) > 0.3 * k
    labels = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    labels.CopyInformation(image)
    back = sitk.ReadImage(str(write_image(labels, tmp_path / "seg.nrrd")))
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-6)


def test_what_a_reader_only_warned_about_reaches_the_user_as_one_line(shared):
    """Code without a Progress to hand (dataset readers, the API) warns with HFSAMWarning; the command
    line turns each into one `warning:` line and a JSON event, every time, never dropped."""
    import io
    import warnings

    from HFSAMCore.cli import app as cli
    from HFSAMCore.errors import HFSAMWarning
    from HFSAMCore.io.read import read_labels
    from HFSAMCore.runtime.progress import Progress

    with pytest.warns(HFSAMWarning, match="no voxel spacing in its header"):
        read_labels(shared / "nodir_ref.nrrd")
    out, err = io.StringIO(), io.StringIO()
    with warnings.catch_warnings():
        cli._warnings_as_progress(Progress("json", out=out, err=err))
        for _ in range(2):
            read_labels(shared / "nodir_ref.nrrd")
    lines = err.getvalue().splitlines()
    assert len(lines) == 2 and all(ln.startswith("warning: ") and "no voxel spacing" in ln for ln in lines), lines
    assert [json.loads(ln)["event"] for ln in out.getvalue().splitlines()] == ["warning", "warning"]
