"""What a user types, checked before anything else: one line, exit code 2, in a fraction of a second.

argparse checks types and choices; the ranges (one table for every command and workflow,
``workflows/options.RANGES``) are checked right after parsing: ``--lr nan``, ``--minutes 0`` or
``--steps -1`` would otherwise be noticed after the model has loaded, or never (an untrained
adapter saved with exit code 0).
The parser's own errors become one line too, and a JSON error event under ``--progress json``,
so the Slicer module reads every refusal the same way.
"""

from __future__ import annotations

import argparse

from ..errors import InputError
from ..model.registry import PROGRESS_MODES
from ..workflows.options import check_ranges


def check_options(args: argparse.Namespace) -> None:
    """Refuse an option value outside its range (``workflows/options.RANGES``), naming the option."""
    check_ranges(args)


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
