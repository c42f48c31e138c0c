"""The prompt-free, multi-class HF-SAM mask decoder with two-step skip fusion.

Built from SAM's own parts (TwoWayTransformer, MLP, LayerNorm2d) with SAM's
attribute names, so that the pretrained `mask_decoder.transformer`,
`output_upscaling` and `iou_token` weights load from a SAM checkpoint. The class-
specific parts (one mask token and one hypernetwork MLP per class, plus
background) start fresh, as in SAMed.

fusion="two_step" (the paper):   src = AWFFM_1(image_embedding, L) + dense
                                 hs, src = transformer(src, pe, tokens)
                                 src = AWFFM_2(src, L)
fusion="released" (the authors' code, where the step-1 result is overwritten):
                                 src = image_embedding + dense
                                 hs, src = transformer(src, pe, tokens)
                                 src = AWFFM(src, L)     (one shared module)
fusion="none" (an ablation: SAM's decoder with K+1 class tokens, no low-level feature):
                                 src = image_embedding + dense
                                 hs, src = transformer(src, pe, tokens)
"""

from __future__ import annotations

import torch
from torch import nn
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.mask_decoder import MLP
from segment_anything.modeling.transformer import TwoWayTransformer

from .awffm import AWFFM
from .registry import FUSIONS

FUSION_MODES = tuple(FUSIONS)


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
        self.num_mask_tokens = num_classes + 1  # K classes + background
        self.transformer = TwoWayTransformer(
            depth=depth, embedding_dim=transformer_dim, mlp_dim=mlp_dim, num_heads=num_heads
        )
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
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
        if fusion == "two_step":
            self.awffm_1 = AWFFM(transformer_dim)
            self.awffm_2 = AWFFM(transformer_dim)
        elif fusion == "released":
            self.awffm = AWFFM(transformer_dim)

    def forward(
        self,
        image_embedding: torch.Tensor,
        low_level: torch.Tensor | None,
        image_pe: torch.Tensor,
        dense_embedding: torch.Tensor,
    ) -> torch.Tensor:
        """Embeddings [B,C,h,w] -> mask logits [B, K+1, 4h, 4w]."""
        b, c, h, w = image_embedding.shape
        tokens = torch.cat((self.iou_token.weight, self.mask_tokens.weight), dim=0)
        tokens = tokens.unsqueeze(0).expand(b, -1, -1)

        if self.fusion == "two_step":
            src = self.awffm_1(image_embedding, low_level) + dense_embedding
        else:
            src = image_embedding + dense_embedding
        hs, src = self.transformer(src, image_pe, tokens)
        src = src.transpose(1, 2).reshape(b, c, h, w)
        if self.fusion == "two_step":
            src = self.awffm_2(src, low_level)
        elif self.fusion == "released":
            src = self.awffm(src, low_level)

        upscaled = self.output_upscaling(src)
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        bu, cu, hu, wu = upscaled.shape
        return (hyper_in @ upscaled.reshape(bu, cu, hu * wu)).reshape(bu, -1, hu, wu)
