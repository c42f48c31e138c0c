"""SAM's encoder attention computed with torch's fused scaled-dot-product attention.

SAM's ``Attention.forward`` materialises softmax(q k^T + rel-pos bias) by hand.
Here the decomposed relative-position term is folded into q and k (see
``_fold_rel_pos``), so the same result comes from
``F.scaled_dot_product_attention`` with SAM's scale (head_dim^-0.5) and no mask,
which runs torch's fused kernels on the CPU and the GPU. The
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
        head_dim = v.shape[-1]
        if self.use_rel_pos:
            q, k = _fold_rel_pos(q, k, self.rel_pos_h, self.rel_pos_w, h, w, self.scale)
            # The fused kernels want one head size for q, k and v: pad v with zeros.
            v = F.pad(v, (0, q.shape[-1] - head_dim))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)[..., :head_dim]
        out = out.transpose(1, 2).reshape(b, h, w, -1)
        return self.proj(out)


def _fold_rel_pos(q, k, rel_pos_h, rel_pos_w, h: int, w: int, scale: float):
    """Fold SAM's decomposed relative-position bias into q and k.

    SAM adds rel_h[q, kh] + rel_w[q, kw] to every logit, which needs an N x N bias
    per head (at 512 px, 12 x 1024 x 1024 per global block): building it cost more
    than the attention itself. The same logits come from longer vectors instead:
    q' = [q, rel_h / s, rel_w / s] and k' = [k, onehot(kh), onehot(kw)], so that
    s * q'.k' = s * q.k + rel_h[kh] + rel_w[kw]; the fused kernel then runs with
    no mask at all.
    """
    bh = q.shape[0] * q.shape[1]
    r_q = q.reshape(bh, h, w, -1)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, get_rel_pos(h, h, rel_pos_h).to(q.dtype))
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, get_rel_pos(w, w, rel_pos_w).to(q.dtype))
    q = torch.cat((q, (rel_h / scale).reshape(q.shape[:3] + (h,)), (rel_w / scale).reshape(q.shape[:3] + (w,))), -1)
    rows = torch.arange(h, device=k.device).repeat_interleave(w)
    cols = torch.arange(w, device=k.device).repeat(h)
    onehot = torch.cat((F.one_hot(rows, h), F.one_hot(cols, w)), -1).to(k.dtype)  # [N, h + w]
    k = torch.cat((k, onehot.expand(k.shape[:3] + (h + w,))), -1)
    return q, k


def use_sdpa(image_encoder: torch.nn.Module, enabled: bool = True) -> None:
    """Switch every encoder block between SAM's attention and the SDPA one (no new state)."""
    for block in image_encoder.blocks:
        block.attn.__class__ = SDPAAttention if enabled else Attention
