"""Dataset training: the draw, the run folder, checkpoints, resume after a kill, and DDP on two CPU processes.

Every run uses the tiny random model at 64 px on a few synthetic slices written
by test_datasets.py's writers, so a run takes seconds.
"""

import dataclasses
import hashlib
import io
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_datasets import write_acdc, write_synapse

from HFSAMCore.errors import InputError
from HFSAMCore.model.hfsam import ModelSpec, build_hfsam
from HFSAMCore.model.loading import load_model
from HFSAMCore.runtime.progress import Progress
from HFSAMCore.store.adapters import load_adapter
from HFSAMCore.train.checkpoints import load_checkpoint, save_checkpoint
from HFSAMCore.train.dataset_config import PRESETS, make_config
from HFSAMCore.train.dataset_lists import read_list, sample_fraction, sample_patients
from HFSAMCore.train.dataset_training import train_on_dataset
from HFSAMCore.train.datasets import AcdcData
from HFSAMCore.train.optim import make_optimizer
from HFSAMCore.train.schedule import hsam_lr_factor, lr_factor_for


def run_cli(*args, launcher=(), check=0, timeout=300):
    """One `hfsam` process. One thread each: on 2 shared cores, spinning OpenMP threads only slow it down."""
    cmd = [sys.executable, *launcher, "-m", "HFSAMCore", *map(str, args)]
    # faulthandler: a crash in a child (a gloo teardown once aborted rank 1 at exit, not reproduced in
    # 48 runs since) then leaves every thread's Python stack in the stderr the assertion shows.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if check is not None:
        assert proc.returncode == check, proc.stderr[-3000:]
    return proc


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def synapse(tmp_path_factory):
    root = tmp_path_factory.mktemp("synapse")
    write_synapse(root)  # 2 cases x 4 slices = 8 training slices
    return root


def tiny(synapse, **options):
    options = {"list": str(synapse / "lists" / "train.txt"), "checkpoint": "none", **options}
    return make_config("synapse", synapse / "train_npz", preset="tiny", **options)


def weights(path):
    return load_adapter(path)[0]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# --------------------------------------------------------------------------- configuration


def test_presets_hold_the_authors_recipe(synapse):
    """docs/reproduce.md's table, the preset column: every setting, for both paper presets."""
    for preset in ("hfsam-synapse", "hfsam-acdc"):
        cfg = make_config("synapse", synapse / "train_npz", fraction=0.1, preset=preset)
        recipe = {k: getattr(cfg, k) for k in PRESETS[preset]}
        assert recipe == {
            "backbone": "vit_b",
            "img_size": 512,
            "rank": 5,
            "fusion": "two_step",
            "pixel_norm": "unit",
            "batch_size": 16,
            "lr": 0.0025,
            "lr_schedule": "hsam",
            "weight_decay": 0.1,
            "warmup": 250,
            "epochs": 300,
            "save_every": 25,
            "augment": "hsam",
            "precision": "fp32",
        }
    cfg = make_config("synapse", synapse / "train_npz", fraction=0.1)
    assert cfg.preset == "hfsam-synapse" and cfg.classes == "synapse" and cfg.seed == 2345
    cfg = make_config("synapse", synapse / "train_npz", preset="tiny", epochs=7, lr=0.001)
    assert (cfg.backbone, cfg.epochs, cfg.lr) == ("tiny", 7, 0.001)
    assert make_config("acdc", synapse, patients=3).classes == "acdc"
    with pytest.raises(InputError, match="either --fraction"):
        make_config("synapse", synapse, fraction=0.1, patients=3)
    with pytest.raises(InputError, match="--epochs"):
        make_config("synapse", synapse, epochs=0)
    with pytest.raises(InputError, match="name the classes"):
        make_config("nifti", synapse)
    with pytest.raises(InputError, match="--augment must be one of hsam, independent, none"):
        make_config("synapse", synapse, augment="flip")
    with pytest.raises(InputError, match="--pixel-norm must be one of imagenet, unit"):
        make_config("synapse", synapse, pixel_norm="zscore")
    with pytest.raises(InputError, match="--lr-schedule"):
        make_config("synapse", synapse, lr_schedule="cosine")


