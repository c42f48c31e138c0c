"""evaluate-dataset: hand-computed Dice/HD95 with the paper's empty-mask rules, averaging, tables, real CT."""

import csv
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from test_datasets import write_synapse
from test_train_dataset import run_cli

from HFSAMCore.evaluate.dataset import case_metrics, summarize
from HFSAMCore.evaluate.metrics import hd95_mm
from HFSAMCore.train.dataset_config import make_config
from HFSAMCore.train.dataset_training import train_on_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# --------------------------------------------------------------------------- by hand


def test_case_metrics_follow_transunet_rules_by_hand():
    ref, pred = np.zeros((2, 6, 6), np.uint8), np.zeros((2, 6, 6), np.uint8)
    ref[0, 1:3, 1:3] = 1  # a 2x2 square ...
    pred[0, 1:3, 2:4] = 1  # ... and the same square one column to the right
    ref[1, 4, 4] = 2  # class 2 missed
    pred[1, 0, 0] = 3  # class 3 predicted where the reference has none
    rows = case_metrics(pred, ref, 4, (3.0, 0.5, 0.5))
    one, two, three, four = rows
    # class 1: Dice 2*2/(4+4); every voxel is on the surface, the shifted column is 1 voxel (0.5 mm) away
    assert one["dice_paper"] == one["dice"] == 0.5
    assert one["hd95_paper"] == 1.0 and one["hd95_mm"] == 0.5
    # class 2: empty prediction -> (0, 0) in the paper; mm: Dice 0, HD95 undefined
    assert (two["dice_paper"], two["hd95_paper"], two["dice"], two["hd95_mm"]) == (0.0, 0.0, 0.0, None)
    # class 3: prediction without reference -> (1, 0) in the paper; mm: not counted (absent from the reference)
    assert (three["dice_paper"], three["hd95_paper"], three["dice"], three["hd95_mm"]) == (1.0, 0.0, None, None)
    # class 4: both empty -> (0, 0) in the paper (TransUNet's rule), nothing in mm
    assert (four["dice_paper"], four["hd95_paper"], four["dice"], four["hd95_mm"]) == (0.0, 0.0, None, None)
    assert (one["ref_voxels"], one["pred_voxels"], three["pred_voxels"]) == (4, 4, 1)

    # a slice apart: Dice 0, HD95 one voxel = 3 mm along z
    ref, pred = np.zeros((3, 4, 4), np.uint8), np.zeros((3, 4, 4), np.uint8)
    ref[0, 1:3, 1:3], pred[1, 1:3, 1:3] = 1, 1
    (row,) = case_metrics(pred, ref, 1, (3.0, 0.5, 0.5))
    assert (row["dice_paper"], row["hd95_paper"], row["dice"], row["hd95_mm"]) == (0.0, 1.0, 0.0, 3.0)
    (row,) = case_metrics(pred, ref, 1, None)
    assert row["hd95_mm"] is None and row["hd95_paper"] == 1.0


