"""Dataset readers and few-shot draws: small files written here in each community format.

The writers below (``write_synapse``, ``write_acdc``, ``write_nifti``) are also
used by test_train_dataset.py and test_evaluate_dataset.py.
"""

import random
import shutil

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from HFSAMCore.errors import InputError
from HFSAMCore.io.slices import SliceView, normalize
from HFSAMCore.train.dataset_lists import read_list, sample_fraction, sample_patients, write_list
from HFSAMCore.train.datasets import AcdcData, NiftiData, SynapseData, open_dataset

# --------------------------------------------------------------------------- synthetic data


def draw_labels(shape, k: int, shift: int = 0) -> np.ndarray:
    """A 2D label map with a disc (1), a bar (2) and, for k >= 3, a small square (3); moved by `shift`."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    lab = np.zeros(shape, np.uint8)
    lab[(yy - h // 3) ** 2 + (xx - w // 3 - shift) ** 2 <= (min(h, w) // 6) ** 2] = 1
    lab[2 * h // 3 : 2 * h // 3 + 3, w // 2 + shift : w // 2 + shift + w // 4] = 2
    if k >= 3:
        lab[h // 6 : h // 6 + 3, 3 * w // 4 : 3 * w // 4 + 3] = 3
    return lab


def image_for(lab: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Intensities in [0, 1] that reveal the labels (each class its own grey), with a little noise."""
    img = 0.2 + 0.2 * lab.astype(np.float32) + rng.normal(0, 0.02, lab.shape).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


def write_synapse(
    root, cases=("case0005", "case0006"), n_slices=4, size=32, test_cases=("case0001", "case0002"), seed=0
):
    """TransUNet layout: train_npz/*.npz, test_vol_h5/*.npy.h5, lists/train.txt and test_vol.txt.

    Labels are written as float32, as TransUNet's files store them. Returns {name: (image, label)}.
    """
    rng = np.random.default_rng(seed)
    train, test, lists = root / "train_npz", root / "test_vol_h5", root / "lists"
    for d in (train, test, lists):
        d.mkdir(parents=True, exist_ok=True)
    written, names = {}, []
    for c, case in enumerate(cases):
        for s in range(n_slices):
            lab = draw_labels((size, size), 2, shift=(s + c) % 3)
            img = image_for(lab, rng)
            name = f"{case}_slice{s:03d}"
            np.savez(train / f"{name}.npz", image=img, label=lab.astype(np.float32))
            written[name] = (img, lab)
            names.append(name)
    (lists / "train.txt").write_text("".join(n + "\n" for n in names))
    for case in test_cases:
        lab = np.stack([draw_labels((size, size), 2, shift=s % 3) for s in range(n_slices)])
        lab[0] = 0  # one empty slice, as at the ends of a real scan
        img = image_for(lab, rng)
        with h5py.File(test / f"{case}.npy.h5", "w") as fh:
            fh.create_dataset("image", data=img)
            fh.create_dataset("label", data=lab.astype(np.float32))
        written[case] = (img, lab)
    (lists / "test_vol.txt").write_text("".join(n + "\n" for n in test_cases))
    return written


def write_acdc(root, patients=(1, 2, 3, 4), frames=(1, 12), n_slices=3, shape=(30, 26), test=(5,), seed=0):
    """SSL4MIS layout: data/slices/*.h5, data/*.h5, train_slices.list, train.list, test.list."""
    rng = np.random.default_rng(seed)
    (root / "data" / "slices").mkdir(parents=True, exist_ok=True)
    written, slice_names, train_vols, test_vols = {}, [], [], []
    for p in (*patients, *test):
        for f in frames:
            vol = f"patient{p:03d}_frame{f:02d}"
            lab = np.stack([draw_labels(shape, 3, shift=(s + p) % 2) for s in range(n_slices)])
            img = image_for(lab, rng)
            with h5py.File(root / "data" / f"{vol}.h5", "w") as fh:
                fh.create_dataset("image", data=img)
                fh.create_dataset("label", data=lab)
            written[vol] = (img, lab)
            (test_vols if p in test else train_vols).append(vol)
            if p in test:
                continue
            for s in range(n_slices):
                name = f"{vol}_slice_{s}"
                with h5py.File(root / "data" / "slices" / f"{name}.h5", "w") as fh:
                    fh.create_dataset("image", data=img[s], compression="gzip")
                    fh.create_dataset("label", data=lab[s], compression="gzip")
                written[name] = (img[s], lab[s])
                slice_names.append(name)
    (root / "train_slices.list").write_text("".join(n + "\n" for n in slice_names))
    (root / "train.list").write_text("".join(n + "\n" for n in train_vols))
    (root / "test.list").write_text("".join(n + "\n" for n in test_vols))
    return written


