"""An adapter's metadata: the schema (see store/adapters.py), validated field by field, and compatibility checks."""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from ..errors import InputError
from ..model.registry import AXES, INTENSITY_PRESETS, PIXEL_NORMS, backbone_names, get_backbone_info
from ..model.registry import FUSIONS as _FUSIONS

FORMAT = "hfsam-adapter"


FORMAT_VERSION = 1


METADATA_KEY = "hfsam"


MAX_METADATA_BYTES = 1 << 20  # the metadata is a few KiB; anything near 1 MiB is not ours


BACKBONES = backbone_names()


FUSIONS = tuple(_FUSIONS)


_FIELDS = (
    "format",
    "format_version",
    "hfsam_version",
    "created",
    "name",
    "backbone",
    "img_size",
    "rank",
    "fusion",
    "low_level_blocks",
    "pixel_norm",
    "base_checkpoint",
    "classes",
    "intensity_preset",
    "axis",
    "training",
    "metrics",
    "description",
    "extra",
)


_TRAINING_FIELDS = (
    "image",
    "slices",
    "heldout_slices",
    "steps",
    "cached_steps",
    "low_level_dropout",
    "max_grad_norm",
    "seed",
    "batch_size",
    "lr",
    "minutes",
    "started_from",
)


_CLASS_FIELDS = ("value", "name", "color", "terminology")


_SHA256 = re.compile(r"[0-9a-f]{64}")


# The fields check_compatible compares: a mismatch in any of them makes the
# adapter's tensors meaningless (wrong shapes, or right shapes on the wrong base).
COMPAT_FIELDS = ("backbone", "img_size", "rank", "fusion", "low_level_blocks", "pixel_norm")


RANDOM_INIT = "random-init"  # base_checkpoint name of a randomly initialised base


# ---------------------------------------------------------------------------
# metadata validation
# ---------------------------------------------------------------------------
# A field this reader does not know is most often one a newer HF-SAM added without a new format_version.
_UNKNOWN = f"is not a known field of adapter format_version {FORMAT_VERSION} (written by a newer HF-SAM? update it)"


