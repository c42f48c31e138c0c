"""HF-SAM assembled: SAM encoder + LoRA, low-level feature, AWFFM decoder.

    images [B,3,H,W] in [0,1]
      -> SAM ImageEncoderViT (frozen, LoRA on q/v)          -> G  [B,256,H/16,W/16]
         the first global-attention block's output           -> 1x1 conv -> L [B,256,H/16,W/16]
      -> HFSAMDecoder(G, L, SAM's dense PE, no_mask_embed)  -> logits [B,K+1,H/4,W/4]

`build_hfsam` is the one place a model is made; `ModelSpec` is everything that
must match between a model and an adapter (see adapters.check_compatible).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F
from segment_anything.modeling import PromptEncoder

from ..errors import InputError
from .attention import use_fast_encoder
from .backbone import PATCH_SIZE, BackboneConfig, build_image_encoder, get_backbone
from .decoder import FUSION_MODES, HFSAMDecoder
from .lora import add_lora, is_lora_parameter
from .registry import PIXEL_NORMS, get_backbone_info

IMG_SIZES = (224, 512)


@dataclass(frozen=True)
class ModelSpec:
    backbone: str = "vit_b"
    img_size: int = 512
    num_classes: int = 8
    rank: int = 5
    fusion: str = "two_step"
    low_level_blocks: tuple[int, ...] | None = None  # None: the backbone's default taps
    pixel_norm: str | None = None  # None: the backbone's own (registry.PIXEL_NORMS)

    def resolved(self) -> "ModelSpec":
        """Validate and fill defaults; raises InputError on impossible values."""
        cfg = get_backbone(self.backbone)
        if self.img_size % PATCH_SIZE or not 64 <= self.img_size <= 2048:
            raise InputError(f"--img-size {self.img_size} is not supported: use 512 or 224 "
                             f"(any multiple of {PATCH_SIZE} from 64 to 2048 works)")
        if not 1 <= self.num_classes <= 255:
            raise InputError(f"the number of classes must be 1..255, not {self.num_classes}")
        if not 0 <= self.rank <= 256:
            raise InputError(f"--rank must be 0..256, not {self.rank}")
        if self.fusion not in FUSION_MODES:
            raise InputError(f"--fusion must be one of {', '.join(FUSION_MODES)}, not {self.fusion!r}")
        blocks = tuple(self.low_level_blocks) if self.low_level_blocks else (cfg.first_global_block,)
        if any(not 0 <= b < cfg.depth for b in blocks):
            raise InputError(f"low-level blocks {blocks} are outside the {self.backbone} encoder (0..{cfg.depth - 1})")
        norm = self.pixel_norm or get_backbone_info(self.backbone).pixel_norm
        if norm not in PIXEL_NORMS:
            raise InputError(f"pixel normalisation must be one of {', '.join(PIXEL_NORMS)}, not {norm!r}")
        return ModelSpec(self.backbone, int(self.img_size), int(self.num_classes), int(self.rank), self.fusion,
                         tuple(int(b) for b in blocks), norm)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["low_level_blocks"] = list(d["low_level_blocks"] or [])
        return d


class HFSAM(nn.Module):
    def __init__(self, spec: ModelSpec, *, fast_encoder: bool = True):
        super().__init__()
        spec = spec.resolved()
        cfg: BackboneConfig = get_backbone(spec.backbone)
        self.spec = spec
        self.cfg = cfg
        embed_size = spec.img_size // PATCH_SIZE
        self.image_encoder = build_image_encoder(cfg, spec.img_size)
        self.lora_parameter_count = add_lora(self.image_encoder, spec.rank)
        use_fast_encoder(self.image_encoder, fast_encoder)  # False: SAM's own blocks, for reference
        self.prompt_encoder = PromptEncoder(
            embed_dim=cfg.prompt_dim,
            image_embedding_size=(embed_size, embed_size),
            input_image_size=(spec.img_size, spec.img_size),
            mask_in_chans=16,
        )
        # One 1x1 compression conv per low-level block; several blocks are summed.
        self.low_level_proj = nn.ModuleList(
            nn.Conv2d(cfg.embed_dim, cfg.prompt_dim, kernel_size=1) for _ in spec.low_level_blocks
        )
        self.mask_decoder = HFSAMDecoder(
            num_classes=spec.num_classes,
            transformer_dim=cfg.prompt_dim,
            depth=cfg.decoder_depth,
            mlp_dim=cfg.decoder_mlp_dim,
            num_heads=cfg.decoder_heads,
            fusion=spec.fusion,
        )
        mean, std = PIXEL_NORMS[spec.pixel_norm]
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.freeze_base()

    # -- parameters -----------------------------------------------------------
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
            parts = [f"{len(v)} {k} ({', '.join(v[:3])})" for k, v in
                     (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if v]
            raise InputError("the adapter's tensors do not fit the model: " + "; ".join(parts))
        with torch.no_grad():
            for n, p in expected.items():
                p.copy_(tensors[n].to(p.dtype))

    def parameter_counts(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for n, p in self.named_parameters() if self.is_trainable_name(n))
        lora = sum(p.numel() for n, p in self.named_parameters() if is_lora_parameter(n))
        return {"total": total, "trainable": trainable, "lora": lora, "frozen": total - trainable}

    # -- forward --------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B,3,H,W] in [0,1] -> (image embedding G, low-level feature L), both [B,C,H/16,W/16]."""
        enc = self.image_encoder
        x = (images - self.pixel_mean) / self.pixel_std
        x = enc.patch_embed(x)
        if enc.pos_embed is not None:
            x = x + enc.pos_embed
        low = None
        wanted = self.spec.low_level_blocks
        for i, block in enumerate(enc.blocks):
            x = block(x)
            if i in wanted:
                proj = self.low_level_proj[wanted.index(i)](x.permute(0, 3, 1, 2))
                low = proj if low is None else low + proj
        return enc.neck(x.permute(0, 3, 1, 2)), low

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B,1|3,H,W] in [0,1] -> low-resolution class logits [B, K+1, H/4, W/4]."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        embedding, low = self.encode(images)
        pe = self.prompt_encoder.get_dense_pe().to(embedding.dtype)
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).to(embedding.dtype)
        return self.mask_decoder(embedding, low, pe, dense)

    def predict(self, images: torch.Tensor, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Logits resized (bilinear) to out_size, default the input size."""
        logits = self(images)
        size = out_size or tuple(images.shape[-2:])
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def build_hfsam(spec: ModelSpec | None = None, **kwargs) -> HFSAM:
    """Make a randomly initialised HF-SAM; load weights with checkpoint.load_base()."""
    spec = spec or ModelSpec(**kwargs)
    return HFSAM(spec)
