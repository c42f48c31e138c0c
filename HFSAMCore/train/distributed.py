"""One code path for one process or many: torchrun's world, a differentiable all-reduce."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import InputError

if TYPE_CHECKING:  # torch is imported inside the functions: `import HFSAMCore` stays cheap
    import torch


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

    from ..runtime.device import resolve_device

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
