"""The integrity checks every input volume passes, whatever its format, before anything is computed.

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

NaN/Inf voxels are refused for every format (volume.py scans the array; for NIfTI the raw bytes,
since its reader zeroes them).
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import os
import re
import stat
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .errors import InputError

Warn = Callable[[str], None]

#: What HF-SAM reads, by file name ending (longest first); a file without one of these endings is
#: read only when its content is DICOM.
READ_SUFFIXES = {".nii.gz": "NIfTI", ".nii": "NIfTI", ".nrrd": "NRRD", ".nhdr": "NRRD", ".mha": "MetaImage",
                 ".mhd": "MetaImage", ".dcm": "DICOM"}
SUPPORTED = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or DICOM"
# Formats ITK would read but HF-SAM does not check (so refuses): their name, by file name ending.
_OTHER_FORMATS = {".hdr": "an Analyze/NIfTI header (.hdr/.img pair)", ".img": "Analyze/NIfTI pair data (.img)",
                  ".img.gz": "Analyze/NIfTI pair data (.img.gz)", ".vtk": "a VTK file", ".vti": "a VTK file",
                  ".mnc": "a MINC file", ".mnc2": "a MINC file", ".tif": "a TIFF image", ".tiff": "a TIFF image",
                  ".png": "a PNG image", ".jpg": "a JPEG image", ".jpeg": "a JPEG image", ".bmp": "a BMP image",
                  ".gipl": "a GIPL file", ".gipl.gz": "a GIPL file", ".lsm": "an LSM file", ".pic": "a Bio-Rad file",
                  ".rec": "a Philips PAR/REC file", ".par": "a Philips PAR/REC file", ".nrrd.gz": "a gzipped NRRD",
                  ".mgz": "a FreeSurfer MGZ file", ".mgh": "a FreeSurfer MGH file", ".npy": "a NumPy array",
                  ".h5": "an HDF5 file", ".npz": "a NumPy archive", ".zip": "a ZIP archive"}
_CONVERT = "convert it to NRRD or NIfTI (in 3D Slicer: load it, then File > Save Data as .nrrd)"


# --------------------------------------------------------------------------- 1. what the file is


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
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else \
            "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
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
        raise InputError(f"{path} is {what}: HF-SAM reads {SUPPORTED} (of those, only NIfTI may be gzip-compressed "
                         "as a whole: decompress it first)")
    if not content:
        other = _OTHER_FORMATS.get(suffix_of(path, _OTHER_FORMATS) or "")
        if other:
            raise InputError(f"{path} is {other}, which HF-SAM does not read: {_CONVERT}")
        raise InputError(f"{path} is {_describe_unknown(path)}, not a {SUPPORTED} image")
    actual = content[:-3] if content.endswith("-gz") else content
    suffix = suffix_of(path, READ_SUFFIXES)
    if suffix in (".nhdr", ".mhd"):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            missing = [f for f in _detached_data_files(path) if "%" not in f.name and not f.is_file()]
            if missing:
                raise InputError(f"{path} is a header whose data file {missing[0].name} is not in {missing[0].parent}: "
                                 "copy the data file beside it (or pass the .nrrd/.mha that holds both)")
    if suffix not in _NAMES_OF[actual]:
        shown = f"'{suffix}'" if suffix else (f"'{path.suffix}'" if path.suffix else "without an extension")
        raise InputError(f"{path} is a {actual} file but is named {shown}: rename it to end in "
                         f"{' or '.join(_NAMES_OF[actual])}")
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
    checked against these (outputs.py): an output must never replace any of them."""
    text = os.fspath(source)
    p = Path(text)
    if not p.exists() and "::" in text:
        p = Path(text.rsplit("::", 1)[0])
    if p.is_dir():
        return [f for f in _files_in(p)]
    if not p.is_file():
        return [p]
    files = [p]
    with contextlib.suppress(OSError, UnicodeDecodeError):
        suffix = suffix_of(p, READ_SUFFIXES)
        if suffix in (".nhdr", ".mhd"):
            files += _detached_data_files(p)
        elif suffix == ".dcm" or sniff(p) == "DICOM":
            files += [f for f in _files_in(p.parent) if f.name != p.name]
    return files


