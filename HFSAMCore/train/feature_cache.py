"""Encoder features of the training slices, computed once, for the steps that do not train LoRA.

On a CPU the image encoder is most of a training step (LiteMedSAM: about 0.8 of 1.0 CPU-s
per sample). While LoRA does not train, the encoder does not change, nor its output for a
given input, so the steps before LoRA trains (``TrainConfig.cached_steps``) draw their batches
from a pool of ``copies`` augmented versions of each slice whose features were computed
here once. Copy 0 is the slice itself. The result is exact for those steps, not an
approximation: it is what the full model would compute on the same augmented batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..runtime.device import autocast


@dataclass
class FeatureCache:
    embeddings: torch.Tensor  # [P,256,h,w] on the device, in the training precision
    taps: list[torch.Tensor]  # each [P,C,h',w']
    labels: torch.Tensor  # [P,S,S]

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        copies: int,
        augment,
        gen: torch.Generator,
        precision: torch.dtype,
        batch_size: int = 4,
        check_cancelled=None,
    ) -> FeatureCache:
        """``augment(images, labels, gen)`` draws copies 1..copies-1 (None: copy 0 only)."""
        xs, ys = [images], [labels]
        for _ in range(1, copies if augment is not None else 1):
            x, y = augment(images, labels, gen)
            xs.append(x)
            ys.append(y)
        x_all, y_all = torch.cat(xs), torch.cat(ys)
        was_training = model.training
        model.eval()
        embeddings, taps = [], []
        for i in range(0, len(x_all), batch_size):
            if check_cancelled is not None:
                check_cancelled()
            with autocast(x_all.device, precision):
                e, t = model.encoder_features(x_all[i : i + batch_size])
            embeddings.append(e)
            taps.append(t)
        model.train(was_training)
        return cls(torch.cat(embeddings), [torch.cat(parts) for parts in zip(*taps)], y_all)

    def batch(self, pick: torch.Tensor) -> tuple[tuple[torch.Tensor, list[torch.Tensor]], torch.Tensor]:
        return (self.embeddings[pick], [t[pick] for t in self.taps]), self.labels[pick]
