"""The prompt-free, multi-class HF-SAM mask decoder with two-step skip fusion.

Built from SAM's own parts (TwoWayTransformer, MLP, LayerNorm2d) with SAM's
attribute names, so that the pretrained `mask_decoder.transformer`,
`output_upscaling` and `iou_token` weights load from a SAM checkpoint. The class-
specific parts (one mask token and one hypernetwork MLP per class, plus
background) start fresh, as in SAMed.

fusion="two_step" (the paper):   src = AWFFM_1(image_embedding, L) + dense
                                 hs, src = transformer(src, pe, tokens)      SAM's own blocks
                                 src = AWFFM_2(src, L)
                                 tokens = [iou, mask_0..K]

fusion="released" (the authors' released network, `mask_decoder_512.py` of 1683194873xrn/HF-SAM):
                                 src = image_embedding + dense               (their step-1 fusion is overwritten)
                                 hs, src = transformer_xf(src, pe, tokens)   cross-attention-first blocks (H-SAM's)
                                 src = AWFFM(src, L)                         (one module)
                                 tokens = [iou, mask_0..K, hf]               a learnable extra token

The released variant reproduces, from the equations of that code (not a copy
of it), everything that reaches its loss: the token sequence with the extra
`hf_token` (it takes part in every attention; its own output and its MLP are
never used, so no MLP is built for it), and H-SAM's reordered two-way block:

    q = norm2(q + A_t2i(q + q_pe, k + k_pe, k))      tokens attend to the image FIRST
    q = norm1(A_self(q, q, q))                        first block: no PE, no residual (SAM's first-block
                                                      rule, here applied after the cross-attention)
    q = norm1(q + A_self(q + q_pe, q + q_pe, q))      later blocks
    q = norm3(q + MLP(q))
    k = norm4(k + A_i2t(k + k_pe, q + q_pe, q))       the image attends to the tokens

where SAM's block runs A_self first. The block keeps SAM's sub-module names
(self_attn, norm1, cross_attn_token_to_image, norm2, mlp, norm3, norm4,
cross_attn_image_to_token), so a SAM checkpoint loads into it BY NAME, exactly
as the authors load it (their `load_from` copies every SAM key whose name
exists in their model): each attention keeps its pretrained weights, though it
now runs in another order. Modules the authors build whose output never reaches
the loss (H-SAM's second decoder `mask_decoder2`, the IoU head, `hf_mlp`,
`embedding_encoder`, `embedding_maskfeature`, the prompt encoder's point and mask
embeddings) get no gradient and keep their initial values, so they are not built
here (docs/reproduce.md counts them).

fusion="none" (an ablation: SAM's decoder with K+1 class tokens, no low-level feature):
                                 src = image_embedding + dense
                                 hs, src = transformer(src, pe, tokens)
"""

from __future__ import annotations

from typing import cast

import torch
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.mask_decoder import MLP
from segment_anything.modeling.transformer import TwoWayAttentionBlock, TwoWayTransformer
from torch import nn
from torch.nn import functional as F

from .awffm import AWFFM
from .registry import FUSIONS

FUSION_MODES = tuple(FUSIONS)


class CrossFirstAttentionBlock(TwoWayAttentionBlock):
    """SAM's two-way block with the token cross-attention moved before the self-attention (H-SAM's order)."""

    def forward(self, queries, keys, query_pe, key_pe):
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q=queries + query_pe, k=k, v=keys))
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)
        queries = self.norm3(queries + self.mlp(queries))
        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(q=k, k=q, v=queries))
        return queries, keys


def build_transformer(
    *, cross_first: bool, depth: int, embedding_dim: int, mlp_dim: int, num_heads: int
) -> TwoWayTransformer:
    """SAM's TwoWayTransformer; with ``cross_first`` its blocks are CrossFirstAttentionBlock (same names)."""
    transformer = TwoWayTransformer(depth=depth, embedding_dim=embedding_dim, mlp_dim=mlp_dim, num_heads=num_heads)
    if cross_first:
        transformer.layers = nn.ModuleList(
            CrossFirstAttentionBlock(
                embedding_dim=embedding_dim, num_heads=num_heads, mlp_dim=mlp_dim, skip_first_layer_pe=(i == 0)
            )
            for i in range(depth)
        )
    return transformer


