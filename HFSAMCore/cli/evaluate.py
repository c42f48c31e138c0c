"""``hfsam evaluate``: flags in, ``workflows.evaluate_files`` called, the scores out."""

from __future__ import annotations

import json

from ..runtime.progress import Progress
from .run_args import add_progress, command


def add_parser(sub) -> None:
    p = command(
        sub,
        "evaluate",
        "Dice and HD95 (mm) per class of a prediction against a reference label map.",
        "hfsam evaluate --reference labels.nii.gz --prediction seg.nrrd --classes synapse --json",
    )
    p.add_argument(
        "--reference",
        required=True,
        help="reference label map (brought onto the prediction's grid by physical position)",
    )
    p.add_argument("--prediction", required=True, help="predicted label map")
    p.add_argument("--classes", help="class preset or names; default: the prediction's sidecar JSON, else numbers")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_progress(p, help="json: one event per line on stdout, the scores being the result event")
    p.set_defaults(func=run)


def run(args, progress: Progress) -> int:
    from ..evaluate.metrics import format_table
    from ..workflows.evaluate_files import evaluate_files

    result = evaluate_files(args.reference, args.prediction, classes=args.classes, progress=progress)
    if progress.mode != "json":  # in JSON mode stdout carries events only: the scores are the result event
        print(json.dumps(result, indent=2) if args.json else format_table(result))
    progress.result(**result)
    return 0
