"""The metadata a newly trained adapter carries, built in one place for every way of training.

Few-shot fine-tuning, the demo and whole-dataset training all describe their adapter as a
``TrainedAdapter``; ``adapter_metadata.validate_metadata`` (run by ``save_adapter``) then
checks its ``metadata()`` against the format and fills the defaults (``hfsam_version`` among them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TrainingRecord:
    """How an adapter was trained: the ``training`` field of its metadata."""

    image: str  # the volume (or dataset root) it was trained on
    steps: int
    batch_size: int
    lr: float
    slices: Sequence[int] = ()
    heldout_slices: Sequence[int] = ()
    cached_steps: int | None = None
    low_level_dropout: float | None = None  # None: before it existed (no dropout)
    max_grad_norm: float | None = None  # each step's gradient clipped to this norm; None: not clipped
    seed: int | None = None
    minutes: float | None = None
    started_from: str | None = None  # the adapter training continued from

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["slices"], d["heldout_slices"] = list(self.slices), list(self.heldout_slices)
        return d


@dataclass(frozen=True)
class TrainedAdapter:
    """Everything an adapter's metadata says about the model and its training."""

    name: str
    spec: Any  # model.hfsam.ModelSpec
    base: Mapping[str, Any] | None  # the base checkpoint's name and SHA256
    classes: Sequence[Mapping[str, Any]]
    preset: str
    axis: str
    training: TrainingRecord
    metrics: Mapping[str, float | None] = field(default_factory=dict)
    description: str = ""
    extra: Mapping[str, Any] | None = None
    hfsam_version: str | None = None  # default: this engine's

    def metadata(self) -> dict[str, Any]:
        spec = {k: v for k, v in self.spec.as_dict().items() if k != "num_classes"}
        meta: dict[str, Any] = {
            "name": self.name,
            **spec,
            "base_checkpoint": self.base,
            "classes": list(self.classes),
            "intensity_preset": self.preset,
            "axis": self.axis,
            "training": self.training.as_dict(),
            "metrics": {k: v for k, v in self.metrics.items() if v is not None},
            "description": self.description,
        }
        if self.extra is not None:
            meta["extra"] = dict(self.extra)
        if self.hfsam_version is not None:
            meta["hfsam_version"] = self.hfsam_version
        return meta
