"""LoRA on the q and v parts of SAM's fused qkv projection.

Why not `peft`: peft adapts a whole Linear layer, i.e. all of q, k and v of SAM's
fused `qkv` projection. HF-SAM (like SAMed) adapts only q and v, which gives the
paper's parameter count (vit_b, r=5: 12 x 2 x (768r + 768r) = 184,320). peft has no
way to restrict a LoRA update to a slice of a layer's outputs, so this small module
does it instead.

`LoRAQKV` *is* an ``nn.Linear`` with the same ``weight``/``bias`` names, so SAM
checkpoints load into it unchanged; the low-rank factors are extra parameters.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class LoRAQKV(nn.Linear):
    """qkv = W x + b, plus B_q A_q x on the q third and B_v A_v x on the v third."""

    def __init__(self, dim: int, rank: int, bias: bool = True):
        super().__init__(dim, 3 * dim, bias=bias)
        self.dim = dim
        self.rank = rank
        self.lora_A_q = nn.Linear(dim, rank, bias=False)
        self.lora_B_q = nn.Linear(rank, dim, bias=False)
        self.lora_A_v = nn.Linear(dim, rank, bias=False)
        self.lora_B_v = nn.Linear(rank, dim, bias=False)
        self.reset_lora()

    def reset_lora(self) -> None:
        # A Kaiming-uniform, B zero: a fresh adapter leaves SAM's output unchanged.
        for a in (self.lora_A_q, self.lora_A_v):
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        for b in (self.lora_B_q, self.lora_B_v):
            nn.init.zeros_(b.weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> "LoRAQKV":
        dim = linear.in_features
        module = cls(dim, rank, bias=linear.bias is not None).to(linear.weight.device, linear.weight.dtype)
        with torch.no_grad():
            module.weight.copy_(linear.weight)
            if linear.bias is not None:
                module.bias.copy_(linear.bias)
        return module

    def merged_weight(self) -> torch.Tensor:
        """W + [B_q A_q; 0; B_v A_v]: the adapted projection as one matrix."""
        zero = torch.zeros_like(self.weight[: self.dim])
        delta = torch.cat((self.lora_B_q.weight @ self.lora_A_q.weight, zero,
                           self.lora_B_v.weight @ self.lora_A_v.weight))
        return self.weight + delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            # Inference: one matmul with the merged weight (a few MFLOP to form) instead of
            # two low-rank paths and a concatenation over every token.
            return F.linear(x, self.merged_weight(), self.bias)
        qkv = F.linear(x, self.weight, self.bias)
        dq = self.lora_B_q(self.lora_A_q(x))
        dv = self.lora_B_v(self.lora_A_v(x))
        q, k, v = qkv.split(self.dim, dim=-1)
        return torch.cat((q + dq, k, v + dv), dim=-1)


def add_lora(image_encoder: nn.Module, rank: int) -> int:
    """Replace every block's ``attn.qkv`` by a LoRAQKV of the given rank; return #LoRA parameters."""
    if rank <= 0:
        return 0
    count = 0
    for block in image_encoder.blocks:
        block.attn.qkv = LoRAQKV.from_linear(block.attn.qkv, rank)
        count += sum(p.numel() for n, p in block.attn.qkv.named_parameters() if n.startswith("lora_"))
    return count


def is_lora_parameter(name: str) -> bool:
    return ".lora_" in name or name.startswith("lora_")
