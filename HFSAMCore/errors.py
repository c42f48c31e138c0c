"""Errors the command line maps to exit codes (0 done, 2 bad input, 130 cancelled, 1 other)."""

import unicodedata

# Shown as escapes: control characters (line breaks, ESC of terminal sequences), Unicode line and paragraph
# separators, lone surrogates (undecodable file-name bytes) and the bidirectional overrides and isolates that
# can make a line read as something else. Other text is kept: non-ASCII spaces and joiners are real names.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def one_line(text: str) -> str:
    """TEXT as one line that shows what it holds: line breaks of every kind, terminal escapes, undecodable
    bytes and bidi overrides written as their escapes (\\n, \\x1b, \\udcff, \\u202e); everything else kept."""
    if text.isprintable():
        return text
    return "".join(
        ch.encode("unicode_escape").decode("ascii")
        if unicodedata.category(ch) in _ESCAPED_CATEGORIES or ch in _BIDI_CONTROLS
        else ch
        for ch in text
    )


class HFSAMError(Exception):
    """Base class for errors the engine raises on purpose.

    Its message is always one line: many are built from what a file holds (a field name, a path, a
    label name), and a line break from a hostile or damaged file must not split the one-line error
    that the command line, the progress stream and the Slicer panel show.
    """

    exit_code = 1

    def __init__(self, *args):
        super().__init__(*(one_line(a) if isinstance(a, str) else a for a in args))


class InputError(HFSAMError):
    """Bad input from the user: one line that names the problem and what to do. Exit code 2."""

    exit_code = 2


class Cancelled(HFSAMError):
    """The run was cancelled (SIGINT/SIGTERM or a cancel request). Exit code 130."""

    exit_code = 130


class HFSAMWarning(UserWarning):
    """A problem worth telling the user that does not stop the run (e.g. what a reader only warned
    about). API callers see it as a Python warning; the command line shows it as one ``warning:``
    line and a JSON warning event."""


class OutOfMemory(HFSAMError):
    """Even batch size 1 did not fit. The message says what to do on the device that ran out. Exit code 1."""

    def __init__(self, device_type: str):
        if device_type == "cuda":
            hint = "close other programs using the GPU, use a smaller --img-size, or run on the CPU (--device cpu)"
        else:
            hint = "close other programs, use a smaller --img-size, or run on a machine with more memory"
        super().__init__(f"out of memory even at batch size 1 on the {device_type.upper()}; {hint}")
        self.device_type = device_type

    def __reduce__(self):  # pickle and copy rebuild it from the device, not from the message
        return type(self), (self.device_type,)


# What torch's allocators say when they run out: CUDA ("CUDA out of memory"), the CPU allocator
# ("DefaultCPUAllocator: can't allocate memory ... (Cannot allocate memory)"), MPS ("not enough memory").
_OUT_OF_MEMORY_TEXTS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError, a CPU allocator failure or a host MemoryError; torch-free (the CLI's last
    line of defence calls it too)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc).lower() for t in _OUT_OF_MEMORY_TEXTS)
