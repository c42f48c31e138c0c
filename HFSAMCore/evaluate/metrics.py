"""Segmentation metrics: Dice and HD95, both in physical units and in the paper's convention.

Two conventions, because they answer two questions:

* **mm convention** (``dice``, ``hd95_mm``): what a clinician asks, "how far
  off is the surface, in millimetres?". Spacing-aware; empty masks give the
  honest answer (HD95 is undefined or infinite), reported as null in JSON.
* **paper convention** (``paper_metrics``): TransUNet's
  ``calculate_metric_percase``, used by SAMed, H-SAM and HF-SAM, so that our
  numbers compare with the literature. Voxel units (spacing 1 on every axis)
  and fixed values for empty masks: prediction and reference both non-empty ->
  (Dice, HD95); prediction non-empty, reference empty -> (1, 0); prediction
  empty -> (0, 0), even when the reference is empty too.

HD95 follows medpy's ``hd95`` (what TransUNet calls): the surface of a mask is
its voxels that have a 6-neighbour outside the mask (the volume border counts
as outside); distances go from every surface voxel of one mask to the nearest
surface voxel of the other, both ways, and HD95 is the 95th percentile of all
those distances together.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..errors import InputError, one_line


def dice(ref: np.ndarray, pred: np.ndarray) -> float:
    """Dice 2|A and B| / (|A| + |B|) of two boolean masks.

    Both empty -> 1.0: the structure is absent and the prediction agrees, which
    is the right answer for a per-volume report. (The paper convention differs,
    see ``paper_metrics``.)
    """
    ref, pred = _masks(ref, pred)
    total = int(np.count_nonzero(ref)) + int(np.count_nonzero(pred))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(ref & pred)) / total


def hd95_mm(ref: np.ndarray, pred: np.ndarray, spacing_zyx=(1.0, 1.0, 1.0)) -> float:
    """95th percentile of the symmetric surface distances, in the units of ``spacing_zyx``.

    ``spacing_zyx`` is the voxel spacing in numpy axis order (reverse of
    SimpleITK's ``GetSpacing()``). Both masks empty -> ``nan`` (nothing to
    measure); exactly one empty -> ``inf`` (the other surface is infinitely far).
    """
    ref, pred = _masks(ref, pred)
    spacing = tuple(float(s) for s in spacing_zyx)
    if len(spacing) != ref.ndim:
        raise InputError(f"spacing {spacing} does not match a {ref.ndim}D mask")
    has_ref, has_pred = ref.any(), pred.any()
    if not has_ref and not has_pred:
        return math.nan
    if not has_ref or not has_pred:
        return math.inf
    ref, pred = _crop_to_union(ref, pred)
    ref_surface, pred_surface = _surface(ref), _surface(pred)
    d_pred_to_ref = _distance_to(ref_surface, spacing)[pred_surface]
    d_ref_to_pred = _distance_to(pred_surface, spacing)[ref_surface]
    return float(np.percentile(np.concatenate([d_pred_to_ref, d_ref_to_pred]), 95))


def paper_metrics(ref: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """(Dice, HD95) with TransUNet's rules: voxel units and fixed values for empty masks."""
    ref, pred = _masks(ref, pred)
    has_ref, has_pred = ref.any(), pred.any()
    if has_pred and has_ref:
        return dice(ref, pred), hd95_mm(ref, pred, (1.0,) * ref.ndim)
    if has_pred:
        return 1.0, 0.0
    return 0.0, 0.0


