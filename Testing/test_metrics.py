"""metrics.py: hand-computed Dice/HD95, a brute-force check of the distance maps, the
paper's empty-mask rules, and the acceptance check on the real DICOM labels."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from HFSAMCore.errors import HFSAMError, InputError
from HFSAMCore.evaluate import metrics as M
from HFSAMCore.io.geometry import labels_onto_image, same_geometry
from HFSAMCore.io.read import read_image, read_labels
from HFSAMCore.model.classes import load_presets, resolve_classes, slicer_terminology_string


def _cubes():
    """Two 4x4x4 cubes, the second shifted by 2 voxels along x (numpy axis 2)."""
    a = np.zeros((8, 8, 10), bool)
    b = np.zeros_like(a)
    a[2:6, 2:6, 2:6] = True
    b[2:6, 2:6, 4:8] = True
    return a, b


def test_dice_of_offset_cubes():
    a, b = _cubes()
    assert M.dice(a, b) == pytest.approx(2 * 32 / 128)  # 4x4x2 overlap
    assert M.dice(a, a) == 1.0
    assert M.dice(a, np.zeros_like(a)) == 0.0
    assert M.dice(np.zeros_like(a), np.zeros_like(a)) == 1.0  # both empty: agreement


def test_hd95_of_offset_cubes_by_hand():
    """Spacing (z, y, x) = (3, 2, 0.5) mm, so the nearest surface is always along x.
    Each cube has 56 surface voxels; from A to B 24 are at 0 mm, 16 at 0.5 mm and 16 at
    1.0 mm (mirror-symmetric from B to A): 112 distances whose 95th percentile is 1.0 mm.
    In voxel units the same voxels are 0, 1 and 2 voxels away: HD95 = 2."""
    a, b = _cubes()
    assert M.hd95_mm(a, b, (3.0, 2.0, 0.5)) == pytest.approx(1.0)
    assert M.hd95_mm(a, b, (1.0, 1.0, 1.0)) == pytest.approx(2.0)
    # Spacing is taken in numpy (z, y, x) order: reversed, the shift along x costs 3 mm a voxel.
    assert M.hd95_mm(a, b, (0.5, 2.0, 3.0)) == pytest.approx(6.0)
    assert M.hd95_mm(a, a, (3.0, 2.0, 0.5)) == 0.0


def test_hd95_of_parallel_plates_is_their_distance():
    a = np.zeros((10, 6, 6), bool)
    b = np.zeros_like(a)
    a[2, 1:5, 1:5] = True
    b[7, 1:5, 1:5] = True
    assert M.hd95_mm(a, b, (2.5, 0.7, 0.7)) == pytest.approx(5 * 2.5)


def _brute_force_hd95(a, b, spacing):
    def surface_points(m):
        pts = []
        for p in np.argwhere(m):
            for axis in range(3):
                for d in (-1, 1):
                    q = p.copy()
                    q[axis] += d
                    if not (0 <= q[axis] < m.shape[axis]) or not m[tuple(q)]:
                        pts.append(p)
                        break
                else:
                    continue
                break
        return np.array(pts, float) * spacing

    pa, pb = surface_points(a), surface_points(b)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return np.percentile(np.concatenate([d.min(axis=1), d.min(axis=0)]), 95)


def test_hd95_matches_brute_force_on_random_blobs():
    rng = np.random.default_rng(7)
    for _ in range(12):
        shape = tuple(rng.integers(4, 12, size=3))
        a = rng.random(shape) > 0.8
        b = rng.random(shape) > 0.85
        a[0, 0, 0] = b[-1, -1, -1] = True  # never empty; touches the volume border
        spacing = rng.uniform(0.3, 3.0, size=3)
        assert M.hd95_mm(a, b, spacing) == pytest.approx(_brute_force_hd95(a, b, spacing), rel=1e-5)


def test_empty_mask_conventions():
    a, _ = _cubes()
    empty = np.zeros_like(a)
    assert math.isnan(M.hd95_mm(empty, empty, (1, 1, 1)))
    assert M.hd95_mm(a, empty, (1, 1, 1)) == math.inf
    assert M.hd95_mm(empty, a, (1, 1, 1)) == math.inf
    # TransUNet's calculate_metric_percase (ref first, pred second here):
    assert M.paper_metrics(empty, a) == (1.0, 0.0)  # predicted, not in the reference
    assert M.paper_metrics(a, empty) == (0.0, 0.0)  # missed
    assert M.paper_metrics(empty, empty) == (0.0, 0.0)  # both empty still counts 0
    _, b = _cubes()
    assert M.paper_metrics(a, b) == (pytest.approx(0.5), pytest.approx(2.0))
    with pytest.raises(InputError, match="shape"):
        M.dice(a, a[:-1])


# --------------------------------------------------------------------------- evaluate


@pytest.fixture(scope="module")
def dicom_case(ctdicom):
    dicom = read_image(ctdicom / "dicom")
    reference = read_labels(ctdicom / "labels_synapse8.nii.gz")  # other grid: y flipped
    return dicom, reference


def test_acceptance_dicom_labels_against_their_resampled_copy(dicom_case):
    dicom, reference = dicom_case
    prediction = labels_onto_image(reference, dicom)
    assert not same_geometry(prediction, reference)
    names = {c["value"]: c["name"] for c in resolve_classes("synapse")}
    result = M.evaluate(reference, prediction, names)
    json.dumps(result, allow_nan=False)  # strict JSON
    rows = {r["name"]: r for r in result["classes"]}
    present = ["spleen", "liver", "stomach", "aorta", "pancreas"]
    for organ in present:
        row = rows[organ]
        assert row["dice"] == 1.0 and row["hd95_mm"] == 0.0, row
        assert row["dice_paper"] == 1.0 and row["hd95_paper"] == 0.0
        assert row["ref_voxels"] == row["pred_voxels"] > 100
    for organ in ("right kidney", "left kidney", "gallbladder"):  # listed, absent from both
        row = rows[organ]
        assert row["ref_voxels"] == row["pred_voxels"] == 0
        assert row["dice"] == 1.0 and row["hd95_mm"] is None
        assert (row["dice_paper"], row["hd95_paper"]) == (0.0, 0.0)
    assert result["mean"] == {"dice": 1.0, "hd95_mm": 0.0, "dice_paper": 5 / 8, "hd95_paper": 0.0, "n_classes": 5}


def test_naive_array_pairing_is_caught(dicom_case):
    dicom, reference = dicom_case
    mirrored = sitk.GetImageFromArray(sitk.GetArrayFromImage(reference))  # arrays paired by index
    mirrored.CopyInformation(dicom)
    result = M.evaluate(reference, mirrored)
    liver = next(r for r in result["classes"] if r["value"] == 5)
    assert liver["name"] == "class 5"
    assert liver["dice"] < 0.7 and liver["hd95_mm"] > 20.0


def test_evaluate_matches_direct_computation_on_another_grid(ct3mm):
    reference = read_labels(ct3mm / "labels_synapse8.nii.gz")
    arr = sitk.GetArrayFromImage(reference)
    damaged = arr.copy()
    damaged[:, :, :-3][arr[:, :, 3:] == 5] = 5  # add a shifted copy of the liver
    damaged[damaged == 8] = 0  # drop the pancreas entirely
    damaged[0, 0, 0] = 9  # a stray class absent from the reference
    pred = sitk.GetImageFromArray(damaged)
    pred.CopyInformation(reference)
    # The reference is stored permuted and flipped: evaluate must match physically.
    stored_ref = sitk.Flip(sitk.PermuteAxes(reference, (1, 2, 0)), (False, True, True))
    result = M.evaluate(stored_ref, pred)
    rows = {r["value"]: r for r in result["classes"]}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    spacing = tuple(reversed(reference.GetSpacing()))
    for v in (5, 2, 1):
        assert rows[v]["dice"] == pytest.approx(M.dice(arr == v, damaged == v))
        assert rows[v]["hd95_mm"] == pytest.approx(M.hd95_mm(arr == v, damaged == v, spacing))
    assert rows[5]["dice"] < 1.0 and rows[5]["hd95_mm"] > 0
    assert rows[2]["dice"] < 1.0 and rows[1]["dice"] == 1.0  # kidney partly overwritten, spleen untouched
    assert rows[8]["dice"] == 0.0 and rows[8]["hd95_mm"] is None and rows[8]["pred_voxels"] == 0
    assert (rows[8]["dice_paper"], rows[8]["hd95_paper"]) == (0.0, 0.0)
    assert rows[9]["ref_voxels"] == 0 and (rows[9]["dice_paper"], rows[9]["hd95_paper"]) == (1.0, 0.0)
    in_ref = [rows[v] for v in range(1, 9)]
    assert result["mean"]["n_classes"] == 8
    assert result["mean"]["dice"] == pytest.approx(np.mean([r["dice"] for r in in_ref]))
    assert result["mean"]["hd95_mm"] == pytest.approx(
        np.mean([r["hd95_mm"] for r in in_ref if r["hd95_mm"] is not None])
    )
    assert result["mean"]["dice_paper"] == pytest.approx(np.mean([r["dice_paper"] for r in rows.values()]))


def test_format_table(dicom_case):
    dicom, reference = dicom_case
    # a class name from a prediction's sidecar: its line break and terminal escape are shown, not obeyed
    names = {5: "liver", 2: "right | kidney", 3: "left\x1b[2J\nkidney"}
    result = M.evaluate(reference, labels_onto_image(reference, dicom), names)
    table = M.format_table(result)
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(result["classes"]) + 1
    assert lines[0].startswith("| Class | Name | Dice | HD95 (mm)")
    liver = next(line for line in lines if "| liver |" in line)
    assert "| 1.0000 | 0.00 |" in liver
    kidney = next(line for line in lines if "kidney" in line)
    assert "right \\| kidney" in kidney and "n/a" in kidney
    assert "| left\\x1b[2J\\nkidney |" in table and "\x1b" not in table
    assert "**mean** (5 in reference)" in lines[-1]


def test_evaluate_refuses_float_prediction(dicom_case):
    dicom, reference = dicom_case
    with pytest.raises(InputError, match="integer"):
        M.evaluate(reference, sitk.Cast(labels_onto_image(reference, dicom), sitk.sitkFloat32))


# --------------------------------------------------------------------------- class presets
# (classes.py names the rows of the evaluation and the segments of the result)


def test_presets_load_with_standard_codes_and_colours():
    presets = load_presets()
    synapse = presets["synapse"]
    assert [c["value"] for c in synapse] == list(range(1, 9))
    assert [c["name"] for c in synapse] == [
        "spleen",
        "right kidney",
        "left kidney",
        "gallbladder",
        "liver",
        "stomach",
        "aorta",
        "pancreas",
    ]
    liver = synapse[4]
    assert liver["color"] == [221, 130, 101]
    assert liver["terminology"]["type"] == {"scheme": "SCT", "code": "10200004", "meaning": "Liver"}
    assert liver["terminology"]["category"]["code"] == "123037004"
    assert synapse[1]["terminology"]["modifier"]["code"] == "24028007"  # right
    assert [c["name"] for c in presets["acdc"]] == ["right ventricle", "myocardium", "left ventricle"]
    assert resolve_classes(" Synapse ") == synapse
    json.dumps(presets, allow_nan=False)


def test_resolve_free_names_values_and_generated_colours():
    classes = resolve_classes("liver, tumour ,Spleen")
    assert [(c["value"], c["name"]) for c in classes] == [(1, "liver"), (2, "tumour"), (3, "Spleen")]
    assert classes[0]["color"] == [221, 130, 101] and classes[0]["terminology"]["type"]["code"] == "10200004"
    assert classes[2]["terminology"]["type"]["code"] == "78961009"
    assert classes[1]["terminology"] is None
    assert min(np.linalg.norm(np.subtract(classes[1]["color"], c["color"])) for c in (classes[0], classes[2])) >= 80
    explicit = resolve_classes("5:liver,1:spleen,LV")
    assert [(c["value"], c["name"]) for c in explicit] == [(1, "spleen"), (3, "LV"), (5, "liver")]
    assert explicit[1]["terminology"]["type"]["code"] == "87878005"  # alias of the ACDC class
    many = resolve_classes([f"lesion {i}" for i in range(8)])
    colours = [tuple(c["color"]) for c in many]
    assert len(set(colours)) == 8
    assert resolve_classes(resolve_classes("acdc")) == resolve_classes("acdc")  # dicts read back from an adapter
    assert resolve_classes(None) == []
    assert [c["name"] for c in resolve_classes(None, values=[0, 3, 1, 3])] == ["class 1", "class 3"]


@pytest.mark.parametrize(
    "spec, words",
    [
        ("liver,,spleen", "empty name"),
        ("liver,LIVER", "appears twice"),
        ("1:liver,1:spleen", "label value 1"),
        ("0:background", "0 is background"),
        ([{"name": "x"}], "integer 'value'"),
        ([{"value": 1, "name": "x", "color": [300, 0, 0]}], "colour"),
        (42, "preset name"),
    ],
)
def test_resolve_classes_refusals(spec, words):
    with pytest.raises(InputError) as err:
        resolve_classes(spec)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_presets_file_location_and_slicer_terminology(tmp_path, monkeypatch):
    kidney = resolve_classes("synapse")[2]
    assert slicer_terminology_string(kidney) == (
        "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
        "~SCT^64033007^Kidney~SCT^7771000^Left~Anatomic codes - DICOM master list~^^~^^"
    )
    assert slicer_terminology_string(resolve_classes("tumour")[0]) is None
    (tmp_path / "class_presets.json").write_text(
        json.dumps({"presets": {"one": {"classes": [{"value": 1, "name": "blob", "color": [1, 2, 3]}]}}})
    )
    monkeypatch.setenv("HFSAM_RESOURCES", str(tmp_path))
    assert load_presets() == {"one": [{"value": 1, "name": "blob", "color": [1, 2, 3], "terminology": None}]}
    monkeypatch.setenv("HFSAM_RESOURCES", str(tmp_path / "missing"))
    with pytest.raises(HFSAMError, match="class presets"):
        load_presets()