def write_nifti(
    root, cases=("liver_001", "liver_002"), subset="Tr", size=(24, 20, 5), spacing=(0.8, 0.8, 2.5), flip_y=False, seed=0
):
    """nnU-Net layout: images{subset}/CASE_0000.nii.gz (HU) and labels{subset}/CASE.nii.gz.

    Returns {case: (hu, labels)} as [z, y, x] arrays in the unflipped orientation."""
    rng = np.random.default_rng(seed)
    (root / f"images{subset}").mkdir(parents=True, exist_ok=True)
    (root / f"labels{subset}").mkdir(parents=True, exist_ok=True)
    out = {}
    x, y, z = size
    for i, case in enumerate(cases):
        lab = np.stack([draw_labels((y, x), 2, shift=(s + i) % 2) for s in range(z)])  # [z, y, x]
        hu = (-100 + 150 * lab.astype(np.int16) + rng.normal(0, 5, lab.shape)).astype(np.int16)
        hu[:, :2, :] = -1000  # some air, so that "auto" recognises a CT
        origin = (10.0, -5.0, 30.0)
        seg = sitk.GetImageFromArray(lab)
        seg.SetSpacing(spacing)
        seg.SetOrigin(origin)
        if flip_y:  # the same anatomy stored with the y axis reversed (as the sample DICOM's labels are)
            img = sitk.GetImageFromArray(np.ascontiguousarray(hu[:, ::-1, :]))
            img.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
            img.SetOrigin((origin[0], origin[1] + (y - 1) * spacing[1], origin[2]))
        else:
            img = sitk.GetImageFromArray(hu)
            img.SetOrigin(origin)
        img.SetSpacing(spacing)
        sitk.WriteImage(img, str(root / f"images{subset}" / f"{case}_0000.nii.gz"))
        sitk.WriteImage(seg, str(root / f"labels{subset}" / f"{case}.nii.gz"))
        out[case] = (hu, lab)
    return out


# --------------------------------------------------------------------------- readers


def test_synapse_reader_returns_what_was_written(tmp_path):
    written = write_synapse(tmp_path)
    train = SynapseData(tmp_path / "train_npz")
    names = train.slice_names(tmp_path / "lists" / "train.txt")
    assert names == [f"case000{c}_slice00{s}" for c in (5, 6) for s in range(4)]
    assert train.slice_names() == sorted(names)  # no list: every .npz in the folder
    for name in names:
        img, lab = train.load_slice(name)
        assert img.dtype == np.float32 and lab.dtype == np.int64
        np.testing.assert_array_equal(img, written[name][0])  # no re-windowing of [0, 1] data
        np.testing.assert_array_equal(lab, written[name][1])
    assert train.patient_of("case0005_slice003") == "case0005"

    test = SynapseData(tmp_path / "test_vol_h5")
    assert test.volume_names(tmp_path / "lists" / "test_vol.txt") == ["case0001", "case0002"]
    assert test.volume_names() == ["case0001", "case0002"]
    vol = test.load_volume("case0002")
    np.testing.assert_array_equal(vol.image, written["case0002"][0])
    np.testing.assert_array_equal(vol.label, written["case0002"][1])
    assert vol.image.shape == (4, 32, 32) and vol.spacing_zyx is None


