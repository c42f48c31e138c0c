"""The `hfsam` command line as a user runs it: real processes, real files from ../shared/data."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

LIB_ENV = "HFSAM_HOME"


def hfsam(*args, tmp_path=None, timeout=300, check=None):
    env = dict(os.environ)
    if tmp_path is not None:
        env[LIB_ENV] = str(tmp_path / "library")
    proc = subprocess.run(
        [sys.executable, "-m", "HFSAMCore", *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env
    )
    if check is not None:
        assert proc.returncode == check, proc.stderr[-3000:]
    return proc


def events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def assert_same_geometry(a: sitk.Image, b: sitk.Image):
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


def test_help_explains_every_command():
    """Every command the parser has (cli/app.COMMANDS) is in the top-level summary, and its own --help
    shows an example: a new command cannot be left out of either."""
    import argparse

    from HFSAMCore.cli.app import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    commands = list(sub.choices)
    assert {"segment", "finetune", "evaluate", "info", "models", "demo", "train", "evaluate-dataset", "bench"} <= set(
        commands
    )
    listed = [line.split()[0] for line in hfsam("--help", check=0).stdout.splitlines() if line.startswith("  ")]
    for command in commands:
        assert command in listed, f"{command} is missing from the summary of `hfsam --help`"
        assert "example" in hfsam(command, "--help", check=0).stdout.lower(), command


def test_info_reports_the_papers_lora_count():
    out = json.loads(
        hfsam(
            "info", "--backbone", "vit_b", "--img-size", "512", "--classes", "8", "--rank", "5", "--json", check=0
        ).stdout
    )
    assert out["parameters"]["lora"] == 184_320
    assert out["outputs"] == 9 and out["logits_size"] == [128, 128]


@pytest.mark.parametrize("source", ["nifti", "dicom"])
def test_segment_keeps_the_input_geometry(tmp_path, ct3mm, ctdicom, source):
    src = ct3mm / "image.nii.gz" if source == "nifti" else ctdicom / "dicom"
    out = tmp_path / "seg.nrrd"
    proc = hfsam(
        "segment",
        src,
        "-o",
        out,
        "--checkpoint",
        "none",
        "--backbone",
        "tiny",
        "--img-size",
        "224",
        "--progress",
        "json",
        tmp_path=tmp_path,
        check=0,
    )
    assert "RANDOMLY INITIALISED" in proc.stderr
    evs = events(proc.stdout)
    progress = [e for e in evs if e["event"] == "progress"]
    assert progress[-1]["done"] == progress[-1]["total"] == (30 if source == "nifti" else 20)
    result = evs[-1]
    assert result["event"] == "result" and result["output"] == str(out)

    from HFSAMCore.io.read import read_image

    labels = sitk.ReadImage(str(out))
    assert_same_geometry(labels, read_image(src))
    assert labels.GetPixelID() == sitk.sitkUInt8
    assert int(sitk.GetArrayViewFromImage(labels).max()) <= 8
    sidecar = json.loads((tmp_path / "seg.json").read_text())
    assert [c["name"] for c in sidecar["classes"]][:2] == ["spleen", "right kidney"]
    assert sidecar["model"]["base_checkpoint"]["name"] == "random-init"


def test_segment_never_overwrites_without_asking(tmp_path, ct3mm):
    out = tmp_path / "seg.nrrd"
    out.write_bytes(b"precious")
    proc = hfsam(
        "segment",
        ct3mm / "image.nii.gz",
        "-o",
        out,
        "--checkpoint",
        "none",
        "--backbone",
        "tiny",
        tmp_path=tmp_path,
        check=2,
    )
    assert "already exists" in proc.stderr and "--overwrite" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert out.read_bytes() == b"precious"


def test_segment_without_an_adapter_says_how_to_get_one(tmp_path, ct3mm):
    proc = hfsam("segment", ct3mm / "image.nii.gz", "-o", tmp_path / "s.nrrd", tmp_path=tmp_path, check=2)
    assert "needs an adapter" in proc.stderr and "hfsam finetune" in proc.stderr
    assert "loaded" not in proc.stderr  # refused before any model is loaded
    assert not (tmp_path / "s.nrrd").exists()


def test_evaluate_brings_flipped_labels_onto_the_series_grid(tmp_path, ctdicom):
    from HFSAMCore.io.read import read_image

    series = read_image(ctdicom / "dicom")
    labels = sitk.ReadImage(str(ctdicom / "labels_synapse8.nii.gz"))
    on_grid = sitk.Resample(labels, series, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    sitk.WriteImage(on_grid, str(tmp_path / "pred.nrrd"))
    out = json.loads(
        hfsam(
            "evaluate",
            "--reference",
            ctdicom / "labels_synapse8.nii.gz",
            "--prediction",
            tmp_path / "pred.nrrd",
            "--classes",
            "synapse",
            "--json",
            check=0,
        ).stdout
    )
    by_name = {c["name"]: c for c in out["classes"]}
    for organ in ("spleen", "liver", "stomach", "aorta", "pancreas"):
        assert by_name[organ]["dice"] == pytest.approx(1.0), organ
        assert by_name[organ]["hd95_mm"] == pytest.approx(0.0)
    # The test can fail: the naive pairing of arrays (ignoring the flipped y axis) is far from 1.
    naive = sitk.GetImageFromArray(sitk.GetArrayFromImage(labels).astype(np.uint8))
    naive.CopyInformation(series)
    sitk.WriteImage(naive, str(tmp_path / "naive.nrrd"))
    bad = json.loads(
        hfsam(
            "evaluate",
            "--reference",
            ctdicom / "labels_synapse8.nii.gz",
            "--prediction",
            tmp_path / "naive.nrrd",
            "--classes",
            "synapse",
            "--json",
            check=0,
        ).stdout
    )
    assert {c["name"]: c for c in bad["classes"]}["liver"]["dice"] < 0.9


def test_finetune_then_segment_learns_the_liver(tmp_path, ct3mm):
    """Issue 3's acceptance run, on the CPU with the tiny configuration: 5 labeled slices, the other 25 scored."""
    labels = ct3mm / "labels_synapse8.nii.gz"
    adapter = tmp_path / "synapse5.safetensors"
    proc = hfsam(
        "finetune",
        ct3mm / "image.nii.gz",
        labels,
        "-o",
        adapter,
        "--slices",
        "5,10,15,20,25",
        "--classes",
        "synapse",
        "--checkpoint",
        "none",
        "--backbone",
        "tiny",
        "--img-size",
        "224",
        "--steps",
        "150",
        "--holdout",
        "0",
        "--progress",
        "json",
        tmp_path=tmp_path,
        check=0,
    )
    evs = events(proc.stdout)
    assert evs[-1]["event"] == "result" and evs[-1]["slices"] == [5, 10, 15, 20, 25]
    losses = [e["loss"] for e in evs if e["event"] == "metric"]
    assert losses[-1] < losses[0]

    seg = tmp_path / "seg.nii.gz"
    hfsam("segment", ct3mm / "image.nii.gz", "-o", seg, "--adapter", adapter, tmp_path=tmp_path, check=0)
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(labels)))
    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(seg)))
    held = np.ones(ref.shape[0], bool)
    held[[5, 10, 15, 20, 25]] = False
    r, p = ref[held] == 5, pred[held] == 5
    liver = 2 * (r & p).sum() / (r.sum() + p.sum())
    everything = 2 * r.sum() / (r.sum() + r.size)  # Dice of predicting liver everywhere
    assert liver > 0.6 and liver > 3 * everything


