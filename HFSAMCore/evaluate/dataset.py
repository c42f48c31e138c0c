"""Evaluating an adapter on a test set, with the numbers laid out as the papers lay them out.

Two conventions, side by side (see metrics.py for the per-case rules):

* **paper**: TransUNet's ``test_single_volume`` + ``calculate_metric_percase``
  (used by SAMed, H-SAM, HF-SAM): per case and class, (Dice, HD95) in voxel
  units with fixed values for empty masks ((1, 0) for a prediction without
  reference, (0, 0) for an empty prediction); each class averaged over ALL
  cases, then the classes averaged. This is the number to compare with the
  paper's table (Dice 79.50 % on Synapse, 88.68 % on ACDC).
* **mm**: Dice over the cases whose reference holds the class, HD95 in
  millimetres over the cases where it is defined (both masks non-empty). The
  preprocessed .h5 volumes carry no spacing: pass ``--raw-dir`` (the original
  NIfTI files, spacing read from their headers) or ``--spacing FILE.json``
  (``{"case0001": [z, y, x], ...}`` in mm), else the mm columns stay empty.

One deliberate difference from TransUNet's script: slices are resized to the
model input bilinearly (antialiased when shrinking) and the LOGITS are resized
back before the argmax, as ``hfsam segment`` does, instead of spline-zooming the
image and nearest-zooming the label map back. At 512 px on Synapse (the
paper's setting) both are the identity.

Outputs in ``--output DIR``: ``table.md`` and ``table.csv`` (one row per
convention: mean Dice, mean HD95, then one Dice column per class, as in the
paper), ``per_class.csv``, ``per_case.csv``, ``results.json``, and optionally
``predictions/CASE.nii.gz``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..runtime.progress import Progress
from .metrics import dice, hd95_mm, paper_metrics

OUTPUT_FILES = ("table.md", "table.csv", "per_class.csv", "per_case.csv", "results.json")


# --------------------------------------------------------------------------- prediction


def predict_stack(
    model, stack: np.ndarray, *, batch_size: int = 4, device="cpu", dtype=None, progress: Progress | None = None
) -> np.ndarray:
    """Label map [D,H,W] (uint8) of a stack of slices [D,H,W] already in [0, 1]."""
    import torch

    from ..model.inference import predict_batches, to_model_input

    device = torch.device(device)
    d, h, w = stack.shape
    size = model.spec.img_size
    model.eval().to(device)
    out, _ = predict_batches(
        model,
        d,
        lambda a, b: to_model_input(stack[a:b], size, device),
        (h, w),
        batch_size=batch_size,
        device=device,
        dtype=dtype or torch.float32,
        progress=progress or Progress("none"),
    )
    return out


# --------------------------------------------------------------------------- metrics


def case_metrics(
    pred: np.ndarray, label: np.ndarray, num_classes: int, spacing_zyx: tuple[float, float, float] | None
) -> list[dict[str, Any]]:
    """One row per class 1..K: both conventions (mm values None without spacing or when undefined)."""
    if pred.shape != label.shape:
        raise InputError(f"prediction {pred.shape} and reference {label.shape} differ in shape")
    rows = []
    for c in range(1, num_classes + 1):
        ref, prd = label == c, pred == c
        d_paper, h_paper = paper_metrics(ref, prd)
        has_ref = bool(ref.any())
        row = {
            "class": c,
            "dice_paper": float(d_paper),
            "hd95_paper": float(h_paper),
            "dice": dice(ref, prd) if has_ref else None,
            "hd95_mm": None,
            "ref_voxels": int(np.count_nonzero(ref)),
            "pred_voxels": int(np.count_nonzero(prd)),
        }
        if spacing_zyx is not None and has_ref:
            h = hd95_mm(ref, prd, spacing_zyx)
            row["hd95_mm"] = float(h) if math.isfinite(h) else None
        rows.append(row)
    return rows


def summarize(per_case: dict[str, list[dict]], class_names: list[str]) -> dict[str, Any]:
    """Average over cases per class, then over classes (TransUNet's order), for both conventions."""
    k = len(class_names)
    classes = []
    for c in range(k):
        rows = [rows_[c] for rows_ in per_case.values()]
        dices = [r["dice"] for r in rows if r["dice"] is not None]
        hds = [r["hd95_mm"] for r in rows if r["hd95_mm"] is not None]
        classes.append(
            {
                "class": c + 1,
                "name": class_names[c],
                "dice_paper": _mean([r["dice_paper"] for r in rows]),
                "hd95_paper": _mean([r["hd95_paper"] for r in rows]),
                "dice": _mean(dices),
                "hd95_mm": _mean(hds),
                "cases_with_class": sum(r["ref_voxels"] > 0 for r in rows),
            }
        )
    mean = {
        key: _mean([c[key] for c in classes if c[key] is not None])
        for key in ("dice_paper", "hd95_paper", "dice", "hd95_mm")
    }
    return {"classes": classes, "mean": mean, "cases": len(per_case)}


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


# --------------------------------------------------------------------------- spacing


def spacing_lookup(raw_dir: str | Path | None = None, spacing_json: str | Path | None = None):
    """A function case name -> (z, y, x) mm or None, from --spacing JSON or the original files' headers."""
    table: dict[str, tuple[float, float, float]] = {}
    if spacing_json is not None:
        path = Path(spacing_json).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            given = {str(k): tuple(float(x) for x in v) for k, v in data.items()}
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise InputError(f"--spacing {path} must be a JSON object case -> [z, y, x] in mm ({exc})") from None
        if any(len(v) != 3 or min(v) <= 0 for v in given.values()):
            raise InputError(f"--spacing {path}: every entry must be three positive numbers [z, y, x]")
        table = {k: (v[0], v[1], v[2]) for k, v in given.items()}
    files: dict[str, Path] = {}
    if raw_dir is not None:
        root = Path(raw_dir).expanduser()
        if not root.is_dir():
            raise InputError(f"--raw-dir {root} is not a folder")
        for p in sorted(root.rglob("*.nii*")):
            stem = p.name.split(".nii")[0]
            files.setdefault(stem, p)

    def lookup(name: str, shape: tuple[int, int, int]) -> tuple[tuple[float, float, float] | None, str | None]:
        if name in table:
            return table[name], None
        path = files.get(name)
        if path is None and name.startswith("case"):  # TransUNet's caseNNNN is Synapse's imgNNNN.nii.gz
            path = files.get("img" + name[len("case") :])
        if path is None:
            return None, None
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        size, spacing = reader.GetSize(), reader.GetSpacing()
        if len(size) < 3 or size[2] != shape[0] or sorted(size[:2]) != sorted(shape[1:]):
            return None, f"{path.name} has size {size}, not that of {name} {shape[::-1]}: no mm metrics for it"
        # z is the slice axis of both; Synapse and ACDC have square pixels, so in-plane order cannot matter.
        return (float(spacing[2]), float(spacing[1]), float(spacing[0])), None

    return lookup


# --------------------------------------------------------------------------- the run


def check_outputs(output: Path, *, overwrite: bool, predictions: bool, inputs: dict | None = None) -> None:
    """Refuse, before any work, result files that exist (without ``overwrite``) or that are one of
    the run's ``inputs`` ({what: [paths]}, e.g. the --spacing JSON): never replaced, whatever the flags."""
    if output.exists() and not output.is_dir():
        raise InputError(f"{output} is a file; --output must be a folder")
    from ..io.outputs import same_file

    for what, paths in (inputs or {}).items():
        for name in OUTPUT_FILES:
            for path in paths:
                if path and same_file(output / name, Path(path).expanduser()):
                    raise InputError(
                        f"{output / name} is {what}: an output never replaces an input of the run; "
                        "choose another --output"
                    )
    if not overwrite:
        taken = [n for n in OUTPUT_FILES if (output / n).exists()]
        if predictions and (output / "predictions").exists():
            taken.append("predictions/")
        if taken:
            raise InputError(f"{output} already holds {', '.join(taken)}; pass --overwrite or choose another --output")


def evaluate_dataset(
    model,
    reader,
    names: list[str],
    class_names: list[str],
    *,
    batch_size: int = 4,
    device="cpu",
    dtype=None,
    spacing=None,
    predictions_dir: Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Segment every listed volume and measure it; returns {"per_case", "summary", "notes"}."""
    progress = progress or Progress("none")
    k = len(class_names)
    per_case: dict[str, list[dict]] = {}
    notes: list[str] = []
    for i, name in enumerate(names):
        progress.check_cancelled()
        vol = reader.load_volume(name)
        top = int(vol.label.max()) if vol.label.size else 0
        if top > k:
            raise InputError(f"case {name} holds label {top} but the model segments {k} classes")
        pred = predict_stack(model, vol.image, batch_size=batch_size, device=device, dtype=dtype, progress=progress)
        spacing_zyx, note = vol.spacing_zyx, None
        if spacing_zyx is None and spacing is not None:
            spacing_zyx, note = spacing(name, vol.image.shape)
        if note:
            notes.append(note)
            progress.warn(note)
        per_case[name] = case_metrics(pred, vol.label, k, spacing_zyx)
        if predictions_dir is not None:
            _write_prediction(pred, vol, spacing_zyx, predictions_dir / f"{name}.nii.gz", overwrite=overwrite)
        mean_dice = float(np.mean([r["dice_paper"] for r in per_case[name]]))
        progress.progress("evaluate", i + 1, len(names), case=name, dice=round(mean_dice, 4))
        progress.log(f"{name}: mean Dice {100 * mean_dice:.2f} % (paper convention)")
    if not any(r["hd95_mm"] is not None for rows in per_case.values() for r in rows):
        notes.append("no spacing known for these volumes: the mm columns are empty (pass --raw-dir or --spacing)")
    return {"per_case": per_case, "summary": summarize(per_case, class_names), "notes": notes}


def _write_prediction(pred: np.ndarray, vol, spacing_zyx, path: Path, *, overwrite: bool) -> None:
    import SimpleITK as sitk

    from ..io.write import write_image

    if vol.reference is not None:  # a NIfTI case: back to its own voxel order and geometry
        img = sitk.GetImageFromArray(vol.view.from_slices(pred))
        img.CopyInformation(vol.reference)
    else:
        img = sitk.GetImageFromArray(pred)
        if spacing_zyx is not None:
            img.SetSpacing(tuple(reversed(spacing_zyx)))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(img, path, overwrite=overwrite)


# --------------------------------------------------------------------------- tables


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def table_rows(result: dict, method: str) -> list[list[str]]:
    """The paper's layout: method, convention, mean Dice (%), mean HD95, one Dice (%) column per class."""
    s = result["summary"]
    return [
        [
            method,
            "paper (voxels)",
            _pct(s["mean"]["dice_paper"]),
            _num(s["mean"]["hd95_paper"]),
            *[_pct(c["dice_paper"]) for c in s["classes"]],
        ],
        [method, "mm", _pct(s["mean"]["dice"]), _num(s["mean"]["hd95_mm"]), *[_pct(c["dice"]) for c in s["classes"]]],
    ]


def table_header(class_names: list[str]) -> list[str]:
    return ["Method", "Convention", "Dice (%)", "HD95", *class_names]


def markdown(result: dict, method: str, class_names: list[str]) -> str:
    s = result["summary"]
    head = table_header(class_names)
    intro = (
        f"{s['cases']} case(s). Dice in %, HD95 in voxels (paper) or mm. Paper convention: TransUNet's "
        "rules (empty prediction 0, prediction without reference 1), mean over all cases then classes."
    )
    lines = [
        f"# Evaluation: {method}",
        "",
        intro,
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * 2 + "---:|" * (len(head) - 2),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(result, method)]
    lines += [
        "",
        "## Per class",
        "",
        "| Class | Dice paper (%) | HD95 paper (voxels) | Dice (%) | HD95 (mm) | Cases with the class |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in s["classes"]:
        lines.append(
            f"| {c['name']} | {_pct(c['dice_paper'])} | {_num(c['hd95_paper'])} | {_pct(c['dice'])} | "
            f"{_num(c['hd95_mm'])} | {c['cases_with_class']} |"
        )
    for note in result.get("notes", []):
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


def _csv(rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def write_tables(result: dict, output: Path, method: str, class_names: list[str], *, overwrite: bool) -> list[Path]:
    """Write the five result files atomically (see the module docstring)."""
    from ..io.atomic import atomic_write_bytes

    s = result["summary"]
    per_class = [["class", "name", "dice_paper", "hd95_paper", "dice", "hd95_mm", "cases_with_class"]]
    per_class += [
        [c["class"], c["name"], c["dice_paper"], c["hd95_paper"], c["dice"], c["hd95_mm"], c["cases_with_class"]]
        for c in s["classes"]
    ]
    per_class.append(
        ["mean", "", s["mean"]["dice_paper"], s["mean"]["hd95_paper"], s["mean"]["dice"], s["mean"]["hd95_mm"], ""]
    )
    per_case = [["case", "class", "name", "dice_paper", "hd95_paper", "dice", "hd95_mm", "ref_voxels", "pred_voxels"]]
    for case, rows in result["per_case"].items():
        per_case += [
            [
                case,
                r["class"],
                class_names[r["class"] - 1],
                r["dice_paper"],
                r["hd95_paper"],
                r["dice"],
                r["hd95_mm"],
                r["ref_voxels"],
                r["pred_voxels"],
            ]
            for r in rows
        ]
    texts = {
        "table.md": markdown(result, method, class_names),
        "table.csv": _csv([table_header(class_names), *table_rows(result, method)]),
        "per_class.csv": _csv([["" if v is None else v for v in row] for row in per_class]),
        "per_case.csv": _csv([["" if v is None else v for v in row] for row in per_case]),
        "results.json": json.dumps({"method": method, "classes": class_names, **result}, indent=2, allow_nan=False)
        + "\n",
    }
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in texts.items():
        data = text.encode("utf-8")
        written.append(atomic_write_bytes(output / name, data, overwrite=overwrite))
    return written