def test_acdc_reader_returns_what_was_written(tmp_path):
    written = write_acdc(tmp_path)
    acdc = AcdcData(tmp_path)
    names = acdc.slice_names()  # default: train_slices.list
    assert len(names) == 4 * 2 * 3 and names[0] == "patient001_frame01_slice_0"
    img, lab = acdc.load_slice("patient003_frame12_slice_2")
    np.testing.assert_array_equal(img, written["patient003_frame12_slice_2"][0])
    np.testing.assert_array_equal(lab, written["patient003_frame12_slice_2"][1])
    assert img.shape == (30, 26) and set(np.unique(lab)) == {0, 1, 2, 3}
    assert acdc.patient_of("patient003_frame12_slice_2") == "patient003"
    assert acdc.volume_names() == ["patient005_frame01", "patient005_frame12"]  # default: test.list
    vol = acdc.load_volume("patient005_frame12")
    np.testing.assert_array_equal(vol.label, written["patient005_frame12"][1])
    assert acdc.intensity_preset == "mr"


def test_nifti_reader_gives_canonical_normalised_slices(tmp_path):
    images = write_nifti(tmp_path, flip_y=True)
    data = NiftiData(tmp_path)
    assert data.cases() == ["liver_001", "liver_002"]
    names = data.slice_names()
    assert names == [f"liver_00{c}_slice{s:03d}" for c in (1, 2) for s in range(5)]
    assert data.intensity_preset == "ct"
    hu, lab = images["liver_002"]
    # The image is stored y-reversed (direction -y), the labels are not: canonical slices undo the
    # image's flip and the labels land by physical position, so both equal the unflipped arrays.
    stored = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "imagesTr" / "liver_002_0000.nii.gz")))
    assert np.array_equal(stored[3], hu[3, ::-1])
    got_img, got_lab = data.load_slice("liver_002_slice003")
    np.testing.assert_allclose(got_img, normalize(hu, "ct")[3], atol=1e-6)
    np.testing.assert_array_equal(got_lab, lab[3])
    vol = data.load_volume("liver_001")
    assert vol.image.shape == (5, 20, 24) and vol.spacing_zyx == pytest.approx((2.5, 0.8, 0.8))
    assert data.patient_of("liver_001_slice004") == "liver_001"