def test_hsam_schedule_is_the_authors_loop():
    """Their loop, transcribed: the rate set after step i is what step i+1 runs at (trainer.py)."""
    base, warmup, total = 0.0025, 250, 300 * 14  # 221 slices / 16 = 14 steps per epoch
    used, lr = [], base / warmup
    for it in range(total):
        used.append(lr)
        lr = base * (it + 1) / warmup if it < warmup else base * (1.0 - (it - warmup) / total) ** 0.9
    ours = [base * hsam_lr_factor(s, total, warmup) for s in range(total)]
    np.testing.assert_allclose(ours, used, rtol=1e-12)
    assert ours[-1] / base == pytest.approx(((warmup + 2) / total) ** 0.9) and 0.079 < ours[-1] / base < 0.080
    assert lr_factor_for("poly", total - 1, total, warmup) < 0.01  # the few-shot schedule goes to 0


# --------------------------------------------------------------------------- a run


def test_a_run_writes_its_draw_config_checkpoints_and_an_adapter(synapse, tmp_path):
    cfg = tiny(synapse, fraction=0.5, seed=11, epochs=3, batch_size=2)
    result = train_on_dataset(cfg, tmp_path / "run")
    run = tmp_path / "run"
    names = read_list(synapse / "lists" / "train.txt")
    assert read_list(run / "train_selected.txt") == sample_fraction(names, 0.5, 11)  # the H-SAM draw, written out
    saved = json.loads((run / "config.json").read_text())
    assert saved["fraction"] == 0.5 and saved["seed"] == 11 and saved["world_size"] == 1 and saved["epochs"] == 3
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"epoch_000{e}.safetensors" for e in (1, 2, 3)]
    assert result.steps == 3 * 2 and result.n_slices == 4 and result.global_batch == 2
    assert np.mean(result.losses[-2:]) < np.mean(result.losses[:2])  # it learns
    # the adapter is a normal one: `hfsam segment --adapter` loads it onto the same random test base
    lm = load_model(adapter=str(run / "adapter.safetensors"))
    assert [c["name"] for c in lm.classes][:2] == ["spleen", "right kidney"]
    meta = lm.adapter_metadata
    assert meta["intensity_preset"] == "ct" and meta["training"]["steps"] == 6
    assert meta["extra"]["dataset_training"]["n_slices"] == 4
    trained = weights(run / "adapter.safetensors")
    for k, v in lm.model.trainable_state_dict().items():
        assert torch.equal(v, trained[k]), k
    with pytest.raises(InputError, match="--resume"):  # a second run never lands in the same folder
        train_on_dataset(cfg, run)


