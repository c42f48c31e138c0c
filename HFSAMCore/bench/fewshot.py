"""`hfsam bench fewshot`: fine-tune on N labeled slices per method, segment, per-organ Dice on the others."""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time

from ..errors import InputError
from ..model.registry import DEFAULT_FEWSHOT_METHODS, FEWSHOT_METHODS
from ..runtime.malloc import keep_freed_memory
from ..runtime.progress import Progress
from .common import machine_info
from .speed import UNET_LR, UNET_STEPS

LORA_STEPS = 40  # hfsam_lora: end-to-end steps after the recipe's


def _fewshot_process_init(threads):
    keep_freed_memory()  # as the `hfsam` command line does
    if threads:
        import torch

        torch.set_num_threads(threads)


def _fewshot_model(method: str, backbone: str, checkpoint, library, img_size: int, dtype, steps, seed: int):
    """(model, TrainConfig) for one row; ``seed`` draws the new weights and the training's batches."""
    from ..model.loading import load_model
    from ..store.library import ModelLibrary
    from ..train.fewshot import TrainConfig, recipe_config
    from .baseline_unet import UNetBaseline

    common = dict(holdout=0, seed=seed, precision=dtype)
    if method == "unet":
        return UNetBaseline(img_size, 8), TrainConfig(steps=steps or UNET_STEPS, lr=UNET_LR, **common)
    fusion, rank = ("none", 0) if method == "decoder_only" else ("two_step", 5)
    lm = load_model(
        checkpoint=checkpoint,
        backbone=backbone,
        img_size=img_size,
        classes="synapse",
        rank=rank,
        fusion=fusion,
        library=ModelLibrary(library),
        progress=Progress("none"),
    )
    cfg = recipe_config(backbone, steps=steps, **common)
    assert cfg.steps is not None  # no time budget here, so recipe_config fixed the steps
    if method == "hfsam_lora":
        cfg.steps, cfg.cached_steps = cfg.steps + LORA_STEPS, min(cfg.cached_steps, cfg.steps)
    if method == "decoder_only":  # nothing in the encoder trains: every step can use cached features
        cfg.cached_steps = cfg.steps
    return lm.model, cfg


def _fewshot_worker(
    method, n_labeled, seed, backbone, checkpoint, img_size, steps, device_name, image_path, labels_path, library
):
    import SimpleITK as sitk
    import torch

    from ..io.geometry import labels_onto_image
    from ..io.read import read_image, read_labels
    from ..io.slices import SliceView, labeled_slices
    from ..model.inference import segment_image
    from ..runtime.device import peak_memory_mb, resolve_precision
    from ..train.fewshot import train
    from ..train.training_set import prepare_training_set
    from ..workflows.demo import evaluate_held_out, spread

    device = torch.device(device_name)
    dtype = resolve_precision("auto", device)
    image, reference = read_image(image_path), read_labels(labels_path)
    view = SliceView.from_image(image)
    ref_on_grid = labels_onto_image(reference, image)  # keep it alive: the array view below borrows its memory
    ref_stack = view.to_slices(sitk.GetArrayViewFromImage(ref_on_grid))
    picked = spread(labeled_slices(ref_stack), n_labeled)
    torch.manual_seed(seed)
    t = time.perf_counter()
    model, cfg = _fewshot_model(method, backbone, checkpoint, library, img_size, dtype, steps, seed)
    data = prepare_training_set(
        image,
        reference,
        num_classes=8,
        img_size=img_size,
        slices=[view.original_index(s) for s in picked],
        device=device,
    )
    report = train(model, data, cfg)
    train_s = time.perf_counter() - t  # model loading, feature caching and training: what a user waits for
    t = time.perf_counter()
    pred, seg_info = segment_image(image, model, device=device, dtype=dtype)
    segment_s = time.perf_counter() - t
    agreement = None
    if dtype != torch.float32:  # the same trained model in fp32: does reduced precision change the labels?
        pred32, _ = segment_image(image, model, device=device, dtype=torch.float32)
        a, b = sitk.GetArrayViewFromImage(pred), sitk.GetArrayViewFromImage(pred32)
        agreement = round(100 * float((a == b).mean()), 3)
    from ..model.classes import resolve_classes

    names = {c["value"]: c["name"] for c in resolve_classes("synapse")}

    def held_out(prediction):
        return evaluate_held_out(
            image, view, ref_stack, view.to_slices(sitk.GetArrayViewFromImage(prediction)), picked, names
        )

    res = held_out(pred)
    # The same model with every slice on its own: what the slice smoothing adds, row by row.
    alone = held_out(segment_image(image, model, device=device, dtype=dtype, slice_smoothing_mm=0)[0])
    return {
        "method": method,
        "n_labeled": n_labeled,
        "seed": seed,
        "slices": data.slices,
        "steps": report.steps,
        "cached_steps": report.cached_steps,
        "low_level_dropout": report.low_level_dropout,
        "max_grad_norm": cfg.max_grad_norm,
        "train_wall_s": round(train_s, 1),
        "segment_wall_s": round(segment_s, 1),
        "peak_memory_mb": round(peak_memory_mb(device), 0),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "dice": {c["name"]: c["dice"] for c in res["classes"]},
        "mean_dice": res["mean"]["dice"],
        "slice_smoothing_mm": seg_info["slice_smoothing_mm"],
        "mean_dice_slices_alone": alone["mean"]["dice"],
        "dice_slices_alone": {c["name"]: c["dice"] for c in alone["classes"]},
        "precision": str(dtype).replace("torch.", ""),
        "voxels_equal_to_fp32_pct": agreement,
    }


