"""The options commands share, each defined once, and their translation into the API's options.

``add_model_args`` and ``add_run_args`` are the model and run groups of ``segment`` and
``finetune``; ``add_device``, ``add_precision``, ``add_library`` and ``add_progress`` are the
single options every other command takes too. Choices come from ``model/registry.py``.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..model.registry import AXES, FUSIONS, INTENSITY_PRESETS, PRECISIONS, PROGRESS_MODES, backbone_names
from ..workflows.options import ModelOptions, RunOptions

LIBRARY_HELP = "model library folder (default: $HFSAM_HOME, else ~/.hfsam or %%LOCALAPPDATA%%\\HFSAM)"
PRECISION_HELP = "auto: bf16 autocast on CUDA (fp16 on GPUs without bf16) and on CPUs with bf16 instructions, else fp32"


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Examples verbatim; a default shown where there is one and the help does not already say it
    (not "(default: None)" after "(default 1 3 5 10)")."""

    def _get_help_string(self, action):
        if action.default in (None, False, "") or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def command(subparsers, name: str, help_: str, example: str, *, formatter=Formatter) -> argparse.ArgumentParser:
    """A sub-command whose --help says what it does and shows an example."""
    return subparsers.add_parser(
        name, help=help_, description=help_, epilog="example:\n  " + example, formatter_class=formatter
    )


class Chosen(argparse.Action):
    """Store the value and note that the user typed it: an adapter fixes the model's architecture
    and what it sees, so a typed value that contradicts it is refused while a default gives way
    (``workflows/options.fixed_by_adapter``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.chosen = set(getattr(namespace, "chosen", ()) or ()) | {self.dest}


def add_progress(g: Any, help: str | None = None) -> None:
    g.add_argument("--progress", default="auto", choices=PROGRESS_MODES, help=help)


def add_device(g: Any, help: str | None = "auto, cpu or cuda[:N]") -> None:
    g.add_argument("--device", default="auto", help=help)


def add_precision(g: Any, *, default: str | None = "auto", help: str | None = PRECISION_HELP) -> None:
    g.add_argument("--precision", default=default, choices=PRECISIONS, help=help)


def add_library(g: Any, help: str | None = LIBRARY_HELP) -> None:
    g.add_argument("--library", metavar="DIR", help=help)


def add_model_args(p: argparse.ArgumentParser, *, adapter_help: str) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--adapter", metavar="A", help=adapter_help)
    g.add_argument(
        "--checkpoint",
        metavar="C",
        help="SAM base checkpoint file; default: the library's for the backbone; "
        "'none' = random initialisation (tests and benchmarks only)",
    )
    g.add_argument(
        "--backbone",
        default="auto",
        choices=("auto", *backbone_names()),
        action=Chosen,
        help="image encoder; auto: SAM vit_b when its checkpoint is in the library, else lite_medsam "
        "(LiteMedSAM, installed with HF-SAM); with --adapter: the adapter's (another value is refused)",
    )
    g.add_argument(
        "--img-size",
        type=int,
        action=Chosen,
        help="model input size in pixels (default: the backbone's, 512 for SAM ViT (or 224), 256 for "
        "LiteMedSAM; with --adapter: the adapter's)",
    )
    g.add_argument("--rank", type=int, default=5, action=Chosen, help="LoRA rank (with --adapter: the adapter's)")
    g.add_argument(
        "--fusion",
        default="two_step",
        choices=tuple(FUSIONS),
        action=Chosen,
        help="; ".join(f"{k}: {v}" for k, v in FUSIONS.items()),
    )
    add_library(g, help="model library folder (default: $HFSAM_HOME or ~/.hfsam)")


def add_run_args(p: argparse.ArgumentParser, *, batch_size: int) -> None:
    g = p.add_argument_group("run")
    add_device(g)
    add_precision(g)
    g.add_argument("--batch-size", type=int, default=batch_size, help="slices per batch")
    g.add_argument(
        "--axis",
        default="axial",
        choices=AXES,
        action=Chosen,
        help="slice direction, in patient terms (whatever the voxel order); with --adapter: the adapter's",
    )
    g.add_argument(
        "--preset",
        default="auto",
        choices=("auto", *INTENSITY_PRESETS),
        action=Chosen,
        help="intensity preset; auto chooses from the data (DICOM modality, HU range); with --adapter: the adapter's",
    )
    add_progress(g, help="json: one event per line on stdout (for the Slicer module); tty: a bar on stderr")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files")


def _chosen(args: argparse.Namespace) -> frozenset[str]:
    return frozenset(getattr(args, "chosen", None) or ())


def model_options(args: argparse.Namespace) -> ModelOptions:
    return ModelOptions(
        adapter=args.adapter,
        checkpoint=args.checkpoint,
        backbone=args.backbone,
        img_size=args.img_size,
        rank=args.rank,
        fusion=args.fusion,
        library=args.library,
        typed=_chosen(args),
    )


def run_options(args: argparse.Namespace) -> RunOptions:
    return RunOptions(
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        axis=args.axis,
        preset=args.preset,
        overwrite=args.overwrite,
        typed=_chosen(args),
    )