def test_checkpoint_round_trip_restores_model_and_optimizer(tmp_path):
    torch.manual_seed(0)
    model = build_hfsam(ModelSpec("tiny", 64, 3, 2))
    opt = make_optimizer(model, 0.0025, 0.1)
    x, y = torch.rand(2, 1, 64, 64), torch.randint(0, 4, (2, 64, 64))
    from HFSAMCore.train.optim import train_step

    for _ in range(2):
        train_step(model, opt, x, y, lr=0.001, precision=torch.float32)
    base = {"name": "random-init", "sha256": None, "seed": 0}
    path = save_checkpoint(tmp_path / "c.safetensors", model, opt, epoch=4, step=9, digest="abc", base=base)
    torch.manual_seed(0)  # the same frozen base, the untrained head and a fresh optimizer
    fresh = build_hfsam(ModelSpec("tiny", 64, 3, 2))
    fresh_opt = make_optimizer(fresh, 0.5, 0.0)
    assert not torch.equal(
        fresh.trainable_state_dict()["mask_decoder.iou_token.weight"],
        model.trainable_state_dict()["mask_decoder.iou_token.weight"],
    )
    assert load_checkpoint(path, fresh, fresh_opt, digest="abc", base=base) == {"epoch": 4, "step": 9}
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(v, fresh.trainable_state_dict()[k]), k
    a, b = opt.state_dict(), fresh_opt.state_dict()
    assert b["param_groups"][0]["lr"] == 0.001 and b["param_groups"][0]["weight_decay"] == 0.1
    assert b["param_groups"][0]["betas"] == (0.9, 0.999)
    for i, entry in a["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, b["state"][i][key]), (i, key)
    # one more identical step on both: the same result
    train_step(model, opt, x, y, lr=0.001, precision=torch.float32)
    train_step(fresh, fresh_opt, x, y, lr=0.001, precision=torch.float32)
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(v, fresh.trainable_state_dict()[k]), k
    with pytest.raises(InputError, match="another configuration"):
        load_checkpoint(path, fresh, fresh_opt, digest="xyz", base=base)
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a readable training checkpoint"):
        load_checkpoint(tmp_path / "bad.safetensors", fresh, fresh_opt, digest="abc", base=base)


def test_acdc_k_patients_from_the_command_line(tmp_path):
    write_acdc(tmp_path / "acdc", patients=(1, 2, 3, 4))
    proc = run_cli(
        "train",
        "--dataset",
        "acdc",
        "--root",
        tmp_path / "acdc",
        "--patients",
        2,
        "--preset",
        "tiny",
        "--checkpoint",
        "none",
        "--epochs",
        1,
        "-o",
        tmp_path / "run",
        "--progress",
        "json",
    )
    acdc = AcdcData(tmp_path / "acdc")
    names = acdc.slice_names()
    drawn = read_list(tmp_path / "run" / "train_selected.txt")
    assert drawn == sample_patients(names, acdc.patient_of, 2) == names[:12]  # SSL4MIS: the first 2 patients
    result = [json.loads(line) for line in proc.stdout.splitlines()][-1]
    assert result["event"] == "result" and result["n_slices"] == 12 and result["steps"] == 6
    meta = load_adapter(tmp_path / "run" / "adapter.safetensors")[1]
    assert [c["name"] for c in meta["classes"]] == ["right ventricle", "myocardium", "left ventricle"]
    assert meta["intensity_preset"] == "mr"


# --------------------------------------------------------------------------- resume


def test_resume_after_a_kill_continues_from_the_last_checkpoint(synapse, tmp_path):
    common = [
        "--dataset",
        "synapse",
        "--root",
        synapse / "train_npz",
        "--list",
        synapse / "lists" / "train.txt",
        "--preset",
        "tiny",
        "--checkpoint",
        "none",
        "--epochs",
        6,
        "--batch-size",
        4,
    ]
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "HFSAMCore", "train", *map(str, common), "-o", str(run), "--progress", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    killed_after = None
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "checkpoint":
            proc.send_signal(signal.SIGKILL)  # no chance to clean up: as a crash or a preempted job
            killed_after = event["epoch"]
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and killed_after == 1
    assert not (run / "adapter.safetensors").exists()
    assert not [p for p in run.rglob(".*")], "a temporary file was left behind"

    resumed = run_cli("train", "-o", run, "--resume", "--progress", "json")
    result = json.loads(resumed.stdout.splitlines()[-1])
    assert 1 <= result["resumed_from_epoch"] < 6 and result["steps"] == 12
    assert "resuming from epoch_000" in resumed.stderr

    whole = run_cli("train", *common, "-o", tmp_path / "whole", "--progress", "json")  # the same, uninterrupted
    assert json.loads(whole.stdout.splitlines()[-1])["resumed_from_epoch"] is None
    # all randomness derives from (seed, epoch, sample): the resumed run repeats the uninterrupted one
    assert max_diff(weights(run / "adapter.safetensors"), weights(tmp_path / "whole" / "adapter.safetensors")) < 1e-6


def test_a_damaged_last_checkpoint_falls_back_to_the_one_before(synapse, tmp_path):
    run = tmp_path / "run"
    train_on_dataset(tiny(synapse, epochs=2), run)
    first = weights(run / "adapter.safetensors")
    last = run / "checkpoints" / "epoch_0002.safetensors"
    last.write_bytes(last.read_bytes()[:1000])  # e.g. a copy cut short
    err = io.StringIO()
    result = train_on_dataset(None, run, resume=True, progress=Progress("none", err=err))
    assert result.resumed_from_epoch == 1 and "skipping checkpoint epoch_0002.safetensors" in err.getvalue()
    assert max_diff(weights(run / "adapter.safetensors"), first) < 1e-6  # epoch 2 done again, identically


def test_resume_takes_its_settings_from_the_run_folder(synapse, tmp_path):
    train_on_dataset(tiny(synapse, epochs=1), tmp_path / "run")
    proc = run_cli("train", "-o", tmp_path / "run", "--resume", "--epochs", 5, check=2)
    assert "drop --epochs" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("train", "-o", tmp_path / "nothing", "--resume", check=2)
    assert "not a training run folder" in proc.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    config["world_size"] = 2
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="nproc_per_node 2"):
        train_on_dataset(None, tmp_path / "run", resume=True)
    proc = run_cli(
        "train",
        "--dataset",
        "synapse",
        "--root",
        synapse / "train_npz",
        "--fraction",
        0.01,
        "--preset",
        "tiny",
        "--checkpoint",
        "none",
        "-o",
        tmp_path / "few",
        check=2,
    )
    assert "less than one slice" in proc.stderr
    assert not (tmp_path / "few").exists()  # nothing written for a run that cannot start
    proc = run_cli(
        "train",
        "--dataset",
        "synapse",
        "--root",
        synapse / "train_npz",
        "--preset",
        "hfsam-synapse",
        "--checkpoint",
        tmp_path / "sam_vit_b.pth",
        "-o",
        tmp_path / "nockpt",
        check=2,
    )
    assert "checkpoint not found" in proc.stderr and not (tmp_path / "nockpt").exists()


