"""Before/after of each encoder optimisation, measured in one process.

    python benchmarks/ab_encoder.py [--batch 4] [--precision bf16] [--repeats 4] [--keep-freed-memory]

Builds vit_b at 512 px (random weights: speed does not depend on them) and times the
forward pass with each step of benchmarks/RESULTS.md's history switched on in turn,
round-robin, so that the machine's drift affects every variant alike; reports the
minimum over the rounds. The allocator setting (--keep-freed-memory) is process-wide
and cannot be undone, so compare two runs of this script for it.
"""

from __future__ import annotations

import argparse
import time

import torch
from segment_anything.modeling.image_encoder import Attention, Block

from HFSAMCore.model import attention
from HFSAMCore.model.attention import FastAttention, FastBlock
from HFSAMCore.model.hfsam import HFSAM, ModelSpec
from HFSAMCore.runtime.malloc import keep_freed_memory

# name -> (block class, attention class, chunked CPU attention)
VARIANTS = {
    "SAM's own blocks": (Block, Attention, False),
    "rel-pos folded into q, k; fused SDPA": (Block, FastAttention, False),
    "+ chunked bmm-softmax-bmm attention": (Block, FastAttention, True),
    "+ padding's qkv/proj skipped": (FastBlock, FastAttention, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--keep-freed-memory", action="store_true", help="as the hfsam command line does")
    args = parser.parse_args()
    if args.keep_freed_memory:
        keep_freed_memory()
    torch.manual_seed(0)
    model = HFSAM(ModelSpec("vit_b", 512)).eval()
    x = torch.rand(args.batch, 1, 512, 512)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    def forward(variant: str) -> float:
        block_cls, attn_cls, chunked = VARIANTS[variant]
        for block in model.image_encoder.blocks:
            block.__class__, block.attn.__class__ = block_cls, attn_cls
        attention.CPU_CHUNKED = chunked
        t = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cpu", dtype, enabled=dtype != torch.float32):
            model(x)
        return time.perf_counter() - t

    best = {v: float("inf") for v in VARIANTS}
    for v in VARIANTS:  # warm-up
        forward(v)
    for _ in range(args.repeats):
        for v in VARIANTS:
            best[v] = min(best[v], forward(v))
    print(
        f"vit_b 512 px, {args.precision}, batch {args.batch}, keep_freed_memory={args.keep_freed_memory}, "
        f"{torch.get_num_threads()} threads; ms per slice, minimum of {args.repeats} rounds"
    )
    for v, seconds in best.items():
        print(f"| {v} | {1000 * seconds / args.batch:.0f} |")


if __name__ == "__main__":
    main()
