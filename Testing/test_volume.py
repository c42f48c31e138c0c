"""Reading and writing volumes (io/read, io/write, io/geometry) against real files: the sample CT
(NIfTI, DICOM), files written here with SimpleITK, real child processes for the read-only-folder and disk-full cases."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from HFSAMCore.errors import InputError
from HFSAMCore.io.dicom import MODALITY_KEY
from HFSAMCore.io.geometry import geometry_mismatch, labels_onto_image, same_geometry
from HFSAMCore.io.read import read_image, read_label_volumes, read_labels
from HFSAMCore.io.write import write_image, write_json

SERIES_A = "1.2.826.0.1.3680043.2.1125.1"
SERIES_B = "1.2.826.0.1.3680043.2.1125.2"


@pytest.fixture(scope="module")
def ct(ct3mm) -> sitk.Image:
    return read_image(ct3mm / "image.nii.gz")


@pytest.fixture(scope="module")
def dicom(ctdicom) -> sitk.Image:
    return read_image(ctdicom / "dicom")


def _small(pixel=sitk.sitkInt16, size=(6, 5, 4), value=None) -> sitk.Image:
    arr = (
        np.arange(np.prod(size), dtype=np.float64).reshape(size[::-1]) if value is None else np.full(size[::-1], value)
    )
    img = sitk.Cast(sitk.GetImageFromArray(arr), pixel)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((-10.0, 20.0, 30.0))
    return img


# --------------------------------------------------------------------------- reading


def test_read_nifti_keeps_values_geometry_and_pixel_type(ct):
    assert ct.GetSize() == (122, 101, 30)
    assert ct.GetPixelID() == sitk.sitkInt16
    np.testing.assert_allclose(ct.GetSpacing(), (3.0, 3.0, 3.0), atol=1e-6)
    np.testing.assert_allclose(ct.GetOrigin(), (177.95632934570312, -11.319000244140625, 94.3017578125), atol=1e-6)
    np.testing.assert_allclose(ct.GetDirection(), (-1, 0, 0, 0, -1, 0, 0, 0, 1), atol=1e-6)
    arr = sitk.GetArrayViewFromImage(ct)
    assert arr.min() <= -1000 and arr.max() > 500  # real HU


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii", ".nhdr", ".mhd"])
def test_write_read_round_trip_keeps_geometry_and_voxels(ct, tmp_path, suffix):
    out = write_image(ct, tmp_path / f"ct{suffix}")
    back = read_image(out)
    assert geometry_mismatch(ct, back, tol=1e-6) is None
    assert back.GetPixelID() == ct.GetPixelID()
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(ct))
    # Detached formats leave header + data side by side, and no temp folder anywhere.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_read_dicom_series_geometry_and_modality(dicom, ctdicom):
    assert dicom.GetSize() == (512, 512, 20)
    np.testing.assert_allclose(dicom.GetSpacing(), (0.9765625, 0.9765625, 2.0), atol=1e-6)
    np.testing.assert_allclose(dicom.GetOrigin(), (-249.51171875, -437.51171875, -804.5), atol=1e-6)
    np.testing.assert_allclose(dicom.GetDirection(), np.eye(3).ravel(), atol=1e-6)
    assert dicom.GetMetaData(MODALITY_KEY) == "CT"
    # The series of these anonymised files has an empty UID: "folder::" names it.
    same = read_image(f"{ctdicom / 'dicom'}::")
    assert np.array_equal(sitk.GetArrayViewFromImage(same), sitk.GetArrayViewFromImage(dicom))
    # One .dcm file stands for its whole series.
    one = read_image(sorted((ctdicom / "dicom").glob("*.dcm"))[3])
    assert one.GetSize() == (512, 512, 20)


def _copy_dicom_with_series_uid(src: Path, dst: Path, uid: str) -> None:
    """Write a copy of one DICOM slice (same pixels and position) under another SeriesInstanceUID."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(src))
    original = reader.Execute()
    img = sitk.GetImageFromArray(sitk.GetArrayFromImage(original))  # drops the anonymised tags GDCM rejects
    img.CopyInformation(original)
    for tag in ("0008|0060", "0008|103e"):
        img.SetMetaData(tag, reader.GetMetaData(tag))
    img.SetMetaData("0020|000e", uid)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(dst))
    writer.Execute(img)