def _files_in(folder: Path) -> Iterator[Path]:
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if entry.is_file():
                yield Path(entry.path)


def _header_lines(path: Path, limit: int = 1 << 16) -> list[str]:
    with open(path, "rb") as fh:
        head = fh.read(limit)
    return head.decode("latin-1").splitlines()


def _detached_data_files(header: Path) -> list[Path]:
    """The data files a .nhdr ("data file: X") or .mhd ("ElementDataFile = X") names."""
    lines = _header_lines(header)
    if header.name.lower().endswith(".nhdr"):
        for i, line in enumerate(lines):
            m = re.match(r"data ?file\s*:\s*(.*)", line, re.I)
            if m:
                value = m.group(1).strip()
                if value.upper().startswith("LIST"):
                    return [header.parent / v.strip() for v in lines[i + 1:] if v.strip()]
                return [header.parent / value.split()[0]] if value else []
    else:
        for i, line in enumerate(lines):
            m = re.match(r"ElementDataFile\s*=\s*(.*)", line)
            if m:
                value = m.group(1).strip()
                if value.upper() == "LIST":
                    return [header.parent / v.strip() for v in lines[i + 1:] if v.strip()]
                return [] if value.upper() == "LOCAL" else [header.parent / value]
    return []


# --------------------------------------------------------------------------- 4. what the reader said


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
        return InputError(f"cannot read {path}: its voxel values end or break off after {int(m.group(1)) - 1} of "
                          f"{m.group(2)} (truncated or damaged); copy or export it again")
    if "Unable to determine ImageIO reader" in text:
        variant = "NIfTI-2" if fmt == "NIfTI" and _nifti_version(path) == 2 else f"this kind of {fmt}"
        return InputError(f"{path} is {variant}, which the installed ITK cannot read: save it as NRRD or "
                          "NIfTI-1 (.nii.gz)")
    m = re.search(r"Refusing to change spacing from \[[^]]*\] to (\[[^]]*\])", text)
    if m:
        return InputError(f"{path}'s header gives the voxel spacing {m.group(1)}: spacings must be positive "
                          "numbers; fix the header (or export the volume again)")
    if "orthonormal" in text.lower():
        return InputError(f"{path}'s header describes sheared or non-perpendicular axes (e.g. a gantry tilt) that "
                          f"ITK cannot read from {fmt}: resample it to a regular grid, or export it as NRRD")
    words = detail if re.search(r"[A-Za-z]{4}", detail or "") and "No such file" not in detail else ""
    hint = f": {words}" if words else ": its header or data is invalid or of an unsupported variant"
    return InputError(f"cannot read {path} (a {fmt} file){hint}; export it again")


def _nifti_version(path: Path) -> int:
    with contextlib.suppress(OSError, EOFError, zlib.error):
        with _open_maybe_gzip(path) as fh:
            head = fh.read(8)
        return 2 if head[4:7] == b"n+2" else 1
    return 1


def truncated(path: Path, actual: int, expected: int, *, uncompressed: bool = False) -> InputError:
    what = " of voxel data (uncompressed)" if uncompressed else ""
    return InputError(f"cannot read {path}: the file is truncated ({actual} of {expected} bytes{what}); "
                      "copy or export it again")


# --------------------------------------------------------------------------- 2. complete data


_ITEM_SIZES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
               "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
               "MET_DOUBLE": 8}
_NRRD_SIZES = {1: ("char", "uchar", "int8", "uint8", "signed char", "unsigned char", "int8_t", "uint8_t"),
               2: ("short", "ushort", "int16", "uint16", "short int", "unsigned short", "unsigned short int",
                   "signed short", "signed short int", "int16_t", "uint16_t"),
               4: ("int", "uint", "int32", "uint32", "signed int", "unsigned int", "int32_t", "uint32_t", "float"),
               8: ("longlong", "ulonglong", "int64", "uint64", "long long", "unsigned long long", "long long int",
                   "unsigned long long int", "signed long long", "signed long long int", "int64_t", "uint64_t",
                   "double")}