# --------------------------------------------------------------------------- distributed


def test_two_processes_give_the_weights_of_one_with_the_same_global_batch(synapse, tmp_path):
    """torchrun --nproc_per_node 2 (gloo, CPU), global batch 4 (2 each) == one process with batch 4,
    H-SAM's augmentation on."""
    args = [
        "train",
        "--dataset",
        "synapse",
        "--root",
        synapse / "train_npz",
        "--list",
        synapse / "lists" / "train.txt",
        "--preset",
        "tiny",
        "--checkpoint",
        "none",
        "--epochs",
        2,
        "--progress",
        "json",
    ]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = run_cli(*args, "--batch-size", 4, "-o", tmp_path / "ddp", launcher=launcher, timeout=240)
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["world_size"] == 2 and result["global_batch"] == 4 and result["steps"] == 4
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["world_size"] == 2

    single = train_on_dataset(tiny(synapse, epochs=2, batch_size=4), tmp_path / "one")
    ddp_losses = [e["loss"] for e in map(json.loads, proc.stdout.splitlines()) if e.get("stage") == "train"]
    np.testing.assert_allclose(ddp_losses, single.losses, atol=1e-4)  # the events round to 4 digits
    ddp_w, one_w = weights(tmp_path / "ddp" / "adapter.safetensors"), weights(tmp_path / "one" / "adapter.safetensors")
    # Equal up to float summation order. Adam divides by sqrt(v): where a gradient is zero in exact
    # arithmetic (attention key biases) rounding noise becomes a step of its own, hence 2e-5, not 1e-7.
    assert max_diff(ddp_w, one_w) < 2e-5
    # ... and the test can tell: another global batch, or a Dice not pooled over both processes
    # (measured at ~9e-3 when developing), lands far away.
    other = train_on_dataset(tiny(synapse, epochs=2, batch_size=2), tmp_path / "other")
    assert other.steps == 8 and max_diff(weights(tmp_path / "other" / "adapter.safetensors"), one_w) > 1e-3


# --------------------------------------------------------------------------- the recipe reaches the run


