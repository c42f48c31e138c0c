"""The checks and claims every workflow makes before any model loads.

Each is cheap and torch-free, so that a wrong path, adapter or option is refused in a fraction
of a second with one line (exit code 2 on the command line), and nothing is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..runtime.progress import Progress
from .options import ModelOptions, RunOptions, fixed_by_adapter


def open_library(model: ModelOptions):
    from ..store.library import ModelLibrary

    return ModelLibrary(model.library)


def adapter_path(model: ModelOptions, library) -> Path | None:
    """The adapter's file (None without one); a missing adapter is refused here, before anything."""
    return library.resolve_adapter(model.adapter) if model.adapter else None


def read_adapter(
    model: ModelOptions, run: RunOptions, path: Path | None
) -> tuple[Mapping[str, Any] | None, ModelOptions, RunOptions]:
    """The adapter's validated metadata (None without one), read without torch, and the options
    with what the adapter fixes taken from it (``options.fixed_by_adapter``)."""
    if path is None:
        return None, model, run
    from ..store.adapters import check_finite_tensors, read_metadata

    meta = read_metadata(path)
    check_finite_tensors(path)
    model, run = fixed_by_adapter(model, run, meta, path.name)
    return meta, model, run


def declare_inputs(claims, model: ModelOptions, adapter: Path | None, images: Mapping[str, list]) -> None:
    """Declare what the run reads, so that no output can replace it (io/outputs.Claims)."""
    from ..io.formats import input_files

    for what, sources in images.items():
        for source in sources:
            claims.inputs(what, input_files(source))
    if adapter is not None:
        claims.inputs("the adapter this run reads", [adapter])
    checkpoint = model.checkpoint
    if checkpoint and str(checkpoint).lower() != "none":
        path = Path(checkpoint).expanduser()
        if path.is_dir():
            raise InputError(f"--checkpoint {path} is a folder; give the checkpoint file (.pth)")
        if not path.is_file():
            raise InputError(f"checkpoint not found: {path}")
        with open(path, "rb") as fh:
            head = fh.read(16)
        # torch.save writes a zip (or, before torch 1.6, a pickle); safetensors starts with a header length.
        if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80" or head[8:9] == b"{"):
            raise InputError(
                f"--checkpoint {path} is not a PyTorch or safetensors checkpoint (its content is neither): "
                "use an official SAM checkpoint (.pth)"
            )
        claims.inputs("the checkpoint", [path])


def device_and_dtype(run: RunOptions):
    from ..runtime.device import resolve_device, resolve_precision

    device = resolve_device(run.device)
    return device, resolve_precision(run.precision, device)


def warn_outside(progress: Progress, labels, grid, what: str, where: str, then: str) -> tuple[int, int]:
    """Warn when part of ``labels`` lies outside ``grid``; returns (voxels outside, labeled voxels)."""
    from ..io.geometry import describe_outside, labels_outside

    outside, total = labels_outside(labels, grid)
    note = describe_outside(outside, total, what, where)
    if note:
        progress.warn(f"{note}: {then}")
    return outside, total


def load(model: ModelOptions, *, classes: Any, library, progress: Progress):
    """The model the options name (``model/loading.load_model``)."""
    from ..model.loading import load_model

    return load_model(
        adapter=model.adapter,
        checkpoint=model.checkpoint,
        backbone=model.backbone,
        img_size=model.img_size,
        rank=model.rank,
        fusion=model.fusion,
        classes=classes,
        library=library,
        progress=progress,
    )