def check_data_size(path: Path, fmt: str, slice_bytes: int) -> None:
    """NRRD and MetaImage: the voxel bytes must be exactly what the header promises. ITK refuses
    fewer (read_error names them) but ignores any number more, which means the header's sizes are
    wrong: a slice's worth or more of extra data is refused. Encodings it cannot count are skipped."""
    try:
        found = _nrrd_data(path) if fmt == "NRRD" else _meta_data(path) if fmt == "MetaImage" else None
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        raise InputError(f"cannot read {path}: its voxel data is damaged or truncated ({exc})") from None
    if found is None:
        return
    actual, expected = found
    if actual < expected:
        raise truncated(path, actual, expected)
    if actual - expected >= max(1, slice_bytes):
        raise InputError(f"{path} holds {actual - expected} bytes of voxel data more than its header describes "
                         f"({expected}): the sizes in its header are wrong; export the volume again")


def _stream_size(path: Path, offset: int, encoding: str) -> int:
    opener = {"gzip": gzip.open, "bzip2": bz2.open}.get(encoding)
    with open(path, "rb") as raw:
        raw.seek(offset)
        if encoding == "raw":
            return os.fstat(raw.fileno()).st_size - offset
        total = 0
        if encoding == "zlib":
            inflate = zlib.decompressobj()
            while block := raw.read(1 << 22):
                total += len(inflate.decompress(block))
            return total + len(inflate.flush())
        with opener(raw, "rb") as fh:
            while block := fh.read(1 << 22):
                total += len(block)
        return total


def _nrrd_data(path: Path) -> tuple[int, int] | None:
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    end = head.find(b"\n\n")
    lines = _header_lines(path) if end < 0 else head[:end].decode("latin-1").splitlines()
    fields = {}
    for line in lines[1:]:
        m = re.match(r"([^:#][^:]*):(?!=)\s*(.*)", line)
        if m:
            fields[m.group(1).strip().lower()] = m.group(2).strip()
    encoding = {"raw": "raw", "gzip": "gzip", "gz": "gzip", "bzip2": "bzip2", "bz2": "bzip2"}.get(
        fields.get("encoding", "").lower())
    if encoding is None or "line skip" in fields or "lineskip" in fields or "byte skip" in fields \
            or "byteskip" in fields:
        return None
    item = next((n for n, names in _NRRD_SIZES.items() if fields.get("type", "").lower() in names), None)
    sizes = [int(v) for v in fields.get("sizes", "").split()]
    if item is None or not sizes:
        return None
    expected = int(np.prod(sizes)) * item
    data = fields.get("data file") or fields.get("datafile")
    if data:
        files = _detached_data_files(path)
        if len(files) != 1 or not files[0].is_file():
            return None  # a LIST or a pattern of files: ITK checks each one
        return _stream_size(files[0], 0, encoding), expected
    if end < 0:
        return None
    return _stream_size(path, end + 2, encoding), expected


def _meta_data(path: Path) -> tuple[int, int] | None:
    lines = _header_lines(path)
    fields, offset = {}, 0
    with open(path, "rb") as fh:
        raw = fh.read(1 << 16)
    for line in lines:
        m = re.match(r"\s*([^=\s][^=]*?)\s*=\s*(.*)", line)
        if not m:
            return None
        fields[m.group(1)] = m.group(2).strip()
        if m.group(1) == "ElementDataFile":
            marker = raw.find(b"ElementDataFile")
            offset = raw.find(b"\n", marker) + 1
            break
    if "HeaderSize" in fields or fields.get("ElementType") not in _ITEM_SIZES:
        return None
    channels = int(fields.get("ElementNumberOfChannels", "1") or 1)
    sizes = [int(v) for v in fields.get("DimSize", "").split()]
    if not sizes:
        return None
    expected = int(np.prod(sizes)) * channels * _ITEM_SIZES[fields["ElementType"]]
    encoding = "zlib" if fields.get("CompressedData", "False").lower() == "true" else "raw"
    data = fields.get("ElementDataFile", "LOCAL")
    if data.upper() == "LOCAL":
        return _stream_size(path, offset, encoding), expected
    files = _detached_data_files(path)
    if len(files) != 1 or "%" in data or not files[0].is_file():
        return None
    return _stream_size(files[0], 0, encoding), expected


