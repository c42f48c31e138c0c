"""AWFFM: the adaptive weighted feature-fusion module of HF-SAM (DESIGN.md).

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

import torch
from torch import nn


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

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        x = self.fuse(torch.cat((high, low), dim=1))
        stats = torch.cat((x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)), dim=1)
        high = high * torch.sigmoid(self.spatial(stats))
        avg = self.channel_mlp(high.mean(dim=(2, 3), keepdim=True))
        mx = self.channel_mlp(high.amax(dim=(2, 3), keepdim=True))
        return high + low * torch.sigmoid(avg + mx)
