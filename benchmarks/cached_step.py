"""Time of one cached few-shot training step of HF-SAM on LiteMedSAM, for before/after comparisons.

    python benchmarks/cached_step.py [--steps 30] [--threads 2] [--precision bfloat16]
    PYTHONPATH=/path/to/other/checkout python benchmarks/cached_step.py   # the same on other code

A cached step is what the few-shot recipe runs 300 times (train/feature_cache.py): the decoder,
AWFFMs, low-level conv, loss and AdamW on encoder features computed once; batch 4 at 256 px.
With glibc's allocator set as `hfsam` sets it (runtime/malloc.py). Prints one JSON line: the
mean seconds per step after 3 warm-up steps, and which code ran.
Run the two checkouts alternately on an idle machine: a VM's speed drifts between runs.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--steps", type=int, default=30, help="timed steps (after 3 warm-up steps)")
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--precision", default="bfloat16", choices=["float32", "bfloat16"])
args = parser.parse_args()
torch.set_num_threads(args.threads)

import HFSAMCore  # noqa: E402
from HFSAMCore.model.loading import load_model  # noqa: E402
from HFSAMCore.runtime.malloc import keep_freed_memory  # noqa: E402
from HFSAMCore.runtime.progress import Progress  # noqa: E402
from HFSAMCore.train.optim import make_optimizer, train_step  # noqa: E402

keep_freed_memory()  # as the `hfsam` command line does: without it fp32 runs vary by 30 %
dtype = getattr(torch, args.precision)
torch.manual_seed(0)
model = load_model(backbone="lite_medsam", img_size=256, classes="synapse", progress=Progress("none")).model.train()
with torch.no_grad(), torch.autocast("cpu", dtype, enabled=dtype != torch.float32):
    features = model.encoder_features(torch.rand(4, 3, 256, 256))
labels = torch.randint(0, 9, (4, 256, 256))
optimizer = make_optimizer(model, 1e-4, 0.1)


def step():
    train_step(model.decode_features, optimizer, features, labels, lr=1e-4, precision=dtype, device=torch.device("cpu"))


for _ in range(3):
    step()
start = time.perf_counter()
for _ in range(args.steps):
    step()
seconds = (time.perf_counter() - start) / args.steps
print(
    json.dumps(
        {
            "code": HFSAMCore.__file__,
            "precision": args.precision,
            "threads": args.threads,
            "s_per_step": round(seconds, 4),
        }
    )
)
