"""What a user types, checked before anything else: one line, exit code 2, in a fraction of a second.

argparse checks types and choices; the ranges are here, one table for every command, checked
right after parsing: ``--lr nan``, ``--minutes 0`` or ``--steps -1`` would otherwise be
noticed after the model has loaded, or never (an untrained adapter saved with exit code 0).
The parser's own errors become one line too, and a JSON error event under ``--progress json``,
so the Slicer module reads every refusal the same way.
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Callable

from ..errors import InputError
from ..model.registry import PROGRESS_MODES


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def _at_least(n: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and v >= n


#: argparse dest -> (rule, what the rule asks for). Every command's options; absent ones are skipped.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "steps": (_at_least(1), "a whole number of at least 1"),
    "minutes": (_positive, "a number of minutes above 0"),
    "lr": (_positive, "a positive learning rate (e.g. 0.0025)"),
    "batch_size": (_at_least(1), "a whole number of at least 1"),
    "holdout": (_at_least(0), "0 or more"),
    "cached_steps": (_at_least(0), "0 or more"),
    "jobs": (_at_least(1), "a whole number of at least 1"),
    "labeled_slices": (_at_least(1), "a whole number of at least 1"),
    "rank": (lambda v: isinstance(v, int) and 0 <= v <= 256, "a whole number from 0 to 256"),
    "img_size": (
        lambda v: isinstance(v, int) and 64 <= v <= 2048 and v % 16 == 0,
        "a multiple of 16 from 64 to 2048 (512 or 224 in practice)",
    ),
    "epochs": (_at_least(1), "a whole number of at least 1"),
    "weight_decay": (lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v >= 0, "0 or more"),
    "fraction": (lambda v: _positive(v) and v <= 1, "a share above 0 and at most 1 (0.1 = 10 %)"),
}


def check_options(args: argparse.Namespace) -> None:
    """Refuse an option value outside its range (RULES), naming the option as the user typed it."""
    for dest, (ok, wanted) in RULES.items():
        value = getattr(args, dest, None)
        if value is not None and not ok(value):
            raise InputError(f"--{dest.replace('_', '-')} must be {wanted}, not {value!r}")


class UsageError(InputError):
    """argparse found the command line malformed (unknown option, bad choice, missing argument)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse prints the usage and exits; this raises ``UsageError`` with one line instead, which
    ``cli/app.main`` reports like every other bad input (and as a JSON event under --progress json).
    ``--help`` and ``--version`` are untouched. Sub-parsers inherit the class."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def progress_mode(argv: list[str]) -> str:
    """The --progress value in a command line argparse could not parse (for reporting its error)."""
    for i, arg in enumerate(argv):
        if arg == "--progress" and i + 1 < len(argv):
            return argv[i + 1] if argv[i + 1] in PROGRESS_MODES else "auto"
        if arg.startswith("--progress="):
            value = arg.split("=", 1)[1]
            return value if value in PROGRESS_MODES else "auto"
    return "auto"
