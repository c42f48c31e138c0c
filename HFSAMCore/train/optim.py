"""One optimisation step, shared by few-shot and dataset training: AdamW, mixed precision, the loss."""

from __future__ import annotations

import functools
from typing import Callable

import torch

from ..runtime.device import autocast
from .losses import hfsam_loss


# -- one optimisation step (shared with dataset training, dataset_training.py) ----
def make_optimizer(model, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (0.9, 0.999) over the trainable parameters only, in the model's parameter order.

    torch's fused kernel where this torch has one for the parameters' device (the CPU's came with
    torch 2.4; the extension accepts 2.1): one pass over all the tensors instead of a dozen small
    operations on each of the ~160; on a CPU that loop was about 8 % of a cached few-shot step.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    adamw = functools.partial(torch.optim.AdamW, params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    try:
        return adamw(fused=True)
    except RuntimeError:  # "fused=True requires all the params to be ... of supported devices"
        return adamw()


def grad_scaler(
    precision: torch.dtype, device: torch.device, init_scale: float = 2.0**16
) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 (its small range lets gradients underflow to 0 unless the loss is scaled);
    None for fp32 and bf16, which need none. ``init_scale``: torch's default, or the scale an earlier
    scaler had reached (see fewshot.train's retry after running out of memory)."""
    if precision != torch.float16:
        return None
    return torch.amp.GradScaler(torch.device(device).type, init_scale=init_scale)


def train_step(
    model,
    optimizer,
    x,
    y: torch.Tensor,
    *,
    lr: float,
    precision: torch.dtype,
    loss_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    device: torch.device | None = None,
    max_grad_norm: float | None = None,
) -> torch.Tensor:
    """Set the step's learning rate, then forward, HF-SAM loss, backward, AdamW step; returns the loss.

    ``x`` [B,1|3,S,S] and ``y`` [B,S,S] are already on the device and augmented;
    ``lr`` is the base rate times ``lr_factor``. ``model`` may be wrapped in DDP.
    ``scaler`` (``grad_scaler``): scale the loss and skip steps whose gradients overflowed.
    ``x`` may also be cached encoder features for ``model`` = a callable that decodes them (then
    pass ``device``). ``max_grad_norm``: scale the gradient of all the optimizer's parameters
    together down to at most this norm before the step (None: no clipping).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast(device or x.device, precision):
        logits = model(x)
    loss = hfsam_loss(logits, y, reduce=loss_reduce)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        _clip(optimizer, max_grad_norm)
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        if max_grad_norm is not None:
            scaler.unscale_(optimizer)  # clip the true gradient, not the scaled one
            _clip(optimizer, max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
    return loss.detach()


def _clip(optimizer: torch.optim.Optimizer, max_norm: float | None) -> None:
    if max_norm is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_norm)
