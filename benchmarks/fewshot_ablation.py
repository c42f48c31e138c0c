"""One few-shot configuration of LiteMedSAM on ct_abdomen_3mm, for the ablations of RESULTS.md.

    python benchmarks/fewshot_ablation.py fusion=two_step rank=5 steps=300 cached=300 pool=8 \
        threads=1 prec=bfloat16 [n=5] [aug=1] [lr=0.0025] [bs=4] [seed=0] [init=identity|default] \
        [smooth=0,3] [unseen=0|1] [cross=0|1] [model=hfsam|unet] [lld=P] [clip=NORM|none] [out=FILE.jsonl]

Trains on n labeled slices spread over the volume (n=5: slices 5,10,14,19,24), segments all 30,
prints and appends to ``out`` (default benchmarks/results/fewshot_ablation.jsonl) the Dice on the others, the
training wall and CPU time and the peak memory. ``init=default`` keeps PyTorch's initialisation
of the low-level branch and the AWFFMs (what HF-SAM did before they started near identity).

Slice smoothing (model/slice_smoothing.py): ``smooth`` lists the widths in mm to segment with;
``mean`` and ``dice`` are the first's (0, every slice on its own, as every row before smoothing
existed), ``by_smoothing`` has them all. ``unseen=1`` adds the default width with the trained
slices left out of every neighbourhood: what the smoothing gives where no neighbour was trained
on, as on a new scan. ``cross=1`` scores the adapter on the DICOM sample, another patient.
``model=unet`` trains bench fewshot's U-Net baseline instead (its 500 steps and lr unless given).
``lld``: the low-level dropout (hfsam.LowLevelDropout), default 0 as in ``finetune``.
``clip``: the gradient's norm limit (TrainConfig.max_grad_norm), default the LiteMedSAM recipe's (1.0 since
2026-12-08; the rows before that date ran unclipped); ``none`` turns it off. The U-Net never clips.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

a = dict(x.split("=", 1) for x in sys.argv[1:])
torch.set_num_threads(int(a.get("threads", 2)))

# Imported only once torch's thread count is set, before anything else can start a thread pool.
import SimpleITK as sitk  # noqa: E402

from HFSAMCore.bench.baseline_unet import UNetBaseline  # noqa: E402
from HFSAMCore.bench.speed import UNET_LR, UNET_STEPS  # noqa: E402
from HFSAMCore.io.geometry import labels_onto_image  # noqa: E402
from HFSAMCore.io.read import read_image, read_labels  # noqa: E402
from HFSAMCore.io.slices import SliceView, choose_preset, labeled_slices, normalize, volume_stats  # noqa: E402
from HFSAMCore.model.classes import resolve_classes  # noqa: E402
from HFSAMCore.model.hfsam import HFSAM  # noqa: E402
from HFSAMCore.model.inference import probabilities_to_labels, segment_image, to_model_input  # noqa: E402
from HFSAMCore.model.loading import load_model  # noqa: E402
from HFSAMCore.model.registry import get_backbone_info  # noqa: E402
from HFSAMCore.model.slice_smoothing import DEFAULT_SLICE_SMOOTHING_MM, slice_weights  # noqa: E402
from HFSAMCore.runtime.progress import Progress  # noqa: E402
from HFSAMCore.store.sample_data import repo_data_dir  # noqa: E402
from HFSAMCore.train.fewshot import TrainConfig, train  # noqa: E402
from HFSAMCore.train.training_set import prepare_training_set  # noqa: E402
from HFSAMCore.workflows.demo import evaluate_held_out, spread  # noqa: E402

if a.get("init") == "default":
    HFSAM.start_fusion_near_identity = lambda self: None  # the ablation: PyTorch's default init

d = repo_data_dir() / "ct_abdomen_3mm"
image, reference = read_image(d / "image.nii.gz"), read_labels(d / "labels_synapse8.nii.gz")
view = SliceView.from_image(image)
ref_on_grid = labels_onto_image(reference, image)  # kept alive: the array view borrows its memory
ref_stack = view.to_slices(sitk.GetArrayViewFromImage(ref_on_grid))
picked = spread(labeled_slices(ref_stack), int(a.get("n", 5)))
torch.manual_seed(int(a.get("seed", 0)))
unet = a.get("model") == "unet"
if unet:  # bench fewshot's baseline row, its steps and lr
    model, classes = UNetBaseline(256, 8), resolve_classes("synapse")
else:
    lm = load_model(
        backbone="lite_medsam",
        img_size=256,
        classes="synapse",
        rank=int(a.get("rank", 5)),
        fusion=a.get("fusion", "two_step"),
        progress=Progress("none"),
    )
    model, classes = lm.model, lm.classes
data = prepare_training_set(
    image, reference, num_classes=8, img_size=256, slices=[view.original_index(s) for s in picked]
)
precision = getattr(torch, a.get("prec", "bfloat16"))
clip = a.get("clip")
if unet or clip == "none":
    clip = None
elif clip is None:
    clip = get_backbone_info("lite_medsam").recipe.max_grad_norm
else:
    clip = float(clip)
cfg = TrainConfig(
    steps=int(a.get("steps", UNET_STEPS if unet else 300)),
    holdout=0,
    seed=int(a.get("seed", 0)),
    precision=precision,
    cached_steps=0 if unet else int(a.get("cached", 0)),  # a U-Net has no frozen encoder to cache
    pool=int(a.get("pool", 8)),
    augment=a.get("aug", "1") == "1",
    lr=float(a.get("lr", UNET_LR if unet else 0.0025)),
    batch_size=int(a.get("bs", 4)),
    low_level_dropout=float(a.get("lld", 0)),
    max_grad_norm=clip,
)
wall, cpu = time.perf_counter(), time.process_time()
report = train(model, data, cfg)
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu


@torch.no_grad()
def smoothed_without(excluded: list[int], sigma_mm: float) -> np.ndarray:
    """Labels with the Gaussian of segment's smoothing, the ``excluded`` slices being nobody's
    neighbour (each still counts for itself). Probabilities through the model one batch at a time."""
    stack = view.to_slices(sitk.GetArrayViewFromImage(image))
    preset = choose_preset(image)
    x = to_model_input(normalize(stack, preset, stats=volume_stats(stack, preset)), 256, torch.device("cpu"))
    with torch.autocast("cpu", torch.bfloat16):
        probs = torch.cat([model(x[i : i + 4]).float().softmax(1) for i in range(0, len(x), 4)])
    w = slice_weights(sigma_mm, view.slice_thickness_mm)
    r, usable = len(w) // 2, np.ones(len(probs), bool)
    usable[excluded] = False
    out = []
    for i in range(len(probs)):
        js = [j for j in range(max(0, i - r), min(len(probs), i + r + 1)) if usable[j] or j == i]
        weights = torch.tensor([w[j - i + r] for j in js]).view(-1, 1, 1, 1)
        out.append((weights * probs[js]).sum(0) / weights.sum())
    return probabilities_to_labels(torch.stack(out), view.slice_shape).numpy()


def cross_patient() -> dict:
    """The adapter on the DICOM sample: another patient, scanner and contrast phase, every slice scored."""
    from HFSAMCore.evaluate.metrics import evaluate

    d = repo_data_dir() / "ct_abdomen_dicom"
    other = read_image(d / "dicom")
    ref = labels_onto_image(read_labels(d / "labels_synapse8.nii.gz"), other)
    result = {}
    for mm in (0.0, DEFAULT_SLICE_SMOOTHING_MM):
        pred, _ = segment_image(other, model, dtype=torch.bfloat16, slice_smoothing_mm=mm)
        result[f"{mm:g}"] = scores(evaluate(ref, pred, names))
    return result


names = {c["value"]: c["name"] for c in classes}


def scores(res):
    return {
        "mean": round(res["mean"]["dice"], 4),
        "dice": {c["name"]: round(c["dice"], 3) for c in res["classes"] if c["dice"] is not None},
    }


def held_out(pred_stack):
    return scores(evaluate_held_out(image, view, ref_stack, pred_stack, picked, names))


by_smoothing = {}
for mm in [float(x) for x in a.get("smooth", "0,3").split(",")]:
    pred, _ = segment_image(image, model, dtype=torch.bfloat16, slice_smoothing_mm=mm)
    by_smoothing[f"{mm:g}"] = held_out(view.to_slices(sitk.GetArrayViewFromImage(pred)))
first = next(iter(by_smoothing.values()))
out = {
    "args": a,
    "slices": data.slices,
    "train_wall": round(wall, 1),
    "train_cpu": round(cpu, 1),
    "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    "low_level_dropout": report.low_level_dropout,
    "max_grad_norm": cfg.max_grad_norm,
    **first,
    "by_smoothing": by_smoothing,
}
if a.get("unseen") == "1":
    out["unseen_neighbours_only"] = held_out(smoothed_without(picked, DEFAULT_SLICE_SMOOTHING_MM))
if a.get("cross") == "1":
    out["cross_patient"] = cross_patient()
print(json.dumps(out))
with open(a.get("out") or Path(__file__).parent / "results" / "fewshot_ablation.jsonl", "a") as f:
    f.write(json.dumps(out) + "\n")
