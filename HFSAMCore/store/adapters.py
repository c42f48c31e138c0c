"""The adapter file format, and the atomic file writes the model library shares.

An adapter is ONE ``.safetensors`` file holding only the trainable tensors of an
HF-SAM model (LoRA, AWFFM, the 1x1 compression conv, the mask decoder,
``no_mask_embed``). Its JSON metadata travels inside the same file, as a string
under the key ``"hfsam"`` of the safetensors header's ``__metadata__`` (which is
str -> str). One file means an adapter can be copied, mailed or stored without a
sidecar getting lost, and safetensors means loading never unpickles anything.

Metadata schema, ``format_version`` 1 (R = required, others get the default shown):

=================  =====================================================================
``format``         "hfsam-adapter"
``format_version`` 1 (a file from a newer version is refused with "update HF-SAM")
``hfsam_version``  version of the engine that wrote it (default: this engine's)
``created``        ISO 8601 time, UTC (default: now), e.g. "2025-05-01T12:00:00Z"
``name``        R  display name, 1..128 printable characters
``backbone``    R  a name of ``model/registry.py``: "lite_medsam" | "vit_b" | "vit_l" | "vit_h" |
                   "tiny" (the CPU test configuration)
``img_size``    R  model input size: 16..2048, a multiple of 16 (224 and 512 in practice)
``rank``        R  LoRA rank, 0..256 (0: no LoRA, a decoder-only ablation)
``fusion``      R  "two_step" (the paper) | "released" (the authors' released code) | "none" (ablation)
``pixel_norm``     "imagenet" | "unit": how a [0, 1] slice is normalised before the encoder
                   (default "imagenet", what every adapter before this field was trained with)
``low_level_blocks`` list of low-level taps feeding the low-level branch: encoder block
                   indices (SAM ViT) or stages (LiteMedSAM); default the backbone's
                   (vit_b [2], vit_l [5], vit_h [7], lite_medsam [1]); required for "tiny"
``base_checkpoint``  {"name": file name, "sha256": 64 hex or null, "seed": int (optional)}, or
                   null; null and the name "random-init" both mean a randomly
                   initialised base (tests, benchmarks), "seed" being its torch seed
``classes``     R  1..255 entries {"value": 1..255 unique, "name": 1..128 printable chars
                   unique, "color": [r, g, b] 0..255, "terminology": dict or null};
                   value 0 is the background and is implicit
``intensity_preset`` "ct" | "mr" (default "ct")
``axis``           "axial" | "coronal" | "sagittal" (default "axial")
``training``       null or {"image": str, "slices": [int], "heldout_slices": [int], "steps": int,
                   "cached_steps": int (of the steps, those on cached encoder features), "seed": int|null,
                   "batch_size": int, "lr": float, "minutes": float|null, "started_from": str|null};
                   missing keys become null ([] for the lists)
``metrics``        dict, free-form JSON (numbers, nested dicts/lists); non-finite
                   floats are stored as null because the header must be strict JSON
``description``    str (default ""; null is stored as "")
``extra``          dict, free-form JSON for additions that do not deserve a format bump
=================  =====================================================================

Unknown keys are refused (at the top level, in ``training`` and in classes) so
that a typo such as ``intesity_preset`` fails loudly instead of silently taking
the default.

Files are written through :mod:`HFSAMCore.io.atomic`, so a crash or a cancel never
leaves a half-written adapter under its final name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from ..io.atomic import atomic_write
from .adapter_metadata import MAX_METADATA_BYTES, METADATA_KEY, dump_metadata, validate_metadata

if TYPE_CHECKING:  # torch is imported lazily: listing adapters must not pay for it
    import torch


# ---------------------------------------------------------------------------
# reading and writing adapter files
# ---------------------------------------------------------------------------
def _existing_file(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"adapter file {p} does not exist; check the path or use `hfsam models list`")
    if not p.is_file():
        raise InputError(f"adapter path {p} is not a file")
    return p


def _not_adapter(path: Path, why: str) -> InputError:
    try:
        with open(path, "rb") as fh:
            zipped = fh.read(4) == b"PK\x03\x04"  # torch.save's archive: a base checkpoint given by mistake
    except OSError:
        zipped = False
    if zipped:
        return InputError(
            f"{path} is not a readable HF-SAM adapter but a PyTorch checkpoint (never unpickled): "
            "a base model goes in the library with `hfsam models import-checkpoint FILE`; "
            "then train an adapter with `hfsam finetune`"
        )
    return InputError(f"{path} is not a readable HF-SAM adapter ({why}); use a .safetensors file written by HF-SAM")


def read_metadata(path: str | os.PathLike) -> dict:
    """Validated metadata of an adapter file, from the header only (no torch import, no tensor read).

    safetensors checks while opening that the header is well-formed and that its
    tensors cover the file exactly, so a truncated file is caught here too.
    """
    p = _existing_file(path)
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="numpy") as fh:
            header = fh.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, UnicodeDecodeError...: all "not an adapter"
        raise _not_adapter(p, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__) from None
    text = header.get(METADATA_KEY)
    if text is None:
        raise _not_adapter(p, f"no '{METADATA_KEY}' metadata in its header")
    if len(text.encode("utf-8")) > MAX_METADATA_BYTES:
        raise InputError(f"invalid adapter metadata in {p}: larger than 1 MiB")
    try:
        # NaN/Infinity are not JSON; accept them from other writers as null.
        raw = json.loads(text, parse_constant=lambda _c: None)
    except (ValueError, RecursionError) as exc:
        raise InputError(f"invalid adapter metadata in {p}: not JSON ({exc})") from None
    return validate_metadata(raw, source=str(p))


def load_adapter(path: str | os.PathLike, *, device: Any = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and validated metadata of an adapter file (safetensors only: nothing is unpickled)."""
    p = _existing_file(path)
    metadata = read_metadata(p)
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(p), device=str(device))
    except Exception as exc:  # noqa: BLE001 - any failure here means the file is damaged
        raise _not_adapter(p, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__) from None
    if not tensors:
        raise _not_adapter(p, "it holds no tensors")
    import torch

    broken = next((k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if broken is not None:
        raise _broken(p, broken)
    return tensors, metadata


def check_finite_tensors(path: str | os.PathLike) -> None:
    """Refuse an adapter holding NaN or infinite weights (what a diverged training saves), without
    torch: the CLI calls it before the model is loaded. Tensor types numpy lacks (bf16) are left to
    ``load_adapter``, which checks every tensor again."""
    import numpy as np
    from safetensors import safe_open

    p = _existing_file(path)
    try:
        with safe_open(str(p), framework="numpy") as fh:
            for key in fh.keys():
                try:
                    array = fh.get_tensor(key)
                except (TypeError, ValueError):  # a dtype numpy does not have
                    continue
                if array.dtype.kind == "f" and not np.isfinite(array).all():
                    raise _broken(p, key)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here means the file is damaged
        raise _not_adapter(p, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__) from None


def _broken(path: Path, key: str) -> InputError:
    return InputError(
        f"{path} is a broken adapter: its tensor '{key}' holds NaN or infinite values (its training "
        "diverged); train it again with a lower --lr"
    )


def _prepare(tensors: Mapping[str, Any], source: str) -> dict:
    import torch

    if not isinstance(tensors, Mapping) or not tensors:
        raise InputError(f"no tensors to save in {source}: pass the model's trainable tensors")
    out = {}
    for key, value in tensors.items():
        if not isinstance(key, str) or not key:
            raise InputError(f"tensor names must be non-empty strings, not {key!r:.40} ({source})")
        if not isinstance(value, torch.Tensor):
            raise InputError(f"'{key}' is a {type(value).__name__}, not a tensor ({source})")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise InputError(
                f"not saving {source}: tensor '{key}' holds NaN or infinite values (the training "
                "diverged); try a lower --lr"
            )
        # clone: safetensors refuses tensors that share storage (views, tied weights).
        out[key] = value.detach().to("cpu").contiguous().clone()
    return out


def save_adapter(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any],
    *,
    overwrite: bool = False,
) -> Path:
    """Write an adapter atomically; returns its path. Metadata is validated (defaults filled) first."""
    dest = Path(path).expanduser()
    if dest.suffix != ".safetensors":
        raise InputError(f"adapter files end in .safetensors, not {dest.name!r}; rename the output")
    meta = validate_metadata(metadata, source=str(dest))
    text = dump_metadata(meta, str(dest))
    prepared = _prepare(tensors, str(dest))
    from safetensors.torch import save

    data = save(prepared, metadata={METADATA_KEY: text})
    return atomic_write(dest, lambda fh: fh.write(data), overwrite=overwrite)
