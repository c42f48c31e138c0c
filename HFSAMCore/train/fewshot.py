"""Few-shot training of an HF-SAM adapter on the labeled slices of one volume.

docs/design.md gives the recipe: loss 0.1 cross-entropy + 0.9 soft Dice on the H/4
logits against nearest-resized labels; AdamW (0.9, 0.999, weight decay 0.1),
base lr 0.0025, linear warm-up then poly(0.9) decay; augmentation with H-SAM's
three transforms (rotation within +-20 deg, random crop resized back, elastic),
labels always nearest. No flips: left and right kidney are different classes.
The few-shot default (``augment`` below) draws the three independently and
milder than H-SAM (crop by area, no shear); dataset training's paper presets use
H-SAM's exact sampling instead (augmentation.py, recipe "hsam").

The training slices are small (N <= a few dozen at model resolution), so they are
prepared once as tensors on the device and augmented there batch by batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InputError, OutOfMemory
from ..evaluate.metrics import dice
from ..model.inference import logits_to_labels
from ..model.lora import is_lora_parameter
from ..model.registry import get_backbone_info
from ..runtime.device import (
    autocast,
    is_out_of_memory,
    peak_memory_mb,
    reset_peak_memory,
)
from ..runtime.progress import Progress
from .augmentation import augment
from .feature_cache import FeatureCache
from .losses import hfsam_loss
from .optim import grad_scaler, make_optimizer, train_step
from .schedule import LIVE_STEP_COST, default_warmup, lr_factor
from .training_set import TrainingSet


@dataclass
class TrainConfig:
    steps: int | None = 300
    minutes: float | None = None
    batch_size: int = 4
    lr: float = 0.0025
    weight_decay: float = 0.1
    warmup: int | None = None  # None: 10 % of the run, at most 250 steps
    seed: int | None = 0
    holdout: int | None = None  # None: 1 held-out slice when >= 5 are labeled
    eval_every: int = 25
    precision: torch.dtype = torch.float32
    augment: bool = True
    # The first `cached_steps` steps train everything but LoRA on encoder features computed once,
    # for `pool` augmented copies of each slice (copy 0 unaugmented). Exact, not an approximation:
    # while LoRA does not train, the encoder does not change. The encoder is most of a step's
    # cost, so these steps are about 5x cheaper on a CPU. LoRA trains in the steps after them.
    cached_steps: int = 0
    pool: int = 8
    # The probability that a training sample's low-level feature is left out (hfsam.LowLevelDropout);
    # a model without one (the U-Net baseline) ignores it. Off by default: within the seed noise on
    # the sample CT, better at N = 3, worse at N = 10 (benchmarks/RESULTS.md, "Low-level dropout").
    low_level_dropout: float = 0.0
    # Each step's gradient (all trainable parameters together) is scaled down to at most this norm;
    # None: not clipped. The first steps' gradients are 10-100x the later ones'.
    max_grad_norm: float | None = None


@dataclass
class TrainReport:
    slices: list[int]
    heldout_slices: list[int]
    steps: int = 0
    cached_steps: int = 0  # of `steps`, those on cached encoder features (no LoRA)
    seconds: float = 0.0
    final_loss: float = float("nan")
    heldout_dice: float | None = None
    batch_size: int = 0
    low_level_dropout: float = 0.0  # as applied: 0 for a model without a low-level branch
    peak_memory_mb: float = 0.0
    losses: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d.pop("losses")
        return d


def recipe_config(
    backbone: str, *, steps: int | None = None, minutes: float | None = None, cached_steps: int | None = None, **kwargs
) -> TrainConfig:
    """The backbone's few-shot recipe (registry.FewShotRecipe) with what the user chose.

    ``steps`` given: the recipe's share of cached steps is kept (unless ``cached_steps`` is given);
    a time budget alone: the recipe's cached steps first, then LoRA for the rest of the time.
    """
    recipe = get_backbone_info(backbone).recipe
    if steps is None and minutes is None:
        steps = recipe.steps
    if cached_steps is None:
        cached_steps = recipe.cached_steps if steps is None else round(steps * recipe.cached_steps / recipe.steps)
    if cached_steps < 0:
        raise InputError(f"--cached-steps must be 0 or more, not {cached_steps}")
    kwargs.setdefault("max_grad_norm", recipe.max_grad_norm)
    return TrainConfig(steps=steps, minutes=minutes, cached_steps=cached_steps, **kwargs)


# -- evaluation on held-out slices --------------------------------------------
@torch.no_grad()
def slice_dice(model, images: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype) -> float:
    """Mean foreground Dice over the classes present in the reference slices."""
    was_training = model.training
    model.eval()
    with autocast(images.device, dtype):
        logits = model(images)
    pred = logits_to_labels(logits, (labels.shape[-2], labels.shape[-1]))
    model.train(was_training)
    ref, got = labels.cpu().numpy(), pred.cpu().numpy()
    scores = [dice(ref == c, got == c) for c in np.unique(ref).tolist() if c != 0]
    return float(np.mean(scores)) if scores else float("nan")


# -- after the last update ----------------------------------------------------
@torch.no_grad()
def check_trained(model, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, batch_size: int = 4) -> None:
    """The loop checks each step's loss, which is computed BEFORE that step's update: the last
    update is checked here, on the weights themselves and on the loss they give on (up to 4 of)
    the training slices (one batch). A diverged model must never be saved as an adapter."""
    broken = [n for n, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
    loss = float("nan")
    if not broken:
        was_training = model.training
        model.eval()
        with autocast(images.device, cfg.precision):
            logits = model(images[:batch_size])
        model.train(was_training)
        loss = float(hfsam_loss(logits, labels[:batch_size]))
    if broken or not math.isfinite(loss):
        what = f"{len(broken)} weight tensor(s) are NaN or infinite" if broken else f"the loss is {loss}"
        raise InputError(f"training diverged: after the last step {what}; try a lower --lr (this run: {cfg.lr:g})")


# -- the loop -----------------------------------------------------------------
def split_holdout(n: int, holdout: int | None) -> tuple[list[int], list[int]]:
    """Positions (in the training set) to train on and to hold out: the middle slice(s)."""
    k = (1 if n >= 5 else 0) if holdout is None else holdout
    if k < 0 or k >= n:
        raise InputError(f"--holdout {k} must leave at least one of the {n} labeled slices for training")
    held = sorted({(i + 1) * (n - 1) // (k + 1) for i in range(k)}) if k else []
    return [i for i in range(n) if i not in held], held


def train(model, data: TrainingSet, cfg: TrainConfig, progress: Progress | None = None) -> TrainReport:
    """Train the trainable parameters of ``model`` in place; returns the report."""
    progress = progress or Progress("none")
    if cfg.steps is None and cfg.minutes is None:
        raise InputError("give a step budget (--steps N) or a time budget (--minutes M)")
    if cfg.steps is not None and cfg.steps < 1:
        raise InputError(f"--steps must be at least 1, not {cfg.steps}")
    if cfg.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, not {cfg.batch_size}")
    # clip_grad_norm_ would reverse (< 0), zero (0) or poison (NaN) the gradient without a word
    if cfg.max_grad_norm is not None and not 0 < cfg.max_grad_norm < float("inf"):
        raise InputError(f"max_grad_norm must be a norm above 0, or None (not clipped), not {cfg.max_grad_norm}")
    device = data.images.device
    train_idx, held_idx = split_holdout(len(data.slices), cfg.holdout)
    report = TrainReport(slices=[data.slices[i] for i in train_idx], heldout_slices=[data.slices[i] for i in held_idx])
    gen = torch.Generator().manual_seed(cfg.seed if cfg.seed is not None else int(time.time()))
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    scaler = grad_scaler(cfg.precision, device)

    total = cfg.steps if cfg.steps is not None else 10**9  # refined from the first steps' timing
    warmup = cfg.warmup or default_warmup(total if cfg.steps is not None else 100)
    batch_size = cfg.batch_size
    train_images, train_labels = data.images[train_idx], data.labels[train_idx]
    held_images, held_labels = data.images[held_idx], data.labels[held_idx]
    model.train().to(device)
    # HF-SAM's low-level dropout; the U-Net baseline has none, nor does HF-SAM without a low-level branch.
    dropout = getattr(model, "low_level_dropout", None) if getattr(model, "taps", ()) else None
    if dropout is not None:
        dropout.p = report.low_level_dropout = cfg.low_level_dropout
        dropout.generator = gen
    elif cfg.low_level_dropout:
        progress.warn(
            f"--low-level-dropout {cfg.low_level_dropout:g} has no effect: this model has no low-level "
            "branch (--fusion none); the adapter records 0"
        )
    reset_peak_memory(device)
    start = time.monotonic()
    cached_steps = min(cfg.cached_steps, total)
    cache = None
    lora = [p for n, p in model.named_parameters() if p.requires_grad and is_lora_parameter(n)]
    if cached_steps:
        after = "LoRA trains after them" if cached_steps < total else "LoRA does not train in this run"
        progress.log(
            f"encoding {len(train_idx)} slice(s) x {cfg.pool} augmented copies once for the first "
            f"{cached_steps} steps ({after})"
        )
        cache = FeatureCache.build(
            model,
            train_images,
            train_labels,
            copies=cfg.pool,
            augment=augment if cfg.augment else None,
            gen=gen,
            precision=cfg.precision,
            check_cancelled=progress.check_cancelled,
        )
        for p in lora:
            p.requires_grad_(False)  # AdamW skips them (no gradient) until the cache is done
    phase_start, live_steps = time.monotonic(), 0  # the phase's start: the cached phase's, then the live one's
    step = 0
    try:
        while step < total:
            progress.check_cancelled()
            if cache is not None and step >= cached_steps:
                cache = None
                for p in lora:
                    p.requires_grad_(True)
                phase_start = time.monotonic()
            elapsed = time.monotonic() - start
            if cfg.minutes is not None:
                if elapsed >= cfg.minutes * 60:
                    break
                left = cfg.minutes * 60 - elapsed
                budget = None
                if live_steps == 3 and cache is None:  # steps/second known: fix the schedule's length
                    budget = step + int(left / ((time.monotonic() - phase_start) / 3))
                elif step == 3 and cache is not None:  # a first estimate, corrected after 3 live steps
                    per = (time.monotonic() - phase_start) / 3
                    cached_left = (cached_steps - step) * per
                    budget = (
                        step + int(left / per)
                        if left <= cached_left
                        else cached_steps + int((left - cached_left) / (per * LIVE_STEP_COST))
                    )
                if budget is not None:
                    budget = max(step + 1, budget)
                    total = budget if cfg.steps is None else min(cfg.steps, budget)
                    warmup = cfg.warmup or default_warmup(total)
            lr = cfg.lr * lr_factor(step, total if total < 10**9 else 100, warmup)
            try:
                if cache is not None:
                    pick = torch.randint(len(cache), (batch_size,), generator=gen).to(device)
                    features, y = cache.batch(pick)
                    loss = train_step(
                        model.decode_features,
                        optimizer,
                        features,
                        y,
                        lr=lr,
                        precision=cfg.precision,
                        scaler=scaler,
                        device=device,
                        max_grad_norm=cfg.max_grad_norm,
                    )
                else:
                    pick = torch.randint(len(train_idx), (batch_size,), generator=gen).to(device)
                    x, y = train_images[pick], train_labels[pick]
                    if cfg.augment:
                        x, y = augment(x, y, gen)
                    loss = train_step(
                        model,
                        optimizer,
                        x,
                        y,
                        lr=lr,
                        precision=cfg.precision,
                        scaler=scaler,
                        max_grad_norm=cfg.max_grad_norm,
                    )
                    live_steps += 1
            except (RuntimeError, MemoryError) as exc:
                if not is_out_of_memory(exc):
                    raise
                if batch_size == 1:
                    raise OutOfMemory(device.type) from exc
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:  # it may have unscaled the failed step's gradient (to clip it) and
                    # would refuse to unscale again before an update: a fresh one at the scale it had reached
                    scaler = grad_scaler(cfg.precision, device, init_scale=scaler.get_scale())
                failed, batch_size = batch_size, max(1, batch_size // 2)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                progress.warn(f"out of memory at batch size {failed}: retrying with batch size {batch_size}")
                continue
            step += 1
            value = float(loss.detach())
            if not math.isfinite(value):
                raise InputError(
                    f"training diverged: the loss became {value} at step {step}; try a lower --lr "
                    f"(this run: {cfg.lr:g})"
                )
            report.losses.append(value)
            shown_total = total if total < 10**9 else step + 1
            progress.progress("finetune", step, shown_total, loss=round(value, 4))
            metrics = {"step": step, "loss": round(value, 5), "lr": optimizer.param_groups[0]["lr"]}
            if held_idx and (step % cfg.eval_every == 0 or step == total):
                metrics["heldout_dice"] = round(slice_dice(model, held_images, held_labels, cfg.precision), 4)
                report.heldout_dice = metrics["heldout_dice"]
            if step % cfg.eval_every == 0 or step == total:
                progress.metric(**metrics)
    finally:
        for p in lora:
            p.requires_grad_(True)
        if dropout is not None:
            dropout.p, dropout.generator = 0.0, None  # only this run's steps drop; a later run sets its own

    if step == 0:
        raise InputError(
            f"the time budget (--minutes {cfg.minutes:g}) ended before the first training step: "
            "give more time, or --steps"
        )
    check_trained(model, train_images, train_labels, cfg, batch_size)
    report.steps = step
    report.cached_steps = min(step, cached_steps)
    report.seconds = round(time.monotonic() - start, 2)
    report.final_loss = float(np.mean(report.losses[-10:])) if report.losses else float("nan")
    if held_idx:
        report.heldout_dice = round(slice_dice(model, held_images, held_labels, cfg.precision), 4)
    report.batch_size = batch_size
    report.peak_memory_mb = round(peak_memory_mb(device), 1)
    model.eval()
    return report
