"""`hfsam`: builds the parser from the command modules beside it, runs one, maps errors to exit codes.

Exit codes: 0 done, 2 bad input (one line on stderr, nothing written),
130 cancelled, 1 anything else. With ``--progress json`` stdout carries one JSON
event per line (docs/design.md, "Progress protocol"); logs always go to stderr.
Heavy imports (torch, SAM) happen inside the workflows so that ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
import warnings

from .. import __version__
from ..errors import Cancelled, HFSAMError, HFSAMWarning, InputError, is_out_of_memory, one_line
from ..runtime.malloc import keep_freed_memory
from ..runtime.progress import Progress
from .options import OneLineParser, UsageError, check_options, progress_mode
from .run_args import Formatter

DESCRIPTION = """\
HF-SAM: few-shot medical image segmentation with a LoRA-tuned Segment Anything Model,
an adaptive weighted feature-fusion module and a two-step skip-fusion decoder
(Liu & Xu, CVIU 2025). The engine of the HF-SAM 3D Slicer extension.

commands:
  segment    segment every slice of a CT/MR volume (file or DICOM folder)
  finetune   train a new adapter from a few labeled slices
  evaluate   Dice and HD95 (mm) of a prediction against a reference label map
  info       architecture summary and parameter counts
  models     the local model library: adapters and base SAM checkpoints
  demo       the whole job on the sample CT: fine-tune on 5 slices, segment, evaluate
  train      train on a dataset (Synapse, ACDC, NIfTI folders); torchrun for many GPUs
  evaluate-dataset  per case/class Dice and HD95 on a test set, laid out like the paper's table
  bench      speed / memory / few-shot benchmarks (writes a results table)

exit codes: 0 done, 2 bad input, 130 cancelled, 1 other error.
Run `hfsam COMMAND --help` for each command's options and an example."""


# The commands, in the order `hfsam --help` lists them: each module adds its parser(s) and the
# function that runs them. A new command is a new module here and one entry in this list.
COMMANDS = ("segment", "finetune", "evaluate", "info", "demo", "models", "dataset", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="hfsam", description=DESCRIPTION, formatter_class=Formatter)
    parser.add_argument("--version", action="version", version=f"hfsam {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__package__}.{name}").add_parser(sub)
    return parser


# -- entry point -------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:  # a malformed command line: one line too, and a JSON event when asked for
        return _refuse(Progress(progress_mode(argv)), exc)
    progress = Progress(getattr(args, "progress", "auto") or "auto")
    progress.install_signal_handlers()
    keep_freed_memory()
    with warnings.catch_warnings():
        _warnings_as_progress(progress)
        return _run(args, progress)


def _warnings_as_progress(progress: Progress) -> None:
    """The engine's warnings (HFSAMWarning, from code that has no Progress to hand, such as dataset
    readers) become one ``warning:`` line and a JSON event, every time; other warnings are left alone."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, HFSAMWarning):
            progress.warn(str(message))
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.simplefilter("always", HFSAMWarning)
    warnings.showwarning = show


def _run(args, progress: Progress) -> int:
    try:
        check_options(args)
        return int(args.func(args, progress) or 0)
    except InputError as exc:
        return _refuse(progress, exc)
    except (Cancelled, KeyboardInterrupt) as exc:
        # A Cancelled says what was kept (e.g. `train` keeps its finished checkpoints).
        message = str(exc) if isinstance(exc, Cancelled) and str(exc) else "cancelled; nothing was written"
        progress.error(message, exit_code=130)
        progress.log(f"hfsam: {message}")
        return 130
    except HFSAMError as exc:
        progress.error(str(exc), exit_code=exc.exit_code)
        progress.log(f"hfsam: error: {exc}")
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - the last line of defence reports and exits 1
        if is_out_of_memory(exc):  # even batch size 1 did not fit: say what to do, not where it happened
            message = (
                "out of memory; close other programs, use a smaller --batch-size or --img-size, "
                "or run where there is more memory"
            )
            progress.error(message, exit_code=1)
            progress.log(f"hfsam: error: {message}")
            return 1
        traceback.print_exc(file=sys.stderr)
        progress.error(one_line(f"{type(exc).__name__}: {exc}"), exit_code=1)  # the traceback above has the rest
        return 1


def _refuse(progress: Progress, exc: InputError) -> int:
    """Bad input: exit code 2, one line on stderr and one JSON error event (an InputError's message is
    one line whatever a path or a library put in it: errors.HFSAMError)."""
    message = str(exc).strip() or "bad input"
    progress.error(message, exit_code=2)
    progress.log(f"hfsam: error: {message}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
