"""The SAM ViT backbone family: SAM's own ``ImageEncoderViT`` and Meta's checkpoints.

The encoder is SAM's own ``ImageEncoderViT``, configured from the registry. A SAM checkpoint is trained at
1024 px; at another input size the absolute position embedding and the relative
position tables of the global-attention blocks no longer fit, so they are
resized bilinearly (as SAMed does). Windowed blocks keep their 14x14 tables.
"""

from __future__ import annotations

import pickle
import re
import warnings
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from segment_anything.modeling import ImageEncoderViT
from torch import nn
from torch.nn import functional as F

from ..errors import InputError
from .attention import use_fast_encoder
from .lora import add_lora
from .registry import BACKBONES, BackboneInfo, ViTArch

if TYPE_CHECKING:
    from .hfsam import HFSAM

SAM_IMG_SIZE = 1024


def vit_arch(info: BackboneInfo) -> ViTArch:
    """The architecture of a backbone of this family (the registry pairs family "sam_vit" with ViTArch)."""
    assert isinstance(info.arch, ViTArch), info.name
    return info.arch


def build_image_encoder(info: BackboneInfo, img_size: int) -> ImageEncoderViT:
    arch = vit_arch(info)
    return ImageEncoderViT(
        img_size=img_size,
        patch_size=arch.patch_size,
        embed_dim=arch.embed_dim,
        depth=arch.depth,
        num_heads=arch.num_heads,
        mlp_ratio=4,
        out_chans=info.decoder.dim,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        rel_pos_zero_init=True,
        window_size=arch.window_size,
        global_attn_indexes=arch.global_attn_indexes,
    )


# Keys of a SAM checkpoint that HF-SAM does not take: they depend on SAM's 3+1
# mask outputs and IoU head, while HF-SAM has K+1 class tokens and no IoU head.
UNUSED_CHECKPOINT_PREFIXES = (
    "mask_decoder.mask_tokens.",
    "mask_decoder.output_hypernetworks_mlps.",
    "mask_decoder.iou_prediction_head.",
)
# Parameters HF-SAM adds to SAM: never expected in a SAM checkpoint.
NEW_PARAMETER_MARKERS = (
    ".lora_",
    "low_level_proj.",
    "awffm",
    "mask_decoder.mask_tokens.",
    "mask_decoder.output_hypernetworks_mlps.",
    "mask_decoder.hf_token.",
)


def load_tensor_file(path: str | Path, *, what: str) -> dict[str, torch.Tensor]:
    """A checkpoint's dictionary of tensors, read without ever running pickled code (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols mean nothing to a user
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower():  # torch's wording when it refuses an object
            raise InputError(
                f"{path} is not a loadable {what}: it holds objects other than tensors, "
                "which could run code when loaded, so it was refused; use an official file"
            ) from None
        raise InputError(f"{path} is not a loadable {what} (damaged or another format)") from None
    except Exception as exc:  # noqa: BLE001 - a damaged file fails in many ways (OSError, RuntimeError, EOFError...)
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # torch colours some messages
        first = text.splitlines()[0][:120] if text else type(exc).__name__
        raise InputError(f"{path} is not a loadable {what} (damaged, truncated or another format: {first})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path} is not a {what}: expected a dictionary of tensors")
    return state


def read_sam_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"checkpoint not found: {path}; download it with `hfsam models download vit_b` "
            "or pass --checkpoint none --backbone tiny for a random test model"
        )
    state = load_tensor_file(path, what="SAM checkpoint")
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
    resized = F.interpolate(
        table[None, None].float(), size=(length, table.shape[1]), mode="bilinear", align_corners=False
    )
    return resized[0, 0]


def adapt_sam_state_dict(state: dict[str, torch.Tensor], info: BackboneInfo, img_size: int) -> dict:
    """Resize the position tables of a 1024-px SAM checkpoint to ``img_size``."""
    state = dict(state)
    tokens = info.embedding_size(img_size)
    state["image_encoder.pos_embed"] = _resize_pos_embed(state["image_encoder.pos_embed"], tokens)
    for i in vit_arch(info).global_attn_indexes:
        for axis in ("h", "w"):
            key = f"image_encoder.blocks.{i}.attn.rel_pos_{axis}"
            if key in state:
                state[key] = _resize_rel_pos(state[key], 2 * tokens - 1)
    return state


def load_sam_weights(model: nn.Module, state: dict[str, torch.Tensor], info: BackboneInfo, img_size: int) -> dict:
    """Load SAM weights into an HF-SAM model, strictly: every key is accounted for.

    Returns a report {"loaded": n, "skipped": [...]} (skipped = the known
    class-specific SAM keys). Raises InputError naming unexpected, missing or
    mis-shaped keys, e.g. a vit_l checkpoint given for a vit_b model.
    """
    width = state["image_encoder.patch_embed.proj.weight"].shape[0]
    if width != vit_arch(info).embed_dim:
        guess = next(
            (n for n, b in BACKBONES.items() if b.family == "sam_vit" and vit_arch(b).embed_dim == width),
            f"width {width}",
        )
        raise InputError(
            f"the checkpoint is a {guess} SAM model but the backbone is width {vit_arch(info).embed_dim}; "
            f"pass --backbone {guess} or the matching checkpoint"
        )
    state = adapt_sam_state_dict(state, info, img_size)
    target = model.state_dict()
    skipped = [k for k in state if k.startswith(UNUSED_CHECKPOINT_PREFIXES)]
    usable = {k: v for k, v in state.items() if not k.startswith(UNUSED_CHECKPOINT_PREFIXES)}
    unexpected = sorted(k for k in usable if k not in target)
    mis_shaped = sorted(
        f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}"
        for k, v in usable.items()
        if k in target and v.shape != target[k].shape
    )
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


class SamViTFamily:
    """SAM's ViT encoders (vit_b, vit_l, vit_h; tiny for tests): the paper's backbone."""

    def build_encoder(self, info: BackboneInfo, img_size: int) -> ImageEncoderViT:
        return build_image_encoder(info, img_size)

    def tap_channels(self, info: BackboneInfo, tap: int) -> int:
        return vit_arch(info).embed_dim

    def encode(self, encoder: ImageEncoderViT, images: torch.Tensor, taps: tuple[int, ...]):
        x = encoder.patch_embed(images)
        if encoder.pos_embed is not None:
            x = x + encoder.pos_embed
        taken = {}
        for i, block in enumerate(encoder.blocks):
            x = block(x)
            if i in taps:
                taken[i] = x.permute(0, 3, 1, 2)
        return encoder.neck(x.permute(0, 3, 1, 2)), [taken[t] for t in taps]

    def add_lora(self, encoder: ImageEncoderViT, rank: int) -> int:
        return add_lora(encoder, rank)

    def read_checkpoint(self, path: Path) -> dict[str, torch.Tensor]:
        return read_sam_state_dict(path)

    def load_checkpoint(self, model: HFSAM, state: dict[str, torch.Tensor]) -> dict:
        return load_sam_weights(model, state, model.info, model.spec.img_size)

    def keep_frozen(self, encoder: ImageEncoderViT) -> None:
        pass  # LayerNorm only: nothing has running statistics

    def set_fast_inference(self, encoder: ImageEncoderViT, enabled: bool) -> None:
        use_fast_encoder(encoder, enabled)
