"""Choosing the device and the precision a run computes in."""

from __future__ import annotations

import contextlib
import sys

import torch

from .errors import InputError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise InputError(f"--device must be auto, cpu or cuda[:N], not {name!r}")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA GPUs that support it, else fp16 on CUDA; fp32 on the CPU.

    CPU bf16 is offered explicitly (`--precision bf16`); the benchmark reports its
    agreement with fp32 on real data.
    """
    if name not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, not {name!r}")
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name == "fp16" and device.type == "cpu":
        raise InputError("--precision fp16 is for CUDA GPUs; on the CPU use bf16 or fp32")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on CUDA; peak resident set size of the process on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource  # POSIX only
    except ImportError:  # Windows: no peak figure without extra packages
        return float("nan")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
