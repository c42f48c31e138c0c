"""``hfsam finetune``: flags in, ``workflows.finetune_adapter`` called, its result out."""

from __future__ import annotations

from ..runtime.progress import Progress
from ..workflows.finetune_adapter import TrainingOptions
from .run_args import add_model_args, add_run_args, command, model_options, run_options


def add_parser(sub) -> None:
    p = command(
        sub,
        "finetune",
        "Train an HF-SAM adapter on the labeled slices of one volume.",
        "hfsam finetune ct.nii.gz liver_labels.nii.gz -o liver.safetensors --slices 10,15,20 --classes liver\n"
        "  hfsam finetune ct.nii.gz labels.nii.gz --name synapse5 --classes synapse --slices auto --minutes 10",
    )
    p.add_argument("image", help="image file or DICOM folder")
    p.add_argument(
        "labels",
        nargs="+",
        help="one label map (values 1..K) or K binary masks (one per class); "
        "brought onto the image grid by physical position",
    )
    p.add_argument("-o", "--output", help="adapter file to write (.safetensors)")
    p.add_argument("--name", help="also store the adapter in the model library under this name")
    p.add_argument(
        "--slices",
        default="auto",
        help="slice indices to train on ('12,15,20', '10-14') along the volume's own slice axis, "
        "or 'auto' = every slice that carries a label",
    )
    p.add_argument(
        "--classes",
        help="class names in label order ('liver,spleen') or a preset (synapse, acdc); default: 'label_1'..'label_K'",
    )
    p.add_argument(
        "--steps",
        type=int,
        help="training steps (default: the backbone's few-shot recipe, 300 "
        "for lite_medsam, 1000 for vit_b, unless --minutes is given)",
    )
    p.add_argument("--minutes", type=float, help="wall-clock budget instead of (or as well as) --steps")
    p.add_argument(
        "--cached-steps",
        type=int,
        metavar="N",
        help="the first N steps train the decoder, AWFFM and compression conv on encoder features "
        "computed once (5x cheaper on a CPU; exact, LoRA does not train in them); "
        "default: the recipe's share (lite_medsam: all of them, so LoRA does not train; on a GPU try "
        "--cached-steps 0 = every step end to end, LoRA included)",
    )
    p.add_argument(
        "--low-level-dropout",
        type=float,
        metavar="P",
        default=0.0,
        help="in each training step, leave out each sample's low-level feature with probability P, a "
        "regulariser for very few labeled slices (default 0 = off; 0.5 helped at 3 slices and cost at "
        "10 on the sample CT, within seed noise: benchmarks/RESULTS.md)",
    )
    p.add_argument("--lr", type=float, default=0.0025, help="base learning rate (AdamW)")
    p.add_argument(
        "--holdout",
        type=int,
        help="labeled slices held out for a Dice check (default: 1 when at least 5 are labeled, else 0)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (runs are deterministic on the CPU)")
    p.add_argument("--description", default="", help="free text stored in the adapter")
    add_model_args(p, adapter_help="continue training this adapter (library name or file)")
    add_run_args(p, batch_size=4)
    p.set_defaults(func=run)


def run(args, progress: Progress) -> int:
    from ..workflows.finetune_adapter import finetune_adapter

    training = TrainingOptions(
        slices=args.slices,
        classes=args.classes,
        steps=args.steps,
        minutes=args.minutes,
        cached_steps=args.cached_steps,
        low_level_dropout=args.low_level_dropout,
        lr=args.lr,
        holdout=args.holdout,
        seed=args.seed,
        description=args.description,
    )
    result = finetune_adapter(
        args.image,
        args.labels,
        output=args.output,
        name=args.name,
        training=training,
        model=model_options(args),
        run=run_options(args),
        progress=progress,
    )
    progress.result(**result)
    return 0
