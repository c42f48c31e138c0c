"""``hfsam train`` and ``hfsam evaluate-dataset``: reproducing the paper on whole datasets.

``cli/app.py`` calls :func:`add_parser` with its subparsers; each command is a
function ``(args, progress) -> int`` that turns flags into arguments and calls
``train/dataset_training.train_on_dataset`` or ``workflows/evaluate_test_set``.

Multi-GPU: launch the same command with torchrun, e.g.
``torchrun --nproc_per_node 2 -m HFSAMCore train ...``.
"""

from __future__ import annotations

import argparse

from ..errors import InputError
from ..runtime.progress import Progress
from .run_args import Formatter, add_device, add_library, add_precision, add_progress

TRAIN_HELP = "Train HF-SAM on a dataset (Synapse, ACDC, NIfTI folders): the paper's few-shot regimes."
TRAIN_EXAMPLE = """examples:
  # the authors' Synapse run: their 221-slice list (HF-SAM's lists/lists_Synapse/train.txt), their recipe
  hfsam train --dataset synapse --root data/Synapse/train_npz --train-list data/Synapse/lists/train_authors.txt \\
      --preset hfsam-synapse --checkpoint sam_vit_b_01ec64.pth -o runs/synapse10
  # 10 % of TransUNet's 2211 slices, drawn as H-SAM's make_list.py draws them (random.sample, seed 2345)
  hfsam train --dataset synapse --root data/Synapse/train_npz --list lists/lists_Synapse/train.txt \\
      --fraction 0.1 --seed 2345 --preset hfsam-synapse -o runs/synapse10-seed2345
  # ACDC with 7 labeled patients (SSL4MIS: the first 7 patients of train_slices.list)
  hfsam train --dataset acdc --root data/ACDC --patients 7 -o runs/acdc7
  # two GPUs: the same command under torchrun (the global batch of 16 is split, 8 per GPU)
  torchrun --nproc_per_node 2 -m HFSAMCore train --dataset synapse ... -o runs/synapse10
  # continue after an interruption, from the last checkpoint
  hfsam train -o runs/synapse10 --resume
  # CPU smoke test: tiny random model
  hfsam train --dataset nifti --root my_nnunet_task --classes liver --preset tiny --checkpoint none -o runs/smoke"""

EVAL_HELP = (
    "Per case and per class Dice and HD95 of an adapter on a test set, in the paper's convention "
    "and in mm; writes the paper-style table as Markdown and CSV."
)
EVAL_EXAMPLE = """examples:
  hfsam evaluate-dataset --dataset synapse --root data/Synapse/test_vol_h5 \\
      --list lists/lists_Synapse/test_vol.txt --adapter runs/synapse10/adapter.safetensors \\
      --checkpoint sam_vit_b_01ec64.pth --raw-dir data/Synapse/RawData/Training -o results/synapse10
  hfsam evaluate-dataset --dataset acdc --root data/ACDC --adapter runs/acdc7/adapter.safetensors -o results/acdc7"""


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    add_device(g, help="auto, cpu or cuda[:N] (under torchrun: each process its own GPU)")
    add_library(g, help="model library folder (default: $HFSAM_HOME or ~/.hfsam)")
    add_progress(g, help="json: one event per line on stdout; tty: a bar on stderr")


def _dataset_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        choices=["synapse", "acdc", "nifti"],
        required=required,
        help="synapse: TransUNet's npz/h5; acdc: SSL4MIS's h5; nifti: imagesTr/labelsTr folders",
    )
    g.add_argument(
        "--root",
        required=required,
        help="synapse: train_npz (train) or test_vol_h5 (evaluate); acdc: the folder holding data/ "
        "and the .list files; nifti: the folder holding imagesTr/labelsTr (imagesTs/labelsTs)",
    )
    g.add_argument(
        "--list",
        help="list file (synapse train.txt / test_vol.txt; acdc default train_slices.list / "
        "test.list in --root; nifti: case names); default: everything in --root",
    )
    g.add_argument(
        "--subset",
        choices=["Tr", "Ts"],
        help="nifti: imagesTr/labelsTr or imagesTs/labelsTs (default: Tr to train, Ts to evaluate)",
    )
    g.add_argument("--axis", choices=["axial", "coronal", "sagittal"], help="nifti: slice direction (default axial)")
    g.add_argument(
        "--intensity",
        choices=["auto", "ct", "mr"],
        help="nifti: intensity preset (auto: from the first case); the .h5/.npz data is already in [0, 1]",
    )


