"""What ITK and its C libraries said while reading: captured, turned into one line, or passed on."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import SimpleITK as sitk

from ..errors import InputError
from .formats import Warn, open_maybe_gzip


def pass_on(messages: list[str], source, warn: Warn | None) -> None:
    """What the reader only warned about reaches the user, one line each."""
    for message in messages:
        (warn or python_warning)(f"reading {source}: {message}")


def python_warning(message: str) -> None:
    import warnings

    from ..errors import HFSAMWarning

    warnings.warn(message, HFSAMWarning, stacklevel=3)


def display_path(path: str | os.PathLike) -> str:
    return os.fspath(path)


@contextlib.contextmanager
def _itk_warnings(shown: bool):
    """ITK's warnings shown (to be captured: captured_stderr) or silenced for one call.
    A process-wide flag, restored afterwards."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def itk_warnings_on():
    return _itk_warnings(True)


def quiet_itk():
    """Silence ITK's stderr warnings for one call: they are noise to a user, and stderr
    carries our own log lines."""
    return _itk_warnings(False)


@contextlib.contextmanager
def c_stderr_silenced():
    """Point file descriptor 2 at the null device for one call: C libraries under SimpleITK
    (nifticlib) print straight to it, past Python and past ITK's warning switch. Process-wide,
    like ``quiet_itk``: fine for the engine, which runs in its own process."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable fd 2 (e.g. a GUI process)
        saved = None
    if saved is None:
        yield
        return
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, 2)
        finally:
            os.close(null)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _uninformative(detail: str) -> bool:
    """ITK details that would mislead a user more than help (e.g. a truncated .mha
    reports 'No such file or directory')."""
    return any(s in detail for s in ("No such file", "Unable to determine ImageIO reader"))


def first_line(exc: BaseException) -> str:
    """SimpleITK errors span many lines with C++ file names; keep the telling part."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:  # ITK puts the human sentence after "Description:" or on its own line
        if ln.lower().startswith("description:"):
            return ln.split(":", 1)[1].strip()
    useful = [ln for ln in lines if not ln.startswith(("/", "itk::", "sitk::")) and ".cxx" not in ln]
    return (useful or lines or [type(exc).__name__])[-1][:200]


def format_vector(values: Iterable[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Capture what C libraries print on file descriptor 2 for one call (ITK's warnings, nifticlib,
    GDCM, MetaIO): the list holds that text afterwards. Process-wide, like the engine's other fd 2
    handling; where there is no usable fd 2 (a GUI process) nothing is captured."""
    box: list[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield box
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield box
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            box.append(sink.read().decode("utf-8", errors="replace"))


def reader_warnings(text: str) -> list[str]:
    """ITK's warnings in captured text, one line each: "WARNING: In FILE, line N\\nClass (0x..): MESSAGE"."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.strip().splitlines() if ln.strip()]
        if lines and lines[0].startswith("WARNING"):
            body = " ".join(lines[1:]) or lines[0]
            body = re.sub(r"^\w+ \(0x[0-9a-f]+\):\s*", "", body)
            if body and body not in out:
                out.append(body[:200])
    return out


def read_error(path: Path, fmt: str, detail: str, captured: str) -> InputError:
    """One line for a failed read: a truncation named with its byte counts, an impossible header
    value named, anything else with ITK's own words (never "damaged" without evidence)."""
    text = f"{captured}\n{detail}"
    m = re.search(r"ideal\s*=\s*(\d+)\s*:\s*actual\s*=\s*(\d+)", text)  # MetaIO
    if m:
        return truncated(path, int(m.group(2)), int(m.group(1)))
    m = re.search(r"fread got only (\d+) (\d+)-sized things, not (\d+)", text)  # teem, raw NRRD
    if m:
        item = int(m.group(2))
        return truncated(path, int(m.group(1)) * item, int(m.group(3)) * item)
    m = re.search(r"expected (\d+) bytes but received (\d+)", text)  # teem, gzip NRRD
    if m:
        return truncated(path, int(m.group(2)), int(m.group(1)), uncompressed=True)
    m = re.search(r"couldn't parse element (\d+) of (\d+)", text)  # teem, text NRRD
    if m:
        return InputError(
            f"cannot read {path}: its voxel values end or break off after {int(m.group(1)) - 1} of "
            f"{m.group(2)} (truncated or damaged); copy or export it again"
        )
    if "Unable to determine ImageIO reader" in text:
        variant = "NIfTI-2" if fmt == "NIfTI" and _nifti_version(path) == 2 else f"this kind of {fmt}"
        return InputError(
            f"{path} is {variant}, which the installed ITK cannot read: save it as NRRD or NIfTI-1 (.nii.gz)"
        )
    m = re.search(r"Refusing to change spacing from \[[^]]*\] to (\[[^]]*\])", text)
    if m:
        return InputError(
            f"{path}'s header gives the voxel spacing {m.group(1)}: spacings must be positive "
            "numbers; fix the header (or export the volume again)"
        )
    if "orthonormal" in text.lower():
        return InputError(
            f"{path}'s header describes sheared or non-perpendicular axes (e.g. a gantry tilt) that "
            f"ITK cannot read from {fmt}: resample it to a regular grid, or export it as NRRD"
        )
    words = detail if re.search(r"[A-Za-z]{4}", detail or "") and "No such file" not in detail else ""
    hint = f": {words}" if words else ": its header or data is invalid or of an unsupported variant"
    return InputError(f"cannot read {path} (a {fmt} file){hint}; export it again")


def _nifti_version(path: Path) -> int:
    with contextlib.suppress(OSError, EOFError, zlib.error):
        with open_maybe_gzip(path) as fh:
            head = fh.read(8)
        return 2 if head[4:7] == b"n+2" else 1
    return 1


def truncated(path: Path, actual: int, expected: int, *, uncompressed: bool = False) -> InputError:
    what = " of voxel data (uncompressed)" if uncompressed else ""
    return InputError(
        f"cannot read {path}: the file is truncated ({actual} of {expected} bytes{what}); copy or export it again"
    )