def first_step_loss(cfg, augment):
    """The first step's loss, rebuilt outside the training loop: the same random base, the sampler's first
    global batch, each slice augmented by the recipe ``augment`` from its own seed, the HF-SAM loss."""
    from torch.utils.data import DistributedSampler

    from HFSAMCore.train.augmentation import augment_sample
    from HFSAMCore.train.dataset_batches import sample_seed, to_model_batch
    from HFSAMCore.train.datasets import SynapseData
    from HFSAMCore.train.losses import hfsam_loss

    model = load_model(
        checkpoint="none",
        backbone=cfg.backbone,
        img_size=cfg.img_size,
        rank=cfg.rank,
        fusion=cfg.fusion,
        pixel_norm=cfg.pixel_norm,
        classes=cfg.classes,
    ).model.train()
    names = read_list(cfg.list)
    sampler = DistributedSampler(range(len(names)), num_replicas=1, rank=0, shuffle=True, seed=cfg.seed)
    sampler.set_epoch(0)
    first = list(sampler)[: cfg.batch_size]
    reader = SynapseData(cfg.root)
    batch = [(i, *reader.load_slice(names[i])) for i in first]
    x, y = to_model_batch(batch, cfg.img_size, torch.device("cpu"))
    pairs = [
        augment_sample(
            augment, x[k : k + 1], y[k : k + 1], torch.Generator().manual_seed(sample_seed(cfg.seed, 0, i)), image.shape
        )
        for k, (i, image, _) in enumerate(batch)
    ]
    x, y = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    with torch.no_grad():
        return float(hfsam_loss(model(x), y))


def test_every_preset_setting_reaches_the_model_and_the_loop(synapse, tmp_path):
    """The paper preset on the tiny model: normalisation in the buffers and the adapter, the schedule step by
    step, AdamW's settings, the global batch, fp32, and H-SAM's augmentation in the very first batch."""
    from safetensors import safe_open

    cfg = make_config(
        "synapse",
        synapse / "train_npz",
        preset="hfsam-synapse",
        list=str(synapse / "lists" / "train.txt"),
        backbone="tiny",
        img_size=64,
        rank=2,
        checkpoint="none",
        epochs=2,
        batch_size=4,
        warmup=3,
        save_every=1,
    )
    assert (cfg.pixel_norm, cfg.augment, cfg.lr_schedule, cfg.precision) == ("unit", "hsam", "hsam", "fp32")
    out, err = io.StringIO(), io.StringIO()
    result = train_on_dataset(cfg, tmp_path / "run", progress=Progress("json", out=out, err=err))
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    # the global batch: 8 slices / 4 = 2 steps per epoch
    assert result.steps == 4 and result.global_batch == 4
    # H-SAM's schedule, every step (the poly schedule would differ from step 1 on)
    lrs = [e["lr"] for e in events if e.get("stage") == "train"]
    assert lrs == pytest.approx([0.0025 * hsam_lr_factor(s, 4, 3) for s in range(4)], rel=1e-12)
    assert lrs != pytest.approx([0.0025 * lr_factor_for("poly", s, 4, 3) for s in range(4)])
    assert "float32" in err.getvalue() and "with loss scaling" not in err.getvalue()
    # AdamW (0.9, 0.999), weight decay 0.1, as the checkpoint records the optimizer
    with safe_open(str(tmp_path / "run" / "checkpoints" / "epoch_0002.safetensors"), "pt") as fh:
        header = json.loads(fh.metadata()["hfsam_checkpoint"])
    group = header["param_groups"][0]
    assert (group["betas"], group["weight_decay"], group["lr"]) == ([0.9, 0.999], 0.1, pytest.approx(lrs[-1]))
    assert header["grad_scaler"] is None
    # the normalisation is recorded, and a model loaded from the adapter feeds the [0, 1] slice unchanged
    meta = load_adapter(tmp_path / "run" / "adapter.safetensors")[1]
    assert (meta["pixel_norm"], meta["fusion"], meta["training"]["batch_size"]) == ("unit", "two_step", 4)
    lm = load_model(adapter=str(tmp_path / "run" / "adapter.safetensors"))
    assert torch.equal(lm.model.pixel_mean, torch.zeros(1, 3, 1, 1))
    assert torch.equal(lm.model.pixel_std, torch.ones(1, 3, 1, 1))
    # the first step ran on H-SAM's augmentation of the sampler's first batch, on the unit-normalised model
    assert result.losses[0] == pytest.approx(first_step_loss(cfg, "hsam"), abs=1e-5)
    assert abs(result.losses[0] - first_step_loss(cfg, "none")) > 1e-4  # ... which the test can tell apart
    imagenet = dataclasses.replace(cfg, pixel_norm="imagenet")
    assert abs(result.losses[0] - first_step_loss(imagenet, "hsam")) > 1e-3


