"""Training HF-SAM on a whole dataset (Synapse, ACDC, NIfTI folders): the paper's regimes.

One code path for the CPU, one GPU and many GPUs: PyTorch's own
DistributedDataParallel, launched by ``torchrun`` (which sets RANK/WORLD_SIZE).
A plain ``hfsam train`` is simply a world of one process. The optimisation step
itself (loss, AdamW) is the few-shot trainer's, ``optim.train_step``; the
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

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import Cancelled, HFSAMError, InputError
from ..runtime.progress import Progress
from .checkpoints import (
    DamagedCheckpoint,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from .dataset_batches import (
    augment_samples,
    collate_slices,
    sample_seed,
    to_model_batch,
    torch_dataset_class,
)
from .dataset_config import (
    SELECTED_FILE,
    DatasetTrainConfig,
    load_config,
    open_reader,
)
from .distributed import DistContext, global_sum, init_distributed, shutdown_distributed
from .run_folder import prepare_run_folder, save_final_adapter
from .schedule import lr_factor_for


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


def train_on_dataset(
    cfg: DatasetTrainConfig | None,
    output: str | os.PathLike,
    *,
    resume: bool = False,
    device: str = "auto",
    num_workers: int = 0,
    library=None,
    progress: Progress | None = None,
) -> RunResult:
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
                prepare_run_folder(cfg, output, resume=resume, world=ctx.world, library=library, progress=progress)
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
                failed = exc
        if ctx.all_max(1.0 if failed else 0.0):
            if failed is not None:
                raise failed
            raise InputError("the run folder could not be prepared (see the first process's message)")
        return _train(
            load_config(output),
            output,
            ctx,
            num_workers=num_workers,
            library=library,
            progress=report,
            cancel=progress,
            resumed=resume,
        )
    finally:
        shutdown_distributed(ctx)


def _load_base_model(cfg: DatasetTrainConfig, library, progress: Progress):
    from ..model.loading import load_model

    lm = load_model(
        checkpoint=cfg.checkpoint,
        backbone=cfg.backbone,
        img_size=cfg.img_size,
        rank=cfg.rank,
        fusion=cfg.fusion,
        pixel_norm=cfg.pixel_norm,
        classes=cfg.classes,
        library=library,
        progress=progress,
    )
    if lm.base.get("sha256"):
        progress.log(f"base: {lm.base['name']} (sha256 {lm.base['sha256'][:12]}...)")
    values = [c["value"] for c in lm.classes]
    if values != list(range(1, len(values) + 1)):
        raise InputError(f"dataset training needs classes numbered 1..K in label order, not {values}")
    return lm


def _train(
    cfg: DatasetTrainConfig,
    output: Path,
    ctx: DistContext,
    *,
    num_workers: int,
    library,
    progress: Progress,
    cancel: Progress,
    resumed: bool,
) -> RunResult:
    from torch.utils.data import DataLoader, DistributedSampler

    from ..runtime.device import is_out_of_memory, resolve_precision
    from .dataset_lists import read_list
    from .optim import grad_scaler, make_optimizer, train_step

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

    dataset = torch_dataset_class()(reader, selected)
    sampler: DistributedSampler[int] = DistributedSampler(
        dataset, num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=cfg.seed
    )
    loader = DataLoader(
        dataset,
        batch_size=per_process,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_slices,
        persistent_workers=num_workers > 0,
    )
    steps_per_epoch = len(loader)
    total = cfg.epochs * steps_per_epoch
    if cfg.warmup >= total:
        progress.warn(
            f"the warm-up ({cfg.warmup} steps) is as long as the whole run ({total} steps): "
            "the learning rate never reaches its base value; lower --warmup"
        )
    train_model = model
    if ctx.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[ctx.local_rank] if device.type == "cuda" else None)
    reduce = global_sum if ctx.world > 1 else None

    progress.log(
        f"{len(selected)} slices, {ctx.world} process(es) x batch {per_process} = global batch "
        f"{cfg.batch_size}, {steps_per_epoch} steps/epoch, {cfg.epochs} epochs ({total} steps), "
        f"lr {cfg.lr:g} ({cfg.lr_schedule} schedule), augmentation {cfg.augment}, pixel normalisation "
        f"{model.spec.pixel_norm}, device {device}, {str(dtype).replace('torch.', '')}"
        f"{' with loss scaling' if scaler is not None else ''}"
    )
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
                raise InputError(
                    f"a training slice holds label {top} but the model has {num_classes} classes; check --classes"
                )
            if cfg.augment != "none":
                x, y = augment_samples(
                    cfg.augment,
                    x,
                    y,
                    [sample_seed(cfg.seed, epoch, i) for i, _, _ in batch],
                    [image.shape[-2:] for _, image, _ in batch],
                )
            lr = cfg.lr * lr_factor_for(cfg.lr_schedule, step, total, cfg.warmup)
            try:
                loss = ctx.mean(
                    train_step(train_model, optimizer, x, y, lr=lr, precision=dtype, loss_reduce=reduce, scaler=scaler)
                )
            except RuntimeError as exc:
                if not is_out_of_memory(exc):
                    raise
                raise HFSAMError(
                    f"out of memory at {per_process} slices of {cfg.img_size} px per process on "
                    f"{device}: spread the global batch over more GPUs (torchrun --nproc_per_node N) "
                    "or lower --batch-size (then the run differs from the authors' 16)"
                ) from None
            if not math.isfinite(loss):
                raise InputError(f"training diverged: the loss became {loss} at step {step + 1}; try a lower --lr")
            step += 1
            losses.append(loss)
            progress.progress("train", step, total, epoch=epoch + 1, loss=round(loss, 4), lr=lr)
        done = epoch + 1
        progress.metric(
            epoch=done,
            step=step,
            loss=round(float(np.mean(losses[-steps_per_epoch:])), 5),
            lr=lr,
            epoch_seconds=round(time.monotonic() - epoch_start, 2),
        )
        if done % cfg.save_every == 0 or done == cfg.epochs:
            if ctx.is_main:
                path = save_checkpoint(
                    checkpoint_path(output, done),
                    model,
                    optimizer,
                    epoch=done,
                    step=step,
                    digest=cfg.digest(),
                    base=lm.base,
                    scaler=scaler,
                )
                progress.emit("checkpoint", epoch=done, step=step, path=str(path))
                progress.log(f"checkpoint {path.name} (epoch {done}/{cfg.epochs})")
            ctx.barrier()

    seconds = round(time.monotonic() - start, 2)
    final_loss = float(np.mean(losses[-10:])) if losses else float("nan")
    adapter = None
    if ctx.is_main:
        adapter = str(
            save_final_adapter(
                cfg,
                output,
                model,
                lm,
                preset=reader.intensity_preset,
                step=step,
                final_loss=final_loss,
                seconds=seconds,
                n_slices=len(selected),
                world=ctx.world,
            )
        )
        progress.log(f"wrote {adapter}")
    ctx.barrier()
    return RunResult(
        str(output),
        adapter,
        cfg.epochs,
        step,
        resumed_from,
        len(selected),
        ctx.world,
        cfg.batch_size,
        final_loss,
        seconds,
        losses,
    )
