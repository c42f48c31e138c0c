"""An HF-SAM configuration summarised without building its weights: sizes and parameter counts."""

from __future__ import annotations

from typing import Any


def architecture_summary(
    backbone: str,
    *,
    img_size: int | None = None,
    classes: str = "8",
    rank: int = 5,
    fusion: str = "two_step",
    pixel_norm: str | None = None,
) -> dict[str, Any]:
    """The resolved model spec, its embedding and logits sizes, and total, trainable, LoRA and frozen
    parameter counts. ``classes``: a number, a preset or names."""
    import torch

    from .classes import resolve_classes
    from .hfsam import HFSAM, ModelSpec
    from .registry import get_backbone_info

    k = int(classes) if classes.isdigit() else len(resolve_classes(classes))
    spec = ModelSpec(
        backbone, img_size or get_backbone_info(backbone).default_img_size, k, rank, fusion, pixel_norm=pixel_norm
    ).resolved()
    with torch.device("meta"):  # counts without allocating vit_h's weights
        model = HFSAM(spec)
    tokens = spec.img_size // 16
    return {
        **spec.as_dict(),
        "embedding_size": [tokens, tokens],
        "logits_size": [tokens * 4, tokens * 4],
        "outputs": k + 1,
        "parameters": model.parameter_counts(),
    }
