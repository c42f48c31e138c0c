"""Few-shot training of an HF-SAM adapter on the labeled slices of one volume.

DESIGN.md fixes the recipe: loss 0.1 cross-entropy + 0.9 soft Dice on the H/4
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
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch
from torch.nn import functional as F

from .device import autocast, is_out_of_memory, peak_memory_mb, reset_peak_memory
from .errors import InputError, OutOfMemory
from .feature_cache import FeatureCache
from .model.lora import is_lora_parameter
from .model.registry import get_backbone_info
from .progress import Progress
from .segment import logits_to_labels, to_model_input
from .slices import SliceView, choose_preset, choose_training_slices, normalize, volume_stats
from .volume import labels_onto_image

CE_WEIGHT, DICE_WEIGHT = 0.1, 0.9
ROTATION_DEG = 20.0
CROP_AREA = (0.2, 0.8)  # area kept by a random crop, resized back
P_ROTATE, P_CROP, P_ELASTIC = 0.5, 0.3, 0.3
LIVE_STEP_COST = 5  # an end-to-end step's cost in cached steps (LiteMedSAM on a CPU), until measured


@dataclass
class TrainingSet:
    """Slices ready for the model: images [N,1,S,S] in [0,1], labels [N,S,S] (long)."""

    images: torch.Tensor
    labels: torch.Tensor
    slices: list[int]  # indices along the image's own slice axis (what the user sees)
    preset: str
    num_classes: int


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
    peak_memory_mb: float = 0.0
    losses: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d.pop("losses")
        return d


def prepare_training_set(
    image: sitk.Image,
    labels: sitk.Image,
    *,
    num_classes: int,
    img_size: int,
    slices: list[int] | str = "auto",
    axis: str = "axial",
    preset: str = "auto",
    device: torch.device | str = "cpu",
    label_values: list[int] | None = None,
) -> TrainingSet:
    """Bring LABELS onto IMAGE's grid by physical position and take the chosen slices.

    ``label_values``: the label-map value that paints each class, in class order (see
    classes.classes_for_labels); None: class k is label value k.
    """
    device = torch.device(device)
    labels = labels_onto_image(labels, image)
    view = SliceView.from_image(image, axis)
    array = sitk.GetArrayViewFromImage(image)
    image_stack = view.to_slices(array)
    label_stack = view.to_slices(sitk.GetArrayViewFromImage(labels))
    label_stack = _classes_of(label_stack, num_classes, label_values)
    chosen = choose_training_slices(view, label_stack, slices)
    preset = choose_preset(image) if preset == "auto" else preset
    stats = volume_stats(array, preset)
    images = to_model_input(normalize(image_stack[chosen], preset, stats=stats), img_size, device)
    lab = torch.from_numpy(np.ascontiguousarray(label_stack[chosen], dtype=np.int64)).to(device)
    lab = resize_labels(lab, (img_size, img_size))
    return TrainingSet(images, lab, [view.original_index(s) for s in chosen], preset, num_classes)


def resize_labels(labels: torch.Tensor, size) -> torch.Tensor:
    """[B,h,w] integer labels -> [B,*size], nearest neighbour on the same pixel grid as the images.

    torch's "nearest" picks source pixel floor(i * scale), a grid shifted by half a source
    pixel against the bilinear resize of the images (align_corners=False, pixel centres at
    (i + 0.5) * scale - 0.5): at 101 -> 256 px the labels would sit 0.75 px off the anatomy.
    "nearest-exact" takes floor((i + 0.5) * scale), the source pixel whose area holds the centre.
    """
    out = F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest-exact")
    return out[:, 0].to(labels.dtype)


def _classes_of(label_stack: np.ndarray, num_classes: int, label_values: list[int] | None) -> np.ndarray:
    """Label values -> class indices 1..K (0 stays background); refuses values no class has."""
    top = int(label_stack.max()) if label_stack.size else 0
    if label_values is None:
        if top > num_classes:
            raise InputError(f"the labels contain class {top} but only {num_classes} class name(s) were given; "
                             "pass one name per label value with --classes")
        return label_stack
    lut = np.zeros(max(top, max(label_values)) + 1, dtype=np.uint8)
    lut[list(label_values)] = np.arange(1, len(label_values) + 1)
    present = np.flatnonzero(np.bincount(label_stack.ravel(), minlength=1)) if top < 1 << 16 else np.unique(label_stack)
    unknown = [int(v) for v in present if v and v not in set(label_values)]
    if unknown:
        raise InputError(f"the labels contain value {unknown[-1]}, which no class paints; pass one name per label "
                         "value with --classes")
    return lut[label_stack]


# -- loss ---------------------------------------------------------------------
def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5,
                   reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """1 - soft Dice of the softmax, per class over the batch, averaged over all classes (background too).

    The Dice pools the whole batch (as H-SAM's DiceLoss does), so it is not a mean
    of per-sample terms. ``reduce`` sums the per-class pooled sums over the
    processes of a distributed run (a differentiable all-reduce); the loss is then
    the Dice of the GLOBAL batch, which is what one process with the whole batch
    (or nn.DataParallel, as the authors trained) computes.
    """
    probs = logits.softmax(dim=1)
    onehot = F.one_hot(target, probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    sums = torch.stack(((probs * onehot).sum(dims), (probs * probs).sum(dims) + (onehot * onehot).sum(dims)))
    if reduce is not None:
        sums = reduce(sums)
    inter, denom = sums[0], sums[1]
    return (1 - (2 * inter + smooth) / (denom + smooth)).mean()


def hfsam_loss(logits: torch.Tensor, target: torch.Tensor,
               reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """0.1 CE + 0.9 soft Dice on the H/4 logits; target is resized to them (nearest).

    ``reduce``: see ``soft_dice_loss`` (distributed training only). The CE is a
    per-pixel mean, which DDP's gradient averaging already makes global when
    every process holds a batch of the same size.
    """
    logits = logits.float()
    if target.shape[-2:] != logits.shape[-2:]:
        target = resize_labels(target, logits.shape[-2:])
    return CE_WEIGHT * F.cross_entropy(logits, target) + DICE_WEIGHT * soft_dice_loss(logits, target, reduce=reduce)


def recipe_config(backbone: str, *, steps: int | None = None, minutes: float | None = None,
                  cached_steps: int | None = None, **kwargs) -> TrainConfig:
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
    return TrainConfig(steps=steps, minutes=minutes, cached_steps=cached_steps, **kwargs)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1, then poly(0.9) decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, 1 - (step - warmup) / max(1, total - warmup)) ** 0.9


def default_warmup(total: int) -> int:
    return max(1, min(250, total // 10))


# -- one optimisation step (shared with dataset training, train_dataset.py) ----
def make_optimizer(model, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (0.9, 0.999) over the trainable parameters only, in the model's parameter order."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)


def grad_scaler(precision: torch.dtype, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 (its small range lets gradients underflow to 0 unless the loss is scaled);
    None for fp32 and bf16, which need none."""
    return torch.amp.GradScaler(torch.device(device).type) if precision == torch.float16 else None


def train_step(model, optimizer, x, y: torch.Tensor, *, lr: float, precision: torch.dtype,
               loss_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
               scaler: torch.amp.GradScaler | None = None, device: torch.device | None = None) -> torch.Tensor:
    """Set the step's learning rate, then forward, HF-SAM loss, backward, AdamW step; returns the loss.

    ``x`` [B,1|3,S,S] and ``y`` [B,S,S] are already on the device and augmented;
    ``lr`` is the base rate times ``lr_factor``. ``model`` may be wrapped in DDP.
    ``scaler`` (``grad_scaler``): scale the loss and skip steps whose gradients overflowed.
    ``x`` may also be cached encoder features for ``model`` = a callable that decodes them (then
    pass ``device``).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast(device or x.device, precision):
        logits = model(x)
    loss = hfsam_loss(logits, y, reduce=loss_reduce)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return loss.detach()


# -- augmentation -------------------------------------------------------------
def augment(images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One random affine (+ optional elastic) warp per sample; images bilinear, labels nearest.

    The few-shot recipe ("independent" in augmentation.py): rotation, crop and elastic drawn
    independently (P_ROTATE, P_CROP, P_ELASTIC), the crop keeping 20-80 % of the AREA. Milder than
    H-SAM's (augmentation.py, "hsam"), which suits a handful of slices of one patient; not measured
    against it.
    """
    b = images.shape[0]
    dev = images.device

    def rand(*shape):
        return torch.rand(*shape, generator=gen).to(dev)

    angle = torch.where(rand(b) < P_ROTATE, (rand(b) * 2 - 1) * math.radians(ROTATION_DEG), torch.zeros(b, device=dev))
    area = CROP_AREA[0] + rand(b) * (CROP_AREA[1] - CROP_AREA[0])
    side = torch.where(rand(b) < P_CROP, area.sqrt(), torch.ones(b, device=dev))
    shift = (rand(b, 2) * 2 - 1) * (1 - side)[:, None]
    cos, sin = torch.cos(angle) * side, torch.sin(angle) * side
    theta = torch.stack((torch.stack((cos, -sin, shift[:, 0]), 1), torch.stack((sin, cos, shift[:, 1]), 1)), 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    elastic = rand(b) < P_ELASTIC
    if elastic.any():
        coarse = torch.randn(b, 2, 4, 4, generator=gen).to(dev) * 0.03
        field_ = F.interpolate(coarse, size=images.shape[-2:], mode="bicubic", align_corners=False)
        grid = grid + field_.permute(0, 2, 3, 1) * elastic[:, None, None, None]
    out_img = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out_lab = F.grid_sample(labels[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out_img, out_lab[:, 0].long()


# -- evaluation on held-out slices --------------------------------------------
@torch.no_grad()
def slice_dice(model, images: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype) -> float:
    """Mean foreground Dice over the classes present in the reference slices."""
    was_training = model.training
    model.eval()
    with autocast(images.device, dtype):
        logits = model(images)
    pred = logits_to_labels(logits, labels.shape[-2:])
    model.train(was_training)
    scores = []
    for c in labels.unique().tolist():
        if c == 0:
            continue
        r, p = labels == c, pred == c
        scores.append(2 * (r & p).sum().item() / max(1, r.sum().item() + p.sum().item()))
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
    reset_peak_memory(device)
    start = time.monotonic()
    cached_steps = min(cfg.cached_steps, total)
    cache = None
    lora = [p for n, p in model.named_parameters() if p.requires_grad and is_lora_parameter(n)]
    if cached_steps:
        after = "LoRA trains after them" if cached_steps < total else "LoRA does not train in this run"
        progress.log(f"encoding {len(train_idx)} slice(s) x {cfg.pool} augmented copies once for the first "
                     f"{cached_steps} steps ({after})")
        cache = FeatureCache.build(model, train_images, train_labels, copies=cfg.pool,
                                   augment=augment if cfg.augment else None, gen=gen, precision=cfg.precision,
                                   check_cancelled=progress.check_cancelled)
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
                    budget = (step + int(left / per) if left <= cached_left else
                              cached_steps + int((left - cached_left) / (per * LIVE_STEP_COST)))
                if budget is not None:
                    budget = max(step + 1, budget)
                    total = budget if cfg.steps is None else min(cfg.steps, budget)
                    warmup = cfg.warmup or default_warmup(total)
            lr = cfg.lr * lr_factor(step, total if total < 10**9 else 100, warmup)
            try:
                if cache is not None:
                    pick = torch.randint(len(cache), (batch_size,), generator=gen).to(device)
                    features, y = cache.batch(pick)
                    loss = train_step(lambda f: model.decode(*f), optimizer, features, y, lr=lr,
                                      precision=cfg.precision, scaler=scaler, device=device)
                else:
                    pick = torch.randint(len(train_idx), (batch_size,), generator=gen).to(device)
                    x, y = train_images[pick], train_labels[pick]
                    if cfg.augment:
                        x, y = augment(x, y, gen)
                    loss = train_step(model, optimizer, x, y, lr=lr, precision=cfg.precision, scaler=scaler)
                    live_steps += 1
            except (RuntimeError, MemoryError) as exc:
                if not is_out_of_memory(exc):
                    raise
                if batch_size == 1:
                    raise OutOfMemory(device.type) from exc
                optimizer.zero_grad(set_to_none=True)
                batch_size = max(1, batch_size // 2)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                progress.warn(f"out of memory at batch size {batch_size * 2}: retrying with batch size {batch_size}")
                continue
            step += 1
            value = float(loss.detach())
            if not math.isfinite(value):
                raise InputError(f"training diverged: the loss became {value} at step {step}; try a lower --lr "
                                 f"(this run: {cfg.lr:g})")
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

    if step == 0:
        raise InputError(f"the time budget (--minutes {cfg.minutes:g}) ended before the first training step: "
                         "give more time, or --steps")
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
