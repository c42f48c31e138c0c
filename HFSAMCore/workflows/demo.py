"""`hfsam demo`: the product's main job, end to end, on the sample abdominal CT.

A clinician's story in one command: 5 of the 30 slices are "painted" (taken from
the reference label map), an adapter is fine-tuned on them, every slice is
segmented, and the result is scored on the slices it never saw. Writes into the
output folder (its own folder, so it replaces its earlier results):

    adapter.safetensors   segmentation.nrrd (+ .json)   dice.md / dice.json   figure.png
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..model.registry import FALLBACK_BACKBONE, PAPER_BACKBONE, get_backbone_info
from ..runtime.progress import Progress

OUTPUT_FILES = ("adapter.safetensors", "segmentation.nrrd", "segmentation.json", "dice.md", "dice.json", "figure.png")


def spread(labeled: list[int], n: int) -> list[int]:
    """n indices spread evenly over the labeled ones (ends excluded: they carry the least anatomy)."""
    if n >= len(labeled):
        return list(labeled)
    positions = [int(round((i + 1) * (len(labeled) - 1) / (n + 1))) for i in range(n)]
    return [labeled[p] for p in sorted(set(positions))]


def evaluate_held_out(
    image: sitk.Image, view, ref_stack: np.ndarray, pred_stack: np.ndarray, trained: list[int], names: dict[int, str]
) -> dict:
    """evaluate/metrics.evaluate on the slices the model never saw (canonical indices ``trained`` blanked in both)."""
    from ..evaluate.metrics import evaluate

    held = np.ones(view.n_slices, bool)
    held[trained] = False

    def held_only(stack: np.ndarray) -> sitk.Image:
        img = sitk.GetImageFromArray(view.from_slices(np.where(held[:, None, None], stack, 0).astype(np.uint8)))
        img.CopyInformation(image)
        return img

    result = evaluate(held_only(ref_stack), held_only(pred_stack), names)
    result["evaluated_slices"] = int(held.sum())
    return result


def choose_model(wanted: str, library, device, progress: Progress) -> tuple[str, str | None]:
    """(backbone, checkpoint) the demo runs: SAM vit_b with its checkpoint in the library and a CUDA
    GPU (the paper's setting), else LiteMedSAM, whose weights come with the engine."""
    if wanted == "tiny":
        return "tiny", "none"
    if wanted == "auto":
        found = library.checkpoint_path(PAPER_BACKBONE)
        if found is not None and device.type == "cuda":
            return PAPER_BACKBONE, str(found)
        why = "no CUDA GPU" if found is not None else f"no SAM {PAPER_BACKBONE} checkpoint in the library"
        progress.log(
            f"{why}: the demo fine-tunes LiteMedSAM (TinyViT distilled from MedSAM, pretrained on "
            "medical images; its weights come with the engine)"
        )
        return FALLBACK_BACKBONE, None
    return wanted, None  # load_model takes the library's checkpoint, or says how to get it


def _overlay(gray: np.ndarray, labels: np.ndarray, colors: dict[int, tuple]) -> np.ndarray:
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    for value, color in colors.items():
        mask = labels == value
        rgb[mask] = 0.45 * rgb[mask] + 0.55 * np.asarray(color, np.float32)
    return rgb.clip(0, 255).astype(np.uint8)


def render_figure(
    image_stack: np.ndarray,
    ref_stack: np.ndarray,
    pred_stack: np.ndarray,
    slices: list[int],
    classes: list[dict],
    preset: str,
    stats,
) -> bytes:
    """A PNG: rows are held-out slices; columns image, reference, prediction."""
    from PIL import Image, ImageDraw

    from ..io.slices import normalize

    colors = {c["value"]: tuple(c["color"]) for c in classes}
    rows = []
    for s in slices:
        gray = (normalize(image_stack[s : s + 1], preset, stats=stats)[0] * 255).astype(np.uint8)
        tiles = [
            np.repeat(gray[..., None], 3, axis=2),
            _overlay(gray, ref_stack[s], colors),
            _overlay(gray, pred_stack[s], colors),
        ]
        rows.append(np.concatenate(tiles, axis=1))
    grid = np.concatenate(rows, axis=0)
    scale = max(1, 600 // grid.shape[1] + 1)
    size = (grid.shape[1] * scale, grid.shape[0] * scale)
    # Pillow defines Image.NEAREST by setattr, unseen by mypy; Image.Resampling would need Pillow 9.1 (we allow 9.0).
    img = Image.fromarray(grid).resize(size, Image.NEAREST)  # type: ignore[attr-defined]
    canvas = Image.new("RGB", (img.width, img.height + 18), "white")
    canvas.paste(img, (0, 18))
    draw = ImageDraw.Draw(canvas)
    w = img.width // 3
    for i, title in enumerate(("image", "reference", "HF-SAM")):
        draw.text((i * w + 4, 3), title, fill="black")
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class DemoOptions:
    labeled_slices: int = 5  # how many labeled slices to train on
    steps: int | None = None  # default: the backbone's few-shot recipe
    backbone: str = "auto"  # auto: SAM vit_b with its checkpoint and a CUDA GPU, else LiteMedSAM
    device: str = "auto"
    library: str | None = None
    overwrite: bool = False  # replace the results of an earlier demo


def run_demo(
    output: str | os.PathLike = "demo_output", options: DemoOptions = DemoOptions(), progress: Progress | None = None
) -> dict[str, Any]:
    """Fine-tune on a few labeled slices of the sample CT, segment every slice, score the others,
    and write the results into the folder ``output``. Returns the scores and the run's setup, with
    ``summary``, the Dice table as text."""
    progress = progress or Progress("none")
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file; --output must be a folder")
    created = not out.exists()
    if created and not out.parent.is_dir():
        raise InputError(f"the folder {out.parent} does not exist; create it first")
    try:
        out.mkdir(exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create {out}: {exc.strerror or exc}") from None
    try:
        return _run_demo(options, progress, out)
    except BaseException:
        if created:  # a failed or cancelled demo leaves no trace, not even its folder
            with contextlib.suppress(OSError):
                out.rmdir()
        raise


def _run_demo(options: DemoOptions, progress: Progress, out: Path) -> dict[str, Any]:
    from ..io.outputs import Claims
    from ..store.sample_data import locate_sample

    # Every output is claimed before any work: existing results are kept unless --overwrite.
    claims = Claims(overwrite=options.overwrite)
    paths = {name: out / name for name in OUTPUT_FILES}
    claims.output(paths["adapter.safetensors"], kind="adapter")
    claims.image_output(paths["segmentation.nrrd"])  # and its sidecar segmentation.json
    for name in ("dice.md", "dice.json", "figure.png"):
        claims.output(paths[name])
    sample = locate_sample(progress=progress)
    claims.inputs("the sample CT", [sample["image"]])
    claims.inputs("the sample labels", [sample["labels"]])
    with claims.hold() as writes:
        return _demo(options, progress, out, paths, sample, writes)


def _demo(
    options: DemoOptions, progress: Progress, out: Path, paths: dict[str, Path], sample: dict, writes
) -> dict[str, Any]:
    import torch

    from ..evaluate.metrics import format_table
    from ..io.atomic import atomic_write_bytes
    from ..io.geometry import labels_onto_image
    from ..io.read import read_image, read_labels
    from ..io.slices import SliceView, labeled_slices, volume_stats
    from ..io.write import write_image
    from ..model.classes import resolve_classes
    from ..model.inference import segment_image
    from ..model.loading import load_model
    from ..runtime.device import resolve_device, resolve_precision
    from ..store.adapters import save_adapter
    from ..store.library import ModelLibrary
    from ..store.training_record import TrainedAdapter, TrainingRecord
    from ..train.fewshot import recipe_config, train
    from ..train.training_set import prepare_training_set

    image = read_image(sample["image"], warn=progress.warn)
    reference = read_labels(sample["labels"], warn=progress.warn)
    device = resolve_device(options.device)
    dtype = resolve_precision("auto", device)
    library = ModelLibrary(options.library)
    backbone, checkpoint = choose_model(options.backbone, library, device, progress)
    backbone_info = get_backbone_info(backbone)
    cfg = recipe_config(backbone, steps=options.steps, holdout=0, seed=0, precision=dtype)
    steps = cfg.steps
    classes = resolve_classes("synapse")

    view = SliceView.from_image(image, "axial")
    ref_on_grid = labels_onto_image(reference, image)
    ref_stack = view.to_slices(sitk.GetArrayViewFromImage(ref_on_grid))
    labeled = labeled_slices(ref_stack)
    train_canonical = spread(labeled, options.labeled_slices)
    train_slices = [view.original_index(s) for s in train_canonical]
    progress.log(
        f"sample CT {sample['image']} ({view.n_slices} slices, source: {sample['source']}); "
        f"'painted' slices: {train_slices}; model: {backbone}, {steps} steps on {device}"
    )

    torch.manual_seed(0)
    size = backbone_info.default_img_size
    lm = load_model(
        checkpoint=checkpoint, backbone=backbone, img_size=size, classes="synapse", library=library, progress=progress
    )
    data = prepare_training_set(
        image, reference, num_classes=len(classes), img_size=size, slices=train_slices, device=device
    )
    report = train(lm.model, data, cfg, progress)

    record = TrainingRecord(
        image=str(sample["image"]),
        slices=report.slices,
        steps=report.steps,
        cached_steps=report.cached_steps,
        low_level_dropout=report.low_level_dropout,
        max_grad_norm=cfg.max_grad_norm,
        seed=0,
        batch_size=report.batch_size,
        lr=cfg.lr,
    )
    metadata = TrainedAdapter(
        name="demo",
        spec=lm.spec,
        base=lm.base,
        classes=classes,
        preset=data.preset,
        axis="axial",
        training=record,
        description="hfsam demo on the TotalSegmentator sample CT",
    ).metadata()

    prediction, info = segment_image(image, lm.model, preset=data.preset, device=device, dtype=dtype, progress=progress)

    # Score only the slices the model never saw.
    pred_stack = view.to_slices(sitk.GetArrayViewFromImage(prediction))
    names = {c["value"]: c["name"] for c in classes}
    result = evaluate_held_out(image, view, ref_stack, pred_stack, train_canonical, names)
    result["setup"] = {
        "backbone": backbone,
        "checkpoint": lm.base.get("name"),
        "steps": report.steps,
        "train_slices": train_slices,
        "evaluated_slices": result["evaluated_slices"],
        "train_seconds": report.seconds,
        "device": str(device),
        "slice_smoothing_mm": info["slice_smoothing_mm"],
    }
    table = format_table(result)
    banner = (
        f"> Model: HF-SAM on {backbone_info.title}.\n\n"
        if not backbone_info.test_only
        else "> Tiny random-init configuration (no pretrained weights): shows the pipeline, not HF-SAM's quality.\n\n"
    )
    dice_md = (
        f"# hfsam demo: Dice on the {result['evaluated_slices']} held-out slices\n\n"
        f"{banner}Trained on slices {train_slices} ({report.steps} steps, {backbone}, "
        f"{report.seconds:.0f} s on {device}); segmented as `hfsam segment` does (slice smoothing "
        f"{info['slice_smoothing_mm']:g} mm).\n\n{table}\n"
    )
    held = [s for s in range(view.n_slices) if s not in train_canonical and ref_stack[s].any()]
    show = [held[int(i)] for i in np.linspace(0, len(held) - 1, min(3, len(held)))] if held else []
    figure = render_figure(
        view.to_slices(sitk.GetArrayViewFromImage(image)),
        ref_stack,
        pred_stack,
        show,
        classes,
        data.preset,
        volume_stats(sitk.GetArrayViewFromImage(image), data.preset),
    )

    progress.check_cancelled()  # up to here nothing was written; from here on everything is
    writes.replacing(*paths.values())
    overwrite = options.overwrite
    save_adapter(paths["adapter.safetensors"], lm.model.trainable_state_dict(), metadata, overwrite=overwrite)
    write_image(
        prediction,
        paths["segmentation.nrrd"],
        overwrite=overwrite,
        sidecar={
            "output": "segmentation.nrrd",
            "classes": classes,
            "model": lm.describe(),
            "input": str(sample["image"]),
            "run": info,
        },
    )
    for name, data_ in (
        ("dice.md", dice_md.encode()),
        ("dice.json", json.dumps(result, indent=2).encode()),
        ("figure.png", figure),
    ):
        atomic_write_bytes(paths[name], data_, overwrite=overwrite)

    return {"output": str(out), "mean_dice": result["mean"]["dice"], **result["setup"], "summary": banner + table}
