"""``hfsam info``: an architecture summary with its parameter counts."""

from __future__ import annotations

import json

from ..model.registry import FUSIONS, PIXEL_NORMS, backbone_names
from ..runtime.progress import Progress
from .run_args import command


def add_parser(sub) -> None:
    p = command(
        sub,
        "info",
        "Architecture summary with total, trainable and LoRA parameter counts.",
        "hfsam info --backbone vit_b --img-size 512 --classes 8 --rank 5 --json",
    )
    p.add_argument("--backbone", default="vit_b", choices=backbone_names())
    p.add_argument("--img-size", type=int, help="default: the backbone's (vit_b 512, lite_medsam 256)")
    p.add_argument("--classes", default="8", help="number of classes, a preset or names")
    p.add_argument("--rank", type=int, default=5)
    p.add_argument("--fusion", default="two_step", choices=tuple(FUSIONS))
    p.add_argument("--pixel-norm", choices=list(PIXEL_NORMS), help="default: the backbone's own")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args, progress: Progress) -> int:
    from ..model.summary import architecture_summary

    info = architecture_summary(
        args.backbone,
        img_size=args.img_size,
        classes=args.classes,
        rank=args.rank,
        fusion=args.fusion,
        pixel_norm=args.pixel_norm,
    )
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        c = info["parameters"]
        print(
            f"HF-SAM {info['backbone']} at {info['img_size']} px, {info['outputs'] - 1} classes + background, "
            f"LoRA rank {info['rank']}, fusion {info['fusion']}, low-level block(s) {list(info['low_level_blocks'])}, "
            f"pixel normalisation {info['pixel_norm']}"
        )
        print(
            f"parameters: total {c['total']:,}  trainable {c['trainable']:,}  LoRA {c['lora']:,}  "
            f"frozen {c['frozen']:,}"
        )
    return 0
