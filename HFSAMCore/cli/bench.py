"""``hfsam bench``: speed, memory and few-shot benchmarks (``bench/``)."""

from __future__ import annotations

import dataclasses

from ..model.registry import DEFAULT_FEWSHOT_METHODS, FEWSHOT_METHODS
from ..runtime.progress import Progress
from .run_args import add_device, add_model_args, add_progress, command


def add_parser(sub) -> None:
    p = command(
        sub,
        "bench",
        "Benchmarks: machine ceiling, FLOPs, inference and fine-tuning speed, memory, "
        "and few-shot Dice for N labeled slices. Writes Markdown and JSON.",
        "hfsam bench speed --backbone lite_medsam -o benchmarks/results\n"
        "  hfsam bench fewshot -o benchmarks/results            (LiteMedSAM: HF-SAM, decoder only, U-Net)\n"
        "  hfsam bench fewshot --n 5 --methods hfsam --steps 100\n"
        "  hfsam bench fewshot --n 1 5 --methods hfsam decoder_only --seeds 0 1 2 --jobs 2",
    )
    p.add_argument("which", choices=["speed", "fewshot"])
    p.add_argument("-o", "--output", default="benchmarks/results", help="folder for the result files")
    p.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run); fewshot: N = 1 and 5 only")
    p.add_argument(
        "--n", type=int, nargs="+", metavar="N", help="fewshot: numbers of labeled slices (default 1 3 5 10)"
    )
    p.add_argument(
        "--methods",
        nargs="+",
        choices=tuple(FEWSHOT_METHODS),
        metavar="METHOD",
        help="fewshot: rows per N (default: " + ", ".join(DEFAULT_FEWSHOT_METHODS) + "; also hfsam_lora)",
    )
    p.add_argument("--steps", type=int, help="fewshot: training steps (default: the backbone's recipe; U-Net 500)")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        metavar="S",
        help="fewshot: train each row once per seed (different whole numbers from 0; a seed draws the new "
        "weights, the batches and the augmentation) and add a table of the mean ± sample sd and the range "
        "over them (default: seed 0 only)",
    )
    p.add_argument("--jobs", type=int, default=1, help="fewshot: rows run at once, each on cores/JOBS threads")
    p.add_argument("--volume", help="volume for the whole-segment timing (default: the DICOM sample)")
    add_model_args(p, adapter_help="(unused)")
    add_device(p, help=None)
    add_progress(p)
    p.set_defaults(func=run)


def run(args, progress: Progress) -> int:
    from ..bench.run import BenchOptions, run_bench

    fields = {f.name for f in dataclasses.fields(BenchOptions)}
    options = BenchOptions(**{k: v for k, v in vars(args).items() if k in fields})
    progress.result(**run_bench(options, progress))
    return 0