class HFSAMDecoder(nn.Module):
    def __init__(
        self,
        *,
        num_classes: int,
        transformer_dim: int = 256,
        depth: int = 2,
        mlp_dim: int = 2048,
        num_heads: int = 8,
        fusion: str = "two_step",
    ):
        super().__init__()
        if fusion not in FUSION_MODES:
            raise ValueError(f"fusion must be one of {FUSION_MODES}, not {fusion!r}")
        self.fusion = fusion
        released = fusion == "released"
        self.num_mask_tokens = num_classes + 1  # K classes + background
        self.transformer = build_transformer(
            cross_first=released, depth=depth, embedding_dim=transformer_dim, mlp_dim=mlp_dim, num_heads=num_heads
        )
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        if released:
            self.hf_token = nn.Embedding(1, transformer_dim)  # after the mask tokens, as the authors order them
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        if released:
            self.awffm = AWFFM(transformer_dim)
        elif fusion == "two_step":
            self.awffm_1 = AWFFM(transformer_dim)
            self.awffm_2 = AWFFM(transformer_dim)

    def awffms(self) -> list[AWFFM]:
        return [m for m in self.modules() if isinstance(m, AWFFM)]

    def forward(
        self,
        image_embedding: torch.Tensor,
        low_level: torch.Tensor | None,
        image_pe: torch.Tensor,
        dense_embedding: torch.Tensor,
    ) -> torch.Tensor:
        """Embeddings [B,C,h,w] -> mask logits [B, K+1, 4h, 4w] (channels-last in memory).

        Everything runs on token sequences [B, h*w, C], the layout of SAM's transformer, so
        that no map is transposed between the fusion modules, the transformer and the
        upscaling (each 1x1 or 2x2-stride-2 convolution is a matrix product there).
        """
        b, c, h, w = image_embedding.shape
        parts = [self.iou_token.weight, self.mask_tokens.weight]
        if self.fusion == "released":
            parts.append(self.hf_token.weight)
        tokens = torch.cat(parts, dim=0).unsqueeze(0).expand(b, -1, -1)

        src = _tokens(image_embedding)
        low = _tokens(low_level) if low_level is not None else None
        if self.fusion == "two_step":
            assert low is not None  # a fusing model always has low-level taps (HFSAM.taps)
            src = self.awffm_1.forward_tokens(src, low, h, w)
        src = src + _tokens(dense_embedding)
        # SAM's transformer takes NCHW maps and flattens them back: views of the token layout.
        hs, src = self.transformer(_as_map(src, h, w), image_pe, tokens)
        if self.fusion == "two_step":
            assert low is not None
            src = self.awffm_2.forward_tokens(src, low, h, w)
        elif self.fusion == "released":
            assert low is not None
            src = self.awffm.forward_tokens(src, low, h, w)

        upscaled = self.upscale(src, h, w)  # [B, 4h*4w, C/8]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        logits = upscaled @ hyper_in.transpose(1, 2)  # [B, 16 h w, K+1]
        return logits.unflatten(1, (4 * h, 4 * w)).permute(0, 3, 1, 2)

    def upscale(self, src: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """SAM's x4 output upscaling (2x2 stride-2 transposed convolutions, LayerNorm2d, GELU) on tokens."""
        layers = self.output_upscaling  # built in __init__: deconv, LayerNorm2d, GELU, deconv, GELU
        up1, up2 = cast(nn.ConvTranspose2d, layers[0]), cast(nn.ConvTranspose2d, layers[3])
        norm = cast(LayerNorm2d, layers[1])
        x = F.gelu(F.layer_norm(_deconv2x2(src, up1, h, w), (norm.weight.shape[0],), norm.weight, norm.bias, norm.eps))
        return F.gelu(_deconv2x2(x, up2, 2 * h, 2 * w))


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] (or [1, C, 1, 1]) -> [B, h*w, C]; a view when the map is channels-last in memory."""
    return x.flatten(2).transpose(1, 2)


def _as_map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return tokens.transpose(1, 2).unflatten(-1, (h, w))


def _deconv2x2(x: torch.Tensor, conv: nn.ConvTranspose2d, h: int, w: int) -> torch.Tensor:
    """ConvTranspose2d(kernel 2, stride 2) on tokens [B, h*w, Cin] -> [B, 2h*2w, Cout].

    Each input pixel writes one 2x2 block of outputs, so the convolution is one matrix product
    [Cin] -> [2 x 2 x Cout] per pixel followed by a depth-to-space rearrangement. The product's
    outputs are ordered (dy, dx, cout), not as the weight stores them (cout, dy, dx), so that the
    rearrangement moves whole runs of Cout values: on a CPU that copy (and its gradient's) was,
    with cout strided, a large part of a cached training step.

    The bias is added after the product, not inside it: under bf16 autocast the fp32 bias makes
    the sum fp32, so the LayerNorm and GELUs after it run in fp32. Folded into the product, they
    ran in bf16 and the LayerNorm's weight gradients came out about 20 % off.
    """
    cin, cout = conv.weight.shape[:2]
    weight = conv.weight.permute(0, 2, 3, 1).reshape(cin, 4 * cout).t()  # rows ordered (dy, dx, cout)
    y = F.linear(x, weight)  # [B, hw, 2*2*Cout]
    b = y.shape[0]
    y = y.view(b, h, w, 2, 2, cout).transpose(2, 3).reshape(b, 4 * h * w, cout)
    assert conv.bias is not None  # SAM's upscaling deconvolutions have a bias
    return y + conv.bias
