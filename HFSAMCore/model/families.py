"""What an encoder family must provide so that HF-SAM can run on it (the torch side of the registry).

HF-SAM itself (low-level projection, AWFFM, the prompt-free decoder, the loss) is the same on
every backbone; a family only says how its image encoder is built and read. ``HFSAM`` calls
nothing else of an encoder. To add a family: write a class with these methods in its own module
and name it in ``_FAMILIES``; the registry entry names the family.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .registry import BackboneInfo

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .hfsam import HFSAM


class EncoderFamily(Protocol):
    def build_encoder(self, info: BackboneInfo, img_size: int) -> nn.Module:
        """A randomly initialised encoder, with the checkpoint's parameter names."""

    def tap_channels(self, info: BackboneInfo, tap: int) -> int:
        """Channels of the feature map at low-level tap ``tap``."""

    def encode(
        self, encoder: nn.Module, images: torch.Tensor, taps: tuple[int, ...]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Normalised [B,3,S,S] -> (image embedding [B,256,s,s], one [B,C,s,s] map per tap)."""

    def add_lora(self, encoder: nn.Module, rank: int) -> int:
        """Put LoRA on the q and v projections of every attention; return the LoRA parameter count."""

    def read_checkpoint(self, path: Path) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors, read without unpickling code; InputError if it is not one."""

    def load_checkpoint(self, model: HFSAM, state: dict[str, torch.Tensor]) -> dict:
        """Load the weights strictly (every key used or knowingly skipped); return a report."""

    def keep_frozen(self, encoder: nn.Module) -> None:
        """After ``model.train()``: put back in eval mode what must not learn (BatchNorm statistics)."""

    def set_fast_inference(self, encoder: nn.Module, enabled: bool) -> None:
        """Switch the encoder's faster implementation on (default) or off (the reference one)."""


_FAMILIES = {
    "sam_vit": "HFSAMCore.model.sam_vit:SamViTFamily",
    "tinyvit": "HFSAMCore.model.lite_medsam:LiteMedSAMFamily",
}


def get_family(info: BackboneInfo) -> EncoderFamily:
    module, _, cls = _FAMILIES[info.family].partition(":")
    return getattr(importlib.import_module(module), cls)()