# NIfTI datatype codes of the float types, and their numpy item type (byte order added per file).
_NIFTI_FLOATS = {16: "f4", 64: "f8"}
_NIFTI_HEADER_SIZES = (348, 540)  # NIfTI-1, NIfTI-2: the first int32 tells the byte order


def check_nifti_complete(path: Path, image) -> None:
    """Check the raw bytes of a NIfTI file for what ITK's reader hides.

    * A truncated file is filled up with zeros instead of failing: compare the bytes that are
      really there with what the header promises (and refuse a slice's worth or more beyond it).
    * NaN and infinite voxels are silently read as 0 (the bundled nifticlib does it; ITK 6 keeps
      them), so a float volume is scanned for them here.
    The file is streamed once, in 4 MiB blocks, so this costs one read of it.
    """
    try:
        ndim = int(image.GetMetaData("dim[0]"))
        dims = [int(image.GetMetaData(f"dim[{i}]")) for i in range(1, ndim + 1)]
        voxels = int(np.prod(dims))
        offset = int(float(image.GetMetaData("vox_offset")))
        item_bytes = int(image.GetMetaData("bitpix")) // 8
        expected = offset + voxels * item_bytes
        item = _NIFTI_FLOATS.get(int(image.GetMetaData("datatype")))
    except (RuntimeError, ValueError):
        return  # header fields not exposed by this ITK version: nothing to compare with
    actual, dtype, carry, finite = 0, None, b"", True
    try:
        with _open_maybe_gzip(path) as fh:
            while block := fh.read(1 << 22):
                if item and finite:
                    if dtype is None:
                        little = int.from_bytes(block[:4], "little") in _NIFTI_HEADER_SIZES
                        dtype = np.dtype(("<" if little else ">") + item)
                    data = carry + block[max(0, offset - actual): max(0, expected - actual)]
                    whole = len(data) - len(data) % dtype.itemsize
                    finite = bool(np.isfinite(np.frombuffer(data[:whole], dtype)).all())
                    carry = data[whole:]
                actual += len(block)
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"cannot read {path}: the compressed file is damaged or truncated ({exc})") from None
    if actual < expected:
        raise truncated(path, actual, expected)
    slice_bytes = int(np.prod(dims[:2])) * item_bytes if len(dims) >= 2 else item_bytes
    if actual - expected >= slice_bytes:
        raise InputError(f"{path} holds {actual - expected} bytes more than its header describes: the sizes in "
                         "its header are wrong; export the volume again")
    if not finite:
        raise non_finite(str(path))


def _open_maybe_gzip(path: Path):
    """NIfTI may be gzip-compressed whatever its name says: go by the content."""
    with open(path, "rb") as fh:
        magic = fh.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def non_finite(name: str) -> InputError:
    return InputError(f"{name} contains NaN or infinite voxels: fix or replace them before segmenting")


# --------------------------------------------------------------------------- 3. geometry


def check_geometry(image, name: str) -> None:
    """Every format: spacing finite and positive, origin finite, a non-singular direction matrix."""
    spacing = np.asarray(image.GetSpacing(), float)
    origin = np.asarray(image.GetOrigin(), float)
    n = image.GetDimension()
    direction = np.asarray(image.GetDirection(), float).reshape(n, n)
    if not (np.isfinite(spacing).all() and (spacing > 0).all()):
        raise InputError(f"{name} has the voxel spacing {tuple(spacing)}: spacings must be positive numbers; "
                         "fix the header")
    if not (np.isfinite(origin).all() and np.isfinite(direction).all()) or abs(np.linalg.det(direction)) < 1e-6:
        raise InputError(f"{name} has an invalid origin or direction matrix in its header: fix the header")