def test_summary_averages_over_cases_then_classes():
    a_ref, a_pred = np.zeros((1, 4, 4), np.uint8), np.zeros((1, 4, 4), np.uint8)
    a_ref[0, :2, :2], a_pred[0, :2, :1] = 1, 1  # class 1 Dice 2*2/(4+2) = 2/3; class 2 absent in both
    b_ref = np.zeros((1, 4, 4), np.uint8)
    b_ref[0, :2, :2], b_ref[0, 3, 3] = 1, 2  # case B: both classes predicted perfectly
    per_case = {"A": case_metrics(a_pred, a_ref, 2, None), "B": case_metrics(b_ref.copy(), b_ref, 2, None)}
    s = summarize(per_case, ["one", "two"])
    c1, c2 = s["classes"]
    assert c1["dice_paper"] == pytest.approx((2 / 3 + 1) / 2) and c1["dice"] == pytest.approx((2 / 3 + 1) / 2)
    assert c2["dice_paper"] == pytest.approx(0.5)  # case A counts as 0 in the paper's convention ...
    assert c2["dice"] == pytest.approx(1.0)  # ... and not at all in mm (no reference there)
    assert s["mean"]["dice_paper"] == pytest.approx(((2 / 3 + 1) / 2 + 0.5) / 2)
    assert s["mean"]["dice"] == pytest.approx(((2 / 3 + 1) / 2 + 1.0) / 2)
    assert (c1["cases_with_class"], c2["cases_with_class"], s["cases"]) == (2, 1, 2)


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny synapse adapter (one short run) and the synthetic test set it is evaluated on."""
    root = tmp_path_factory.mktemp("synapse")
    written = write_synapse(root)
    cfg = make_config("synapse", root / "train_npz", preset="tiny", checkpoint="none", epochs=3, batch_size=4)
    train_on_dataset(cfg, root / "run")
    return root, written, root / "run" / "adapter.safetensors"


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def test_evaluate_dataset_writes_the_papers_table(trained, tmp_path):
    root, written, adapter = trained
    raw = tmp_path / "RawData" / "Training" / "img"
    raw.mkdir(parents=True)
    img = sitk.Image(32, 32, 4, sitk.sitkInt16)
    img.SetSpacing((0.7, 0.7, 2.5))
    sitk.WriteImage(img, str(raw / "img0001.nii.gz"))  # TransUNet's case0001 is Synapse's img0001
    sitk.WriteImage(sitk.Image(30, 32, 4, sitk.sitkInt16), str(raw / "img0002.nii.gz"))  # wrong size
    out = tmp_path / "results"
    proc = run_cli(
        "evaluate-dataset",
        "--dataset",
        "synapse",
        "--root",
        root / "test_vol_h5",
        "--list",
        root / "lists" / "test_vol.txt",
        "--adapter",
        adapter,
        "--raw-dir",
        tmp_path / "RawData",
        "--save-predictions",
        "--method",
        "HF-SAM tiny",
        "-o",
        out,
        "--progress",
        "json",
    )
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["event"] == "result"
    assert sorted(p.name for p in out.iterdir()) == [
        "per_case.csv",
        "per_class.csv",
        "predictions",
        "results.json",
        "table.csv",
        "table.md",
    ]

    # per case: recompute from the written predictions, independently of the tool
    rows = read_csv(out / "per_case.csv")
    assert rows[0] == [
        "case",
        "class",
        "name",
        "dice_paper",
        "hd95_paper",
        "dice",
        "hd95_mm",
        "ref_voxels",
        "pred_voxels",
    ]
    by_key = {(r[0], int(r[1])): r for r in rows[1:]}
    assert len(by_key) == 2 * 8
    for case, spacing in (("case0001", (2.5, 0.7, 0.7)), ("case0002", None)):
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "predictions" / f"{case}.nii.gz")))
        label = written[case][1]
        assert pred.shape == label.shape
        for c in range(1, 9):
            r, p = label == c, pred == c
            row = by_key[(case, c)]
            assert (int(row[7]), int(row[8])) == (r.sum(), p.sum())
            if r.any() and p.any():
                assert float(row[3]) == pytest.approx(2 * (r & p).sum() / (r.sum() + p.sum()))
                assert float(row[4]) == pytest.approx(hd95_mm(r, p))
            else:
                assert (float(row[3]), float(row[4])) == ((1.0, 0.0) if p.any() else (0.0, 0.0))
            if spacing and r.any() and p.any():
                assert float(row[6]) == pytest.approx(hd95_mm(r, p, spacing))
            else:
                assert row[6] == ""  # no spacing (case0002's raw file does not match) or undefined
    assert "img0002.nii.gz has size" in proc.stderr

    # the paper's layout: Method, Convention, Dice, HD95, one column per organ; mean over cases, then classes
    table = read_csv(out / "table.csv")
    assert table[0] == [
        "Method",
        "Convention",
        "Dice (%)",
        "HD95",
        "spleen",
        "right kidney",
        "left kidney",
        "gallbladder",
        "liver",
        "stomach",
        "aorta",
        "pancreas",
    ]
    paper = table[1]
    assert paper[:2] == ["HF-SAM tiny", "paper (voxels)"]
    class_means = [np.mean([float(by_key[(case, c)][3]) for case in ("case0001", "case0002")]) for c in range(1, 9)]
    assert [float(v) for v in paper[4:]] == pytest.approx([100 * m for m in class_means], abs=0.006)
    assert float(paper[2]) == pytest.approx(100 * np.mean(class_means), abs=0.006)
    md = (out / "table.md").read_text()
    assert "| Method | Convention | Dice (%) | HD95 | spleen |" in md and "| HF-SAM tiny | paper (voxels) |" in md

    again = run_cli(
        "evaluate-dataset",
        "--dataset",
        "synapse",
        "--root",
        root / "test_vol_h5",
        "--adapter",
        adapter,
        "-o",
        out,
        check=2,
    )
    assert "--overwrite" in again.stderr and "Traceback" not in again.stderr


def test_train_and_evaluate_a_nifti_task_in_mm_on_the_real_ct(tmp_path, ct3mm):
    """nnU-Net style folders holding the sample CT: train the tiny model on it, evaluate it in mm."""
    root = tmp_path / "task"
    for subset in ("Tr", "Ts"):
        (root / f"images{subset}").mkdir(parents=True)
        (root / f"labels{subset}").mkdir()
        shutil.copy(ct3mm / "image.nii.gz", root / f"images{subset}" / "abdomen_0000.nii.gz")
        shutil.copy(ct3mm / "labels_synapse8.nii.gz", root / f"labels{subset}" / "abdomen.nii.gz")
    run_cli(
        "train",
        "--dataset",
        "nifti",
        "--root",
        root,
        "--classes",
        "synapse",
        "--preset",
        "tiny",
        "--checkpoint",
        "none",
        "--epochs",
        20,
        "--batch-size",
        8,
        "-o",
        tmp_path / "run",
    )
    adapter = tmp_path / "run" / "adapter.safetensors"
    out = tmp_path / "results"
    run_cli(
        "evaluate-dataset", "--dataset", "nifti", "--root", root, "--adapter", adapter, "--save-predictions", "-o", out
    )
    image = sitk.ReadImage(str(ct3mm / "image.nii.gz"))
    pred = sitk.ReadImage(str(out / "predictions" / "abdomen.nii.gz"))
    assert pred.GetSize() == image.GetSize()  # written back onto the input's grid
    np.testing.assert_allclose(pred.GetOrigin(), image.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(pred.GetDirection(), image.GetDirection(), atol=1e-6)
    rows = {int(r[1]): r for r in read_csv(out / "per_case.csv")[1:]}
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(ct3mm / "labels_synapse8.nii.gz")))
    both = 0
    for c, row in rows.items():
        assert int(row[7]) == int((ref == c).sum())  # every organ's voxels counted on the image grid
        if row[6]:  # 3 mm isotropic voxels: HD95 in mm is exactly 3 x HD95 in voxels
            assert float(row[6]) == pytest.approx(3 * float(row[4]))
            both += 1
    assert both >= 1
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert summary["cases"] == 1 and len(summary["classes"]) == 8
