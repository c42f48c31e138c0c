"""The configuration of a dataset training run: the paper's presets, checks, and the slices drawn."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError

CHECKPOINT_FORMAT = "hfsam-train-checkpoint"


CHECKPOINT_VERSION = 1


CONFIG_FILE = "config.json"


SELECTED_FILE = "train_selected.txt"


ADAPTER_FILE = "adapter.safetensors"


CHECKPOINT_DIR = "checkpoints"


#: The authors' recipe (HF-SAM's train.py + trainer.py, run as H-SAM's README runs it: --warmup --AdamW
#: --base_lr 0.0025 on 2 GPUs); docs/reproduce.md lists every setting with its source, row by row.
#: SAM fed the [0, 1] slice unchanged (pixel_mean 0, pixel_std 1), global batch 16 (8 per GPU x 2),
#: AdamW lr 0.0025, H-SAM's schedule (250 warm-up steps, poly(0.9) over all steps), 300 epochs, H-SAM's
#: augmentation, fp32 (the authors used no autocast); loss 0.1 CE + 0.9 Dice (losses.hfsam_loss).
#: The decoder is the paper's two-step fusion; --fusion released is the authors' released network.
#: ACDC: the same recipe is assumed (the authors released only the Synapse trainer).
_PAPER_RECIPE: dict[str, Any] = {
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


PRESETS: dict[str, dict[str, Any]] = {
    "hfsam-synapse": dict(_PAPER_RECIPE),
    "hfsam-acdc": dict(_PAPER_RECIPE),
    # CPU smoke tests and CI: the paper's recipe on a random tiny model, a handful of steps.
    "tiny": {
        **_PAPER_RECIPE,
        "backbone": "tiny",
        "img_size": 64,
        "rank": 2,
        "batch_size": 2,
        "warmup": 2,
        "epochs": 2,
        "save_every": 1,
    },
}


#: Learning-rate schedules (the factor of the base rate at each step):
#: "hsam"  SAMed's trainer, kept by H-SAM and HF-SAM: step s uses s/W during the warm-up (step 0: 1/W),
#:         then (1 - (s - 1 - W) / T) ** 0.9 with T ALL steps, so it ends near ((W + 2) / T) ** 0.9
#:         (8 % for T = 4200, W = 250) instead of 0;
#: "poly"  the few-shot trainer's (schedule.lr_factor): warm-up to 1, then poly(0.9) down to 0 at T.
LR_SCHEDULES = ("hsam", "poly")


#: sha256 of the authors' training list: HF-SAM's lists/lists_Synapse/train.txt, byte for byte H-SAM's
#: lists/lists_Synapse/train_220.txt (221 slices, an unseeded random.sample of TransUNet's 2211).
AUTHORS_SYNAPSE_LIST_SHA256 = "b2d6ee0b083bcc9b80be2a9c1716fca8f538eb78ce207cd9b0c689b377b161c2"


DEFAULT_PRESET = {"synapse": "hfsam-synapse", "acdc": "hfsam-acdc", "nifti": "hfsam-synapse"}


DEFAULT_CLASSES = {"synapse": "synapse", "acdc": "acdc"}


@dataclass
class DatasetTrainConfig:
    """Everything that defines a training run; saved as OUT/config.json and reread on resume."""

    dataset: str
    root: str
    list: str | None = None  # slice list (synapse train.txt, acdc train_slices.list) or case list (nifti)
    train_list: str | None = None  # exactly these slices, no draw (the authors' 221-slice train.txt)
    train_list_sha256: str | None = None  # of the train_list file as it was read
    fraction: float | None = None  # draw this fraction of the slices (H-SAM)
    patients: int | None = None  # or every slice of K patients (SSL4MIS)
    patient_order: str = "list"  # "list": the first K patients; "random": random.sample with the seed
    seed: int = 2345
    classes: Any = None  # preset name or names; default from the dataset
    preset: str = "hfsam-synapse"
    backbone: str = "vit_b"
    img_size: int = 512
    rank: int = 5
    fusion: str = "two_step"
    pixel_norm: str | None = None  # registry.PIXEL_NORMS key; None: the backbone's default
    checkpoint: str | None = None  # SAM base checkpoint file, "none" (random, tests), None (the library's)
    batch_size: int = 16  # GLOBAL: slices per step over all processes
    lr: float = 0.0025
    lr_schedule: str = "hsam"  # LR_SCHEDULES
    weight_decay: float = 0.1
    warmup: int = 250  # iterations
    epochs: int = 300
    save_every: int = 25  # epochs between checkpoints (the last epoch is always saved)
    augment: str = "hsam"  # augmentation.AUGMENTATIONS
    precision: str = "auto"
    intensity: str = "auto"  # nifti only: ct, mr or auto
    subset: str = "Tr"  # nifti only
    axis: str = "axial"  # nifti only
    name: str | None = None  # adapter name (default: the output folder's name)
    description: str = ""
    world_size: int = 1  # filled in at the start of the run
    hfsam_version: str = ""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """Identity of the run: checkpoints carry it so that a resume never mixes two runs."""
        text = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


# The options a user may set; everything else in DatasetTrainConfig is derived.
TRAINING_OPTIONS = tuple(
    f.name
    for f in dataclasses.fields(DatasetTrainConfig)
    if f.name not in ("world_size", "hfsam_version", "train_list_sha256")
)


def make_config(dataset: str, root: str | os.PathLike, *, preset: str | None = None, **options) -> DatasetTrainConfig:
    """Resolve a configuration: the preset's values, then every option given (None = not given)."""
    from .datasets import DATASETS

    if dataset not in DATASETS:
        raise InputError(f"--dataset must be one of {', '.join(DATASETS)}, not {dataset!r}")
    preset = preset or DEFAULT_PRESET[dataset]
    if preset not in PRESETS:
        raise InputError(f"unknown --preset {preset!r}; choose one of {', '.join(PRESETS)}")
    unknown = sorted(set(options) - set(TRAINING_OPTIONS))
    if unknown:
        raise TypeError(f"unknown training option(s): {', '.join(unknown)}")
    values = {**PRESETS[preset], **{k: v for k, v in options.items() if v is not None}}
    if values.get("classes") is None:
        if dataset not in DEFAULT_CLASSES:
            raise InputError(
                "name the classes of a NIfTI dataset in label order: --classes 'liver,spleen' "
                "or a preset (synapse, acdc)"
            )
        values["classes"] = DEFAULT_CLASSES[dataset]
    for key in ("list", "train_list", "checkpoint"):
        if values.get(key) is not None and values[key] != "none":
            values[key] = str(Path(values[key]).expanduser().resolve())
    if values.get("train_list") is not None:
        from ..store.download import sha256_file

        if not Path(values["train_list"]).is_file():
            raise InputError(
                f"--train-list {values['train_list']} does not exist; pass the file of slice names "
                "to train on (e.g. the authors' lists/lists_Synapse/train.txt)"
            )
        values["train_list_sha256"] = sha256_file(values["train_list"])
    from .. import __version__

    cfg = DatasetTrainConfig(
        dataset=dataset, root=str(Path(root).expanduser().resolve()), preset=preset, hfsam_version=__version__, **values
    )
    check_config(cfg)
    return cfg


