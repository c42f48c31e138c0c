"""Learning-rate schedules and the backbones' few-shot recipes."""

from __future__ import annotations

from ..errors import InputError
from .dataset_config import LR_SCHEDULES


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
        return lr_factor(step, total, warmup)
    raise InputError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, not {schedule!r}")


LIVE_STEP_COST = 5  # an end-to-end step's cost in cached steps (LiteMedSAM on a CPU), until measured


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1, then poly(0.9) decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, 1 - (step - warmup) / max(1, total - warmup)) ** 0.9


def default_warmup(total: int) -> int:
    return max(1, min(250, total // 10))
