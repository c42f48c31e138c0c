"""Training HF-SAM on a whole dataset (Synapse, ACDC, NIfTI folders): the paper's regimes.

One code path for the CPU, one GPU and many GPUs: PyTorch's own
DistributedDataParallel, launched by ``torchrun`` (which sets RANK/WORLD_SIZE).
A plain ``hfsam train`` is simply a world of one process. The optimisation step
itself (loss, AdamW) is the few-shot trainer's, ``finetune.train_step``; the
augmentation is a recipe of ``augmentation.py`` and the learning-rate schedule
one of ``LR_SCHEDULES``; this module adds what a dataset needs: streaming slices
with a DataLoader, the few-shot draw, epochs, checkpoints and resuming.

``batch_size`` is the GLOBAL batch (slices per optimisation step over all
processes), split evenly over them: the authors' 8 per GPU on 2 GPUs is 16, on
one GPU or on two.

Why the same global batch gives the same weights on 1 or N processes:

* the DistributedSampler makes one permutation per epoch from (seed, epoch);
  process r takes every N-th sample of it, so the samples of global step j are
  the same set for any N (given per-process batch = global batch / N);
* augmentation is drawn per SAMPLE from (seed, epoch, sample index), not from a
  per-process random stream, so a sample is warped alike wherever it lands;
* the soft Dice pools the whole batch (as the authors' DiceLoss, which ran
  under nn.DataParallel on the full batch): its per-class sums are all-reduced
  with a differentiable all-reduce, so every process computes the Dice of the
  GLOBAL batch; the CE is a per-pixel mean that DDP's gradient averaging makes
  global. The gradients are then exactly the single-process ones (up to float
  summation order).

The same property makes resuming exact: all randomness derives from (seed,
epoch, sample), so a checkpoint at an epoch boundary needs no RNG state, and
a resumed run repeats the uninterrupted one step for step.

Run folder (``--output OUT``)::

    OUT/config.json                   the exact, resolved configuration (resume reads it)
    OUT/train_selected.txt            the slices drawn for training (one name per line)
    OUT/checkpoints/epoch_0025.safetensors   trainable tensors + AdamW state + position
    OUT/adapter.safetensors           the final model, a normal adapter for `hfsam segment`

Checkpoints are safetensors files (tensors) with a JSON header (epoch, step,
optimizer hyper-parameters): nothing is pickled, nothing unpickled.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import Cancelled, HFSAMError, InputError
from .progress import Progress

if TYPE_CHECKING:  # torch is imported inside the functions: `import HFSAMCore` stays cheap
    import torch

CHECKPOINT_FORMAT = "hfsam-train-checkpoint"
CHECKPOINT_VERSION = 1
CONFIG_FILE = "config.json"
SELECTED_FILE = "train_selected.txt"
ADAPTER_FILE = "adapter.safetensors"
CHECKPOINT_DIR = "checkpoints"
_CKPT_NAME = re.compile(r"^epoch_(\d{4,})\.safetensors$")

#: The authors' recipe (HF-SAM's train.py + trainer.py, run as H-SAM's README runs it: --warmup --AdamW
#: --base_lr 0.0025 on 2 GPUs); docs/reproduce.md lists every setting with its source, row by row.
#: SAM fed the [0, 1] slice unchanged (pixel_mean 0, pixel_std 1), global batch 16 (8 per GPU x 2),
#: AdamW lr 0.0025, H-SAM's schedule (250 warm-up steps, poly(0.9) over all steps), 300 epochs, H-SAM's
#: augmentation, fp32 (the authors used no autocast); loss 0.1 CE + 0.9 Dice (finetune.hfsam_loss).
#: The decoder is the paper's two-step fusion; --fusion released is the authors' released network.
#: ACDC: the same recipe is assumed (the authors released only the Synapse trainer).
_PAPER_RECIPE: dict[str, Any] = {
    "backbone": "vit_b", "img_size": 512, "rank": 5, "fusion": "two_step", "pixel_norm": "unit",
    "batch_size": 16, "lr": 0.0025, "lr_schedule": "hsam", "weight_decay": 0.1, "warmup": 250, "epochs": 300,
    "save_every": 25, "augment": "hsam", "precision": "fp32",
}
PRESETS: dict[str, dict[str, Any]] = {
    "hfsam-synapse": dict(_PAPER_RECIPE),
    "hfsam-acdc": dict(_PAPER_RECIPE),
    # CPU smoke tests and CI: the paper's recipe on a random tiny model, a handful of steps.
    "tiny": {**_PAPER_RECIPE, "backbone": "tiny", "img_size": 64, "rank": 2, "batch_size": 2, "warmup": 2,
             "epochs": 2, "save_every": 1},
}
#: Learning-rate schedules (the factor of the base rate at each step):
#: "hsam"  SAMed's trainer, kept by H-SAM and HF-SAM: step s uses s/W during the warm-up (step 0: 1/W),
#:         then (1 - (s - 1 - W) / T) ** 0.9 with T ALL steps, so it ends near ((W + 2) / T) ** 0.9
#:         (8 % for T = 4200, W = 250) instead of 0;
#: "poly"  the few-shot trainer's (finetune.lr_factor): warm-up to 1, then poly(0.9) down to 0 at T.
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
TRAINING_OPTIONS = tuple(f.name for f in dataclasses.fields(DatasetTrainConfig)
                         if f.name not in ("world_size", "hfsam_version", "train_list_sha256"))


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
            raise InputError("name the classes of a NIfTI dataset in label order: --classes 'liver,spleen' "
                             "or a preset (synapse, acdc)")
        values["classes"] = DEFAULT_CLASSES[dataset]
    for key in ("list", "train_list", "checkpoint"):
        if values.get(key) is not None and values[key] != "none":
            values[key] = str(Path(values[key]).expanduser().resolve())
    if values.get("train_list") is not None:
        from .download import sha256_file

        if not Path(values["train_list"]).is_file():
            raise InputError(f"--train-list {values['train_list']} does not exist; pass the file of slice names "
                             "to train on (e.g. the authors' lists/lists_Synapse/train.txt)")
        values["train_list_sha256"] = sha256_file(values["train_list"])
    from . import __version__

    cfg = DatasetTrainConfig(dataset=dataset, root=str(Path(root).expanduser().resolve()), preset=preset,
                             hfsam_version=__version__, **values)
    check_config(cfg)
    return cfg


def check_config(cfg: DatasetTrainConfig) -> None:
    from .augmentation import AUGMENTATIONS
    from .model.registry import PIXEL_NORMS

    if cfg.fraction is not None and cfg.patients is not None:
        raise InputError("give either --fraction (a share of the slices) or --patients (K labeled patients), not both")
    if cfg.train_list is not None:
        others = [flag for flag, value in (("--list", cfg.list), ("--fraction", cfg.fraction),
                                           ("--patients", cfg.patients)) if value is not None]
        if others:
            raise InputError(f"--train-list names exactly the slices to train on; drop {', '.join(others)}")
    for key, value, choices in (("augment", cfg.augment, AUGMENTATIONS), ("lr_schedule", cfg.lr_schedule, LR_SCHEDULES),
                                ("pixel_norm", cfg.pixel_norm, (*PIXEL_NORMS, None))):
        if value not in choices:
            names = ", ".join(c for c in choices if c is not None)
            raise InputError(f"--{key.replace('_', '-')} must be one of {names}, not {value!r}")
    positive = {"batch_size": cfg.batch_size, "epochs": cfg.epochs, "save_every": cfg.save_every,
                "warmup": cfg.warmup}
    for key, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise InputError(f"--{key.replace('_', '-')} must be a whole number of at least 1, not {value}")
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


# --------------------------------------------------------------------------- the draw


def draw_slices(cfg: DatasetTrainConfig, reader) -> list[str]:
    """The training slices: the --train-list as it is, or of the --list (default: all) every slice,
    a fraction (H-SAM's random.sample), or K patients (SSL4MIS)."""
    from .datasets import read_list, sample_fraction, sample_patients

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


# --------------------------------------------------------------------------- torch data


def _torch_dataset_class():
    import torch

    class SliceDataset(torch.utils.data.Dataset):
        """(index, image [H,W] float32 in [0,1], label [H,W] int64) per named slice, read when asked."""

        def __init__(self, reader, names: list[str]):
            self.reader, self.names = reader, list(names)

        def __len__(self) -> int:
            return len(self.names)

        def __getitem__(self, i: int):
            image, label = self.reader.load_slice(self.names[i])
            return i, image, label

    return SliceDataset


def collate_slices(batch):
    """Keep the slices as a list: sizes may differ (ACDC), they are resized on the device."""
    return batch


def to_model_batch(batch, size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [B,1,S,S] (bilinear, as segment.to_model_input) and labels [B,S,S] (nearest) on the device."""
    import torch

    from .finetune import resize_labels
    from .segment import to_model_input

    xs, ys = [], []
    for _, image, label in batch:
        xs.append(to_model_input(image[None], size, device))
        lab = torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64)).to(device)[None]
        ys.append(resize_labels(lab, (size, size)))
    return torch.cat(xs), torch.cat(ys)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch, the same on every process."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def augment_samples(kind: str, x, y, seeds: list[int], sizes: list[tuple[int, int]]):
    """The augmentation recipe ``kind`` applied to each sample with its own generator (see the module
    docstring); ``sizes``: each slice's (H, W) as stored, which H-SAM's sizes are relative to."""
    import torch

    from .augmentation import augment_sample

    out = [augment_sample(kind, x[i:i + 1], y[i:i + 1], torch.Generator().manual_seed(s), sizes[i])
           for i, s in enumerate(seeds)]
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])


def hsam_lr_factor(step: int, total: int, warmup: int) -> float:
    """SAMed's / H-SAM's / HF-SAM's schedule (LR_SCHEDULES "hsam"), step counted from 0.

    Their loop sets the rate AFTER each step, so step 0 runs at the initial base/W and
    step s at what step s-1 set: (s-1+1)/W in the warm-up, then poly(0.9) of the steps
    after the warm-up over ALL steps T (not T - W).
    """
    if step <= warmup:
        return max(step, 1) / warmup
    return (1.0 - (step - 1 - warmup) / total) ** 0.9


def lr_factor_for(schedule: str, step: int, total: int, warmup: int) -> float:
    if schedule == "hsam":
        return hsam_lr_factor(step, total, warmup)
    if schedule == "poly":
        from .finetune import lr_factor

        return lr_factor(step, total, warmup)
    raise InputError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, not {schedule!r}")


# --------------------------------------------------------------------------- distributed


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def all_max(self, value: float) -> float:
        """The largest of ``value`` over the processes (a cancel flag, an error flag)."""
        if self.world == 1:
            return value
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(value)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def mean(self, value: torch.Tensor) -> float:
        if self.world == 1:
            return float(value)
        import torch.distributed as dist

        t = value.detach().clone().reshape(1)
        dist.all_reduce(t)
        return float(t.item()) / self.world


def global_sum(t):
    """Differentiable all-reduce (sum): the soft Dice's pooled sums over all processes.

    Forward: the sum over processes. Backward: the gradient of a sum reaching
    every process is the sum of the processes' gradients, i.e. another
    all-reduce. (torch.distributed.nn.functional.all_reduce does the same but is
    deprecated; this uses only the stable dist.all_reduce.)
    """
    return _global_sum_function().apply(t)


@functools.lru_cache(maxsize=1)
def _global_sum_function():
    import torch
    import torch.distributed as dist

    class GlobalSum(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            x = x.clone()
            dist.all_reduce(x)
            return x

        @staticmethod
        def backward(ctx, grad):
            grad = grad.clone()
            dist.all_reduce(grad)
            return grad

    return GlobalSum


def init_distributed(device_name: str = "auto") -> DistContext:
    """A world of one, or the process group torchrun describes in the environment."""
    import torch

    from .device import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=resolve_device(device_name))
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise InputError("--device cuda was asked for but no CUDA GPU is available")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    elif device_name in ("auto", "cpu"):
        device = torch.device("cpu")
    else:
        raise InputError(f"--device must be auto, cpu or cuda, not {device_name!r}")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(rank, world, local, device)


def shutdown_distributed(ctx: DistContext) -> None:
    if ctx.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------- checkpoints


def checkpoint_path(output: Path, epoch: int) -> Path:
    return output / CHECKPOINT_DIR / f"epoch_{epoch:04d}.safetensors"


def list_checkpoints(output: Path) -> list[tuple[int, Path]]:
    folder = output / CHECKPOINT_DIR
    found = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = _CKPT_NAME.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(path: Path, model, optimizer, *, epoch: int, step: int, digest: str, base: dict,
                    scaler=None) -> Path:
    """Trainable tensors + AdamW state as safetensors, position, hyper-parameters and the fp16
    GradScaler's state (``scaler``, if any) as JSON; atomic."""
    from safetensors.torch import save

    from .atomic import atomic_write

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    tensors = {f"model.{n}": t.detach().cpu().contiguous().clone() for n, t in model.trainable_state_dict().items()}
    state = optimizer.state_dict()
    extra_state: dict[str, dict] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if hasattr(value, "detach"):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous().clone()
            else:
                extra_state.setdefault(str(index), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    meta = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "epoch": epoch, "step": step,
            "config_digest": digest, "base_checkpoint": base, "parameters": names, "param_groups": groups,
            "extra_state": extra_state, "grad_scaler": scaler.state_dict() if scaler is not None else None}
    data = save(tensors, metadata={"hfsam_checkpoint": json.dumps(meta)})
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda fh: fh.write(data), overwrite=True)


class DamagedCheckpoint(InputError):
    """A checkpoint file that cannot be read (resume then falls back to the one before)."""


def load_checkpoint(path: Path, model, optimizer, *, digest: str, base: dict, scaler=None) -> dict:
    """Restore model, optimizer (and the fp16 ``scaler``) from ``path``; returns its position {"epoch", "step"}.

    Raises DamagedCheckpoint for an unreadable file, InputError for a checkpoint
    of another run (other configuration, base or model).
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = json.loads((fh.metadata() or {})["hfsam_checkpoint"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open is no dict
    except Exception as exc:  # noqa: BLE001 - any failure means: not a usable checkpoint
        detail = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DamagedCheckpoint(f"{path} is not a readable training checkpoint ({detail})") from None
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version") != CHECKPOINT_VERSION:
        raise DamagedCheckpoint(f"{path} is not an hfsam train checkpoint of version {CHECKPOINT_VERSION}")
    if meta.get("config_digest") != digest:
        raise InputError(f"{path} belongs to another configuration than {CONFIG_FILE}; "
                         "do not mix run folders (start a new --output)")
    if (meta.get("base_checkpoint") or {}).get("sha256") != base.get("sha256"):
        raise InputError(f"{path} was trained on base {meta.get('base_checkpoint')}, not on {base}; "
                         "pass the same --checkpoint file as the first run")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if meta["parameters"] != names:
        raise InputError(f"{path} holds other trainable tensors than this model; it is from another build")
    model.load_trainable_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in meta.get("extra_state", {}).items():
        state.setdefault(int(index), {}).update(values)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})  # moves the moments to the params' device
    if scaler is not None and meta.get("grad_scaler"):
        scaler.load_state_dict(meta["grad_scaler"])
    return {"epoch": int(meta["epoch"]), "step": int(meta["step"])}


# --------------------------------------------------------------------------- the run


@dataclass
class RunResult:
    output: str
    adapter: str | None
    epochs: int
    steps: int
    resumed_from_epoch: int | None
    n_slices: int
    world_size: int
    global_batch: int
    final_loss: float
    seconds: float
    losses: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d.pop("losses")
        return d


def _prepare_folder(cfg: DatasetTrainConfig | None, output: Path, *, resume: bool, world: int, library,
                    progress: Progress) -> None:
    """Rank 0: check everything, draw the slices, then write config.json and the list (nothing writes first)."""
    from .classes import resolve_classes
    from .datasets import write_list
    from .library import ModelLibrary
    from .loading import resolve_checkpoint
    from .volume import write_json

    if resume:
        saved = load_config(output)
        if saved.world_size != world:
            raise InputError(f"this run was trained with {saved.world_size} process(es) (global batch "
                             f"{saved.batch_size}); resume it with the same number "
                             f"(torchrun --nproc_per_node {saved.world_size})")
        if not (output / SELECTED_FILE).is_file():
            raise InputError(f"{output / SELECTED_FILE} is missing; the run folder is incomplete")
        return
    if cfg is None:
        raise InputError("give the dataset to train on (--dataset, --root), or --resume an existing run")
    if (output / CONFIG_FILE).exists():
        raise InputError(f"{output} already holds a training run; continue it with --resume or choose a new --output")
    if output.exists() and not output.is_dir():
        raise InputError(f"{output} is a file; --output must be a folder")
    # Fail before writing anything on what would fail later: the base checkpoint, the classes, the draw.
    if cfg.batch_size % world:
        raise InputError(f"the global batch {cfg.batch_size} does not split evenly over {world} processes; "
                         f"pass a --batch-size that is a multiple of {world} (the authors': 16)")
    resolve_checkpoint(cfg.checkpoint, cfg.backbone, library if library is not None else ModelLibrary())
    resolve_classes(cfg.classes)
    cfg = dataclasses.replace(cfg, world_size=world)
    reader = open_reader(cfg)
    selected = draw_slices(cfg, reader)
    missing = reader.missing_slices(selected)
    if missing:
        raise InputError(f"{len(missing)} of the {len(selected)} training slices are not in {cfg.root} (first: "
                         f"{missing[0]}); check --root and the list")
    if cfg.train_list_sha256 == AUTHORS_SYNAPSE_LIST_SHA256:
        progress.log("--train-list is the authors' list (HF-SAM's lists_Synapse/train.txt = H-SAM's train_220.txt)")
    if len(selected) < cfg.batch_size:
        progress.warn(f"only {len(selected)} training slice(s) for a global batch of {cfg.batch_size}")
    output.mkdir(parents=True, exist_ok=True)
    write_list(selected, output / SELECTED_FILE, overwrite=True)
    write_json(cfg.as_dict(), output / CONFIG_FILE)
    progress.log(f"training on {len(selected)} slice(s) of {cfg.dataset} ({output / SELECTED_FILE})")


def train_on_dataset(cfg: DatasetTrainConfig | None, output: str | os.PathLike, *, resume: bool = False,
                     device: str = "auto", num_workers: int = 0, library=None,
                     progress: Progress | None = None) -> RunResult:
    """Train (or, with ``resume``, continue) the run in ``output``; see the module docstring.

    Under torchrun every process calls this; rank 0 alone writes files and
    reports progress. Returns the run's summary (on every rank).
    """
    progress = progress or Progress("none")
    output = Path(output).expanduser().resolve()
    ctx = init_distributed(device)
    try:
        report = progress if ctx.is_main else Progress("none", err=progress.err)
        failed: BaseException | None = None
        if ctx.is_main:
            try:
                _prepare_folder(cfg, output, resume=resume, world=ctx.world, library=library, progress=progress)
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
                failed = exc
        if ctx.all_max(1.0 if failed else 0.0):
            if failed is not None:
                raise failed
            raise InputError("the run folder could not be prepared (see the first process's message)")
        return _train(load_config(output), output, ctx, num_workers=num_workers, library=library,
                      progress=report, cancel=progress, resumed=resume)
    finally:
        shutdown_distributed(ctx)


def _load_base_model(cfg: DatasetTrainConfig, library, progress: Progress):
    from .loading import load_model

    lm = load_model(checkpoint=cfg.checkpoint, backbone=cfg.backbone, img_size=cfg.img_size, rank=cfg.rank,
                    fusion=cfg.fusion, pixel_norm=cfg.pixel_norm, classes=cfg.classes, library=library,
                    progress=progress)
    if lm.base.get("sha256"):
        progress.log(f"base: {lm.base['name']} (sha256 {lm.base['sha256'][:12]}...)")
    values = [c["value"] for c in lm.classes]
    if values != list(range(1, len(values) + 1)):
        raise InputError(f"dataset training needs classes numbered 1..K in label order, not {values}")
    return lm


def _train(cfg: DatasetTrainConfig, output: Path, ctx: DistContext, *, num_workers: int, library,
           progress: Progress, cancel: Progress, resumed: bool) -> RunResult:
    from torch.utils.data import DataLoader, DistributedSampler

    from .datasets import read_list
    from .device import is_out_of_memory, resolve_precision
    from .finetune import grad_scaler, make_optimizer, train_step

    device = ctx.device
    dtype = resolve_precision(cfg.precision, device)
    per_process = cfg.batch_size // ctx.world
    selected = read_list(output / SELECTED_FILE)
    reader = open_reader(cfg)
    if hasattr(reader, "preload"):
        reader.preload(selected)
    lm = _load_base_model(cfg, library, progress)
    model = lm.model.to(device)
    num_classes = len(lm.classes)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    scaler = grad_scaler(dtype, device)

    start_epoch, step, resumed_from = 0, 0, None
    if resumed:
        for _, path in reversed(list_checkpoints(output)):
            try:
                position = load_checkpoint(path, model, optimizer, digest=cfg.digest(), base=lm.base, scaler=scaler)
            except DamagedCheckpoint as exc:  # e.g. truncated by a copy; the one before is as good
                progress.warn(f"skipping checkpoint {path.name}: {exc}")
                continue
            start_epoch, step, resumed_from = position["epoch"], position["step"], position["epoch"]
            progress.log(f"resuming from {path.name} (epoch {start_epoch}, step {step})")
            break
        else:
            progress.log("no checkpoint yet: starting from the beginning")

    dataset = _torch_dataset_class()(reader, selected)
    sampler = DistributedSampler(dataset, num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(dataset, batch_size=per_process, sampler=sampler, num_workers=num_workers,
                        collate_fn=collate_slices, persistent_workers=num_workers > 0)
    steps_per_epoch = len(loader)
    total = cfg.epochs * steps_per_epoch
    if cfg.warmup >= total:
        progress.warn(f"the warm-up ({cfg.warmup} steps) is as long as the whole run ({total} steps): "
                      "the learning rate never reaches its base value; lower --warmup")
    train_model = model
    if ctx.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[ctx.local_rank] if device.type == "cuda" else None)
    reduce = global_sum if ctx.world > 1 else None

    progress.log(f"{len(selected)} slices, {ctx.world} process(es) x batch {per_process} = global batch "
                 f"{cfg.batch_size}, {steps_per_epoch} steps/epoch, {cfg.epochs} epochs ({total} steps), "
                 f"lr {cfg.lr:g} ({cfg.lr_schedule} schedule), augmentation {cfg.augment}, pixel normalisation "
                 f"{model.spec.pixel_norm}, device {device}, {str(dtype).replace('torch.', '')}"
                 f"{' with loss scaling' if scaler is not None else ''}")
    losses: list[float] = []
    start = time.monotonic()
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        train_model.train()
        epoch_start = time.monotonic()
        for batch in loader:
            if ctx.all_max(1.0 if cancel.cancelled else 0.0):  # every process stops at the same step
                raise Cancelled("training cancelled; the last checkpoint is kept (continue with --resume)")
            x, y = to_model_batch(batch, cfg.img_size, device)
            top = int(y.max())
            if top > num_classes:
                raise InputError(f"a training slice holds label {top} but the model has {num_classes} classes; "
                                 "check --classes")
            if cfg.augment != "none":
                x, y = augment_samples(cfg.augment, x, y, [sample_seed(cfg.seed, epoch, i) for i, _, _ in batch],
                                       [image.shape[-2:] for _, image, _ in batch])
            lr = cfg.lr * lr_factor_for(cfg.lr_schedule, step, total, cfg.warmup)
            try:
                loss = ctx.mean(train_step(train_model, optimizer, x, y, lr=lr, precision=dtype, loss_reduce=reduce,
                                           scaler=scaler))
            except RuntimeError as exc:
                if not is_out_of_memory(exc):
                    raise
                raise HFSAMError(f"out of memory at {per_process} slices of {cfg.img_size} px per process on "
                                 f"{device}: spread the global batch over more GPUs (torchrun --nproc_per_node N) "
                                 "or lower --batch-size (then the run differs from the authors' 16)") from None
            if not math.isfinite(loss):
                raise InputError(f"training diverged: the loss became {loss} at step {step + 1}; try a lower --lr")
            step += 1
            losses.append(loss)
            progress.progress("train", step, total, epoch=epoch + 1, loss=round(loss, 4), lr=lr)
        done = epoch + 1
        progress.metric(epoch=done, step=step, loss=round(float(np.mean(losses[-steps_per_epoch:])), 5),
                        lr=lr, epoch_seconds=round(time.monotonic() - epoch_start, 2))
        if done % cfg.save_every == 0 or done == cfg.epochs:
            if ctx.is_main:
                path = save_checkpoint(checkpoint_path(output, done), model, optimizer, epoch=done, step=step,
                                       digest=cfg.digest(), base=lm.base, scaler=scaler)
                progress.emit("checkpoint", epoch=done, step=step, path=str(path))
                progress.log(f"checkpoint {path.name} (epoch {done}/{cfg.epochs})")
            ctx.barrier()

    seconds = round(time.monotonic() - start, 2)
    final_loss = float(np.mean(losses[-10:])) if losses else float("nan")
    adapter = None
    if ctx.is_main:
        adapter = str(_save_final_adapter(cfg, output, model, lm, preset=reader.intensity_preset, step=step,
                                          final_loss=final_loss, seconds=seconds, n_slices=len(selected),
                                          world=ctx.world))
        progress.log(f"wrote {adapter}")
    ctx.barrier()
    return RunResult(str(output), adapter, cfg.epochs, step, resumed_from, len(selected), ctx.world,
                     cfg.batch_size, final_loss, seconds, losses)


def _save_final_adapter(cfg: DatasetTrainConfig, output: Path, model, lm, *, preset: str, step: int,
                        final_loss: float, seconds: float, n_slices: int, world: int) -> Path:
    from .adapters import save_adapter

    regime = ("the --train-list" if cfg.train_list is not None
              else f"{cfg.fraction:g} of the slices" if cfg.fraction is not None
              else f"{cfg.patients} patients" if cfg.patients is not None else "all listed slices")
    spec = {k: v for k, v in model.spec.as_dict().items() if k != "num_classes"}
    metadata = {
        "name": cfg.name or output.name,
        **spec,
        "base_checkpoint": lm.base,
        "classes": lm.classes,
        "intensity_preset": preset,
        "axis": cfg.axis,
        "training": {"image": cfg.root, "slices": [], "heldout_slices": [], "steps": step, "seed": cfg.seed,
                     "batch_size": cfg.batch_size, "lr": cfg.lr, "minutes": None, "started_from": None},
        "metrics": {"final_loss": final_loss, "seconds": seconds},
        "description": cfg.description or f"HF-SAM trained on {cfg.dataset} ({regime}, {n_slices} slices, "
                                          f"{cfg.epochs} epochs, preset {cfg.preset})",
        "extra": {"dataset_training": {"dataset": cfg.dataset, "selected_list": SELECTED_FILE, "n_slices": n_slices,
                                       "world_size": world, "config": cfg.as_dict()}},
        "hfsam_version": cfg.hfsam_version,
    }
    return save_adapter(output / ADAPTER_FILE, model.trainable_state_dict(), metadata, overwrite=True)
