"""AWFFM: the adaptive weighted feature-fusion module of HF-SAM (docs/design.md).

Given a high-level map G (SAM's image embedding, or the decoder's output) and a
low-level map L (an early global-attention block, compressed to the same width):

    X   = conv1x1(cat[G, L])                              2C -> C
    S   = sigmoid(conv3x3(cat[mean_c X, max_c X]))         spatial weights, 2 -> 1
    G'  = G * S
    Ca  = sigmoid(M(avgpool G') + M(maxpool G'))           channel weights
    out = G' + L * Ca

with M = conv1x1 C->C/8, ReLU, conv1x1 C/8->C, no bias (C=256: 256->32->256).
The spatial gate decides *where* the high-level map is trusted, the channel gate
*which* low-level channels (edges, texture) are added back.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from torch.nn import functional as F


class AWFFM(nn.Module):
    def __init__(self, dim: int = 256, reduction: int = 8):
        super().__init__()
        hidden = max(dim // reduction, 1)
        self.fuse = nn.Conv2d(2 * dim, dim, kernel_size=1)
        self.spatial = nn.Conv2d(2, 1, kernel_size=3, padding=1, bias=False)
        self.channel_mlp = nn.Sequential(
            nn.Conv2d(dim, hidden, kernel_size=1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, dim, kernel_size=1, bias=False),
        )

    @torch.no_grad()
    def start_near_identity(self, logit: float = 5.0) -> None:
        """Initialise so that out = sigmoid(logit) * G (0.993 G) whatever L: the fuse conv gives the
        constant logit / 2 (zero weight), the spatial conv looks only at its centre tap (weights 1),
        so S = sigmoid(logit) everywhere, borders included. For a decoder that starts from pretrained
        weights: with the usual random init S is about 0.5 with random spatial structure, and
        the pretrained transformer first sees a damaged embedding. Training moves away from this
        start (Adam's steps do not shrink with sigmoid's small slope)."""
        assert self.fuse.bias is not None  # built with a bias in __init__
        self.fuse.weight.zero_()
        self.fuse.bias.fill_(logit / 2)
        self.spatial.weight.zero_()
        k = self.spatial.kernel_size[0] // 2
        self.spatial.weight[:, :, k, k] = 1.0

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """NCHW maps [B,C,h,w] -> [B,C,h,w]."""
        b, c, h, w = high.shape
        out = self.forward_tokens(high.flatten(2).transpose(1, 2), low.flatten(2).transpose(1, 2), h, w)
        return out.transpose(1, 2).reshape(b, c, h, w)

    def forward_tokens(self, high: torch.Tensor, low: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """The same on token sequences [B, h*w, C], the layout the decoder's transformer works in.

        Every 1x1 convolution is then one matrix product, and cat[G, L] is never built: the fuse
        weight is applied as its G half plus its L half.
        """
        c = high.shape[-1]
        weight = self.fuse.weight.flatten(1)
        x = F.linear(high, weight[:, :c], self.fuse.bias) + F.linear(low, weight[:, c:])
        stats = torch.stack((x.mean(-1), amax(x, -1)), dim=1).unflatten(-1, (h, w))  # [B, 2, h, w]
        high = high * torch.sigmoid(self.spatial(stats)).flatten(1).unsqueeze(-1)
        down_conv, up_conv = cast(nn.Conv2d, self.channel_mlp[0]), cast(nn.Conv2d, self.channel_mlp[2])
        down, up = down_conv.weight.flatten(1), up_conv.weight.flatten(1)

        def mlp(v: torch.Tensor) -> torch.Tensor:
            return F.linear(F.relu(F.linear(v, down)), up)

        gate = torch.sigmoid(mlp(high.mean(1)) + mlp(amax(high, 1)))  # [B, C]
        return high + low * gate.unsqueeze(1)


class _AMax(torch.autograd.Function):
    """torch.amax with torch's gradient (shared evenly among tied maxima), in fewer passes.

    The even split matters here: an AWFFM that starts near identity has a fuse output that is
    constant over the channels, so every channel ties, and max()'s gradient (all of it to one
    arg-max) trains differently from the start. torch's own amax backward casts and sums the
    tie mask through extra full-size copies; a cached few-shot step computes four of these
    maxima over [B, 4096, 256], and this backward is about twice as fast on a CPU.
    One difference: where the input holds NaN, torch's gradient is NaN and this one 0; the
    loss is NaN then anyway, and training stops on it.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int) -> torch.Tensor:
        top = x.amax(dim, keepdim=True)
        ctx.save_for_backward(x, top)
        ctx.dim = dim
        return top.squeeze(dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, top = ctx.saved_tensors
        ties = x == top
        count = ties.sum(ctx.dim, keepdim=True, dtype=grad.dtype)  # in grad's dtype, rounded as torch does
        return torch.where(ties, grad.unsqueeze(ctx.dim) / count, 0.0), None


def amax(x: torch.Tensor, dim: int) -> torch.Tensor:
    return _AMax.apply(x, dim)
