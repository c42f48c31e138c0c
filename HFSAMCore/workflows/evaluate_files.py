"""Score a predicted label map against a reference: the `evaluate` job.

The reference is brought onto the prediction's grid by physical position; what cannot be
compared (reference outside the prediction, no shared label value) is said, never scored silently.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..runtime.progress import Progress


def evaluate_files(
    reference: str | os.PathLike,
    prediction: str | os.PathLike,
    *,
    classes: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Dice and HD95 (mm) per class and their means. Class names: ``classes`` (a preset or names),
    else the prediction's sidecar, else the label values."""
    from ..evaluate.metrics import evaluate
    from ..io.read import label_values, read_labels
    from ..io.write import sidecar_path
    from .preparation import warn_outside

    progress = progress or Progress("none")
    ref = read_labels(reference, warn=progress.warn)
    pred = read_labels(prediction, warn=progress.warn)
    outside, total = warn_outside(
        progress,
        ref,
        pred,
        "the reference",
        "the prediction's grid",
        "the scores cover only the part of the reference the prediction covers",
    )
    ref_values, pred_values = label_values(ref), label_values(pred)
    if ref_values and pred_values and not set(ref_values) & set(pred_values):
        progress.warn(
            f"the reference (values {_few(ref_values)}) and the prediction (values {_few(pred_values)}) "
            "share no label value: are they labelled alike? Every class scores 0"
        )
    names: dict[int, str] | None
    if classes:
        from ..model.classes import resolve_classes

        names = {c["value"]: c["name"] for c in resolve_classes(classes)}
    else:
        names = _sidecar_names(sidecar_path(prediction), Path(prediction).name, progress)
    result = evaluate(ref, pred, names, progress=progress)
    result["reference_outside_prediction"] = {"voxels": outside, "of_labeled_voxels": total}
    return result


def _few(values: list[int]) -> str:
    return ", ".join(map(str, values[:5])) + (" ..." if len(values) > 5 else "")


def _sidecar_names(sidecar: Path, prediction: str, progress: Progress) -> dict[int, str] | None:
    """Class names from the prediction's sidecar, if it is this prediction's (its "output" field)."""
    if not sidecar.is_file():
        return None
    try:
        data = json.loads(sidecar.read_text())
        owner = data.get("output")
        if owner is not None and str(owner).casefold() != prediction.casefold():
            progress.warn(f"ignoring {sidecar}: it is the sidecar of {owner}, not of {prediction}")
            return None
        return {int(c["value"]): str(c["name"]) for c in data["classes"]}
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
        progress.warn(f"ignoring unreadable sidecar {sidecar}")
        return None
