"""Choosing the device and the precision a run computes in."""

from __future__ import annotations

import contextlib
import functools
import sys

import torch

from ..errors import InputError
from ..errors import is_out_of_memory as _is_out_of_memory
from ..model.registry import PRECISIONS


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise InputError(f"--device must be auto, cpu or cuda[:N], not {name!r}")
    return torch.device(name)


#: /proc/cpuinfo flags of bf16 matrix instructions, and how people name them.
BF16_CPU_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16"}


@functools.lru_cache(maxsize=1)
def cpu_bf16_instructions(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, ...]:
    """The CPU's bf16 matrix instructions (AMX-BF16, AVX512-BF16), read from /proc/cpuinfo (Linux);
    other systems report none. AMX runs bf16 matrix products about 7x faster than fp32, AVX512-BF16
    about 2x, so benchmark figures mean little without saying which the machine had."""
    try:
        with open(cpuinfo) as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return ()
    return tuple(name for flag, name in BF16_CPU_FLAGS.items() if flag in flags)


def cpu_has_native_bf16() -> bool:
    """True where the CPU has bf16 matrix instructions (AVX512-BF16 or AMX).

    Elsewhere oneDNN emulates bf16 and it is slower than fp32, so auto stays fp32.
    """
    return bool(cpu_bf16_instructions())


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 autocast on CUDA GPUs that support it (fp16 on older ones) and on CPUs
    with native bf16 instructions; fp32 elsewhere. `hfsam bench speed` reports the
    agreement of bf16 with fp32 on real data (benchmarks/RESULTS.md).
    """
    if name not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, not {name!r}")
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if name == "fp16" and device.type == "cpu":
        raise InputError("--precision fp16 is for CUDA GPUs; on the CPU use bf16 or fp32")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA and CPU allocator failures alike (errors.is_out_of_memory): both get the batch back-off."""
    return isinstance(exc, torch.OutOfMemoryError) or _is_out_of_memory(exc)


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
