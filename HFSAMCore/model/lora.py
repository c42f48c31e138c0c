"""LoRA on the q and v parts of a fused qkv projection (SAM's ViT and TinyViT).

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
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from segment_anything.modeling.image_encoder import ImageEncoderViT


class LoRAQKV(nn.Linear):
    """qkv = W x + b, plus B_q A_q x on the q rows and B_v A_v x on the v rows.

    Two row layouts of a fused qkv exist: SAM's ViT stacks [q | k | v] (each ``dim`` rows);
    TinyViT interleaves them head by head ([q0 k0 v0 | q1 k1 v1 | ...]), given here as
    ``interleaved_heads``. Taking "the first and last third" on TinyViT would adapt q, k and v of
    a few heads instead of q and v of all of them.
    """

    def __init__(self, dim: int, rank: int, bias: bool = True, interleaved_heads: int | None = None):
        super().__init__(dim, 3 * dim, bias=bias)
        self.dim = dim
        self.rank = rank
        self.interleaved_heads = interleaved_heads
        self.lora_A_q = nn.Linear(dim, rank, bias=False)
        self.lora_B_q = nn.Linear(rank, dim, bias=False)
        self.lora_A_v = nn.Linear(dim, rank, bias=False)
        self.lora_B_v = nn.Linear(rank, dim, bias=False)
        self.reset_lora()

    def reset_lora(self) -> None:
        # A Kaiming-uniform, B zero: a fresh adapter leaves the encoder's output unchanged.
        for a in (self.lora_A_q, self.lora_A_v):
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        for b in (self.lora_B_q, self.lora_B_v):
            nn.init.zeros_(b.weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, *, interleaved_heads: int | None = None) -> LoRAQKV:
        dim = linear.in_features
        module = cls(dim, rank, bias=linear.bias is not None, interleaved_heads=interleaved_heads)
        module = module.to(linear.weight.device, linear.weight.dtype)
        with torch.no_grad():
            module.weight.copy_(linear.weight)
            if linear.bias is not None:
                module.bias.copy_(linear.bias)
        return module

    def lora_parameter_count(self) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if n.startswith("lora_"))

    def q_v_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices of q and of v in the fused output (what the tests check LoRA touches)."""
        rows = torch.arange(3 * self.dim)
        if self.interleaved_heads is None:
            return rows[: self.dim], rows[2 * self.dim :]
        per_head = rows.view(self.interleaved_heads, 3, -1)
        return per_head[:, 0].flatten(), per_head[:, 2].flatten()

    def _full_width(self, dq: torch.Tensor, dv: torch.Tensor) -> torch.Tensor:
        """Place q and v updates [..., dim] at their rows of a [..., 3 dim] tensor (zeros for k)."""
        zero = torch.zeros_like(dq)
        if self.interleaved_heads is None:
            return torch.cat((dq, zero, dv), dim=-1)
        h = self.interleaved_heads
        parts = [t.unflatten(-1, (h, 1, -1)) for t in (dq, zero, dv)]
        return torch.cat(parts, dim=-2).flatten(-3)

    def merged_weight(self) -> torch.Tensor:
        """W + the LoRA rows: the adapted projection as one matrix."""
        dq = (self.lora_B_q.weight @ self.lora_A_q.weight).t()  # [in, dim]: rows of the update, transposed
        dv = (self.lora_B_v.weight @ self.lora_A_v.weight).t()
        return self.weight + self._full_width(dq, dv).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            # Inference: one matmul with the merged weight (a few MFLOP to form) instead of
            # two low-rank paths and a concatenation over every token.
            return F.linear(x, self.merged_weight(), self.bias)
        qkv = F.linear(x, self.weight, self.bias)
        return qkv + self._full_width(self.lora_B_q(self.lora_A_q(x)), self.lora_B_v(self.lora_A_v(x)))


def add_lora(image_encoder: ImageEncoderViT, rank: int) -> int:
    """Replace every block's ``attn.qkv`` by a LoRAQKV of the given rank; return #LoRA parameters."""
    if rank <= 0:
        return 0
    count = 0
    for block in image_encoder.blocks:
        block.attn.qkv = LoRAQKV.from_linear(block.attn.qkv, rank)
        count += block.attn.qkv.lora_parameter_count()
    return count


def is_lora_parameter(name: str) -> bool:
    return ".lora_" in name or name.startswith("lora_")