@pytest.fixture(scope="module")
def two_series(ctdicom, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("two_series")
    files = sorted((ctdicom / "dicom").glob("*.dcm"))
    for i, f in enumerate(files[:2]):
        _copy_dicom_with_series_uid(f, folder / f"a{i}.dcm", SERIES_A)
    for i, f in enumerate(files[5:8]):
        _copy_dicom_with_series_uid(f, folder / f"b{i}.dcm", SERIES_B)
    return folder


def test_folder_with_two_series_is_refused_with_both_listed(two_series):
    with pytest.raises(InputError) as err:
        read_image(two_series)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"{SERIES_A} (2 files" in msg and f"{SERIES_B} (3 files" in msg
    assert "::SERIES_UID" in msg


def test_folder_uid_syntax_reads_one_series(two_series, dicom):
    img = read_image(f"{two_series}::{SERIES_B}")
    assert img.GetSize() == (512, 512, 3)
    assert img.GetMetaData(MODALITY_KEY) == "CT"
    # Its slices are the original series' slices at the same physical position.
    k0 = round((img.GetOrigin()[2] - dicom.GetOrigin()[2]) / 2.0)
    whole = sitk.GetArrayViewFromImage(dicom)
    assert np.array_equal(sitk.GetArrayViewFromImage(img), whole[k0 : k0 + 3])
    with pytest.raises(InputError, match="is not in"):
        read_image(f"{two_series}::1.2.3.999")


# --------------------------------------------------------------------------- refusals


def _refused(path, *words):
    with pytest.raises(InputError) as err:
        read_image(path)
    msg = str(err.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_missing_path_and_empty_folders(tmp_path):
    _refused(tmp_path / "nope.nii.gz", "does not exist")
    _refused(tmp_path, "no DICOM series")
    (tmp_path / "sub").mkdir()
    _refused(tmp_path, "sub-folders")


def test_unreadable_files_name_the_file(tmp_path, ct3mm):
    text = tmp_path / "notes.nii.gz"
    text.write_text("this is not an image\n")
    _refused(text, "notes.nii.gz", "is a text file")
    data = (ct3mm / "image.nii.gz").read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(data[: len(data) // 2])
    _refused(cut, "cut.nii.gz", "truncated")
    raw = tmp_path / "raw.nii"
    write_image(read_image(ct3mm / "image.nii.gz"), raw)
    raw.write_bytes(raw.read_bytes()[:-1000])  # ITK would fill the gap with zeros
    _refused(raw, "raw.nii", "truncated")
    nrrd = tmp_path / "cut.nrrd"
    write_image(read_image(ct3mm / "image.nii.gz"), nrrd)
    nrrd.write_bytes(nrrd.read_bytes()[:-5000])
    _refused(nrrd, "cut.nrrd")


def test_refuses_4d_vector_2d_nan_inf_blank(tmp_path):
    vol = _small(sitk.sitkFloat32)
    four = sitk.JoinSeries([vol, vol])
    sitk.WriteImage(four, str(tmp_path / "four.nii.gz"))
    _refused(tmp_path / "four.nii.gz", "4D")

    rgb = sitk.Compose([sitk.Cast(_small(), sitk.sitkUInt8)] * 3)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.nrrd"))
    _refused(tmp_path / "rgb.nrrd", "3 components")

    flat = sitk.GetImageFromArray(np.arange(20, dtype=np.int16).reshape(4, 5))
    sitk.WriteImage(flat, str(tmp_path / "flat.nii.gz"))
    _refused(tmp_path / "flat.nii.gz", "2D")

    line = sitk.GetImageFromArray(np.arange(5, dtype=np.int16).reshape(1, 1, 5))
    sitk.WriteImage(line, str(tmp_path / "line.nrrd"))
    _refused(tmp_path / "line.nrrd", "two axes")

    for bad, word in ((np.nan, "NaN"), (np.inf, "infinite")):
        arr = sitk.GetArrayFromImage(vol)
        arr[1, 2, 3] = bad
        img = sitk.GetImageFromArray(arr)
        img.CopyInformation(vol)
        sitk.WriteImage(img, str(tmp_path / "bad.mha"))
        _refused(tmp_path / "bad.mha", word)

    sitk.WriteImage(_small(value=-1024), str(tmp_path / "blank.nrrd"))
    _refused(tmp_path / "blank.nrrd", "blank", "-1024")


def test_4d_file_with_one_time_point_reads_as_3d(tmp_path):
    vol = _small()
    sitk.WriteImage(sitk.JoinSeries([vol]), str(tmp_path / "t1.nrrd"))  # NRRD keeps the size-1 axis
    img = read_image(tmp_path / "t1.nrrd")
    assert img.GetDimension() == 3 and same_geometry(img, vol)
    assert np.array_equal(sitk.GetArrayViewFromImage(img), sitk.GetArrayViewFromImage(vol))


def test_dicom_series_with_a_missing_slice_is_refused(ctdicom, tmp_path):
    files = sorted((ctdicom / "dicom").glob("*.dcm"))
    for f in files[:3] + files[4:6]:  # slice 3 missing: ITK would stretch the volume
        shutil.copy(f, tmp_path / f.name)
    msg = _refused(tmp_path, "unevenly spaced", "missing")
    assert "gap of 4 mm" in msg
    for f in files[3:4]:
        shutil.copy(f, tmp_path / f.name)
    assert read_image(tmp_path).GetSize() == (512, 512, 6)


def test_single_slice_3d_volume_is_allowed(tmp_path):
    one = sitk.GetImageFromArray(np.arange(30, dtype=np.int16).reshape(1, 5, 6))
    sitk.WriteImage(one, str(tmp_path / "one.nrrd"))
    assert read_image(tmp_path / "one.nrrd").GetSize() == (6, 5, 1)


# --------------------------------------------------------------------------- labels


def test_read_labels_rules(tmp_path):
    zero = _small(sitk.sitkUInt8, value=0)
    sitk.WriteImage(zero, str(tmp_path / "zero.nii.gz"))
    assert read_labels(tmp_path / "zero.nii.gz").GetPixelID() == sitk.sitkUInt8
    with pytest.raises(InputError, match="blank"):
        read_image(tmp_path / "zero.nii.gz")

    whole = sitk.GetArrayFromImage(_small(sitk.sitkFloat32)) % 3  # 0., 1., 2. as float
    img = sitk.GetImageFromArray(whole.astype(np.float32))
    sitk.WriteImage(img, str(tmp_path / "float.nrrd"))
    lab = read_labels(tmp_path / "float.nrrd")
    assert lab.GetPixelID() == sitk.sitkUInt8
    assert np.array_equal(sitk.GetArrayViewFromImage(lab), whole.astype(np.uint8))

    sitk.WriteImage(sitk.GetImageFromArray((whole + 0.5).astype(np.float32)), str(tmp_path / "half.nrrd"))
    with pytest.raises(InputError, match="non-integer"):
        read_labels(tmp_path / "half.nrrd")

    neg = sitk.GetArrayFromImage(_small(sitk.sitkInt16)) - 3
    sitk.WriteImage(sitk.GetImageFromArray(neg.astype(np.int16)), str(tmp_path / "neg.nrrd"))
    with pytest.raises(InputError, match="negative"):
        read_labels(tmp_path / "neg.nrrd")

    big = np.zeros((4, 5, 6), np.int32)
    big[0, 0, 0] = 300
    sitk.WriteImage(sitk.GetImageFromArray(big), str(tmp_path / "big.nrrd"))
    assert read_labels(tmp_path / "big.nrrd").GetPixelID() == sitk.sitkUInt16


def test_read_label_volumes_merges_by_physical_position_later_wins(tmp_path):
    base = _small(sitk.sitkUInt8, value=0)
    a = np.zeros((4, 5, 6), np.uint8)
    a[1:3, 1:4, 1:4] = 1
    b = np.zeros((4, 5, 6), np.uint8)
    b[2:4, 2:5, 3:6] = 1
    img_a = sitk.GetImageFromArray(a)
    img_a.CopyInformation(base)
    img_b = sitk.GetImageFromArray(b)
    img_b.CopyInformation(base)
    write_image(img_a, tmp_path / "a.nii.gz")
    # The second class is stored with permuted and flipped axes: same physical content.
    write_image(sitk.Flip(sitk.PermuteAxes(img_b, (2, 0, 1)), (True, False, True)), tmp_path / "b.nrrd")
    merged = read_label_volumes([tmp_path / "a.nii.gz", tmp_path / "b.nrrd"])
    assert same_geometry(merged, base)
    expected = np.where(b > 0, 2, a)
    assert np.array_equal(sitk.GetArrayViewFromImage(merged), expected)
    assert (expected == 1).sum() > 0 and ((a > 0) & (b > 0)).sum() > 0  # both classes and an overlap exist


def test_labels_onto_dicom_grid_undo_the_flipped_y_axis(ctdicom, dicom):
    labels = read_labels(ctdicom / "labels_synapse8.nii.gz")
    assert labels.GetDirection()[4] == -1.0  # the trap the data README warns about
    on_grid = labels_onto_image(labels, dicom)
    assert same_geometry(on_grid, dicom)
    assert on_grid.GetPixelID() == sitk.sitkUInt8
    hu = sitk.GetArrayViewFromImage(dicom)
    lab = sitk.GetArrayViewFromImage(on_grid)
    liver = lab == 5
    assert liver.sum() == (sitk.GetArrayViewFromImage(labels) == 5).sum()  # same grid points, every voxel kept
    assert 0 <= hu[liver].mean() <= 200, hu[liver].mean()
    assert -200 <= hu[lab == 7].mean() <= 400  # aorta: blood, maybe with contrast
    naive = sitk.GetArrayViewFromImage(labels) == 5  # pairing arrays by index mirrors y
    dice_naive = 2 * (naive & liver).sum() / (naive.sum() + liver.sum())
    assert dice_naive < 0.7, dice_naive
    assert hu[naive].mean() < hu[liver].mean() - 30  # the mirrored "liver" is not liver tissue


def test_labels_outside_the_image_are_refused(ct):
    labels = _small(sitk.sitkUInt8, value=1)
    labels.SetOrigin((5000.0, 0.0, 0.0))
    with pytest.raises(InputError, match="do not overlap"):
        labels_onto_image(labels, ct)


def test_labels_onto_image_partial_overlap_fills_zero(ct):
    labels = sitk.Image(10, 10, 10, sitk.sitkUInt16)
    labels += 300
    labels.SetSpacing((3.0, 3.0, 3.0))
    labels.SetDirection(ct.GetDirection())
    labels.SetOrigin(ct.GetOrigin())
    out = labels_onto_image(labels, ct)
    assert out.GetPixelID() == sitk.sitkUInt16
    arr = sitk.GetArrayViewFromImage(out)
    assert (arr == 300).sum() == 1000 and arr[:10, :10, :10].min() == 300 and arr.sum() == 300 * 1000


# --------------------------------------------------------------------------- geometry


def test_geometry_mismatch_names_what_differs(ct):
    same = sitk.Image(ct)
    assert geometry_mismatch(ct, same) is None and same_geometry(ct, same)
    moved = sitk.Image(ct)
    moved.SetOrigin(tuple(np.add(ct.GetOrigin(), (0, 0, 1e-3))))
    assert "origin" in geometry_mismatch(ct, moved)
    nearly = sitk.Image(ct)
    nearly.SetOrigin(tuple(np.add(ct.GetOrigin(), (0, 0, 1e-8))))
    assert same_geometry(ct, nearly)
    spaced = sitk.Image(ct)
    spaced.SetSpacing((3.0, 3.0, 3.01))
    assert "spacing" in geometry_mismatch(ct, spaced)
    turned = sitk.Image(ct)
    turned.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
    assert "direction" in geometry_mismatch(ct, turned)
    assert "size" in geometry_mismatch(ct, sitk.PermuteAxes(ct, (1, 0, 2)))


# --------------------------------------------------------------------------- writing


def test_write_never_overwrites_unless_asked(tmp_path):
    first, second = _small(value=1), _small(value=2)
    path = write_image(first, tmp_path / "out.nii.gz")
    with pytest.raises(InputError, match="already exists"):
        write_image(second, path)
    assert sitk.GetArrayViewFromImage(sitk.ReadImage(str(path))).max() == 1  # untouched
    write_image(second, path, overwrite=True)
    assert sitk.GetArrayViewFromImage(sitk.ReadImage(str(path))).max() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]


def test_write_refuses_bad_targets(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        write_image(_small(), tmp_path / "missing" / "x.nrrd")
    with pytest.raises(InputError, match="use one of"):
        write_image(_small(), tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_write_compress_flag(tmp_path, ct):
    small = write_image(ct, tmp_path / "c.nrrd", compress=True).stat().st_size
    big = write_image(ct, tmp_path / "u.nrrd", compress=False).stat().st_size
    assert big > 122 * 101 * 30 * 2 > small


def _run_child(code: str, repo: Path, **kw) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
        capture_output=True,
        text=True,
        timeout=120,
        **kw,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_write_into_read_only_folder_is_refused(repo_root):
    # Root ignores permission bits, so the writer runs as 'nobody' in a child process then.
    folder = Path(tempfile.mkdtemp(prefix="hfsam-ro-"))
    try:
        folder.chmod(0o555)
        code = f"""
            import json, os, SimpleITK as sitk
            # import first: the Python install may be unreadable to nobody
            from HFSAMCore.io.read import read_image; from HFSAMCore.io.write import write_image, write_json
            from HFSAMCore.errors import InputError
            if os.geteuid() == 0:
                os.setgid(65534); os.setuid(65534)
            try:
                write_image(sitk.Image(4, 4, 4, sitk.sitkUInt8), {str(folder / "x.nrrd")!r})
                print(json.dumps({{"raised": None}}))
            except InputError as e:
                print(json.dumps({{"raised": "InputError", "msg": str(e)}}))
        """
        out = _run_child(code, repo_root)
        assert out["raised"] == "InputError", out
        assert "cannot write" in out["msg"] and "\n" not in out["msg"]
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)
        shutil.rmtree(folder)


def test_disk_full_leaves_no_partial_file(repo_root, tmp_path):
    # RLIMIT_FSIZE makes every write past 100 kB fail (EFBIG), like a full disk.
    code = f"""
        import json, resource, signal, SimpleITK as sitk
        from HFSAMCore.io.read import read_image; from HFSAMCore.io.write import write_image, write_json
        from HFSAMCore.errors import InputError
        img = sitk.Image(128, 128, 64, sitk.sitkInt16)  # 2 MB uncompressed
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        out = {{}}
        for name in ("big.nii", "big.nhdr", "meta.json"):
            try:
                if name.endswith(".json"):
                    write_json({{"x": "y" * 300_000}}, {str(tmp_path)!r} + "/" + name)
                else:
                    write_image(img, {str(tmp_path)!r} + "/" + name, compress=False)
                out[name] = None
            except InputError as e:
                out[name] = str(e)
        print(json.dumps(out))
    """
    out = _run_child(code, repo_root)
    for name, msg in out.items():
        assert msg is not None and "could not write" in msg and "\n" not in msg, (name, msg)
    assert list(tmp_path.iterdir()) == []  # no temp folder, no partial file


def test_write_json_atomic_rules(tmp_path):
    path = write_json({"dice": 0.9, "classes": ["liver"]}, tmp_path / "r.json")
    assert json.loads(path.read_text()) == {"dice": 0.9, "classes": ["liver"]}
    with pytest.raises(InputError, match="already exists"):
        write_json({}, path)
    write_json({"a": 1}, path, overwrite=True)
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(ValueError):
        write_json({"hd95": float("inf")}, tmp_path / "bad.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