def evaluate(
    reference: sitk.Image, prediction: sitk.Image, classes: dict[int, str] | None = None, *, progress=None
) -> dict[str, Any]:
    """Per-class metrics of a predicted label map against a reference label map.

    The reference is brought onto the prediction's grid by physical position
    (nearest neighbour), so the two files may differ in grid, axis order and
    direction. Classes evaluated: every value listed in ``classes`` plus every
    non-zero value present in either map. Returns strict-JSON data (non-finite
    numbers become ``None``)::

        {"classes": [{"value", "name", "dice", "hd95_mm", "dice_paper", "hd95_paper",
                      "ref_voxels", "pred_voxels"}, ...],
         "mean": {"dice", "hd95_mm", "dice_paper", "hd95_paper", "n_classes"}}

    ``mean.dice`` and ``mean.hd95_mm`` average over the classes present in the
    reference (HD95 over those where it is finite, i.e. also predicted);
    ``mean.dice_paper`` and ``mean.hd95_paper`` average over all evaluated
    classes, as TransUNet averages over its fixed class list.

    ``progress`` (a progress.Progress): a "evaluate" progress event per class, and a cancel
    (SIGINT/SIGTERM) honoured between classes, since HD95 on a large volume takes a while.
    """
    from ..io.geometry import labels_onto_image

    ref_img = labels_onto_image(reference, prediction)
    ref = sitk.GetArrayViewFromImage(ref_img)
    pred = sitk.GetArrayViewFromImage(prediction)
    if pred.dtype.kind not in "iu":
        raise InputError(
            f"the prediction has pixel type {prediction.GetPixelIDTypeAsString()}: a label map must be integer"
        )
    spacing_zyx = tuple(reversed(prediction.GetSpacing()))
    names = {int(k): str(v) for k, v in (classes or {}).items()}
    values = sorted(set(names) | set(_present(ref)) | set(_present(pred)))

    rows: list[dict[str, Any]] = []
    for done, value in enumerate(values):
        if progress is not None:
            progress.check_cancelled()
            progress.progress("evaluate", done, len(values), value=value)
        r, p = ref == value, pred == value
        d_paper, h_paper = paper_metrics(r, p)
        rows.append(
            {
                "value": value,
                "name": names.get(value, f"class {value}"),
                "dice": dice(r, p),
                "hd95_mm": _finite_or_none(hd95_mm(r, p, spacing_zyx)),
                "dice_paper": d_paper,
                "hd95_paper": h_paper,
                "ref_voxels": int(np.count_nonzero(r)),
                "pred_voxels": int(np.count_nonzero(p)),
            }
        )
    if progress is not None:
        progress.check_cancelled()
        progress.progress("evaluate", len(values), len(values))
    in_ref = [row for row in rows if row["ref_voxels"] > 0]
    finite_hd = [row["hd95_mm"] for row in in_ref if row["hd95_mm"] is not None]
    mean = {
        "dice": _mean([row["dice"] for row in in_ref]),
        "hd95_mm": _mean(finite_hd),
        "dice_paper": _mean([row["dice_paper"] for row in rows]),
        "hd95_paper": _mean([row["hd95_paper"] for row in rows]),
        "n_classes": len(in_ref),
    }
    return {"classes": rows, "mean": mean}


def format_table(result: dict[str, Any]) -> str:
    """The result of ``evaluate`` as a Markdown table (one row per class plus the mean)."""
    lines = [
        "| Class | Name | Dice | HD95 (mm) | Dice (paper) | HD95 (paper, voxels) | Ref voxels | Pred voxels |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["classes"]:
        lines.append(
            f"| {row['value']} | {_cell(row['name'])} | {_num(row['dice'], 4)} | {_num(row['hd95_mm'], 2)} | "
            f"{_num(row['dice_paper'], 4)} | {_num(row['hd95_paper'], 2)} | "
            f"{row['ref_voxels']} | {row['pred_voxels']} |"
        )
    m = result["mean"]
    lines.append(
        f"| | **mean** ({m['n_classes']} in reference) | {_num(m['dice'], 4)} | {_num(m['hd95_mm'], 2)} | "
        f"{_num(m['dice_paper'], 4)} | {_num(m['hd95_paper'], 2)} | | |"
    )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- helpers


def _masks(ref: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref, pred = np.asarray(ref) != 0, np.asarray(pred) != 0
    if ref.shape != pred.shape:
        raise InputError(f"masks differ in shape: {ref.shape} vs {pred.shape}")
    return ref, pred


def _crop_to_union(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to their joint bounding box plus one voxel, for speed.

    Exact: every surface voxel lies inside the box, and a mask that touches the
    volume border still touches the crop's border (the margin is clipped there).
    """
    union = a | b
    box = []
    for axis in range(union.ndim):
        other = tuple(i for i in range(union.ndim) if i != axis)
        idx = np.flatnonzero(union.any(axis=other))
        box.append(slice(max(idx[0] - 1, 0), min(idx[-1] + 2, union.shape[axis])))
    crop = tuple(box)
    return a[crop], b[crop]


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with at least one 6-neighbour outside it (outside the volume counts)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = mask.copy()
    core = tuple(slice(1, -1) for _ in range(mask.ndim))
    for axis in range(mask.ndim):
        for shift in (-1, 1):
            neighbour = list(core)
            neighbour[axis] = slice(1 + shift, padded.shape[axis] - 1 + shift)
            interior &= padded[tuple(neighbour)]
    return mask & ~interior


def _distance_to(surface: np.ndarray, spacing_zyx: tuple[float, ...]) -> np.ndarray:
    """Euclidean distance (physical units) from every voxel to the nearest ``surface`` voxel.

    SimpleITK's Maurer map is exact; it is negative inside the object and 0 on
    its contour, and inside a one-voxel-thick surface every voxel is at
    distance 0 from the surface, hence the clip.
    """
    img = sitk.GetImageFromArray(surface.astype(np.uint8))
    img.SetSpacing(tuple(reversed(spacing_zyx)))
    dist = sitk.SignedMaurerDistanceMap(img, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return np.clip(sitk.GetArrayFromImage(dist), 0.0, None)


def _present(labels: np.ndarray) -> list[int]:
    return [int(v) for v in np.unique(labels) if v != 0]


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _num(x: float | None, digits: int) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _cell(text: str) -> str:
    return one_line(str(text)).replace("|", "\\|")  # a class name may come from a file