def test_cancel_leaves_no_file(tmp_path, ct3mm):
    adapter = tmp_path / "a.safetensors"
    env = dict(os.environ, HFSAM_HOME=str(tmp_path / "library"))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "HFSAMCore",
            "finetune",
            str(ct3mm / "image.nii.gz"),
            str(ct3mm / "labels_synapse8.nii.gz"),
            "-o",
            str(adapter),
            "--classes",
            "synapse",
            "--checkpoint",
            "none",
            "--backbone",
            "tiny",
            "--img-size",
            "224",
            "--steps",
            "100000",
            "--progress",
            "json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    for line in proc.stdout:  # wait until training really runs
        if json.loads(line).get("stage") == "finetune":
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert events(out)[-1] == {"event": "error", "message": "cancelled; nothing was written", "exit_code": 130}
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "library"]
    assert leftovers == [] and not adapter.exists()


@pytest.mark.parametrize(
    "args,fragment",
    [
        (
            ["segment", "/no/such/file.nii.gz", "-o", "{tmp}/x.nrrd", "--checkpoint", "none", "--backbone", "tiny"],
            "does not exist",
        ),
        (
            [
                "segment",
                "{ct}/image.nii.gz",
                "-o",
                "/no/such/folder/x.nrrd",
                "--checkpoint",
                "none",
                "--backbone",
                "tiny",
            ],
            "does not exist",
        ),
        (
            [
                "finetune",
                "{ct}/image.nii.gz",
                "{ct}/labels_synapse8.nii.gz",
                "-o",
                "{tmp}/a.safetensors",
                "--slices",
                "40",
                "--checkpoint",
                "none",
                "--backbone",
                "tiny",
                "--classes",
                "synapse",
            ],
            "outside",
        ),
        (
            [
                "finetune",
                "{ct}/image.nii.gz",
                "{ct}/labels_synapse8.nii.gz",
                "-o",
                "{tmp}/a.safetensors",
                "--checkpoint",
                "none",
                "--backbone",
                "tiny",
                "--classes",
                "liver",
            ],
            "class",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, ct3mm, args, fragment):
    args = [a.format(tmp=tmp_path, ct=ct3mm) for a in args]
    proc = hfsam(*args, tmp_path=tmp_path, check=2)
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and fragment in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any(p.suffix in (".nrrd", ".safetensors") for p in tmp_path.iterdir())


def test_bench_fewshot_refuses_a_missing_monai_before_any_training(tmp_path):
    """The U-Net row needs MONAI: a run without it used to train the HF-SAM rows for minutes, then fail
    and lose them. MONAI is hidden the standard way (a None entry in sys.modules) in a real process."""
    code = (
        "import sys; sys.modules['monai'] = None; from HFSAMCore.cli import main; "
        f"sys.exit(main(['bench', 'fewshot', '--n', '3', '-o', {str(tmp_path / 'out')!r}]))"
    )
    env = dict(os.environ, HFSAM_HOME=str(tmp_path / "library"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "hfsam: error: the U-Net baseline needs MONAI: pip install monai (or pip install -e '.[bench]'), "
        "or leave it out with --methods hfsam decoder_only"
    ]
    assert not (tmp_path / "out").exists() and not (tmp_path / "library").exists()  # nothing was started


def test_bench_fewshot_scores_each_row_with_and_without_slice_smoothing_and_over_seeds(tmp_path, ct3mm):
    """A row's Dice is `segment`'s as it runs by default (slice smoothing) and, beside it, the same model's
    with every slice on its own; the report says which is which. `--seeds` trains the row once per seed
    and summarises them. The tiny random model, 2 steps."""
    out = tmp_path / "out"
    args = ("bench", "fewshot", "--backbone", "tiny", "--checkpoint", "none", "--n", "1", "--methods", "hfsam")
    hfsam(*args, "--steps", "2", "--seeds", "3", "7", "-o", out, "--progress", "none", tmp_path=tmp_path, check=0)
    result = json.loads((out / "fewshot_tiny_cpu.json").read_text())
    rows = result["rows"]
    assert [r["seed"] for r in rows] == [3, 7] and result["seeds"] == [3, 7]
    for row in rows:
        assert row["slice_smoothing_mm"] == 3.0 and row["steps"] == 2
        assert row["low_level_dropout"] == 0.0  # off unless asked for
        organs = ["spleen", "right kidney", "left kidney", "gallbladder", "liver", "stomach", "aorta", "pancreas"]
        assert list(row["dice"]) == organs and list(row["dice_slices_alone"]) == organs
        assert 0 <= row["mean_dice_slices_alone"] <= 1 and 0 <= row["mean_dice"] <= 1
    assert rows[0]["dice"] != rows[1]["dice"]  # the seed reached the weights or the batches
    assert rows[0]["max_grad_norm"] is None and result["recipe"]["max_grad_norm"] is None  # tiny does not clip
    (summary,) = result["over_seeds"]
    means = [r["mean_dice"] for r in rows]
    assert summary["seeds"] == [3, 7] and (summary["min"], summary["max"]) == (min(means), max(means))
    assert summary["mean_dice"] == pytest.approx(sum(means) / 2, abs=1e-4)
    assert summary["sd"] == pytest.approx(abs(means[0] - means[1]) / 2**0.5, abs=1e-4)
    liver = [r["dice"]["liver"] for r in rows]
    assert summary["dice"]["liver"] == pytest.approx(sum(liver) / 2, abs=1e-4)
    report = (out / "fewshot_tiny_cpu.md").read_text()
    assert "| mean, slices alone |" in report and "slice smoothing 3 mm" in report
    assert "## Over seeds" in report and f"| 1 | hfsam | 3,7 | {summary['mean_dice']:.3f} ± " in report


def test_bench_fewshot_refuses_repeated_or_negative_seeds_before_any_work(tmp_path):
    for seeds in (["1", "1"], ["-1", "2"], ["0", str(2**31)]):
        proc = hfsam("bench", "fewshot", "--seeds", *seeds, "-o", tmp_path / "out", tmp_path=tmp_path, check=2)
        assert proc.stderr.strip().splitlines() == [
            f"hfsam: error: --seeds must be different whole numbers from 0 to 2147483647, not {' '.join(seeds)}"
        ]
    assert not (tmp_path / "out").exists()
