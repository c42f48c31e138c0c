"""What every benchmark shares: synchronised timing, fresh processes for peak memory, the machine."""

from __future__ import annotations

import multiprocessing as mp
import platform
import statistics
import time

from ..runtime.malloc import keep_freed_memory


# -- helpers ------------------------------------------------------------------------
def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def in_fresh_process(fn, *args, our_allocator: bool = True):
    """Run fn(*args) in a spawned interpreter so that its peak memory is its own; with glibc set to
    keep freed memory as the `hfsam` command line does (``our_allocator=False``: the default malloc)."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1, initializer=keep_freed_memory if our_allocator else None) as pool:
        return pool.apply(fn, args)


def machine_info(device) -> dict:
    import torch

    from ..runtime.device import cpu_bf16_instructions

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")(),
        "bf16_instructions": ", ".join(cpu_bf16_instructions()) or "none",
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