# --------------------------------------------------------------------------- train


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    from ..model.registry import PIXEL_NORMS
    from ..train.augmentation import AUGMENTATIONS
    from ..train.dataset_config import LR_SCHEDULES, PRESETS

    p = subparsers.add_parser(
        "train", help=TRAIN_HELP, description=TRAIN_HELP, epilog=TRAIN_EXAMPLE, formatter_class=Formatter
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="run folder: config.json, train_selected.txt, checkpoints/, adapter.safetensors",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output from its last checkpoint (its config.json decides everything)",
    )
    _dataset_args(p, required=False)
    g = p.add_argument_group("few-shot regime")
    g.add_argument(
        "--train-list",
        metavar="FILE",
        help="train on exactly the slices this file names, one per line, no draw (the authors' list: "
        "HF-SAM's lists/lists_Synapse/train.txt, see docs/reproduce.md); replaces --list, "
        "--fraction and --patients",
    )
    g.add_argument(
        "--fraction",
        type=float,
        help="train on this share of the listed slices, drawn with "
        "random.sample after random.seed(--seed), as H-SAM (0.1 = the paper)",
    )
    g.add_argument("--patients", type=int, help="train on every slice of K patients (ACDC: 3 or 7, as SSL4MIS)")
    g.add_argument(
        "--patient-order",
        choices=["list", "random"],
        help="--patients: the first K of the list (SSL4MIS, default) or random.sample with --seed",
    )
    g.add_argument("--seed", type=int, help="seed of the draw, the shuffling and the augmentation (default 2345)")
    g = p.add_argument_group("recipe (defaults: the --preset)")
    g.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="hfsam-synapse / hfsam-acdc: the authors' recipe (vit_b, 512 px, rank 5, [0, 1] input, "
        "global batch 16, AdamW lr 0.0025 with H-SAM's schedule, 250 warm-up steps, 300 epochs, "
        "H-SAM's augmentation, fp32; docs/reproduce.md lists every setting); tiny: CPU smoke tests",
    )
    g.add_argument("--classes", help="class preset (synapse, acdc) or names in label order; default from --dataset")
    g.add_argument(
        "--checkpoint",
        metavar="C",
        help="SAM base checkpoint file; default: the library's; 'none' = random initialisation (tests only)",
    )
    g.add_argument("--backbone", choices=["vit_b", "vit_l", "vit_h", "tiny"])
    g.add_argument("--img-size", type=int)
    g.add_argument("--rank", type=int, help="LoRA rank")
    g.add_argument(
        "--fusion",
        choices=["two_step", "released"],
        help="two_step: the paper's decoder; released: the authors' released network (one fusion after "
        "the decoder, an extra learnable token, H-SAM's cross-attention-first blocks)",
    )
    g.add_argument(
        "--pixel-norm",
        choices=list(PIXEL_NORMS),
        help="how the [0, 1] slice is normalised for the encoder: unit = unchanged (the authors'), "
        "imagenet = SAM's own ImageNet statistics (the default of hfsam finetune)",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        help="the GLOBAL batch: slices per optimisation step, over all "
        "processes (split evenly under torchrun); the authors': 16",
    )
    g.add_argument("--lr", type=float, help="base learning rate (AdamW)")
    g.add_argument(
        "--lr-schedule",
        choices=list(LR_SCHEDULES),
        help="hsam: H-SAM's warm-up, then poly(0.9) over all steps (ends near 8 %% of --lr); "
        "poly: warm-up, then poly(0.9) down to 0",
    )
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--warmup", type=int, help="linear warm-up steps before the poly(0.9) decay")
    g.add_argument("--epochs", type=int)
    g.add_argument("--save-every", type=int, help="epochs between checkpoints (the last epoch is always saved)")
    g.add_argument(
        "--augment",
        choices=list(AUGMENTATIONS),
        help="hsam: H-SAM's (one of rotation, crop-resize, elastic per slice); independent: hfsam "
        "finetune's milder recipe; none",
    )
    g.add_argument("--no-augment", dest="augment", action="store_const", const="none", help="= --augment none")
    add_precision(
        g,
        default=None,
        help="auto: bf16 on GPUs and CPUs that have it, else fp16 (with loss scaling) on GPUs, fp32 on "
        "CPUs; the paper presets: fp32, as the authors trained",
    )
    g.add_argument("--name", help="adapter name (default: the output folder's name)")
    g.add_argument("--description", help="free text stored in the adapter")
    _common(p)
    p.add_argument(
        "--num-workers",
        type=int,
        default=0,
        help="DataLoader worker processes per training process (4-8 on a GPU machine)",
    )
    p.set_defaults(func=cmd_train)
    return p


