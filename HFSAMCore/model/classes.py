"""Class lists: the value, name, colour and terminology of every label a model predicts.

An adapter stores its class list, and the Slicer module turns it into named,
coloured segments with standard (SNOMED CT) terminology, so that a liver from
HF-SAM looks and is coded like a liver from any other Slicer tool. The known
lists ("synapse", "acdc") live in ``Resources/class_presets.json`` (found next
to this package, or in ``$HFSAM_RESOURCES``); a user may also name classes
freely ("liver,tumour"): known organ names get their standard colour and
code, unknown ones a distinct generated colour and no terminology.

A resolved class is a plain JSON-ready dict::

    {"value": 5, "name": "liver", "color": [221, 130, 101],
     "terminology": {"category": {"scheme": "SCT", "code": "123037004", "meaning": "Anatomical Structure"},
                     "type": {"scheme": "SCT", "code": "10200004", "meaning": "Liver"},
                     "modifier": None}}      # or "terminology": None
"""

from __future__ import annotations

import colorsys
import copy
import json
import re
from collections.abc import Mapping
from typing import Any

from ..errors import HFSAMError, InputError
from ..resources import resources_dir

PRESETS_FILE = "class_presets.json"
#: Slicer's context name for the general anatomy terminology the presets follow.
SLICER_TERMINOLOGY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
SLICER_ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
MAX_LABEL = 65535  # label maps are written as UInt8/UInt16


def load_presets() -> dict[str, list[dict[str, Any]]]:
    """Preset name -> its resolved class list (a fresh copy each call)."""
    raw = _load_raw()
    category = raw.get("category")
    return {
        name: [_from_preset_entry(entry, category) for entry in preset["classes"]]
        for name, preset in raw["presets"].items()
    }


def resolve_classes(spec: str | list | None, *, values: list[int] | None = None) -> list[dict[str, Any]]:
    """Turn a user's class specification into a sorted list of resolved classes.

    ``spec`` may be
      * a preset name: "synapse", "acdc";
      * names separated by commas, "liver,spleen": class i+1 is the i-th name;
        "5:liver,1:spleen" gives explicit label values;
      * a list of such names, or of class dicts (e.g. read back from an adapter);
      * None: generic "class N" entries for ``values`` (the labels found in a
        label map), or [] without them.
    Duplicate names or values, value 0 (background) and empty names are refused.
    """
    if spec is None:
        return [_generic(int(v), []) for v in sorted(set(values or [])) if int(v) != 0]
    presets = load_presets()
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key in presets:
            return presets[key]
        items: list = spec.split(",")
    elif isinstance(spec, (list, tuple)):
        items = list(spec)
    else:
        raise InputError(f"classes must be a preset name or a list of names, got {type(spec).__name__}")
    if not items:
        raise InputError("no classes given: name a preset (synapse, acdc) or list names like 'liver,spleen'")

    known = _known_classes(presets)
    resolved: list[dict[str, Any]] = []
    unknown: list[tuple[int, str]] = []
    for position, item in enumerate(items, start=1):
        if isinstance(item, dict):
            resolved.append(_from_dict(item))
            continue
        if not isinstance(item, str):
            raise InputError(f"class {position} is a {type(item).__name__}: give class names as text")
        value, name = _split_value(item, position)
        match = known.get(_normalise(name))
        if match is None:
            unknown.append((value, name))
        else:
            entry = copy.deepcopy(match)
            entry.update(value=value, name=name)
            resolved.append(entry)
    used = [tuple(c["color"]) for c in resolved]
    for value, name in unknown:
        resolved.append(_generic(value, used, name=name))
        used.append(tuple(resolved[-1]["color"]))
    _check_unique(resolved)
    return sorted(resolved, key=lambda c: c["value"])


MAX_CLASS_VALUE = 255  # an adapter's classes, and so HF-SAM's label volumes (UInt8)


