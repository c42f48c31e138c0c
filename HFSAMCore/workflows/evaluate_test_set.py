"""Evaluate an adapter on a whole test set, laid out as the paper's tables: the `evaluate-dataset` job."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..runtime.progress import Progress


@dataclass(frozen=True)
class TestSet:
    """Which cases: a dataset layout (train/datasets.DATASETS) under ``root``, optionally a list."""

    __test__ = False  # not a pytest test class, whatever its name

    dataset: str
    root: str
    list: str | None = None  # default: every volume in root (acdc: its test.list)
    subset: str | None = None  # nifti: "Ts" (default) or "Tr"
    axis: str | None = None  # nifti: must match the adapter's
    intensity: str | None = None  # nifti: must match the adapter's
    raw_dir: str | None = None  # original NIfTI files whose headers give the spacing for the mm metrics
    spacing: str | None = None  # or a JSON {case: [z, y, x]} in mm


def evaluate_test_set(
    test_set: TestSet,
    output: str | os.PathLike,
    *,
    adapter: str,
    checkpoint: str | None = None,
    method: str | None = None,
    save_predictions: bool = False,
    batch_size: int = 8,
    precision: str = "auto",
    device: str = "auto",
    library: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Per case and per class Dice and HD95; writes table.md, table.csv, per_class.csv, per_case.csv and
    results.json into ``output``. Returns the summary."""
    from ..evaluate.dataset import check_outputs, evaluate_dataset, spacing_lookup, write_tables
    from ..store.adapters import read_metadata
    from ..store.library import ModelLibrary
    from ..train.datasets import open_dataset

    progress = progress or Progress("none")

    output = Path(output).expanduser()
    check_outputs(
        output,
        overwrite=overwrite,
        predictions=save_predictions,
        inputs={
            "the --list file": [test_set.list],
            "the --spacing file": [test_set.spacing],
            "the adapter": [adapter],
            "the checkpoint": [checkpoint],
        },
    )
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, not {batch_size}")
    spacing = spacing_lookup(test_set.raw_dir, test_set.spacing) if (test_set.raw_dir or test_set.spacing) else None
    models = ModelLibrary(library)
    meta = read_metadata(models.resolve_adapter(adapter))
    trained_preset, trained_axis = meta["intensity_preset"], meta["axis"]
    if test_set.dataset == "nifti":
        # What the adapter was trained with is what it must see (workflows/options.ADAPTER_FIXES): never contradicted.
        for option, given, trained in (
            ("--axis", test_set.axis, trained_axis),
            ("--intensity", test_set.intensity, trained_preset),
        ):
            if given not in (None, "auto", trained):
                raise InputError(f"the adapter was trained with {option} {trained}, not {given}: drop the option")
        reader = open_dataset(
            "nifti", test_set.root, subset=test_set.subset or "Ts", axis=trained_axis, preset=trained_preset
        )
    else:
        reader = open_dataset(test_set.dataset, test_set.root)
        if reader.intensity_preset != trained_preset:
            progress.warn(
                f"the adapter was trained on {trained_preset.upper()} data, this is {test_set.dataset} "
                f"({reader.intensity_preset.upper()})"
            )
    from ..model.loading import load_model
    from ..runtime.device import resolve_device, resolve_precision

    where = resolve_device(device)
    dtype = resolve_precision(precision, where)
    lm = load_model(adapter=adapter, checkpoint=checkpoint, library=models, progress=progress)
    names = reader.volume_names(test_set.list)  # default: every volume in --root (acdc: its test.list)
    class_names = [c["name"] for c in lm.classes]
    progress.log(
        f"evaluating {lm.adapter_path.name if lm.adapter_path else 'the model'} on {len(names)} "
        f"{test_set.dataset} case(s)"
    )
    result = evaluate_dataset(
        lm.model,
        reader,
        names,
        class_names,
        batch_size=batch_size,
        device=where,
        dtype=dtype,
        spacing=spacing,
        predictions_dir=output / "predictions" if save_predictions else None,
        overwrite=overwrite,
        progress=progress,
    )
    row = method or (lm.adapter_metadata or {}).get("name") or "HF-SAM"
    written = write_tables(result, output, row, class_names, overwrite=overwrite)
    m = result["summary"]["mean"]
    progress.log(
        f"mean Dice {100 * m['dice_paper']:.2f} %, HD95 {m['hd95_paper']:.2f} voxels (paper convention); "
        f"wrote {', '.join(p.name for p in written)} in {output}"
    )
    return {"output": str(output), "summary": result["summary"], "notes": result["notes"]}