def test_train_list_is_used_as_it_is(synapse, tmp_path):
    names = ["case0006_slice002", "case0005_slice000", "case0006_slice003"]
    listed = tmp_path / "authors_train.txt"
    listed.write_text("".join(n + "\n" for n in names))
    from HFSAMCore.cli.app import build_parser

    args = build_parser().parse_args(
        map(
            str,
            [
                "train",
                "--dataset",
                "synapse",
                "--root",
                synapse / "train_npz",
                "--preset",
                "tiny",
                "--checkpoint",
                "none",
                "--epochs",
                1,
                "--batch-size",
                3,
                "--train-list",
                listed,
                "-o",
                tmp_path / "run",
            ],
        )
    )
    out = io.StringIO()
    assert args.func(args, Progress("json", out=out, err=io.StringIO())) == 0  # `hfsam train`, in this process
    assert read_list(tmp_path / "run" / "train_selected.txt") == names  # no draw, the file's order
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (
        saved["train_list"] == str(listed)
        and saved["train_list_sha256"] == hashlib.sha256(listed.read_bytes()).hexdigest()
    )
    assert json.loads(out.getvalue().splitlines()[-1])["n_slices"] == 3
    with pytest.raises(InputError, match="drop --list, --fraction"):
        tiny(synapse, train_list=str(listed), fraction=0.5)  # tiny() passes --list too
    listed.write_text("case0005_slice000\ncase0005_slice042\n")
    with pytest.raises(InputError, match="1 of the 2 training slices are not in .*case0005_slice042"):
        train_on_dataset(tiny(synapse, list=None, train_list=str(listed)), tmp_path / "missing")
    assert not (tmp_path / "missing").exists()


def test_the_global_batch_must_split_over_the_processes(synapse, tmp_path):
    from HFSAMCore.train.run_folder import prepare_run_folder

    with pytest.raises(InputError, match="global batch 3 does not split evenly over 2 processes"):
        prepare_run_folder(
            tiny(synapse, batch_size=3),
            tmp_path / "run",
            resume=False,
            world=2,
            library=None,
            progress=Progress("none"),
        )
    assert not (tmp_path / "run").exists()