def nifti_header_geometry(path: Path) -> dict | None:
    """qform and sform of a NIfTI-1/2 header as 4x4 voxel-to-RAS matrices (None where the code is 0),
    and pixdim; None when the header cannot be parsed."""
    try:
        with _open_maybe_gzip(path) as fh:
            head = fh.read(540)
    except (OSError, EOFError, zlib.error):
        return None
    if len(head) < 348:
        return None
    for order in "<>":
        size = int(np.frombuffer(head[:4], order + "i4")[0])
        if size in _NIFTI_HEADER_SIZES:
            break
    else:
        return None
    if size == 348:
        f, i2 = order + "f4", order + "i2"
        pixdim = np.frombuffer(head[76:108], f).astype(float)
        qcode, scode = (int(v) for v in np.frombuffer(head[252:256], i2))
        quat = np.frombuffer(head[256:280], f).astype(float)
        srow = np.frombuffer(head[280:328], f).astype(float).reshape(3, 4)
    else:
        if len(head) < 540:
            return None
        f, i4 = order + "f8", order + "i4"
        pixdim = np.frombuffer(head[104:168], f).astype(float)
        qcode, scode = (int(v) for v in np.frombuffer(head[344:352], i4))
        quat = np.frombuffer(head[352:400], f).astype(float)
        srow = np.frombuffer(head[400:496], f).astype(float).reshape(3, 4)
    out = {"pixdim": pixdim, "qform": None, "sform": None}
    if scode > 0:
        out["sform"] = np.vstack([srow, [0, 0, 0, 1]])
    if qcode > 0:
        b, c, d = quat[:3]
        a = np.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
        rot = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                        [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                        [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b]])
        qfac = -1.0 if pixdim[0] < 0 else 1.0
        affine = np.eye(4)
        affine[:3, :3] = rot @ np.diag([abs(pixdim[1]), abs(pixdim[2]), qfac * abs(pixdim[3])])  # as nifticlib
        affine[:3, 3] = quat[3:6]
        out["qform"] = affine
    return out


def image_affine_ras(image) -> np.ndarray:
    """ITK's geometry (LPS) as a 4x4 voxel-to-RAS matrix, comparable with a NIfTI header's."""
    n = image.GetDimension()  # a 4D image: its first three axes
    direction = np.asarray(image.GetDirection(), float).reshape(n, n)[:3, :3]
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(image.GetSpacing()[:3])
    affine[:3, 3] = image.GetOrigin()[:3]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def max_displacement_mm(a: np.ndarray, b: np.ndarray, size) -> float:
    """How far apart two voxel-to-world matrices put the corner voxels of a grid of ``size``, in mm."""
    corners = np.array(np.meshgrid(*[[0.0, max(0, s - 1)] for s in size[:3]], indexing="ij")).reshape(3, -1)
    points = np.vstack([corners, np.ones(corners.shape[1])])
    return float(np.abs((a @ points) - (b @ points))[:3].max())


#: Geometry that differs by less than this (in mm, at the volume's corners) is the same: float32
#: storage in NIfTI rounds a few tenths of a micrometre.
GEOMETRY_TOLERANCE_MM = 1e-3


