"""One few-shot configuration of LiteMedSAM on ct_abdomen_3mm, for the ablations of RESULTS.md.

    python benchmarks/fewshot_ablation.py fusion=two_step rank=5 steps=300 cached=300 pool=8 \
        threads=1 prec=bfloat16 [n=5] [aug=1] [lr=0.0025] [bs=4] [seed=0] [init=identity|default] [out=FILE.jsonl]

Trains on n labeled slices spread over the volume (n=5: slices 5,10,14,19,24), segments all 30,
prints and appends to ``out`` (default benchmarks/results/fewshot_ablation.jsonl) the Dice on the others, the
training wall and CPU time and the peak memory. ``init=default`` keeps PyTorch's initialisation
of the low-level branch and the AWFFMs (what HF-SAM did before they started near identity).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

a = dict(x.split("=", 1) for x in sys.argv[1:])
torch.set_num_threads(int(a.get("threads", 2)))

# Imported only once torch's thread count is set, before anything else can start a thread pool.
import SimpleITK as sitk  # noqa: E402

from HFSAMCore.io.geometry import labels_onto_image  # noqa: E402
from HFSAMCore.io.read import read_image, read_labels  # noqa: E402
from HFSAMCore.io.slices import SliceView, labeled_slices  # noqa: E402
from HFSAMCore.model.hfsam import HFSAM  # noqa: E402
from HFSAMCore.model.inference import segment_image  # noqa: E402
from HFSAMCore.model.loading import load_model  # noqa: E402
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
lm = load_model(
    backbone="lite_medsam",
    img_size=256,
    classes="synapse",
    rank=int(a.get("rank", 5)),
    fusion=a.get("fusion", "two_step"),
    progress=Progress("none"),
)
data = prepare_training_set(
    image, reference, num_classes=8, img_size=256, slices=[view.original_index(s) for s in picked]
)
precision = getattr(torch, a.get("prec", "bfloat16"))
cfg = TrainConfig(
    steps=int(a.get("steps", 300)),
    holdout=0,
    seed=int(a.get("seed", 0)),
    precision=precision,
    cached_steps=int(a.get("cached", 0)),
    pool=int(a.get("pool", 8)),
    augment=a.get("aug", "1") == "1",
    lr=float(a.get("lr", 0.0025)),
    batch_size=int(a.get("bs", 4)),
)
wall, cpu = time.perf_counter(), time.process_time()
train(lm.model, data, cfg)
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
pred, _ = segment_image(image, lm.model, dtype=torch.bfloat16)
names = {c["value"]: c["name"] for c in lm.classes}
res = evaluate_held_out(image, view, ref_stack, view.to_slices(sitk.GetArrayViewFromImage(pred)), picked, names)
out = {
    "args": a,
    "slices": data.slices,
    "train_wall": round(wall, 1),
    "train_cpu": round(cpu, 1),
    "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    "mean": round(res["mean"]["dice"], 4),
    "dice": {c["name"]: round(c["dice"], 3) for c in res["classes"]},
}
print(json.dumps(out))
with open(a.get("out") or Path(__file__).parent / "results" / "fewshot_ablation.jsonl", "a") as f:
    f.write(json.dumps(out) + "\n")
