"""slices.py: canonical orientation on the real CT (permuted, flipped, rotated copies),
the anatomy lands where a radiologist expects it, intensity presets, slice lists."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from HFSAMCore.errors import InputError
from HFSAMCore.io import slices as S
from HFSAMCore.io.geometry import labels_onto_image
from HFSAMCore.io.read import read_image, read_labels


@pytest.fixture(scope="module")
def ct(ct3mm):
    return read_image(ct3mm / "image.nii.gz")


@pytest.fixture(scope="module")
def ct_labels(ct3mm):
    return read_labels(ct3mm / "labels_synapse8.nii.gz")


def _stack(image, axis="axial"):
    view = S.SliceView.from_image(image, axis)
    return view, view.to_slices(sitk.GetArrayViewFromImage(image))


# --------------------------------------------------------------------------- orientation


@pytest.mark.parametrize("axis", S.AXES)
def test_permuted_and_flipped_copies_give_the_same_canonical_stack(ct, axis):
    _, reference = _stack(ct, axis)
    for order in itertools.permutations(range(3)):
        for flips in itertools.product((False, True), repeat=3):
            image = sitk.Flip(sitk.PermuteAxes(ct, order), flips)  # same physical content
            view, stack = _stack(image, axis)
            assert np.array_equal(stack, reference), (order, flips)
            array = sitk.GetArrayViewFromImage(image)
            back = view.from_slices(stack)
            assert back.dtype == array.dtype and np.array_equal(back, array)


def test_small_rotation_keeps_the_canonical_stack(ct):
    rotated = sitk.Image(ct)
    c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
    turn = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    rotated.SetDirection(tuple((turn @ np.asarray(ct.GetDirection()).reshape(3, 3)).ravel()))
    assert np.array_equal(_stack(rotated)[1], _stack(ct)[1])


def test_45_degree_oblique_still_gives_a_permutation(ct):
    oblique = sitk.Image(ct)
    r = np.sqrt(0.5)
    oblique.SetDirection((r, -r, 0, r, r, 0, 0, 0, 1))
    view, stack = _stack(oblique)
    assert sorted(view.numpy_axes) == [0, 1, 2] and stack.shape[0] == 30


def test_axial_canonical_layout_is_the_radiological_display(ct, ct_labels):
    _, lab = _stack(ct_labels)
    n, h, w = lab.shape

    def centroid(value):
        return np.argwhere(lab == value).mean(axis=0)  # (slice, row, column)

    liver, spleen, stomach, aorta, rkidney = (centroid(v) for v in (5, 1, 6, 7, 2))
    assert liver[2] < w / 2 < spleen[2]  # patient right on the image's left
    assert stomach[1] < aorta[1]  # rows run anterior -> posterior
    assert rkidney[0] < liver[0]  # slice index runs inferior -> superior


def test_coronal_and_sagittal_layouts(ct_labels):
    _, cor = _stack(ct_labels, "coronal")
    _, sag = _stack(ct_labels, "sagittal")
    liver_c, spleen_c, rk_c = (np.argwhere(cor == v).mean(axis=0) for v in (5, 1, 2))
    assert liver_c[2] < spleen_c[2]  # columns right -> left
    assert liver_c[1] < rk_c[1]  # rows superior -> inferior
    liver_s, rk_s, stomach_s, aorta_s = (np.argwhere(sag == v).mean(axis=0) for v in (5, 2, 6, 7))
    assert liver_s[0] < stomach_s[0]  # slice index runs right -> left
    assert stomach_s[2] < aorta_s[2]  # columns anterior -> posterior
    assert liver_s[1] < rk_s[1]  # rows superior -> inferior


def test_flipped_label_file_and_dicom_grid_share_canonical_slices(ctdicom):
    """The data README's trap: the label NIfTI has a flipped y axis. Canonical slicing
    of the file as stored equals canonical slicing after resampling onto the DICOM grid."""
    dicom = read_image(ctdicom / "dicom")
    labels = read_labels(ctdicom / "labels_synapse8.nii.gz")
    on_grid = labels_onto_image(labels, dicom)
    view_l, stack_l = _stack(labels)
    view_g, stack_g = _stack(on_grid)
    assert view_l.flips[1] != view_g.flips[1]  # the two files really differ in y
    assert np.array_equal(stack_l, stack_g)
    _, hu = _stack(dicom)
    assert 0 <= hu[stack_g == 5].mean() <= 200  # liver tissue under the liver label
    liver, spleen = (np.argwhere(stack_g == v).mean(axis=0) for v in (5, 1))
    assert liver[2] < spleen[2]


def test_sizes_spacing_and_index_mapping(ctdicom):
    dicom = read_image(ctdicom / "dicom")
    # Store it upside down and with x/z swapped: the canonical numbers must not change.
    stored = sitk.Flip(sitk.PermuteAxes(dicom, (2, 1, 0)), (True, False, False))
    assert stored.GetSize() == (20, 512, 512)
    for image in (dicom, stored):
        ax = S.SliceView.from_image(image, "axial")
        assert ax.n_slices == 20 and ax.slice_shape == (512, 512)
        np.testing.assert_allclose(ax.slice_spacing_mm, (0.9765625, 0.9765625))
        assert ax.slice_thickness_mm == pytest.approx(2.0)
        cor = S.SliceView.from_image(image, "coronal")
        assert cor.n_slices == 512 and cor.slice_shape == (20, 512)
        np.testing.assert_allclose(cor.slice_spacing_mm, (2.0, 0.9765625))
    ax = S.SliceView.from_image(stored, "axial")
    assert ax.original_axis == 0  # z is stored along i now ...
    assert [ax.original_index(s) for s in (0, 1, 19)] == [19, 18, 0]  # ... and flipped
    arr = sitk.GetArrayViewFromImage(stored)
    stack = ax.to_slices(arr)
    for s in (0, 7, 19):
        k = ax.original_index(s)
        assert ax.canonical_index(k) == s
        original_slice = arr[:, :, k]  # index i is numpy axis 2
        assert np.array_equal(np.sort(stack[s], axis=None), np.sort(original_slice, axis=None))
    straight = S.SliceView.from_image(dicom, "axial")
    assert straight.original_axis == 2 and straight.original_index(7) == 7
    with pytest.raises(InputError, match="outside the volume"):
        ax.original_index(20)
    with pytest.raises(InputError, match="shape"):
        ax.to_slices(np.zeros((3, 3, 3)))
    with pytest.raises(InputError, match="axis"):
        S.SliceView.from_image(dicom, "oblique")


# --------------------------------------------------------------------------- intensity


def test_choose_preset(ct, ctdicom):
    assert S.choose_preset(read_image(ctdicom / "dicom")) == "ct"  # from the DICOM modality
    assert S.choose_preset(ct) == "ct"  # from the values (NIfTI has no modality)
    tagged = sitk.Image(ct)
    tagged.SetMetaData("hfsam_modality", "MR")
    assert S.choose_preset(tagged) == "mr"
    shifted = sitk.Cast(sitk.Clamp(ct + 1024, lowerBound=0), sitk.sitkUInt16)  # no negative values
    assert S.choose_preset(shifted) == "mr"
    padded = sitk.GetArrayFromImage(ct)
    padded[:, :20, :20] = -3024  # scanner padding outside the field of view
    assert S.choose_preset(sitk.GetImageFromArray(padded)) == "ct"
    mr_like = sitk.GetImageFromArray(np.random.default_rng(0).gamma(2.0, 100.0, (10, 32, 32)).astype(np.float32))
    assert S.choose_preset(mr_like) == "mr"


def test_normalize_ct_window():
    x = np.array([[[-1000, -125, 75, 275, 3000]]], dtype=np.int16)
    out = S.normalize(x, "ct")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.ravel(), [0, 0, 0.5, 1, 1], atol=1e-7)


def test_normalize_mr_uses_whole_volume_percentiles():
    rng = np.random.default_rng(1)
    vol = rng.gamma(2.0, 100.0, (12, 16, 16)).astype(np.float32)
    vol[0] *= 10  # one bright slice: a per-batch window would differ from the volume's
    lo, hi = S.volume_stats(vol, "mr")
    assert lo == pytest.approx(np.percentile(vol, 0.5)) and hi == pytest.approx(np.percentile(vol, 99.5))
    whole = S.normalize(vol, "mr", stats=(lo, hi))
    batches = np.concatenate([S.normalize(vol[i : i + 4], "mr", stats=(lo, hi)) for i in range(0, 12, 4)])
    assert np.array_equal(whole, batches)
    assert whole.min() == 0.0 and whole.max() == 1.0
    assert (whole == 1.0).mean() == pytest.approx(0.005, abs=0.002)  # the top 0.5 % are clipped
    alone = S.normalize(vol[4:8], "mr")  # without stats: the batch's own window
    assert not np.allclose(alone, whole[4:8])
    assert np.array_equal(S.normalize(np.full((2, 3, 3), 7.0), "mr"), np.zeros((2, 3, 3), np.float32))
    assert S.volume_stats(vol, "ct") == (-125.0, 275.0)
    with pytest.raises(InputError, match="preset"):
        S.normalize(vol, "pet")


# --------------------------------------------------------------------------- slice lists


def test_labeled_slices_match_the_data_readme(ct_labels):
    _, lab = _stack(ct_labels)
    counts = {v: len(S.labeled_slices(lab == v)) for v in range(1, 9)}
    assert counts == {1: 30, 2: 19, 3: 23, 4: 13, 5: 30, 6: 30, 7: 30, 8: 18}
    gall = S.labeled_slices(lab == 4)
    assert gall == sorted(gall) and all((lab[s] == 4).any() for s in gall)
    assert S.labeled_slices(np.zeros((5, 2, 2))) == []


@pytest.mark.parametrize(
    "text, expected",
    [
        ("12,15,20", [12, 15, 20]),
        ("20, 12 ,15,12", [12, 15, 20]),
        ("10-14", [10, 11, 12, 13, 14]),
        ("3 - 5,4,0", [0, 3, 4, 5]),
        ("7-7", [7]),
        ("29", [29]),
        (" AUTO ", "auto"),
    ],
)
def test_parse_slice_list_accepts(text, expected):
    assert S.parse_slice_list(text, 30) == expected


@pytest.mark.parametrize(
    "text, words",
    [
        ("40", "slice 40 is outside the volume (0..29)"),
        ("25-31", "slice 31 is outside"),
        ("", "no slices given"),
        ("   ", "no slices given"),
        ("1,,2", "empty item"),
        ("1,", "empty item"),
        ("a", "cannot read 'a'"),
        ("-3", "cannot read '-3'"),
        ("1.5", "cannot read"),
        ("14-10", "range 14-10 is reversed: write 10-14"),
        ("1-2-3", "cannot read"),
        ("9" * 5000, "outside the volume"),
        ("\u0663", "cannot read"),  # an Arabic-Indic digit: int() would take it, we do not
        ("1\n2", "cannot read '1\\n2'"),
    ],
)
def test_parse_slice_list_refuses_with_one_line(text, words):
    with pytest.raises(InputError) as err:
        S.parse_slice_list(text, 30)
    assert words in str(err.value) and "\n" not in str(err.value)


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(st.text(max_size=40), st.text(alphabet="0123456789-, \t\nAUTOauto", max_size=25)),
    st.integers(min_value=1, max_value=600),
)
def test_parse_slice_list_fuzz_only_input_errors(text, n):
    try:
        result = S.parse_slice_list(text, n)
    except InputError as err:
        assert "\n" not in str(err)
        return
    assert result == "auto" or (result == sorted(set(result)) and all(0 <= s < n for s in result))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 99), min_size=1, max_size=20))
def test_parse_slice_list_reads_back_what_it_is_given(values):
    text = ",".join(str(v) for v in values)
    assert S.parse_slice_list(text, 100) == sorted(set(values))
