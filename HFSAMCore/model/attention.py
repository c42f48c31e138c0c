"""SAM's encoder blocks, computed with less work and memory traffic, with SAM's weights and results.

SAM's ``Block`` zero-pads the token grid to a multiple of the window size (32 x 32
tokens -> 42 x 42 at 512 px) and its ``Attention`` materialises softmax(q k^T +
rel-pos bias) with an N x N bias built by hand. Here, with the same parameters and
state-dict keys:

- SAM pads the normalised tokens with zeros, so their q, k and v are exactly the qkv bias: only the
  real tokens are projected (qkv and proj), the projections are padded with the bias
  (``FastBlock``): at 512 px, 42 % less qkv and proj work in the windowed blocks;
- the decomposed relative-position term is folded into q and k (``fold_rel_pos``), so
  that the logits are one product q' k'^T and no N x N bias is ever built;
- on the CPU at inference the attention runs as bmm -> softmax -> bmm over chunks of
  heads small enough to stay in cache (``chunked_attention``): on CPUs this is about 3x
  faster than torch's fused CPU kernel for these shapes (benchmarks/RESULTS.md).
  Training and CUDA use torch's fused ``scaled_dot_product_attention``, whose backward
  pass and GPU kernels are the better choice there.

The test suite checks both paths against SAM's own blocks, with and without padding, to 1e-4
of the output's magnitude (float32 rounding of a different summation order).
"""

from __future__ import annotations

import torch
from segment_anything.modeling.image_encoder import Attention, Block, ImageEncoderViT, get_rel_pos
from torch.nn import functional as F

# Scores per chunk of the CPU path: about 1 MiB keeps q', k', v and the scores of a chunk
# in a core's L2 cache (one 14x14 window with 12 heads, or one head of a 32x32 global block).
CHUNK_BYTES = 1 << 20
# The CPU path at inference; benchmarks/ab_encoder.py switches it off to measure what it gains.
CPU_CHUNKED = True


class FastAttention(Attention):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, W, C] -> [B, H, W, C], as SAM's Attention."""
        return self.proj(self.attend(self.qkv(x)))

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """Attention over the tokens of each item: qkv [B, H, W, 3C] -> [B, H, W, C] (before proj)."""
        b, h, w, _ = qkv.shape
        q, k, v = qkv.reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        head_dim = v.shape[-1]
        q, k = fold_rel_pos(q, k, self, h, w) if self.use_rel_pos else (q * self.scale, k)
        if CPU_CHUNKED and qkv.device.type == "cpu" and not torch.is_grad_enabled():
            out = chunked_attention(q, k, v)
        else:
            # The fused kernels want one head size for q, k and v: pad v with zeros.
            v = F.pad(v, (0, q.shape[-1] - head_dim))
            out = F.scaled_dot_product_attention(q, k, v, scale=1.0)[..., :head_dim]
        return out.transpose(1, 2).reshape(b, h, w, -1)


class FastBlock(Block):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        x = self.windowed_attention(x) if self.window_size > 0 else self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))

    def windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        """SAM's window attention (pad to whole windows, attend per window, crop) on x [B, H, W, C]."""
        b, h, w, c = x.shape
        ws = self.window_size
        qkv = self.attn.qkv(x)
        hp, wp = h + (-h % ws), w + (-w % ws)
        if (hp, wp) != (h, w):
            # A zero token's projection is the bias (W 0 + b; LoRA adds B A 0 = 0), in the
            # dtype the linear layer computed in, so padding qkv equals projecting the padding.
            bias = self.attn.qkv.bias
            fill = bias.to(qkv.dtype) if bias is not None else qkv.new_zeros(qkv.shape[-1])
            padded = fill.expand(b, hp, wp, qkv.shape[-1]).clone()
            padded[:, :h, :w] = qkv
            qkv = padded
        nh, nw = hp // ws, wp // ws
        windows = qkv.view(b, nh, ws, nw, ws, -1).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, ws, ws, -1)
        out = self.attn.attend(windows)
        out = out.view(b, nh, nw, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        # contiguous: a Linear on a cropped view falls back to a batched matmul with copied weights
        return self.attn.proj(out[:, :h, :w].contiguous())


def fold_rel_pos(q: torch.Tensor, k: torch.Tensor, attn: Attention, h: int, w: int):
    """Fold SAM's scale and decomposed relative-position bias into q and k: [B, heads, N, d] each.

    SAM's logits are s q.k + rel_h[q, kh] + rel_w[q, kw], with rel_h and rel_w computed
    from the unscaled q. The same logits come from longer vectors,
    q' = [s q, rel_h, rel_w] and k' = [k, onehot(kh), onehot(kw)], as one product q'.k'.
    """
    bh = q.shape[0] * q.shape[1]
    r_q = q.reshape(bh, h, w, -1)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, get_rel_pos(h, h, attn.rel_pos_h).to(q.dtype))
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, get_rel_pos(w, w, attn.rel_pos_w).to(q.dtype))
    q = torch.cat((q * attn.scale, rel_h.reshape(q.shape[:3] + (h,)), rel_w.reshape(q.shape[:3] + (w,))), -1)
    rows = torch.arange(h, device=k.device).repeat_interleave(w)
    cols = torch.arange(w, device=k.device).repeat(h)
    onehot = torch.cat((F.one_hot(rows, h), F.one_hot(cols, w)), -1).to(k.dtype)  # [N, h + w]
    k = torch.cat((k, onehot.expand(k.shape[:3] + (h + w,))), -1)
    return q, k


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T) v for [B, heads, N, d] tensors whose scale is already in q.

    One bmm -> softmax -> bmm per chunk of (item, head) pairs, so that the N x N scores of a
    chunk never leave the cache; the whole-batch version writes and re-reads them from memory.
    """
    b, heads, n, _ = q.shape
    q, k, v = (t.reshape(b * heads, n, -1) for t in (q, k, v))
    out = torch.empty_like(v)
    kt = k.transpose(1, 2)
    step = max(1, CHUNK_BYTES // (n * n * q.element_size()))
    for i in range(0, b * heads, step):
        scores = torch.bmm(q[i : i + step], kt[i : i + step])
        torch.bmm(torch.softmax(scores, -1), v[i : i + step], out=out[i : i + step])
    return out.view(b, heads, n, -1)


def use_fast_encoder(image_encoder: ImageEncoderViT, enabled: bool = True) -> None:
    """Switch every encoder block between SAM's own computation and this module's (no new state)."""
    for block in image_encoder.blocks:
        block.__class__ = FastBlock if enabled else Block
        block.attn.__class__ = FastAttention if enabled else Attention