def classes_for_labels(
    spec: str | None, values: list[int], *, adapter: Mapping[str, Any] | None = None, source: str = "the label map"
) -> tuple[list[dict[str, Any]], list[int], str | None]:
    """The classes a fine-tune trains, the label-map value that paints each (in class order), and a
    note to show when the label map was read other than value = class.

    ``values`` are the non-zero values of the label map on the image grid. Without ``--classes``
    every value present is a class ``label_V`` (no phantom classes for the values in between); with
    it, each value must be a named class. Common exports that are not class maps are recognised:
    a binary mask (one value, such as 255) for one named class is that class; values above 255
    cannot be adapter classes and are refused with what to do. ``adapter``: continuing training,
    whose classes are kept.
    """
    if not values:
        raise InputError("the labels have no labeled voxel on the image grid: paint at least one slice")
    big = [v for v in values if v > MAX_CLASS_VALUE]
    if big:
        shown = ", ".join(map(str, big[:5])) + (" ..." if len(big) > 5 else "")
        raise InputError(
            f"{source} holds label values above {MAX_CLASS_VALUE} ({shown}); an adapter's classes are "
            f"1..{MAX_CLASS_VALUE}: relabel the file so that each structure has a value from 1 to "
            f"{MAX_CLASS_VALUE} (3D Slicer: load it as a segmentation and export a labelmap; "
            "SimpleITK: ChangeLabel)"
        )
    if adapter is not None:
        classes = adapter["classes"]
        names = [c["name"] for c in classes]
        if spec and [c["name"] for c in resolve_classes(spec)] != names:
            raise InputError(
                "--classes differs from the adapter's classes; continuing training keeps them: " + ", ".join(names)
            )
        where = f"adapter {adapter['name']!r} knows {len(names)} class(es) ({', '.join(names)})"
    else:
        classes = resolve_classes(spec) if spec else resolve_classes([f"{v}:label_{v}" for v in values])
        where = f"only {len(classes)} class name(s) were given"
        over = [c for c in classes if c["value"] > MAX_CLASS_VALUE]
        if over:
            raise InputError(
                f"class {over[0]['name']!r} has label value {over[0]['value']}: an adapter's classes are "
                f"1..{MAX_CLASS_VALUE}"
            )
    known = [c["value"] for c in classes]
    if len(classes) == 1 and len(values) == 1 and values[0] not in known:
        note = (
            f"{source} is a binary mask (0/{values[0]}): reading value {values[0]} as class "
            f"{known[0]} ({classes[0]['name']})"
        )
        return classes, [values[0]], note
    unknown = [v for v in values if v not in known]
    if unknown:
        top = unknown[-1]
        raise InputError(
            f"the labels hold value {top} but {where}; "
            + (
                f"continuing training keeps its classes: use label values {', '.join(map(str, known))} only, or "
                "fine-tune a new adapter"
                if adapter is not None
                else f"pass one name per label value with --classes (e.g. '{top}:name' names value {top})"
            )
        )
    return classes, known, None


def slicer_terminology_string(cls: dict[str, Any]) -> str | None:
    """The class's terminology in Slicer's serialised form (the segment tag
    "TerminologyEntry"), or None when the class has no terminology."""
    term = cls.get("terminology")
    if not term:
        return None

    def code(c: dict | None) -> str:
        return f"{c['scheme']}^{c['code']}^{c['meaning']}" if c else "^^"

    return "~".join(
        [
            SLICER_TERMINOLOGY_CONTEXT,
            code(term.get("category")),
            code(term.get("type")),
            code(term.get("modifier")),
            SLICER_ANATOMIC_CONTEXT,
            "^^",
            "^^",
        ]
    )


# --------------------------------------------------------------------------- helpers


