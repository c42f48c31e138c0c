"""SAM image-encoder configurations and loading of the official SAM checkpoints.

The encoder is SAM's own ``ImageEncoderViT``. A SAM checkpoint is trained at
1024 px; at another input size the absolute position embedding and the relative
position tables of the global-attention blocks no longer fit, so they are
resized bilinearly (as SAMed does). Windowed blocks keep their 14x14 tables.
"""

from __future__ import annotations

import pickle
import re
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from segment_anything.modeling import ImageEncoderViT

from ..errors import InputError

PATCH_SIZE = 16
SAM_IMG_SIZE = 1024


@dataclass(frozen=True)
class BackboneConfig:
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int = 14
    prompt_dim: int = 256  # SAM's prompt/decoder width
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    checkpoint: str | None = None  # catalog key of the official weights
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def first_global_block(self) -> int:
        return self.global_attn_indexes[0]


BACKBONES: dict[str, BackboneConfig] = {
    "vit_b": BackboneConfig(768, 12, 12, (2, 5, 8, 11), checkpoint="vit_b"),
    "vit_l": BackboneConfig(1024, 24, 16, (5, 11, 17, 23), checkpoint="vit_l"),
    "vit_h": BackboneConfig(1280, 32, 16, (7, 15, 23, 31), checkpoint="vit_h"),
    # For CPU tests and CI: the same architecture, a few hundred thousand parameters.
    "tiny": BackboneConfig(
        64, 4, 2, (1, 3), window_size=7, prompt_dim=64, decoder_depth=1, decoder_mlp_dim=128,
        decoder_heads=2, note="test configuration: no pretrained weights exist",
    ),
}


def get_backbone(name: str) -> BackboneConfig:
    try:
        return BACKBONES[name]
    except KeyError:
        raise InputError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}") from None


def build_image_encoder(cfg: BackboneConfig, img_size: int) -> ImageEncoderViT:
    return ImageEncoderViT(
        img_size=img_size,
        patch_size=PATCH_SIZE,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=4,
        out_chans=cfg.prompt_dim,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        rel_pos_zero_init=True,
        window_size=cfg.window_size,
        global_attn_indexes=cfg.global_attn_indexes,
    )


# Keys of a SAM checkpoint that HF-SAM does not take: they depend on SAM's 3+1
# mask outputs and IoU head, while HF-SAM has K+1 class tokens and no IoU head.
UNUSED_CHECKPOINT_PREFIXES = (
    "mask_decoder.mask_tokens.",
    "mask_decoder.output_hypernetworks_mlps.",
    "mask_decoder.iou_prediction_head.",
)
# Parameters HF-SAM adds to SAM: never expected in a SAM checkpoint.
NEW_PARAMETER_MARKERS = (".lora_", "low_level_proj.", "awffm", "mask_decoder.mask_tokens.",
                         "mask_decoder.output_hypernetworks_mlps.", "mask_decoder.hf_token.")


def read_sam_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint without ever running pickled code (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}; download it with `hfsam models download vit_b` "
                         "or pass --checkpoint none --backbone tiny for a random test model")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols mean nothing to a user
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower():  # torch's wording when it refuses an object
            raise InputError(f"{path} is not a loadable SAM checkpoint: it holds objects other than tensors, "
                             "which could run code when loaded, so it was refused; use an official SAM "
                             "checkpoint") from None
        raise InputError(f"{path} is not a loadable SAM checkpoint (damaged or another format)") from None
    except Exception as exc:  # a damaged file fails in many ways (OSError, RuntimeError, EOFError, KeyError...)
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # torch colours some messages
        first = text.splitlines()[0][:120] if text else type(exc).__name__
        raise InputError(f"{path} is not a loadable SAM checkpoint (damaged, truncated or another format: "
                         f"{first})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path} is not a SAM checkpoint: expected a dictionary of tensors")
    if "image_encoder.patch_embed.proj.weight" not in state:
        raise InputError(f"{path} is not a SAM checkpoint: it has no image_encoder weights")
    return state


def _resize_pos_embed(pos: torch.Tensor, tokens: int) -> torch.Tensor:
    if pos.shape[1] == tokens:
        return pos
    pos = F.interpolate(pos.permute(0, 3, 1, 2).float(), size=(tokens, tokens), mode="bilinear", align_corners=False)
    return pos.permute(0, 2, 3, 1)


def _resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    if table.shape[0] == length:
        return table
    resized = F.interpolate(table[None, None].float(), size=(length, table.shape[1]), mode="bilinear",
                            align_corners=False)
    return resized[0, 0]


def adapt_sam_state_dict(state: dict[str, torch.Tensor], cfg: BackboneConfig, img_size: int) -> dict:
    """Resize the position tables of a 1024-px SAM checkpoint to ``img_size``."""
    state = dict(state)
    tokens = img_size // PATCH_SIZE
    state["image_encoder.pos_embed"] = _resize_pos_embed(state["image_encoder.pos_embed"], tokens)
    for i in cfg.global_attn_indexes:
        for axis in ("h", "w"):
            key = f"image_encoder.blocks.{i}.attn.rel_pos_{axis}"
            if key in state:
                state[key] = _resize_rel_pos(state[key], 2 * tokens - 1)
    return state


def load_sam_weights(model: nn.Module, state: dict[str, torch.Tensor], cfg: BackboneConfig, img_size: int) -> dict:
    """Load SAM weights into an HF-SAM model, strictly: every key is accounted for.

    Returns a report {"loaded": n, "skipped": [...]} (skipped = the known
    class-specific SAM keys). Raises InputError naming unexpected, missing or
    mis-shaped keys, e.g. a vit_l checkpoint given for a vit_b model.
    """
    width = state["image_encoder.patch_embed.proj.weight"].shape[0]
    if width != cfg.embed_dim:
        guess = next((n for n, c in BACKBONES.items() if c.embed_dim == width), f"width {width}")
        raise InputError(f"the checkpoint is a {guess} SAM model but the backbone is width {cfg.embed_dim}; "
                         f"pass --backbone {guess} or the matching checkpoint")
    state = adapt_sam_state_dict(state, cfg, img_size)
    target = model.state_dict()
    skipped = [k for k in state if k.startswith(UNUSED_CHECKPOINT_PREFIXES)]
    usable = {k: v for k, v in state.items() if not k.startswith(UNUSED_CHECKPOINT_PREFIXES)}
    unexpected = sorted(k for k in usable if k not in target)
    mis_shaped = sorted(f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}"
                        for k, v in usable.items() if k in target and v.shape != target[k].shape)
    missing = sorted(k for k in target if k not in usable and not any(m in k for m in NEW_PARAMETER_MARKERS))
    problems = []
    for label, keys in (("unexpected", unexpected), ("missing", missing), ("wrong shape", mis_shaped)):
        if keys:
            problems.append(f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    if problems:
        raise InputError("the checkpoint does not fit the model: " + "; ".join(problems))
    with torch.no_grad():
        for k, v in usable.items():
            target[k].copy_(v.to(target[k].dtype))
    return {"loaded": len(usable), "skipped": skipped}