def check_config(cfg: DatasetTrainConfig) -> None:
    from ..model.registry import PIXEL_NORMS
    from .augmentation import AUGMENTATIONS

    if cfg.fraction is not None and cfg.patients is not None:
        raise InputError("give either --fraction (a share of the slices) or --patients (K labeled patients), not both")
    if cfg.train_list is not None:
        others = [
            flag
            for flag, value in (("--list", cfg.list), ("--fraction", cfg.fraction), ("--patients", cfg.patients))
            if value is not None
        ]
        if others:
            raise InputError(f"--train-list names exactly the slices to train on; drop {', '.join(others)}")
    for key, value, choices in (
        ("augment", cfg.augment, AUGMENTATIONS),
        ("lr_schedule", cfg.lr_schedule, LR_SCHEDULES),
        ("pixel_norm", cfg.pixel_norm, (*PIXEL_NORMS, None)),
    ):
        if value not in choices:
            names = ", ".join(c for c in choices if c is not None)
            raise InputError(f"--{key.replace('_', '-')} must be one of {names}, not {value!r}")
    positive = {"batch_size": cfg.batch_size, "epochs": cfg.epochs, "save_every": cfg.save_every, "warmup": cfg.warmup}
    for key, number in positive.items():
        if not isinstance(number, int) or number < 1:
            raise InputError(f"--{key.replace('_', '-')} must be a whole number of at least 1, not {number}")
    if not (isinstance(cfg.lr, (int, float)) and cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise InputError(f"--lr must be a positive number, not {cfg.lr}")
    if cfg.seed < 0:
        raise InputError(f"--seed must be 0 or more, not {cfg.seed}")
    if cfg.patient_order not in ("list", "random"):
        raise InputError(f"--patient-order must be list or random, not {cfg.patient_order!r}")


def load_config(output: Path) -> DatasetTrainConfig:
    path = output / CONFIG_FILE
    if not path.is_file():
        raise InputError(f"{output} holds no {CONFIG_FILE}: it is not a training run folder (nothing to resume)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return DatasetTrainConfig(**data)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{path} is not a training configuration written by hfsam train ({exc})") from None


def draw_slices(cfg: DatasetTrainConfig, reader) -> list[str]:
    """The training slices: the --train-list as it is, or of the --list (default: all) every slice,
    a fraction (H-SAM's random.sample), or K patients (SSL4MIS)."""
    from .dataset_lists import read_list, sample_fraction, sample_patients

    if cfg.train_list is not None:
        return read_list(cfg.train_list)
    names = reader.slice_names(cfg.list)
    if cfg.fraction is not None:
        return sample_fraction(names, cfg.fraction, cfg.seed)
    if cfg.patients is not None:
        return sample_patients(names, reader.patient_of, cfg.patients, order=cfg.patient_order, seed=cfg.seed)
    return names


def open_reader(cfg: DatasetTrainConfig):
    from .datasets import open_dataset

    options = {"subset": cfg.subset, "axis": cfg.axis, "preset": cfg.intensity} if cfg.dataset == "nifti" else {}
    return open_dataset(cfg.dataset, cfg.root, **options)