def _load_raw() -> dict[str, Any]:
    path = resources_dir() / PRESETS_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        raw["presets"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        # Not the user's input: the installation is broken.
        raise HFSAMError(f"cannot load class presets from {path}: {exc}") from None
    return raw


def _from_preset_entry(entry: dict[str, Any], category: dict | None) -> dict[str, Any]:
    terminology = None
    if entry.get("type"):
        terminology = {
            "category": copy.deepcopy(category),
            "type": copy.deepcopy(entry["type"]),
            "modifier": copy.deepcopy(entry.get("modifier")),
        }
    return {
        "value": int(entry["value"]),
        "name": entry["name"],
        "color": [int(c) for c in entry["color"]],
        "terminology": terminology,
    }


def _known_classes(presets: dict[str, list[dict]]) -> dict[str, dict[str, Any]]:
    """Every name and alias of every preset class -> that class (for free-form names)."""
    raw = _load_raw()
    known: dict[str, dict[str, Any]] = {}
    for name, preset in raw["presets"].items():
        for entry, resolved in zip(preset["classes"], presets[name]):
            for alias in [entry["name"], *entry.get("aliases", [])]:
                known.setdefault(_normalise(alias), resolved)
    return known


def _normalise(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


_VALUE_NAME = re.compile(r"\s*([0-9]{1,6})\s*:\s*(.*)", re.S)


def _split_value(item: str, position: int) -> tuple[int, str]:
    match = _VALUE_NAME.fullmatch(item)
    value, name = (int(match.group(1)), match.group(2)) if match else (position, item)
    name = name.strip()
    if not name:
        raise InputError(f"class {position} has an empty name: list names like 'liver,spleen'")
    if any(ord(ch) < 32 for ch in name):
        raise InputError(f"class name {name!r} contains control characters: use plain text")
    _check_value(value, name)
    return value, name


def _from_dict(item: dict[str, Any]) -> dict[str, Any]:
    try:
        value, name = int(item["value"]), str(item["name"]).strip()
        color = [int(c) for c in item.get("color") or _generated_color(value, [])]
    except (KeyError, TypeError, ValueError):
        raise InputError(f"class entry {item!r:.80} needs an integer 'value' and a 'name'") from None
    if not name:
        raise InputError(f"class {value} has an empty name")
    if len(color) != 3 or not all(0 <= c <= 255 for c in color):
        raise InputError(f"class {name!r} has colour {color}: give three numbers 0..255")
    _check_value(value, name)
    return {"value": value, "name": name, "color": color, "terminology": copy.deepcopy(item.get("terminology"))}


def _check_value(value: int, name: str) -> None:
    if not 1 <= value <= MAX_LABEL:
        raise InputError(f"class {name!r} has label value {value}: use 1..{MAX_LABEL} (0 is background)")


def _check_unique(classes: list[dict[str, Any]]) -> None:
    seen_values: dict[int, str] = {}
    seen_names: set[str] = set()
    for c in classes:
        if c["value"] in seen_values:
            raise InputError(f"label value {c['value']} is given to both {seen_values[c['value']]!r} and {c['name']!r}")
        seen_values[c["value"]] = c["name"]
        key = _normalise(c["name"])
        if key in seen_names:
            raise InputError(f"class name {c['name']!r} appears twice: give each class its own name")
        seen_names.add(key)


def _generic(value: int, used: list, *, name: str | None = None) -> dict[str, Any]:
    _check_value(value, name or f"class {value}")
    return {
        "value": value,
        "name": name or f"class {value}",
        "color": _generated_color(value, used),
        "terminology": None,
    }


def _generated_color(seed: int, used: list) -> list[int]:
    """A saturated colour far from those already used: golden-angle hue steps
    spread consecutive classes around the colour wheel, deterministically."""
    best, best_gap = None, -1.0
    for step in range(64):
        hue = ((seed + step) * 0.618033988749895) % 1.0
        rgb = [round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.65, 0.9)]
        gap = min((sum((a - b) ** 2 for a, b in zip(rgb, u)) ** 0.5 for u in used), default=1e9)
        if gap >= 80:
            return rgb
        if gap > best_gap:
            best, best_gap = rgb, gap
    assert best is not None  # the first step always beats best_gap = -1
    return best