_TRAIN_KEYS = (
    "dataset",
    "root",
    "list",
    "train_list",
    "subset",
    "axis",
    "intensity",
    "fraction",
    "patients",
    "patient_order",
    "seed",
    "preset",
    "classes",
    "checkpoint",
    "backbone",
    "img_size",
    "rank",
    "fusion",
    "pixel_norm",
    "batch_size",
    "lr",
    "lr_schedule",
    "weight_decay",
    "warmup",
    "epochs",
    "save_every",
    "augment",
    "precision",
    "name",
    "description",
)


def cmd_train(args, progress: Progress) -> int:
    from ..store.library import ModelLibrary
    from ..train.dataset_config import make_config
    from ..train.dataset_training import train_on_dataset

    given = {k: getattr(args, k) for k in _TRAIN_KEYS if getattr(args, k) is not None}
    cfg = None
    if args.resume:
        if given:
            names = ", ".join("--" + k.replace("_", "-") for k in given)
            raise InputError(f"--resume takes every setting from {args.output}/config.json; drop {names}")
    else:
        if "dataset" not in given or "root" not in given:
            raise InputError("give --dataset and --root (or --resume a run folder)")
        options = {k: v for k, v in given.items() if k not in ("dataset", "root", "preset")}
        cfg = make_config(given["dataset"], given["root"], preset=given.get("preset"), **options)
    if args.num_workers < 0:
        raise InputError(f"--num-workers must be 0 or more, not {args.num_workers}")
    result = train_on_dataset(
        cfg,
        args.output,
        resume=args.resume,
        device=args.device,
        num_workers=args.num_workers,
        library=ModelLibrary(args.library),
        progress=progress,
    )
    if result.adapter:
        progress.log(
            f"trained {result.steps} steps ({result.epochs} epochs) in {result.seconds:.0f} s; "
            f"evaluate with: hfsam evaluate-dataset --adapter {result.adapter} ..."
        )
        progress.result(**result.as_dict())
    return 0


# --------------------------------------------------------------------------- evaluate-dataset


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate-dataset", help=EVAL_HELP, description=EVAL_HELP, epilog=EVAL_EXAMPLE, formatter_class=Formatter
    )
    _dataset_args(p, required=True)
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="folder for table.md, table.csv, per_class.csv, per_case.csv, results.json",
    )
    p.add_argument(
        "--adapter", required=True, help="adapter (library name or .safetensors file), e.g. a run's adapter.safetensors"
    )
    p.add_argument("--checkpoint", metavar="C", help="the adapter's SAM base checkpoint file (default: the library's)")
    p.add_argument("--method", help="name of the table row (default: the adapter's name)")
    p.add_argument(
        "--raw-dir",
        help="original NIfTI files (e.g. Synapse RawData/Training, ACDC database/): "
        "their headers give the spacing for the mm metrics",
    )
    p.add_argument("--spacing", help="JSON {case: [z, y, x]} in mm, instead of --raw-dir")
    p.add_argument("--save-predictions", action="store_true", help="also write predictions/CASE.nii.gz")
    p.add_argument("--batch-size", type=int, default=8, help="slices per batch")
    add_precision(p, help=None)
    p.add_argument("--overwrite", action="store_true", help="replace existing result files")
    _common(p)
    p.set_defaults(func=cmd_evaluate_dataset)
    return p


def cmd_evaluate_dataset(args, progress: Progress) -> int:
    from ..workflows.evaluate_test_set import TestSet, evaluate_test_set

    test_set = TestSet(
        dataset=args.dataset,
        root=args.root,
        list=args.list,
        subset=args.subset,
        axis=args.axis,
        intensity=args.intensity,
        raw_dir=args.raw_dir,
        spacing=args.spacing,
    )
    result = evaluate_test_set(
        test_set,
        args.output,
        adapter=args.adapter,
        checkpoint=args.checkpoint,
        method=args.method,
        save_predictions=args.save_predictions,
        batch_size=args.batch_size,
        precision=args.precision,
        device=args.device,
        library=args.library,
        overwrite=args.overwrite,
        progress=progress,
    )
    progress.result(**result)
    return 0


# --------------------------------------------------------------------------- registration


def add_parser(subparsers) -> None:
    """Add ``train`` and ``evaluate-dataset`` to cli/app.py's subparsers."""
    add_train_parser(subparsers)
    add_evaluate_parser(subparsers)
