"""SAM's encoder attention computed with torch's fused scaled-dot-product attention.

SAM's ``Attention.forward`` materialises softmax(q k^T + rel-pos bias) by hand.
The decomposed relative-position term is an additive bias, so the same result is
``F.scaled_dot_product_attention(q, k, v, attn_mask=bias)`` (same default scale,
head_dim^-0.5), which runs torch's fused kernels on the CPU and the GPU. The
weights and state-dict keys are SAM's own; only the computation changes, and the
test suite checks it against SAM's original to 1e-5.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos


class SDPAAttention(Attention):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, N, head_dim]
        bias = None
        if self.use_rel_pos:
            r_q = q.reshape(b * self.num_heads, h, w, -1)
            rh = get_rel_pos(h, h, self.rel_pos_h)
            rw = get_rel_pos(w, w, self.rel_pos_w)
            rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh.to(r_q.dtype))
            rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw.to(r_q.dtype))
            bias = (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(b, self.num_heads, h * w, h * w)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(b, h, w, -1)
        return self.proj(out)


def use_sdpa(image_encoder: torch.nn.Module, enabled: bool = True) -> None:
    """Switch every encoder block between SAM's attention and the SDPA one (no new state)."""
    for block in image_encoder.blocks:
        block.attn.__class__ = SDPAAttention if enabled else Attention
