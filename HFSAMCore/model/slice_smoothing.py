"""Neighbouring slices vote: class probabilities averaged along the slice axis, Gaussian in mm.

HF-SAM is a 2D model: it segments every slice on its own, so its mistakes on neighbouring slices
are largely independent, while the anatomy changes little over a few millimetres. Averaging each
slice's class probabilities with its neighbours' before the argmax (a Gaussian along the slice
axis, renormalised at the volume's first and last slices) removes much of that noise. On the
sample CT it raised the mean Dice of every `bench fewshot` row (HF-SAM, decoder only, U-Net; 1 to
10 labeled slices) by 0.010-0.024, no organ losing more than 0.01; about two thirds of HF-SAM's
gain remains with the painted slices kept out of every neighbourhood (benchmarks/RESULTS.md).

The width is in millimetres, so that one setting means the same anatomy at any slice thickness:
3 mm weighs the next slice of a 3 mm scan 0.61 of the slice itself, that of a 5 mm scan 0.25, and
the slice three over of a 1 mm scan 0.61. 0 turns it off (each slice's own argmax).

Slices stream through ``SliceSmoother`` in order, so only a window of about 2r slices of probabilities
(r = 3 sigma in slices, at most ``MAX_RADIUS``) plus one batch is held at any time, never the volume's.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch  # torch-free at import: the command line reads the default before torch loads

#: What `segment`, the demo and `bench fewshot` use. Chosen on the sample CT (3 mm slices: of 0, 1.5,
#: 3 and 4.5 mm, the best or within 0.003 of it) and checked on the 2 mm DICOM sample; RESULTS.md.
DEFAULT_SLICE_SMOOTHING_MM = 3.0
#: Widths above this would blur distinct organs into each other: refused as a typo.
MAX_SLICE_SMOOTHING_MM = 50.0
#: Neighbours either side at most: bounds the window's memory on very thin slices (3 mm over 0.1 mm
#: slices is sigma 30 slices, cut at 32 instead of 90; ``is_truncated`` says so). LiteMedSAM's class
#: maps are 256 x 256, so 2 x 32 + 1 slices of 9 classes are 150 MB.
MAX_RADIUS = 32
#: Below a tenth of a slice a neighbour's weight is under e^-50: no smoothing.
MIN_SIGMA_SLICES = 0.1


def is_truncated(sigma_mm: float, thickness_mm: float) -> bool:
    """Whether ``MAX_RADIUS`` cuts this Gaussian short of 3 sigma (segment warns)."""
    return math.ceil(3 * sigma_mm / thickness_mm) > MAX_RADIUS


def slice_weights(sigma_mm: float, thickness_mm: float) -> list[float]:
    """Gaussian weights for slice offsets -r..r (r = ceil(3 sigma) in slices, at most ``MAX_RADIUS``),
    not normalised; [1.0] (no smoothing) when ``sigma_mm`` is 0 or so small that a neighbour would
    weigh less than e^-50."""
    sigma = sigma_mm / thickness_mm
    if sigma < MIN_SIGMA_SLICES:
        return [1.0]
    r = min(math.ceil(3 * sigma), MAX_RADIUS)
    return [math.exp(-0.5 * (o / sigma) ** 2) for o in range(-r, r + 1)]


class SliceSmoother:
    """Push the probabilities [b, C, S, S] of consecutive slices 0..n-1 in order; each ``push``
    returns (first index, smoothed probabilities) of the slices whose neighbourhood is now complete,
    or None. Where a neighbour lies outside the volume, the weights of those that exist are
    renormalised."""

    def __init__(self, weights: list[float], n_slices: int):
        self.weights, self.n = weights, n_slices
        self.r = len(weights) // 2
        self.buffer: torch.Tensor | None = None  # slices [self.lo, self.received)
        self.lo = 0
        self.received = 0
        self.done = 0  # slices returned so far

    def push(self, probs: torch.Tensor) -> tuple[int, torch.Tensor] | None:
        """Take the next slices; nothing changes if this raises (out of memory), so the caller may retry."""
        import torch

        buffer = probs if self.buffer is None else torch.cat((self.buffer, probs))
        received = self.received + len(probs)
        # A slice is complete once its last neighbour (or the volume's last slice) has arrived.
        ready_to = self.n if received >= self.n else max(self.done, received - self.r)
        if ready_to <= self.done:
            self.buffer, self.received = buffer, received
            return None
        start, out = self.done, self._smooth(buffer, self.done, ready_to)
        keep_from = max(self.lo, ready_to - self.r)  # the oldest slice a future one still needs
        self.buffer, self.lo, self.received, self.done = buffer[keep_from - self.lo :], keep_from, received, ready_to
        return start, out

    def _smooth(self, buffer: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """Smoothed slices a..b-1 from ``buffer`` (slices self.lo.., holding every neighbour they have)."""
        out = buffer.new_zeros(buffer[: b - a].shape)
        total = buffer.new_zeros(b - a)
        for offset, w in zip(range(-self.r, self.r + 1), self.weights):
            # Slices i in [a, b) whose neighbour i + offset exists (0 <= i + offset < n).
            lo, hi = max(a, -offset), min(b, self.n - offset)
            if lo >= hi:
                continue
            out[lo - a : hi - a] += w * buffer[lo + offset - self.lo : hi + offset - self.lo]
            total[lo - a : hi - a] += w
        return out / total.view(-1, *([1] * (out.dim() - 1)))
