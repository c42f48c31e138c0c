"""HF-SAM assembled: an image encoder + LoRA, low-level feature, AWFFM decoder.

    images [B,3,H,W] in [0,1], normalised as the backbone expects (``pixel_norm``)
      -> image encoder (frozen, LoRA on q/v)               -> G  [B,256,h,w]
         an early block's / stage's output (the tap)       -> 1x1 conv -> L [B,256,h,w]
      -> HFSAMDecoder(G, L, SAM's dense PE, no_mask_embed)  -> logits [B,K+1,4h,4w]

h = H/16 for SAM's ViT, H/4 for LiteMedSAM's TinyViT (256 px -> 64 x 64). The encoder comes
from its family (``families.py``); everything after it is the same on every backbone.

`build_hfsam` is the one place a model is made; `ModelSpec` is everything that
must match between a model and an adapter (see adapters.check_compatible).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from segment_anything.modeling import PromptEncoder
from torch import nn
from torch.nn import functional as F

from ..errors import InputError
from .decoder import FUSION_MODES, HFSAMDecoder
from .families import get_family
from .lora import is_lora_parameter
from .registry import PIXEL_NORMS, BackboneInfo, get_backbone_info


@dataclass(frozen=True)
class ModelSpec:
    backbone: str = "vit_b"
    img_size: int = 512
    num_classes: int = 8
    rank: int = 5
    fusion: str = "two_step"
    low_level_blocks: tuple[int, ...] | None = None  # None: the backbone's default taps
    pixel_norm: str | None = None  # None: the backbone's own (registry.PIXEL_NORMS)

    def resolved(self) -> ModelSpec:
        """Validate and fill defaults; raises InputError on impossible values."""
        info = get_backbone_info(self.backbone)
        info.check_img_size(self.img_size)
        if not 1 <= self.num_classes <= 255:
            raise InputError(f"the number of classes must be 1..255, not {self.num_classes}")
        if not 0 <= self.rank <= 256:
            raise InputError(f"--rank must be 0..256, not {self.rank}")
        if self.fusion not in FUSION_MODES:
            raise InputError(f"--fusion must be one of {', '.join(FUSION_MODES)}, not {self.fusion!r}")
        blocks = tuple(self.low_level_blocks) if self.low_level_blocks else info.default_taps
        if any(b not in info.low_level_taps for b in blocks):
            raise InputError(
                f"low-level taps {list(blocks)} are not offered by the {self.backbone} encoder "
                f"(choose from {list(info.low_level_taps)})"
            )
        norm = self.pixel_norm or info.pixel_norm
        if norm not in PIXEL_NORMS:
            raise InputError(f"pixel normalisation must be one of {', '.join(PIXEL_NORMS)}, not {norm!r}")
        return ModelSpec(
            self.backbone,
            int(self.img_size),
            int(self.num_classes),
            int(self.rank),
            self.fusion,
            tuple(int(b) for b in blocks),
            norm,
        )

    def as_dict(self) -> dict:
        d = asdict(self)
        d["low_level_blocks"] = list(d["low_level_blocks"] or [])
        return d


class LowLevelDropout(nn.Module):
    """In training, leave out the low-level feature L of each sample with probability ``p``.

    A regulariser for few-shot training (docs/design.md, "Low-level dropout"): with a handful of
    slices the low-level branch learns their texture by heart. Each sample of a batch then either
    has its L or none, so the decoder must also segment from the image embedding alone. L is
    not rescaled by 1 / (1 - p) (torchvision's StochasticDepth does rescale): at inference the
    decoder sees L exactly as it saw it in training, never twice as strong. No parameters, so
    adapters do not change. The trainer sets ``p`` (0 outside training) and ``generator`` (its own
    seeded CPU generator, so that a run depends on its seed alone; None: torch's global one).
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p
        self.generator: torch.Generator | None = None

    def forward(self, low: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p <= 0:
            return low
        keep = torch.rand(low.shape[0], 1, 1, 1, generator=self.generator) >= self.p
        return low * keep.to(low.device, low.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class HFSAM(nn.Module):
    pixel_mean: torch.Tensor  # buffers, registered in __init__
    pixel_std: torch.Tensor

    def __init__(self, spec: ModelSpec, *, fast_encoder: bool = True):
        super().__init__()
        spec = spec.resolved()
        assert spec.low_level_blocks is not None and spec.pixel_norm is not None  # resolved() fills both
        info: BackboneInfo = get_backbone_info(spec.backbone)
        self.spec, self.info = spec, info
        self.family = get_family(info)
        embed_size = info.embedding_size(spec.img_size)
        dim = info.decoder.dim
        self.image_encoder = self.family.build_encoder(info, spec.img_size)
        self.lora_parameter_count = self.family.add_lora(self.image_encoder, spec.rank)
        self.family.set_fast_inference(self.image_encoder, fast_encoder)  # False: the reference blocks
        self.prompt_encoder = PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(embed_size, embed_size),
            input_image_size=(spec.img_size, spec.img_size),
            mask_in_chans=16,
        )
        # One 1x1 compression conv per low-level tap; several taps are summed. The "none" ablation
        # has no low-level branch at all.
        self.taps = spec.low_level_blocks if spec.fusion != "none" else ()
        self.low_level_proj = nn.ModuleList(
            nn.Conv2d(self.family.tap_channels(info, t), dim, kernel_size=1) for t in self.taps
        )
        self.low_level_dropout = LowLevelDropout()
        self.mask_decoder = HFSAMDecoder(
            num_classes=spec.num_classes,
            transformer_dim=dim,
            depth=info.decoder.depth,
            mlp_dim=info.decoder.mlp_dim,
            num_heads=info.decoder.num_heads,
            fusion=spec.fusion,
        )
        mean, std = PIXEL_NORMS[spec.pixel_norm]
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.freeze_base()

    # -- parameters -----------------------------------------------------------
    def train(self, mode: bool = True) -> HFSAM:
        super().train(mode)
        self.family.keep_frozen(self.image_encoder)  # e.g. BatchNorm statistics are not an adapter's
        return self

    def freeze_base(self) -> None:
        """Trainable: LoRA, AWFFM, compression conv, mask decoder, no_mask_embed. Frozen: the rest."""
        for name, p in self.named_parameters():
            p.requires_grad_(self.is_trainable_name(name))

    @staticmethod
    def is_trainable_name(name: str) -> bool:
        if name.startswith("image_encoder."):
            return is_lora_parameter(name)
        if name.startswith("prompt_encoder."):
            return name.startswith("prompt_encoder.no_mask_embed.")
        return True  # low_level_proj, mask_decoder (incl. AWFFM and its transformer)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Exactly the tensors an adapter stores."""
        return {n: p.detach() for n, p in self.named_parameters() if self.is_trainable_name(n)}

    def load_trainable_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        expected = {n: p for n, p in self.named_parameters() if self.is_trainable_name(n)}
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        wrong = sorted(n for n in set(expected) & set(tensors) if tensors[n].shape != expected[n].shape)
        if missing or unexpected or wrong:
            parts = [
                f"{len(v)} {k} ({', '.join(v[:3])})"
                for k, v in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                if v
            ]
            raise InputError("the adapter's tensors do not fit the model: " + "; ".join(parts))
        with torch.no_grad():
            for n, p in expected.items():
                p.copy_(tensors[n].to(p.dtype))

    def parameter_counts(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for n, p in self.named_parameters() if self.is_trainable_name(n))
        lora = sum(p.numel() for n, p in self.named_parameters() if is_lora_parameter(n))
        return {"total": total, "trainable": trainable, "lora": lora, "frozen": total - trainable}

    @torch.no_grad()
    def start_fusion_near_identity(self) -> None:
        """After loading a pretrained decoder: the low-level branch starts at zero (its 1x1 convs) and
        every AWFFM passes the embedding through (AWFFM.start_near_identity), so that the first step
        starts from what the pretrained decoder computes; what the low-level feature adds is learned."""
        for proj in self.low_level_proj:
            assert isinstance(proj, nn.Conv2d) and proj.bias is not None  # built so in __init__
            proj.weight.zero_()
            proj.bias.zero_()
        for module in self.mask_decoder.awffms():
            module.start_near_identity()

    # -- forward --------------------------------------------------------------
    def encoder_features(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """[B,1|3,H,W] in [0,1] -> (image embedding G [B,256,h,w], the raw low-level taps).

        Everything the frozen encoder computes; ``decode`` does the rest. Split so that fine-tuning
        with the encoder frozen (or its LoRA still at zero) can compute this once per slice.
        """
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        x = (images - self.pixel_mean) / self.pixel_std
        return self.family.encode(self.image_encoder, x, self.taps)

    def decode(self, embedding: torch.Tensor, taps: list[torch.Tensor]) -> torch.Tensor:
        """The trainable rest: low-level compression, AWFFM, decoder -> logits [B, K+1, 4h, 4w]."""
        low = self.compress_taps(taps)
        pe = self.prompt_encoder.get_dense_pe().to(embedding.dtype)
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).to(embedding.dtype)
        return self.mask_decoder(embedding, low, pe, dense)

    def decode_features(self, features: tuple[torch.Tensor, list[torch.Tensor]]) -> torch.Tensor:
        """``decode`` on what ``encoder_features`` returned, as one argument: the forward of a training
        step on cached features (train_step calls its model with the batch alone)."""
        return self.decode(*features)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B,3,H,W] in [0,1] -> (image embedding G, compressed low-level feature L or None)."""
        embedding, taps = self.encoder_features(images)
        return embedding, self.compress_taps(taps)

    def compress_taps(self, taps: list[torch.Tensor]) -> torch.Tensor | None:
        """The low-level feature L: each tap through its 1x1 conv, summed (then, in training, dropped
        per sample with probability ``low_level_dropout.p``); None without taps."""
        if not taps:
            return None
        return self.low_level_dropout(sum(proj(t) for proj, t in zip(self.low_level_proj, taps)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B,1|3,H,W] in [0,1] -> low-resolution class logits [B, K+1, H/4, W/4]."""
        return self.decode(*self.encoder_features(images))

    def predict(self, images: torch.Tensor, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Logits resized (bilinear) to out_size, default the input size."""
        logits = self(images)
        size = out_size or tuple(images.shape[-2:])
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def build_hfsam(spec: ModelSpec | None = None, **kwargs) -> HFSAM:
    """Make a randomly initialised HF-SAM; load weights with checkpoint.load_base()."""
    spec = spec or ModelSpec(**kwargs)
    return HFSAM(spec)