def _bad(source: str, field: str, problem: str) -> InputError:
    # An unknown field's name comes from the file: cut, so the error stays readable (InputError escapes line breaks).
    if len(field) > 80:
        field = field[:80] + "..."
    return InputError(f"invalid adapter metadata in {source}: '{field}' {problem}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(source: str, field: str, value: Any, lo: int, hi: int) -> int:
    if not _is_int(value) or not lo <= value <= hi:
        raise _bad(source, field, f"must be an integer in {lo}..{hi}, not {value!r:.40}")
    return value


def _choice(source: str, field: str, value: Any, allowed: tuple) -> str:
    if value not in allowed:
        raise _bad(source, field, f"must be one of {', '.join(allowed)}, not {value!r:.40}")
    return value


def _text(source: str, field: str, value: Any, max_len: int, *, empty: bool = False, printable: bool = True) -> str:
    if not isinstance(value, str):
        raise _bad(source, field, f"must be a string, not {type(value).__name__}")
    if not empty and not value.strip():
        raise _bad(source, field, "must not be empty")
    if len(value) > max_len:
        raise _bad(source, field, f"is longer than {max_len} characters")
    if printable and not value.isprintable():
        raise _bad(source, field, "contains control characters")
    return value


def _number(source: str, field: str, value: Any, *, allow_none: bool) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(source, field, f"must be a finite number, not {value!r:.40}")
    return float(value) + 0.0  # -0.0 (`--low-level-dropout -0`) is stored as 0.0


def _finite_json(value: Any, source: str, field: str, depth: int = 0) -> Any:
    """Free-form JSON with non-finite floats mapped to null (strict JSON has no NaN)."""
    if depth > 32:
        raise _bad(source, field, "is nested too deeply")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return value if math.isfinite(value) else None
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _finite_json(value.item(), source, field, depth + 1)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise _bad(source, field, f"has a non-string key {key!r:.40}")
            out[key] = _finite_json(item, source, field, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_finite_json(item, source, field, depth + 1) for item in value]
    raise _bad(source, field, f"holds a {type(value).__name__}, which is not JSON")


def _created(source: str, value: Any) -> str:
    _text(source, "created", value, 64)
    try:
        _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise _bad(source, "created", f"is not an ISO 8601 time: {value!r:.40}") from None
    return value


def utc_now() -> str:
    """The ``created`` default: ISO 8601 UTC to the second, e.g. 2025-05-01T12:00:00Z."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _low_level(source: str, value: Any, backbone: str) -> list[int]:
    info = get_backbone_info(backbone)
    if value is None:
        if info.test_only:
            raise _bad(source, "low_level_blocks", f"is required for backbone {backbone}")
        return list(info.default_taps)
    taps = info.low_level_taps
    if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= len(taps):
        raise _bad(source, "low_level_blocks", f"must be a list of 1..{len(taps)} tap indices")
    blocks = [_int(source, "low_level_blocks", b, min(taps), max(taps)) for b in value]
    if len(set(blocks)) != len(blocks):
        raise _bad(source, "low_level_blocks", "has duplicate block indices")
    return blocks


def _base_checkpoint(source: str, value: Any) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise _bad(source, "base_checkpoint", 'must be {"name": ..., "sha256": ...} or null')
    unknown = sorted(set(value) - {"name", "sha256", "seed"})
    if unknown:
        raise _bad(source, f"base_checkpoint.{unknown[0]}", _UNKNOWN)
    name = _text(source, "base_checkpoint.name", value.get("name"), 256)
    sha = value.get("sha256")
    if sha is not None:
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha.lower()):
            raise _bad(source, "base_checkpoint.sha256", "must be 64 hexadecimal digits or null")
        sha = sha.lower()
    out: dict[str, Any] = {"name": name, "sha256": sha}
    if value.get("seed") is not None:
        out["seed"] = _int(source, "base_checkpoint.seed", value["seed"], -(1 << 63), (1 << 64) - 1)
    return out


def _classes(source: str, value: Any) -> list[dict]:
    if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= 255:
        raise _bad(source, "classes", "must be a list of 1..255 classes (background is implicit)")
    out, values, names = [], set(), set()
    for i, cls in enumerate(value):
        where = f"classes[{i}]"
        if not isinstance(cls, Mapping):
            raise _bad(source, where, "must be an object {value, name, color}")
        unknown = sorted(set(cls) - set(_CLASS_FIELDS))
        if unknown:
            raise _bad(source, f"{where}.{unknown[0]}", _UNKNOWN)
        v = _int(source, f"{where}.value", cls.get("value"), 1, 255)
        name = _text(source, f"{where}.name", cls.get("name"), 128)
        color = cls.get("color")
        if not isinstance(color, (list, tuple)) or len(color) != 3:
            raise _bad(source, f"{where}.color", "must be [r, g, b]")
        color = [_int(source, f"{where}.color", c, 0, 255) for c in color]
        term = cls.get("terminology")
        if term is not None and not isinstance(term, Mapping):
            raise _bad(source, f"{where}.terminology", "must be an object or null")
        if v in values:
            raise _bad(source, f"{where}.value", f"repeats label value {v}")
        if name in names:
            raise _bad(source, f"{where}.name", f"repeats class name {name!r}")
        values.add(v)
        names.add(name)
        term = None if term is None else _finite_json(term, source, f"{where}.terminology")
        out.append({"value": v, "name": name, "color": color, "terminology": term})
    return out


def _training(source: str, value: Any) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise _bad(source, "training", "must be an object or null")
    unknown = sorted(set(value) - set(_TRAINING_FIELDS))
    if unknown:
        raise _bad(source, f"training.{unknown[0]}", _UNKNOWN)
    out: dict[str, Any] = {}
    image = value.get("image")
    out["image"] = None if image is None else _text(source, "training.image", image, 4096, empty=True)
    for key in ("slices", "heldout_slices"):
        slices = value.get(key) or []
        if not isinstance(slices, (list, tuple)):
            raise _bad(source, f"training.{key}", "must be a list of slice indices")
        out[key] = [_int(source, f"training.{key}", s, 0, 1 << 20) for s in slices]
    for key, lo in (("steps", 0), ("cached_steps", 0), ("batch_size", 1)):
        v = value.get(key)
        out[key] = None if v is None else _int(source, f"training.{key}", v, lo, 1 << 31)
    seed = value.get("seed")
    out["seed"] = None if seed is None else _int(source, "training.seed", seed, -(1 << 63), (1 << 64) - 1)
    out["lr"] = _number(source, "training.lr", value.get("lr"), allow_none=True)
    out["minutes"] = _number(source, "training.minutes", value.get("minutes"), allow_none=True)
    dropout = _number(source, "training.low_level_dropout", value.get("low_level_dropout"), allow_none=True)
    if dropout is not None and not 0 <= dropout < 1:
        raise _bad(source, "training.low_level_dropout", "must be a probability from 0 up to, not including, 1")
    out["low_level_dropout"] = dropout
    clip = _number(source, "training.max_grad_norm", value.get("max_grad_norm"), allow_none=True)
    if clip is not None and not clip > 0:
        raise _bad(source, "training.max_grad_norm", "must be a norm above 0, or null (not clipped)")
    out["max_grad_norm"] = clip
    start = value.get("started_from")
    out["started_from"] = None if start is None else _text(source, "training.started_from", start, 4096)
    return out


def validate_metadata(metadata: Any, *, source: str = "adapter metadata") -> dict:
    """Check every field of adapter metadata and return a complete copy (defaults filled).

    Raises InputError naming the field (and ``source``, usually the file) on the
    first problem.
    """
    src = source
    if not isinstance(metadata, Mapping):
        raise InputError(f"invalid adapter metadata in {src}: it must be a JSON object")
    m = metadata
    fmt = m.get("format", FORMAT)
    if fmt != FORMAT:
        raise _bad(src, "format", f"must be {FORMAT!r}, not {fmt!r:.40}: this is not an HF-SAM adapter")
    version = m.get("format_version", FORMAT_VERSION)
    if _is_int(version) and version > FORMAT_VERSION:  # before its fields: a newer format may have new ones
        raise InputError(
            f"{src} was written by a newer HF-SAM (adapter format_version {version}, this one reads "
            f"{FORMAT_VERSION}); update HF-SAM to use it"
        )
    unknown = sorted(set(metadata) - set(_FIELDS))
    if unknown:
        raise _bad(src, unknown[0], _UNKNOWN)
    _int(src, "format_version", version, 1, FORMAT_VERSION)
    out: dict[str, Any] = {"format": FORMAT, "format_version": version}
    out["hfsam_version"] = _text(src, "hfsam_version", m.get("hfsam_version", _engine_version()), 64)
    out["created"] = _created(src, m.get("created", utc_now()))
    out["name"] = _text(src, "name", m.get("name"), 128)
    out["backbone"] = _choice(src, "backbone", m.get("backbone"), BACKBONES)
    img = m.get("img_size")
    if not isinstance(img, int) or isinstance(img, bool) or not 16 <= img <= 2048 or img % 16:  # as _is_int
        raise _bad(src, "img_size", f"must be a multiple of 16 in 16..2048 (224 or 512), not {img!r:.40}")
    out["img_size"] = img
    out["rank"] = _int(src, "rank", m.get("rank"), 0, 256)
    out["fusion"] = _choice(src, "fusion", m.get("fusion"), FUSIONS)
    out["low_level_blocks"] = _low_level(src, m.get("low_level_blocks"), out["backbone"])
    out["pixel_norm"] = _choice(src, "pixel_norm", m.get("pixel_norm", "imagenet"), tuple(PIXEL_NORMS))
    out["base_checkpoint"] = _base_checkpoint(src, m.get("base_checkpoint"))
    out["classes"] = _classes(src, m.get("classes"))
    out["intensity_preset"] = _choice(src, "intensity_preset", m.get("intensity_preset", "ct"), INTENSITY_PRESETS)
    out["axis"] = _choice(src, "axis", m.get("axis", "axial"), AXES)
    out["training"] = _training(src, m.get("training"))
    metrics = m.get("metrics", {})
    if not isinstance(metrics, Mapping):
        raise _bad(src, "metrics", "must be an object")
    out["metrics"] = _finite_json(metrics, src, "metrics")
    description = m.get("description")
    out["description"] = _text(
        src, "description", "" if description is None else description, 10000, empty=True, printable=False
    )
    extra = m.get("extra", {})
    if not isinstance(extra, Mapping):
        raise _bad(src, "extra", "must be an object")
    out["extra"] = _finite_json(extra, src, "extra")
    return out


def _engine_version() -> str:
    from .. import __version__

    return __version__


def dump_metadata(metadata: dict, source: str) -> str:
    text = json.dumps(metadata, sort_keys=True, separators=(",", ":"), allow_nan=False)
    if len(text.encode("utf-8")) > MAX_METADATA_BYTES:
        raise InputError(f"adapter metadata for {source} is larger than 1 MiB; shorten 'description' or 'metrics'")
    return text


# ---------------------------------------------------------------------------
# compatibility
# ---------------------------------------------------------------------------
def _is_random(ckpt: Any) -> bool:
    return ckpt is None or (isinstance(ckpt, Mapping) and ckpt.get("name") == RANDOM_INIT)


def _checkpoint_text(ckpt: Any) -> str:
    if _is_random(ckpt):
        seed = ckpt.get("seed") if isinstance(ckpt, Mapping) else None
        return "none (random init)" if seed is None else f"none (random init, seed {seed})"
    if isinstance(ckpt, str):
        return f"sha256 {ckpt[:12]}..."
    sha = ckpt.get("sha256")
    return f"{ckpt.get('name')} (sha256 {sha[:12]}...)" if sha else str(ckpt.get("name"))


def _checkpoint_sha(ckpt: Any) -> str | None:
    if isinstance(ckpt, str):
        return ckpt.lower()
    if isinstance(ckpt, Mapping) and ckpt.get("sha256"):
        return str(ckpt["sha256"]).lower()
    return None


def check_compatible(metadata: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Raise InputError listing EVERY field where an adapter does not fit a model.

    ``expected`` describes the model: any of backbone, img_size, rank, fusion,
    low_level_blocks and base_checkpoint ({"name", "sha256"}, a sha256 string, or
    None / {"name": "random-init", "seed": N} for a randomly initialised base).
    Fields absent from ``expected`` are not compared. Base checkpoints are
    compared by SHA256 when both are known (random bases by seed when both are
    known); an adapter trained on a real checkpoint never fits a random base and
    vice versa.
    """
    diffs = []
    for field in COMPAT_FIELDS:
        if field not in expected or expected[field] is None or field not in metadata:
            continue
        have, want = metadata[field], expected[field]
        if isinstance(have, (list, tuple)):
            have, want = list(have), list(want) if isinstance(want, (list, tuple)) else want
        if have != want:
            diffs.append(f"{field} {have} (model {want})")
    if "base_checkpoint" in expected and "base_checkpoint" in metadata:
        have, want = metadata["base_checkpoint"], expected["base_checkpoint"]
        sha_have, sha_want = _checkpoint_sha(have), _checkpoint_sha(want)
        seeds = [c.get("seed") if isinstance(c, Mapping) else None for c in (have, want)]
        if (
            _is_random(have) != _is_random(want)
            or (sha_have and sha_want and sha_have != sha_want)
            or (_is_random(have) and None not in seeds and seeds[0] != seeds[1])
        ):
            diffs.append(f"base checkpoint {_checkpoint_text(have)} (model {_checkpoint_text(want)})")
    if diffs:
        name = metadata.get("name", "?")
        raise InputError(
            f"adapter '{name}' does not match: {', '.join(diffs)}; "
            "build the model with the adapter's settings or pick another adapter"
        )