def test_nifti_reader_on_the_real_ct_with_flipped_labels(tmp_path, ctdicom):
    """The sample DICOM series as a NIfTI image, its label map stored with y reversed: by position, not index."""
    from HFSAMCore.io.read import read_image

    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    image = read_image(ctdicom / "dicom")
    sitk.WriteImage(image, str(tmp_path / "imagesTr" / "ct_0000.nii.gz"))
    shutil.copy(ctdicom / "labels_synapse8.nii.gz", tmp_path / "labelsTr" / "ct.nii.gz")
    data = NiftiData(tmp_path)
    names = data.slice_names()
    assert len(names) == 20
    labels = sitk.ReadImage(str(ctdicom / "labels_synapse8.nii.gz"))
    resampled = sitk.Resample(labels, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    view = SliceView.from_image(image, "axial")
    want = view.to_slices(sitk.GetArrayFromImage(resampled))
    for k in (0, 9, 19):
        _, lab = data.load_slice(f"ct_slice{k:03d}")
        np.testing.assert_array_equal(lab, want[k])
        assert lab.max() > 0
    # the array of the label file pairs with the image only after the flip: index pairing would be wrong
    raw = sitk.GetArrayFromImage(labels)
    assert not np.array_equal(view.to_slices(raw)[9], want[9])


def test_bad_files_are_clear_errors(tmp_path):
    (tmp_path / "train_npz").mkdir()
    np.savez(
        tmp_path / "train_npz" / "case0001_slice000.npz",
        image=np.full((8, 8), 40.0, np.float32),
        label=np.zeros((8, 8)),
    )
    np.savez(tmp_path / "train_npz" / "case0001_slice001.npz", image=np.zeros((8, 8), np.float32))
    data = SynapseData(tmp_path / "train_npz")
    with pytest.raises(InputError, match=r"must already be scaled to \[0, 1\]"):
        data.load_slice("case0001_slice000")
    with pytest.raises(InputError, match="no 'label' array"):
        data.load_slice("case0001_slice001")
    with pytest.raises(InputError, match="does not exist"):
        data.load_slice("case0009_slice000")
    (tmp_path / "dup.txt").write_text("a\nb\na\n")
    with pytest.raises(InputError, match="more than once"):
        read_list(tmp_path / "dup.txt")
    with pytest.raises(InputError, match="--dataset"):
        open_dataset("kits", tmp_path)
    (tmp_path / "data").mkdir()
    with h5py.File(tmp_path / "data" / "v.h5", "w") as fh:
        fh.create_dataset("image", data=np.zeros((2, 4, 4), np.float32))
    with pytest.raises(InputError, match="no 'label' dataset"):
        AcdcData(tmp_path).load_volume("v")


# --------------------------------------------------------------------------- draws


def test_fraction_draw_is_h_sams_random_sample():
    names = [f"case{c:04d}_slice{s:03d}" for c in range(18) for s in range(123)]  # 2214 slices
    drawn = sample_fraction(names, 0.1, 2345)
    random.seed(2345)
    assert drawn == random.sample(names, int(len(names) * 0.1))  # H-SAM: random.sample(slices, int(cnt*perc))
    assert len(drawn) == 221 and len(set(drawn)) == 221
    assert sample_fraction(names, 0.1, 2345) == drawn  # reproducible
    assert sample_fraction(names, 0.1, 1) != drawn
    assert sample_fraction(names, 1.0, 2345) == names
    with pytest.raises(InputError, match="less than one slice"):
        sample_fraction(names[:5], 0.1, 0)
    with pytest.raises(InputError, match="--fraction"):
        sample_fraction(names, 1.5, 0)


def test_k_patients_as_ssl4mis_or_drawn(tmp_path):
    write_acdc(tmp_path, patients=(1, 2, 3, 4, 5, 6), test=())
    acdc = AcdcData(tmp_path)
    names = acdc.slice_names()
    first3 = sample_patients(names, acdc.patient_of, 3)
    assert first3 == names[: 3 * 2 * 3]  # SSL4MIS: the first slices of the sorted list
    assert {acdc.patient_of(n) for n in first3} == {"patient001", "patient002", "patient003"}
    drawn = sample_patients(names, acdc.patient_of, 2, order="random", seed=7)
    patients = [f"patient00{p}" for p in range(1, 7)]
    assert {acdc.patient_of(n) for n in drawn} == set(random.Random(7).sample(patients, 2))
    assert drawn == [n for n in names if n in set(drawn)]  # list order kept
    assert sample_patients(names, acdc.patient_of, 2, order="random", seed=7) == drawn
    with pytest.raises(InputError, match="6 patient"):
        sample_patients(names, acdc.patient_of, 7)


def test_written_list_reads_back(tmp_path):
    names = ["case0001_slice002", "case0003_slice010"]
    write_list(names, tmp_path / "train.txt")
    assert read_list(tmp_path / "train.txt") == names
    with pytest.raises(InputError, match="already exists"):
        write_list(names, tmp_path / "train.txt")
    (tmp_path / "suffixed.txt").write_text("# a comment\ncase0001_slice002.npz\n\ncase0002.npy.h5\n")
    assert read_list(tmp_path / "suffixed.txt") == ["case0001_slice002", "case0002"]


def test_readers_name_the_slices_they_do_not_hold(tmp_path):
    """Checked before a run writes anything: a --train-list or --list naming slices that are not there."""
    write_synapse(tmp_path / "syn")
    syn = SynapseData(tmp_path / "syn" / "train_npz")
    assert syn.missing_slices(["case0005_slice001", "case0005_slice009", "case0099_slice000"]) == [
        "case0005_slice009",
        "case0099_slice000",
    ]
    write_acdc(tmp_path / "acdc")
    acdc = AcdcData(tmp_path / "acdc")
    assert acdc.missing_slices(["patient001_frame01_slice_2", "patient001_frame01_slice_3"]) == [
        "patient001_frame01_slice_3"
    ]
    write_nifti(tmp_path / "nii")  # 2 cases of 5 axial slices
    nii = NiftiData(tmp_path / "nii")
    assert nii.missing_slices(["liver_001_slice004", "liver_001_slice005", "liver_009_slice000", "liver_001"]) == [
        "liver_001_slice005",
        "liver_009_slice000",
        "liver_001",
    ]
    assert nii.missing_slices(nii.slice_names()) == []
