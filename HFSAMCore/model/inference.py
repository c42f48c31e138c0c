"""Inference over a volume: slices in canonical orientation, batched through HF-SAM.

Slices stream through the model in batches: the only per-volume array kept is
the uint8 label volume (logit maps exist for one batch at a time, class
probabilities for the few slices the slice smoothing averages), so a 500-slice
CT costs no more memory than a 5-slice one. Resizing to the model input and back
(logits or probabilities, then argmax) is done on whole batches on the device.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import SimpleITK as sitk
import torch
from torch.nn import functional as F

from ..errors import InputError, OutOfMemory
from ..io.slices import check_slices_are_images, choose_preset, normalize, volume_stats
from ..runtime.device import (
    autocast,
    is_out_of_memory,
    peak_memory_mb,
    reset_peak_memory,
)
from ..runtime.progress import Progress
from .slice_smoothing import DEFAULT_SLICE_SMOOTHING_MM, SliceSmoother, is_truncated, slice_weights


def to_model_input(batch: np.ndarray, size: int, device: torch.device) -> torch.Tensor:
    """[b,h,w] float32 in [0,1] -> [b,1,size,size] on the device (bilinear, antialiased when shrinking)."""
    x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(device, non_blocking=True)[:, None]
    if x.shape[-2:] == (size, size):
        return x
    shrink = x.shape[-2] > size or x.shape[-1] > size
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


def logits_to_labels(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[b,K+1,h',w'] logits -> [b,h,w] uint8 labels: bilinear to the slice size, then argmax.

    Channels-last, so that each pixel's K+1 logits are adjacent: on the CPU the argmax over
    channels is then 8x faster than over NCHW planes, and the result is the same.
    """
    logits = logits.float().contiguous(memory_format=torch.channels_last)
    logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits.argmax(dim=1).to(torch.uint8)


