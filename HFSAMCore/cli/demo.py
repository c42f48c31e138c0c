"""``hfsam demo``: the main job on the sample CT (``workflows.demo``)."""

from __future__ import annotations

from ..model.registry import pretrained_backbones
from ..runtime.progress import Progress
from .run_args import add_device, add_library, add_progress, command


def add_parser(sub) -> None:
    p = command(
        sub,
        "demo",
        "The main job on the sample CT: fine-tune on a few labeled slices, segment every "
        "slice, evaluate on the others, write the segmentation, a figure and a Dice table.",
        "hfsam demo --output demo_output",
    )
    p.add_argument("--output", default="demo_output", help="folder for the results")
    p.add_argument("--labeled-slices", type=int, default=5, help="how many labeled slices to train on")
    p.add_argument("--steps", type=int, help="training steps (default: the backbone's few-shot recipe)")
    p.add_argument(
        "--backbone",
        choices=("auto", *pretrained_backbones(), "tiny"),
        default="auto",
        help="auto: SAM vit_b with its checkpoint and a CUDA GPU, else LiteMedSAM; tiny: the random-init test model",
    )
    add_device(p, help=None)
    add_library(p, help=None)
    add_progress(p)
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier demo in --output")
    p.set_defaults(func=run)


def run(args, progress: Progress) -> int:
    from ..workflows.demo import DemoOptions, run_demo

    options = DemoOptions(
        labeled_slices=args.labeled_slices,
        steps=args.steps,
        backbone=args.backbone,
        device=args.device,
        library=args.library,
        overwrite=args.overwrite,
    )
    result = run_demo(args.output, options, progress)
    summary = result.pop("summary")
    if progress.mode != "json":
        print(summary)
    progress.log(f"results in {result['output']}/: segmentation.nrrd, adapter.safetensors, dice.md, figure.png")
    progress.result(**result)
    return 0
