"""HF-SAM's loss: 0.1 cross-entropy + 0.9 soft Dice on the H/4 logits."""

from __future__ import annotations

from typing import Callable

import torch
from torch.nn import functional as F

from .training_set import resize_labels

CE_WEIGHT, DICE_WEIGHT = 0.1, 0.9


# -- loss ---------------------------------------------------------------------
def soft_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    smooth: float = 1e-5,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
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


def hfsam_loss(
    logits: torch.Tensor, target: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """0.1 CE + 0.9 soft Dice on the H/4 logits; target is resized to them (nearest).

    ``reduce``: see ``soft_dice_loss`` (distributed training only). The CE is a
    per-pixel mean, which DDP's gradient averaging already makes global when
    every process holds a batch of the same size.
    """
    logits = logits.float()
    if target.shape[-2:] != logits.shape[-2:]:
        target = resize_labels(target, logits.shape[-2:])
    return CE_WEIGHT * F.cross_entropy(logits, target) + DICE_WEIGHT * soft_dice_loss(logits, target, reduce=reduce)