def probabilities_to_labels(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[b,K+1,h',w'] class probabilities -> [b,h,w] uint8 labels, resized as ``logits_to_labels`` resizes:
    their logarithm differs from the logits by one number per pixel, so unsmoothed probabilities give
    exactly the labels of their logits."""
    return logits_to_labels(probs.clamp_min(1e-30).log(), size)


class StageTimer:
    """Wall time per stage, for the benchmark; a no-op unless asked for."""

    def __init__(self, device: torch.device, enabled: bool):
        self.device, self.enabled = device, enabled
        self.seconds: dict[str, float] = {}
        self._t = 0.0

    def start(self) -> None:
        if self.enabled:
            self._sync()
            self._t = time.perf_counter()

    def stop(self, stage: str) -> None:
        if self.enabled:
            self._sync()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - self._t
            self._t = time.perf_counter()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def segment_image(
    image: sitk.Image,
    model,
    *,
    preset: str = "auto",
    axis: str = "axial",
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
    timings: dict | None = None,
    class_values: list[int] | None = None,
    slice_smoothing_mm: float = DEFAULT_SLICE_SMOOTHING_MM,
) -> tuple[sitk.Image, dict]:
    """Segment every slice of ``image``; return (label image with image's geometry, run info).

    ``slice_smoothing_mm``: each slice's class probabilities are averaged with its neighbours'
    (a Gaussian of this sigma along the slice axis, ``slice_smoothing.py``) before the argmax;
    0: every slice on its own.

    ``class_values``: the label value written for each class, in the model's class order (an
    adapter's class list); None: class k is written as k. Pass a dict as ``timings`` to get
    seconds per stage (preprocess, model, postprocess) added to it; the benchmark does.
    A model whose output is not finite (a broken adapter) is an error, not an empty result.
    """
    progress = progress or Progress("none")
    device = torch.device(device)
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, not {batch_size}")
    slice_smoothing_mm += 0.0  # -0.0 (`--slice-smoothing -0`) becomes 0.0, as the sidecar records it
    timer = StageTimer(device, timings is not None)
    timer.start()
    view = check_slices_are_images(image, axis, "the volume")
    array = sitk.GetArrayViewFromImage(image)
    stack = view.to_slices(array)
    preset = choose_preset(image) if preset == "auto" else preset
    stats = volume_stats(array, preset)
    n, h, w = stack.shape
    size = model.spec.img_size
    weights = slice_weights(slice_smoothing_mm, view.slice_thickness_mm)
    if is_truncated(slice_smoothing_mm, view.slice_thickness_mm):
        cut = len(weights) // 2 * view.slice_thickness_mm / slice_smoothing_mm
        progress.warn(
            f"slice smoothing of {slice_smoothing_mm:g} mm over {view.slice_thickness_mm:g} mm slices is cut at "
            f"{len(weights) // 2} slices either side ({cut:.1f} sigma instead of 3)"
        )
    model.eval().to(device)
    reset_peak_memory(device)
    timer.stop("preprocess")

    def batch(a: int, b: int) -> torch.Tensor:
        return to_model_input(normalize(stack[a:b], preset, stats=stats), size, device)

    out, batch_size = predict_batches(
        model,
        n,
        batch,
        (h, w),
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        progress=progress,
        timer=timer,
        stage="segment",
        slice_weights=weights,
    )

    timer.start()
    if class_values is not None and list(class_values) != list(range(1, len(class_values) + 1)):
        lut = np.zeros(256, dtype=np.uint8)
        lut[1 : len(class_values) + 1] = class_values
        out = lut[out]
    labels = sitk.GetImageFromArray(view.from_slices(out))
    labels.CopyInformation(image)
    timer.stop("postprocess")
    if timings is not None:
        for k, v in timer.seconds.items():
            timings[k] = timings.get(k, 0.0) + v
    info = {
        "slices": n,
        "axis": axis,
        "intensity_preset": preset,
        "batch_size": batch_size,
        "device": str(device),
        "precision": str(dtype).replace("torch.", ""),
        "slice_smoothing_mm": slice_smoothing_mm,
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "labeled_voxels": int(np.count_nonzero(out)),
    }
    return labels, info


def predict_batches(
    model,
    n: int,
    batch: Callable[[int, int], torch.Tensor],
    out_hw: tuple[int, int],
    *,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    progress: Progress,
    timer: StageTimer | None = None,
    stage: str | None = None,
    slice_weights: list[float] | None = None,
) -> tuple[np.ndarray, int]:
    """Labels [n, H, W] (uint8) of n slices through ``model``, ``batch(a, b)`` giving the model input
    of slices a..b-1; the one loop every inference runs (``segment``, ``evaluate-dataset``).

    Out of memory: the batch is halved and tried again, down to 1, then ``OutOfMemory``. A model
    whose output is not finite (a broken adapter) is an error, never an empty result. ``stage``
    names the progress events (None: cancellation is checked, no events). ``slice_weights``: the
    neighbours' weights along the slice axis (``slice_smoothing.slice_weights``); None or one weight:
    each slice's own logits. Returns the labels and the batch size that fitted."""
    timer = timer or StageTimer(device, False)
    out = np.zeros((n, *out_hw), dtype=np.uint8)
    smoother = SliceSmoother(slice_weights, n) if slice_weights and len(slice_weights) > 1 else None
    start = 0
    if stage:
        progress.progress(stage, 0, n)
    with torch.inference_mode():
        while start < n:
            progress.check_cancelled()
            stop = min(start + batch_size, n)
            ready = None
            try:
                timer.start()
                x = batch(start, stop)
                timer.stop("preprocess")
                with autocast(device, dtype):
                    logits = model(x)
                timer.stop("model")
                if not bool(torch.isfinite(logits).all()):
                    raise InputError(
                        f"the model's output is NaN or infinite on slices {start}..{stop - 1}: its "
                        "weights are broken (an adapter trained with too high a learning rate?); "
                        "train the adapter again"
                    )
                if smoother is None:
                    out[start:stop] = logits_to_labels(logits, out_hw).cpu().numpy()
                else:
                    # push() changes nothing when it fails, so an out-of-memory here retries this batch.
                    ready = smoother.push(logits.float().softmax(dim=1))
                timer.stop("postprocess")
            except (RuntimeError, MemoryError) as exc:
                batch_size = _smaller_batch(exc, batch_size, device, progress)
                continue
            if ready is not None:
                batch_size = _write_labels(out, *ready, out_hw, batch_size, device, progress)
                timer.stop("postprocess")
            start = stop
            if stage:
                progress.progress(stage, start, n)
    return out, batch_size


def _write_labels(
    out: np.ndarray, first: int, probs: torch.Tensor, out_hw, batch_size: int, device, progress: Progress
) -> int:
    """Labels of smoothed slices first.. into ``out``, resized ``batch_size`` slices at a time (the last
    push releases the volume's last r slices with its own); returns the batch size that fitted."""
    done = 0
    while done < len(probs):
        try:
            chunk = probs[done : done + batch_size]
            out[first + done : first + done + len(chunk)] = probabilities_to_labels(chunk, out_hw).cpu().numpy()
            done += len(chunk)
        except (RuntimeError, MemoryError) as exc:
            batch_size = _smaller_batch(exc, batch_size, device, progress)
    return batch_size


def _smaller_batch(exc: BaseException, batch_size: int, device: torch.device, progress: Progress) -> int:
    """After an error in a batch: half the batch size if it was out of memory, else the error itself."""
    if not is_out_of_memory(exc):
        raise exc
    if batch_size == 1:
        raise OutOfMemory(device.type) from exc
    if device.type == "cuda":
        torch.cuda.empty_cache()
    progress.warn(f"out of memory: retrying with batch size {batch_size // 2}")
    return batch_size // 2
