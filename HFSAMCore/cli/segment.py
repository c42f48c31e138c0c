"""``hfsam segment``: flags in, ``workflows.segment_file`` called, its result out."""

from __future__ import annotations

from ..model.slice_smoothing import DEFAULT_SLICE_SMOOTHING_MM
from ..runtime.progress import Progress
from .run_args import add_model_args, add_run_args, command, model_options, run_options


def add_parser(sub) -> None:
    p = command(
        sub,
        "segment",
        "Segment every slice of a volume and write a label volume with its geometry.",
        "hfsam segment ct.nii.gz -o seg.nrrd --adapter liver5\n"
        "  hfsam segment dicom_folder/ -o seg.nrrd --checkpoint none --backbone tiny   # random test model",
    )
    p.add_argument(
        "input",
        help="image file (NIfTI, NRRD, MHA) or a DICOM series folder (folder::SERIES_UID when it holds several)",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="label volume to write (.nrrd, .nii.gz, .mha); "
        "a sidecar .json with class names and colours is written beside it",
    )
    p.add_argument("--classes", help="class preset (synapse, acdc) or names 'a,b,c' (without --adapter)")
    add_model_args(p, adapter_help="adapter: a library name or a .safetensors file")
    add_run_args(p, batch_size=4)
    p.add_argument(
        "--slice-smoothing",
        type=float,
        default=DEFAULT_SLICE_SMOOTHING_MM,
        metavar="MM",
        help="average each slice's class probabilities with its neighbours' (a Gaussian with this sigma "
        "in mm along the slice axis) before choosing the label: removes slice-to-slice noise; 0: each "
        "slice on its own",
    )
    p.set_defaults(func=run)


def run(args, progress: Progress) -> int:
    from ..workflows.segment_file import segment_file

    result = segment_file(
        args.input,
        args.output,
        classes=args.classes,
        model=model_options(args),
        run=run_options(args),
        slice_smoothing=args.slice_smoothing,
        progress=progress,
    )
    progress.result(**result)
    return 0
