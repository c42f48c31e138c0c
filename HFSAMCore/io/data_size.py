"""That an input file's voxel data is complete: the bytes its header promises, no fewer and no more."""

from __future__ import annotations

import bz2
import gzip
import os
import re
import zlib
from pathlib import Path

import numpy as np

from ..errors import InputError
from .formats import (
    NIFTI_HEADER_SIZES,
    detached_data_files,
    header_lines,
    open_maybe_gzip,
)
from .reader_messages import truncated

_ITEM_SIZES = {
    "MET_CHAR": 1,
    "MET_UCHAR": 1,
    "MET_SHORT": 2,
    "MET_USHORT": 2,
    "MET_INT": 4,
    "MET_UINT": 4,
    "MET_LONG": 4,
    "MET_ULONG": 4,
    "MET_LONG_LONG": 8,
    "MET_ULONG_LONG": 8,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}


_NRRD_SIZES = {
    1: ("char", "uchar", "int8", "uint8", "signed char", "unsigned char", "int8_t", "uint8_t"),
    2: (
        "short",
        "ushort",
        "int16",
        "uint16",
        "short int",
        "unsigned short",
        "unsigned short int",
        "signed short",
        "signed short int",
        "int16_t",
        "uint16_t",
    ),
    4: ("int", "uint", "int32", "uint32", "signed int", "unsigned int", "int32_t", "uint32_t", "float"),
    8: (
        "longlong",
        "ulonglong",
        "int64",
        "uint64",
        "long long",
        "unsigned long long",
        "long long int",
        "unsigned long long int",
        "signed long long",
        "signed long long int",
        "int64_t",
        "uint64_t",
        "double",
    ),
}


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
        raise InputError(
            f"{path} holds {actual - expected} bytes of voxel data more than its header describes "
            f"({expected}): the sizes in its header are wrong; export the volume again"
        )


def _stream_size(path: Path, offset: int, encoding: str) -> int:
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
        assert encoding in ("gzip", "bzip2"), encoding  # what the callers pass
        with gzip.open(raw, "rb") if encoding == "gzip" else bz2.open(raw, "rb") as fh:
            while block := fh.read(1 << 22):
                total += len(block)
        return total


def _nrrd_data(path: Path) -> tuple[int, int] | None:
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    end = head.find(b"\n\n")
    lines = header_lines(path) if end < 0 else head[:end].decode("latin-1").splitlines()
    fields = {}
    for line in lines[1:]:
        m = re.match(r"([^:#][^:]*):(?!=)\s*(.*)", line)
        if m:
            fields[m.group(1).strip().lower()] = m.group(2).strip()
    encoding = {"raw": "raw", "gzip": "gzip", "gz": "gzip", "bzip2": "bzip2", "bz2": "bzip2"}.get(
        fields.get("encoding", "").lower()
    )
    if (
        encoding is None
        or "line skip" in fields
        or "lineskip" in fields
        or "byte skip" in fields
        or "byteskip" in fields
    ):
        return None
    item = next((n for n, names in _NRRD_SIZES.items() if fields.get("type", "").lower() in names), None)
    sizes = [int(v) for v in fields.get("sizes", "").split()]
    if item is None or not sizes:
        return None
    expected = int(np.prod(sizes)) * item
    data = fields.get("data file") or fields.get("datafile")
    if data:
        files = detached_data_files(path)
        if len(files) != 1 or not files[0].is_file():
            return None  # a LIST or a pattern of files: ITK checks each one
        return _stream_size(files[0], 0, encoding), expected
    if end < 0:
        return None
    return _stream_size(path, end + 2, encoding), expected


def _meta_data(path: Path) -> tuple[int, int] | None:
    lines = header_lines(path)
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
    files = detached_data_files(path)
    if len(files) != 1 or "%" in data or not files[0].is_file():
        return None
    return _stream_size(files[0], 0, encoding), expected


# NIfTI datatype codes of the float types, and their numpy item type (byte order added per file).
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


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
        with open_maybe_gzip(path) as fh:
            while block := fh.read(1 << 22):
                if item and finite:
                    if dtype is None:
                        little = int.from_bytes(block[:4], "little") in NIFTI_HEADER_SIZES
                        dtype = np.dtype(("<" if little else ">") + item)
                    data = carry + block[max(0, offset - actual) : max(0, expected - actual)]
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
        raise InputError(
            f"{path} holds {actual - expected} bytes more than its header describes: the sizes in "
            "its header are wrong; export the volume again"
        )
    if not finite:
        raise non_finite(str(path))


def non_finite(name: str) -> InputError:
    return InputError(f"{name} contains NaN or infinite voxels: fix or replace them before segmenting")
