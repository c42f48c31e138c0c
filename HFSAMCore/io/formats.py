"""What an input file is (check 1 below), and the list of the integrity checks every input volume
passes, whatever its format, before anything is computed.

ITK reads many formats and forgives a lot without a word: a NIfTI reader that turns NaN into 0
and pads a truncated file with zeros, a NRRD or MetaImage reader that ignores data beyond what
the header describes, a spacing of 0 or NaN replaced by 1 mm, a sheared or self-contradicting
NIfTI header resolved by picking one transform, a damaged DICOM file left out of its series.
Each of those gives a result that looks fine and is wrong. So every input file is checked here,
the same way for every format:

1. **What it is**: a regular, readable, non-empty file whose *content* (its magic bytes) is a
   format HF-SAM reads (NIfTI, NRRD, MetaImage, DICOM) and agrees with its name. Other formats
   ITK would read (Analyze, VTK, TIFF, MINC...) are refused, naming the format to convert to.
2. **That its data is complete**: the voxel bytes the header promises, no fewer (truncated) and
   not a slice's worth more (a header whose sizes are wrong).
3. **That the geometry is the header's**: spacing finite and positive, a non-singular direction
   matrix; for NIfTI, the geometry ITK returns is the one the header's sform (or qform) states,
   and qform and sform agree when both are set.
4. **What the reader said**: ITK and its C libraries print to the process's stderr; that text is
   captured, errors become one line naming the problem, warnings are passed on (never dropped).
5. **DICOM**: every DICOM image file of the folder belongs to the series that was read.

Check 1 lives here, 2 in ``data_size.py``, 3 in ``header_geometry.py``, 4 in
``reader_messages.py``, 5 in ``dicom.py``; ``read.py`` runs them all.

NaN/Inf voxels are refused for every format (io/read.py scans the array; for NIfTI the raw bytes,
since its reader zeroes them).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import stat
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

from ..errors import InputError

Warn = Callable[[str], None]


#: What HF-SAM reads, by file name ending (longest first); a file without one of these endings is
#: read only when its content is DICOM.
READ_SUFFIXES = {
    ".nii.gz": "NIfTI",
    ".nii": "NIfTI",
    ".nrrd": "NRRD",
    ".nhdr": "NRRD",
    ".mha": "MetaImage",
    ".mhd": "MetaImage",
    ".dcm": "DICOM",
}


SUPPORTED = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or DICOM"


# Formats ITK would read but HF-SAM does not check (so refuses): their name, by file name ending.
_OTHER_FORMATS = {
    ".hdr": "an Analyze/NIfTI header (.hdr/.img pair)",
    ".img": "Analyze/NIfTI pair data (.img)",
    ".img.gz": "Analyze/NIfTI pair data (.img.gz)",
    ".vtk": "a VTK file",
    ".vti": "a VTK file",
    ".mnc": "a MINC file",
    ".mnc2": "a MINC file",
    ".tif": "a TIFF image",
    ".tiff": "a TIFF image",
    ".png": "a PNG image",
    ".jpg": "a JPEG image",
    ".jpeg": "a JPEG image",
    ".bmp": "a BMP image",
    ".gipl": "a GIPL file",
    ".gipl.gz": "a GIPL file",
    ".lsm": "an LSM file",
    ".pic": "a Bio-Rad file",
    ".rec": "a Philips PAR/REC file",
    ".par": "a Philips PAR/REC file",
    ".nrrd.gz": "a gzipped NRRD",
    ".mgz": "a FreeSurfer MGZ file",
    ".mgh": "a FreeSurfer MGH file",
    ".npy": "a NumPy array",
    ".h5": "an HDF5 file",
    ".npz": "a NumPy archive",
    ".zip": "a ZIP archive",
}


_CONVERT = "convert it to NRRD or NIfTI (in 3D Slicer: load it, then File > Save Data as .nrrd)"


def suffix_of(path: str | os.PathLike, table) -> str | None:
    name = Path(path).name.lower()
    return next((s for s in sorted(table, key=len, reverse=True) if name.endswith(s) and len(name) > len(s)), None)


def sniff(path: Path) -> str:
    """The format the content says: NIfTI, NIfTI-pair, NRRD, MetaImage, DICOM, each with "-gz" when
    gzip-compressed; "gzip" (holding none of them), "gzip-damaged", or "" (none of them)."""
    with open(path, "rb") as fh:
        head = fh.read(1024)
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as fh:
                inner = fh.read(1024)
        except (OSError, EOFError, zlib.error):
            return "gzip-damaged"
        kind = _sniff_bytes(inner)
        return kind + "-gz" if kind else "gzip"
    return _sniff_bytes(head)


def _sniff_bytes(head: bytes) -> str:
    if len(head) >= 348 and head[344:348] in (b"n+1\0", b"ni1\0"):
        return "NIfTI" if head[344:348] == b"n+1\0" else "NIfTI-pair"
    if len(head) >= 8 and head[4:8] in (b"n+2\0", b"ni2\0"):
        return "NIfTI" if head[4:8] == b"n+2\0" else "NIfTI-pair"
    if head.startswith(b"NRRD000"):
        return "NRRD"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "DICOM"
    text = head[:400].decode("ascii", errors="replace")
    if re.match(r"\s*(ObjectType|NDims|Comment|ObjectSubType|TransformType)\s*=", text):
        return "MetaImage"
    return ""


_NAMES_OF = {"NIfTI": (".nii", ".nii.gz"), "NRRD": (".nrrd", ".nhdr"), "MetaImage": (".mha", ".mhd")}


def check_file(path: Path) -> str:
    """Refuse what is not a readable file of a format HF-SAM reads, with a message that says what it
    is instead; returns the format: NIfTI, NRRD, MetaImage or DICOM."""
    if path.is_symlink() and not path.exists():
        raise InputError(f"{path} is a broken link (to {os.readlink(path)}): check the path")
    try:
        info = path.stat()
    except OSError as exc:
        raise InputError(f"cannot open {path}: {exc.strerror or exc}") from None
    mode = info.st_mode
    if not stat.S_ISREG(mode):
        kind = (
            "a FIFO"
            if stat.S_ISFIFO(mode)
            else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "not a regular file"
        )
        raise InputError(f"{path} is {kind}, not an image file: pass a {SUPPORTED} file or a DICOM folder")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path} cannot be read (permission denied): make it readable or copy it")
    if info.st_size == 0:
        raise InputError(f"{path} is empty (0 bytes): copy or export it again")
    try:
        content = sniff(path)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    if content == "DICOM" or (not content and suffix_of(path, READ_SUFFIXES) == ".dcm"):
        return "DICOM"  # often without an extension; old files without the "DICM" preamble: GDCM decides
    if content.startswith("NIfTI-pair"):
        raise InputError(f"{path} is half of an Analyze/NIfTI .hdr/.img pair, which HF-SAM does not read: {_CONVERT}")
    if content == "gzip-damaged":
        raise InputError(f"cannot read {path}: the compressed file is damaged or truncated; copy or export it again")
    if content == "gzip" or (content.endswith("-gz") and content != "NIfTI-gz"):
        what = "a gzip file that holds no image" if content == "gzip" else f"a gzip-compressed {content[:-3]} file"
        raise InputError(
            f"{path} is {what}: HF-SAM reads {SUPPORTED} (of those, only NIfTI may be gzip-compressed "
            "as a whole: decompress it first)"
        )
    if not content:
        other = _OTHER_FORMATS.get(suffix_of(path, _OTHER_FORMATS) or "")
        if other:
            raise InputError(f"{path} is {other}, which HF-SAM does not read: {_CONVERT}")
        raise InputError(f"{path} is {_describe_unknown(path)}, not a {SUPPORTED} image")
    actual = content[:-3] if content.endswith("-gz") else content
    suffix = suffix_of(path, READ_SUFFIXES)
    if suffix in (".nhdr", ".mhd"):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            missing = [f for f in detached_data_files(path) if "%" not in f.name and not f.is_file()]
            if missing:
                raise InputError(
                    f"{path} is a header whose data file {missing[0].name} is not in {missing[0].parent}: "
                    "copy the data file beside it (or pass the .nrrd/.mha that holds both)"
                )
    if suffix not in _NAMES_OF[actual]:
        shown = f"'{suffix}'" if suffix else (f"'{path.suffix}'" if path.suffix else "without an extension")
        raise InputError(
            f"{path} is a {actual} file but is named {shown}: rename it to end in {' or '.join(_NAMES_OF[actual])}"
        )
    return actual


def _describe_unknown(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(64)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "not an image file of any format HF-SAM knows"
    shown = text.strip().splitlines()[0][:30] if text.strip() else ""
    return f"a text file (it begins {shown!r})" if text.isprintable() or "\n" in text else "not an image file"


def input_files(source: str | os.PathLike) -> list[Path]:
    """Every file a read of ``source`` may use: the file; a detached header's data files; for DICOM
    (a folder, ``folder::UID`` or one file of a series) every file of the folder. Outputs are
    checked against these (io/outputs.py): an output must never replace any of them."""
    text = os.fspath(source)
    p = Path(text)
    if not p.exists() and "::" in text:
        p = Path(text.rsplit("::", 1)[0])
    if p.is_dir():
        return [f for f in files_in(p)]
    if not p.is_file():
        return [p]
    files = [p]
    with contextlib.suppress(OSError, UnicodeDecodeError):
        suffix = suffix_of(p, READ_SUFFIXES)
        if suffix in (".nhdr", ".mhd"):
            files += detached_data_files(p)
        elif suffix == ".dcm" or sniff(p) == "DICOM":
            files += [f for f in files_in(p.parent) if f.name != p.name]
    return files


def files_in(folder: Path) -> Iterator[Path]:
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if entry.is_file():
                yield Path(entry.path)


def header_lines(path: Path, limit: int = 1 << 16) -> list[str]:
    with open(path, "rb") as fh:
        head = fh.read(limit)
    return head.decode("latin-1").splitlines()


def detached_data_files(header: Path) -> list[Path]:
    """The data files a .nhdr ("data file: X") or .mhd ("ElementDataFile = X") names."""
    lines = header_lines(header)
    if header.name.lower().endswith(".nhdr"):
        for i, line in enumerate(lines):
            m = re.match(r"data ?file\s*:\s*(.*)", line, re.I)
            if m:
                value = m.group(1).strip()
                if value.upper().startswith("LIST"):
                    return [header.parent / v.strip() for v in lines[i + 1 :] if v.strip()]
                return [header.parent / value.split()[0]] if value else []
    else:
        for i, line in enumerate(lines):
            m = re.match(r"ElementDataFile\s*=\s*(.*)", line)
            if m:
                value = m.group(1).strip()
                if value.upper() == "LIST":
                    return [header.parent / v.strip() for v in lines[i + 1 :] if v.strip()]
                return [] if value.upper() == "LOCAL" else [header.parent / value]
    return []


NIFTI_HEADER_SIZES = (348, 540)  # NIfTI-1, NIfTI-2: the first int32 tells the byte order


def open_maybe_gzip(path: Path):
    """NIfTI may be gzip-compressed whatever its name says: go by the content."""
    with open(path, "rb") as fh:
        magic = fh.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")