def run_fewshot(args, progress: Progress) -> dict:
    from ..model.loading import default_backbone_in
    from ..model.registry import get_backbone_info
    from ..runtime.device import resolve_device
    from ..store.library import ModelLibrary
    from ..store.sample_data import locate_sample

    ns = tuple(args.n) if args.n else ((1, 5) if args.quick else (1, 3, 5, 10))
    if any(n < 1 for n in ns):
        raise InputError(f"--n must be whole numbers of at least 1, not {' '.join(map(str, ns))}")
    seeds = tuple(args.seeds) if args.seeds else (0,)
    if len(set(seeds)) < len(seeds) or any(not 0 <= s < 2**31 for s in seeds):
        raise InputError(
            f"--seeds must be different whole numbers from 0 to {2**31 - 1}, not {' '.join(map(str, seeds))}"
        )
    methods = tuple(args.methods) if args.methods else DEFAULT_FEWSHOT_METHODS
    if "unet" in methods:
        from .baseline_unet import require_monai

        require_monai()
    device = resolve_device(args.device)
    sample = locate_sample(progress=progress)
    backbone = args.backbone
    if backbone in (None, "auto"):
        backbone = default_backbone_in(ModelLibrary(args.library))
    info = get_backbone_info(backbone)
    img_size = args.img_size or info.default_img_size
    jobs = [(n, m, seed) for n in ns for m in methods for seed in seeds]
    # --jobs J: J rows at once, each on cores/J torch threads (times then are per row on that share).
    parallel = max(1, min(args.jobs or 1, len(jobs)))
    threads = max(1, (os.cpu_count() or 1) // parallel) if device.type == "cpu" else None
    ctx = mp.get_context("spawn")
    with ctx.Pool(parallel, initializer=_fewshot_process_init, initargs=(threads,), maxtasksperchild=1) as pool:
        pending = [
            pool.apply_async(
                _fewshot_worker,
                (
                    method,
                    n,
                    seed,
                    backbone,
                    args.checkpoint,
                    img_size,
                    args.steps,
                    str(device),
                    str(sample["image"]),
                    str(sample["labels"]),
                    args.library,
                ),
            )
            for n, method, seed in jobs
        ]
        rows = []
        for i, ((n, method, seed), job) in enumerate(zip(jobs, pending)):
            rows.append(dict(job.get(), threads=threads))
            progress.progress("bench", i + 1, len(jobs))
            # The whole row goes to the log as it finishes: a run stopped later (for time, or by a failed
            # row) still leaves every finished row's numbers, not only its mean.
            organs = ", ".join(f"{k} {v:.3f}" for k, v in rows[-1]["dice"].items() if v is not None)
            progress.log(
                f"N={n} {method} seed {seed}: mean Dice {rows[-1]['mean_dice']:.3f} "
                f"({rows[-1]['mean_dice_slices_alone']:.3f} with every slice on its own), "
                f"trained in {rows[-1]['train_wall_s']} s, peak {rows[-1]['peak_memory_mb']:.0f} MB ({organs})"
            )
    return {
        "machine": machine_info(device),
        "backbone": backbone,
        "checkpoint": args.checkpoint or "library",
        "img_size": img_size,
        "recipe": {
            "steps": info.recipe.steps,
            "cached_steps": info.recipe.cached_steps,
            "max_grad_norm": info.recipe.max_grad_norm,
        },
        "methods": {m: FEWSHOT_METHODS[m] for m in methods},
        "seeds": list(seeds),
        "rows": rows,
        "over_seeds": over_seeds(rows) if len(seeds) > 1 else [],
    }


def over_seeds(rows: list[dict]) -> list[dict]:
    """Per N and method, the spread of the rows that differ only in their seed: the mean Dice's mean,
    sample standard deviation, lowest and highest, and each organ's mean over the rows that scored it
    (None where none did). Needs two rows or more per group.

    One seed's row moves by up to 0.03 at N = 3 and 5 and by more at N = 1 and 10 (benchmarks/RESULTS.md),
    so two methods are compared by these, not by one row each.
    """
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["n_labeled"], r["method"]), []).append(r)
    out = []
    for (n, method), rs in groups.items():
        means = [r["mean_dice"] for r in rs]
        organs = {}
        for organ in rs[0]["dice"]:
            scored = [r["dice"][organ] for r in rs if r["dice"][organ] is not None]
            organs[organ] = round(statistics.fmean(scored), 4) if scored else None
        out.append(
            {
                "n_labeled": n,
                "method": method,
                "seeds": [r["seed"] for r in rs],
                "mean_dice": round(statistics.fmean(means), 4),
                "sd": round(statistics.stdev(means), 4),
                "min": min(means),
                "max": max(means),
                "dice": organs,
                "mean_dice_slices_alone": round(statistics.fmean(r["mean_dice_slices_alone"] for r in rs), 4),
                "train_wall_s": round(statistics.fmean(r["train_wall_s"] for r in rs), 1),
            }
        )
    return out