def check_nifti_geometry(path: Path, image, warn: Warn | None) -> None:
    """The geometry ITK returns must be the one the header states, and the header must not
    contradict itself. ITK quietly prefers the sform over a disagreeing qform, replaces a zero or
    NaN spacing by 1 mm, and orthonormalises what it cannot represent."""
    header = nifti_header_geometry(path)
    if header is None or image.GetDimension() < 3:
        return
    size = image.GetSize()
    name = str(path)
    sform, qform = header["sform"], header["qform"]
    pixdim = header["pixdim"][1:4]
    if (qform is not None or sform is None) and not (np.isfinite(pixdim).all() and (pixdim != 0).all()):
        raise InputError(f"{name}'s header gives the voxel spacing {tuple(float(v) for v in pixdim)} (pixdim): "
                         "spacings must be positive numbers, and ITK would replace this one by 1 mm; fix the header")
    for what, affine in (("sform", sform), ("qform", qform)):
        if affine is not None and not np.isfinite(affine).all():
            raise InputError(f"{name}'s header has a {what} with NaN or infinite values: fix the header")
    if sform is not None and qform is not None:
        apart = max_displacement_mm(sform, qform, size)
        if apart > GEOMETRY_TOLERANCE_MM:
            raise InputError(f"{name}'s header contradicts itself: its qform and sform place the volume up to "
                             f"{apart:.3g} mm apart, so no reader can know which is right; fix the header "
                             "(e.g. set the wrong one's code to 0) or export the volume again")
    stated = sform if sform is not None else qform
    if stated is None:
        if warn:
            warn(f"{name} has no orientation in its header (qform and sform codes are 0): its voxel axes are "
                 "taken as the patient axes, which may be mirrored or rotated; check it in 3D Slicer")
        return
    off = max_displacement_mm(image_affine_ras(image), stated, size)
    if off > GEOMETRY_TOLERANCE_MM:
        which = "sform" if sform is not None else "qform"
        raise InputError(f"{name}'s header cannot be read as it states its geometry (its {which} with pixdim "
                         f"{tuple(float(v) for v in pixdim)}): ITK would place voxels up to {off:.3g} mm away from "
                         "where the header puts them; fix the header or export the volume as NRRD")


def check_no_geometry(path: Path, fmt: str, warn: Warn | None) -> None:
    """NRRD/MetaImage without any spacing or orientation: ITK assumes 1 mm voxels at the origin."""
    if warn is None or fmt not in ("NRRD", "MetaImage"):
        return
    with contextlib.suppress(OSError):
        text = "\n".join(_header_lines(path, 1 << 14)).lower()
        keys = ("space directions", "spacings") if fmt == "NRRD" else ("elementspacing", "elementsize")
        if not any(k in text for k in keys):
            warn(f"{path} has no voxel spacing in its header: it is read as 1 mm voxels at the origin, so "
                 "distances (HD95 in mm) and overlays with other scans are wrong unless that is true")


# --------------------------------------------------------------------------- 5. DICOM


# Media Storage SOP Class UIDs of image objects: a file of such a class left out of the series is a lost slice.
def _sop_class(path: Path) -> str | None:
    """(0002,0002) Media Storage SOP Class UID from a Part 10 file's meta header (explicit VR LE)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(2048)
    except OSError:
        return None
    if head[128:132] != b"DICM":
        return None
    pos = 132
    while pos + 8 <= len(head):
        group, element = int.from_bytes(head[pos:pos + 2], "little"), int.from_bytes(head[pos + 2:pos + 4], "little")
        if group != 2:
            return None
        vr = head[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            length, start = int.from_bytes(head[pos + 8:pos + 12], "little"), pos + 12
        else:
            length, start = int.from_bytes(head[pos + 6:pos + 8], "little"), pos + 8
        if element == 2:
            return head[start:start + length].rstrip(b"\0 ").decode("ascii", errors="replace").strip()
        pos = start + length
    return None


def check_dicom_leftovers(folder: Path, series_files: set[str], series_class: str | None) -> None:
    """GDCM silently leaves out of a series the files it cannot parse (a truncated copy, a damaged
    disk), which drops slices from the middle (caught by the spacing check) or, worse, from the ends
    of the volume. A DICOM file of the folder with the series' own SOP class that is in no series
    is such a lost slice: refuse, naming it."""
    listed = {os.path.normcase(os.path.abspath(f)) for f in series_files}
    series_class = (series_class or "").rstrip("\0 ") or None
    lost = []
    for f in _files_in(folder):
        if f.name.startswith(".") or f.name.upper() == "DICOMDIR":
            continue
        if os.path.normcase(os.path.abspath(f)) in listed:
            continue
        cls = _sop_class(f)
        if cls is not None and (series_class is None or cls == series_class):
            lost.append(f.name)
    if lost:
        more = f" and {len(lost) - 1} more" if len(lost) > 1 else ""
        raise InputError(f"{len(lost)} DICOM image file(s) in {folder} could not be read ({lost[0]}{more}): they "
                         "are damaged or truncated and would be missing from the volume; copy the series again")
