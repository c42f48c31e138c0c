"""Train an HF-SAM adapter on the labeled slices of one volume: the `finetune` job.

The labels are brought onto the image by physical position; every check that needs no model
(paths, adapter, classes, slices, outputs) comes before torch is imported. The adapter file and
the library entry are claimed first and written together at the end: both or neither.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..runtime.progress import Progress
from .options import ModelOptions, RunOptions, check_ranges
from .preparation import adapter_path, declare_inputs, device_and_dtype, load, open_library, read_adapter, warn_outside


@dataclass(frozen=True)
class TrainingOptions:
    """What to train on and for how long (defaults: the backbone's few-shot recipe)."""

    slices: str = "auto"  # '12,15,20', '10-14', or every slice that carries a label
    classes: str | None = None  # names in label order, or a preset; default label_1..label_K
    steps: int | None = None
    minutes: float | None = None
    cached_steps: int | None = None
    low_level_dropout: float = 0.0  # model/hfsam.LowLevelDropout; off by default
    lr: float = 0.0025
    holdout: int | None = None
    seed: int | None = 0
    description: str = ""


def finetune_adapter(
    image: str | os.PathLike,
    labels: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    output: str | os.PathLike | None = None,
    name: str | None = None,
    training: TrainingOptions = TrainingOptions(),
    model: ModelOptions = ModelOptions(),
    run: RunOptions = RunOptions(),
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Fine-tune on ``labels`` (one label map, or one binary mask per class) of ``image``; write the
    adapter to ``output`` and/or the model library as ``name``. Returns the written adapter and the
    training report."""
    import SimpleITK as sitk

    from ..io.geometry import labels_onto_image
    from ..io.outputs import Claims
    from ..io.read import label_values, read_image, read_label_volumes, read_labels
    from ..io.slices import check_slices_are_images, choose_training_slices, parse_slice_list
    from ..model.classes import classes_for_labels

    progress = progress or Progress("none")
    check_ranges(model, run, training)
    # One path is one label map, not a sequence of characters.
    labels = [labels] if isinstance(labels, (str, os.PathLike)) else list(labels)
    if not output and not name:
        raise InputError("say where the adapter goes: -o FILE.safetensors and/or --name NAME (model library)")
    library = open_library(model)
    adapter = adapter_path(model, library)
    claims = Claims(overwrite=run.overwrite)
    declare_inputs(claims, model, adapter, {"the input image": [image], "a label file of this run": labels})
    out = claims.output(output, kind="adapter") if output else None
    entry = claims.library_entry(library, name) if name else None
    meta, model, run = read_adapter(model, run, adapter)
    volume = read_image(image, warn=progress.warn)
    warn = progress.warn
    label_map = read_labels(labels[0], warn=warn) if len(labels) == 1 else read_label_volumes(labels, warn=warn)
    warn_outside(
        progress,
        label_map,
        volume,
        "the labels",
        "the image",
        "if the label map is shifted or from another scan, fix it; if the image is a crop of it, this is expected",
    )
    label_map = labels_onto_image(label_map, volume)  # by physical position; refuses labels of another scan
    view = check_slices_are_images(volume, run.axis, str(image))
    slices = parse_slice_list(training.slices, view.n_slices)
    source = labels[0] if len(labels) == 1 else "the label masks"
    classes, values, note = classes_for_labels(
        training.classes, label_values(label_map), adapter=meta, source=str(source)
    )
    if note:
        progress.warn(note)
    # Every non-zero label is a class now (classes_for_labels), so a slice with one carries a class.
    chosen = choose_training_slices(view, view.to_slices(sitk.GetArrayViewFromImage(label_map)), slices)
    if training.holdout is not None and training.holdout >= len(chosen):
        raise InputError(
            f"--holdout {training.holdout} must leave at least one of the {len(chosen)} labeled slices for training"
        )
    with claims.hold() as writes:
        return _finetune(
            image,
            volume,
            label_map,
            slices,
            classes,
            values,
            out,
            entry,
            name,
            training,
            model,
            run,
            library,
            writes,
            progress,
        )


def _finetune(
    image_source,
    image,
    labels,
    slices,
    classes,
    values,
    output: Path | None,
    entry: Path | None,
    name: str | None,
    training: TrainingOptions,
    model: ModelOptions,
    run: RunOptions,
    library,
    writes,
    progress: Progress,
) -> dict[str, Any]:
    import numpy as np
    import torch

    from .. import __version__
    from ..store.adapters import save_adapter
    from ..store.training_record import TrainedAdapter, TrainingRecord
    from ..train.fewshot import recipe_config, train
    from ..train.training_set import prepare_training_set

    if training.seed is not None:
        torch.manual_seed(training.seed)
        np.random.seed(training.seed)
    device, dtype = device_and_dtype(run)
    lm = load(model, classes=None if model.adapter else classes, library=library, progress=progress)
    net = lm.model.to(device)
    data = prepare_training_set(
        image,
        labels,
        num_classes=len(lm.classes),
        img_size=lm.spec.img_size,
        slices=slices,
        axis=run.axis,
        preset=run.preset,
        device=device,
        label_values=values,
    )
    progress.log(f"training on {len(data.slices)} labeled slice(s): {', '.join(map(str, data.slices))}")
    cfg = recipe_config(
        lm.spec.backbone,
        steps=training.steps,
        minutes=training.minutes,
        cached_steps=training.cached_steps,
        low_level_dropout=training.low_level_dropout,
        batch_size=run.batch_size,
        lr=training.lr,
        seed=training.seed,
        holdout=training.holdout,
        precision=dtype,
    )
    report = train(net, data, cfg, progress)  # refuses a diverged model, also after the last step
    progress.check_cancelled()  # a cancel during the last step's bookkeeping still means "write nothing"

    record = TrainingRecord(
        image=str(image_source),
        slices=report.slices,
        heldout_slices=report.heldout_slices,
        steps=report.steps,
        cached_steps=report.cached_steps,
        low_level_dropout=report.low_level_dropout,
        max_grad_norm=cfg.max_grad_norm,
        seed=training.seed,
        batch_size=report.batch_size,
        lr=training.lr,
        minutes=training.minutes,
        started_from=str(lm.adapter_path) if lm.adapter_path else None,
    )
    metadata = TrainedAdapter(
        name=name or (output.stem if output else "adapter"),
        spec=lm.spec,
        base=lm.base,
        classes=lm.classes,
        preset=data.preset,
        axis=run.axis,
        training=record,
        description=training.description,
        metrics={"final_loss": report.final_loss, "heldout_dice": report.heldout_dice, "seconds": report.seconds},
        hfsam_version=__version__,
    ).metadata()
    tensors = net.trainable_state_dict()
    # Both files or neither: when the library entry fails after -o was written, Claims.hold takes -o back.
    writes.replacing(*(p for p in (output, entry) if p is not None))
    if output:
        save_adapter(output, tensors, metadata, overwrite=run.overwrite)
    if name:
        library.save_adapter(name, tensors, metadata, overwrite=run.overwrite)
    written = [str(p) for p in (output, entry) if p is not None]
    progress.log(
        f"trained {report.steps} steps in {report.seconds:.0f} s (loss {report.final_loss:.3f}"
        + (f", held-out Dice {report.heldout_dice:.3f}" if report.heldout_dice is not None else "")
        + f"); wrote {', '.join(written)}"
    )
    return {"adapter": written[0], "name": name, "classes": lm.classes, **report.as_dict()}