def test_adamw_is_fused_where_torch_has_the_kernel_and_plain_where_not(monkeypatch):
    model = build_hfsam(ModelSpec("tiny", 64, 3, 2))
    assert make_optimizer(model, 0.0025, 0.1).param_groups[0]["fused"] is True  # torch >= 2.4 on the CPU

    class AdamWOfTorch23(torch.optim.AdamW):  # torch 2.1-2.3 (still accepted) had no fused CPU kernel
        def __init__(self, params, **kw):
            if kw.get("fused"):
                raise RuntimeError(
                    "`fused=True` requires all the params to be floating point Tensors of supported devices"
                )
            super().__init__(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", AdamWOfTorch23)
    group = make_optimizer(model, 0.0025, 0.1).param_groups[0]
    assert not group["fused"] and (group["lr"], group["weight_decay"], group["betas"]) == (0.0025, 0.1, (0.9, 0.999))


def test_a_checkpoint_of_the_unfused_adamw_resumes_fused_with_its_state(tmp_path):
    """Checkpoints written before make_optimizer used the fused kernel record fused=None: resuming takes the
    moments and the step from them, and keeps this build's kernel."""
    from HFSAMCore.train.optim import train_step

    torch.manual_seed(0)
    model = build_hfsam(ModelSpec("tiny", 64, 3, 2))
    old = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0025, weight_decay=0.1)
    x, y = torch.rand(2, 1, 64, 64), torch.randint(0, 4, (2, 64, 64))
    train_step(model, old, x, y, lr=0.001, precision=torch.float32)
    base = {"name": "random-init", "sha256": None, "seed": 0}
    path = save_checkpoint(tmp_path / "c.safetensors", model, old, epoch=1, step=1, digest="d", base=base)
    resumed = make_optimizer(model, 0.0025, 0.1)
    load_checkpoint(path, model, resumed, digest="d", base=base)
    assert resumed.param_groups[0]["fused"] is True and resumed.param_groups[0]["lr"] == 0.001
    for i, entry in old.state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(value.float(), resumed.state_dict()["state"][i][key].float()), (i, key)
    train_step(model, resumed, x, y, lr=0.001, precision=torch.float32)  # the fused kernel takes the loaded state
    assert float(resumed.state_dict()["state"][0]["step"]) == 2


def test_loss_scaling_steps_alike_skips_overflows_and_resumes(tmp_path):
    """fp16 needs a GradScaler; its wiring, checked in fp32 on the CPU (fp16 autocast is for GPUs)."""
    from HFSAMCore.train.optim import train_step

    def fresh():
        torch.manual_seed(0)
        model = build_hfsam(ModelSpec("tiny", 64, 3, 2))
        return model, make_optimizer(model, 0.0025, 0.1)

    x, y = torch.rand(2, 1, 64, 64), torch.randint(0, 4, (2, 64, 64))
    plain, plain_opt = fresh()
    scaled, scaled_opt = fresh()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for _ in range(2):
        train_step(plain, plain_opt, x, y, lr=0.001, precision=torch.float32)
        train_step(scaled, scaled_opt, x, y, lr=0.001, precision=torch.float32, scaler=scaler)
    assert max_diff(plain.trainable_state_dict(), scaled.trainable_state_dict()) < 1e-6  # scaled, then unscaled
    before = {k: v.clone() for k, v in scaled.trainable_state_dict().items()}
    bad = x.clone()
    bad[0, 0, 0, 0] = float("inf")  # overflowing gradients: the step is skipped and the scale backs off
    train_step(scaled, scaled_opt, bad, y, lr=0.001, precision=torch.float32, scaler=scaler)
    assert max_diff(before, scaled.trainable_state_dict()) == 0 and scaler.get_scale() == 2.0**9
    base = {"name": "random-init", "sha256": None, "seed": 0}
    path = save_checkpoint(
        tmp_path / "c.safetensors", scaled, scaled_opt, epoch=1, step=3, digest="d", base=base, scaler=scaler
    )
    other, other_opt = fresh()
    restored = torch.amp.GradScaler("cpu")
    load_checkpoint(path, other, other_opt, digest="d", base=base, scaler=restored)
    assert restored.state_dict() == scaler.state_dict()


def test_out_of_memory_stops_with_what_to_do_and_keeps_the_batch(synapse, tmp_path, monkeypatch):
    """CUDA OOM cannot happen on the CPU: the model raises torch's own OOM error (a simulation). Unlike
    `hfsam finetune`, a dataset run never shrinks its batch by itself: that would change the recipe."""
    from HFSAMCore.errors import HFSAMError
    from HFSAMCore.model.hfsam import HFSAM

    def forward(self, images):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(HFSAM, "forward", forward)
    with pytest.raises(HFSAMError, match="out of memory at 4 slices of 64 px per process .* --nproc_per_node"):
        train_on_dataset(tiny(synapse, batch_size=4), tmp_path / "run")
    assert not (tmp_path / "run" / "adapter.safetensors").exists()
