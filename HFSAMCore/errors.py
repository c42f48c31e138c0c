"""Errors the command line maps to exit codes (0 done, 2 bad input, 130 cancelled, 1 other)."""


class HFSAMError(Exception):
    """Base class for errors the engine raises on purpose."""

    exit_code = 1


class InputError(HFSAMError):
    """Bad input from the user: one line that names the problem and what to do. Exit code 2."""

    exit_code = 2


class Cancelled(HFSAMError):
    """The run was cancelled (SIGINT/SIGTERM or a cancel request). Exit code 130."""

    exit_code = 130
