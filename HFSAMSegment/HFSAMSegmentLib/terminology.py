"""Class name -> standard terminology entry (SNOMED CT codes, recommended colour).

Slicer describes what a segment *is* with a terminology entry (category, type,
modifier codes) stored on the segment as one serialized string. The entries
for the Synapse and ACDC classes live in ``Resources/HFSAM.term.json``, a
terminology context in Slicer's own JSON format, so Slicer's Terminologies
module can load the same file and show these entries in its selector.

This module reads that file with plain ``json`` (no MRML, no Slicer) and builds
the serialized strings in the format of
``vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry``:
``context~category~type~typeModifier~regionContext~region~regionModifier``,
each code written as ``scheme^value^meaning``. The CI test checks the strings
against Slicer's real terminology logic.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .engine_command import find_engine_dir

TERM_FILE_NAME = "HFSAM.term.json"
EMPTY_CODE = "^^"
SLICER_GENERAL_ANATOMY = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMICAL_STRUCTURE = {
    "CodingSchemeDesignator": "SCT",
    "CodeValue": "123037004",
    "CodeMeaning": "Anatomical Structure",
}


def find_term_file() -> Path | None:
    """Resources/HFSAM.term.json beside the engine (source tree and installed extension alike)."""
    root = find_engine_dir()
    if root is not None and (root / "Resources" / TERM_FILE_NAME).is_file():
        return root / "Resources" / TERM_FILE_NAME
    return None


def load_into_slicer(terminologies_logic, path: str | Path | None = None) -> str | None:
    """Load the context file into Slicer's Terminologies logic once; returns the context name (None: no file).

    Called at ``startupCompleted`` (as TotalSegmentator does), so that a saved
    scene reopened in a fresh session shows our segments' entries. Uses only
    calls that exist in Slicer 5.8 (``IsTerminologyContextLoaded`` is 5.10+).
    """
    import vtk  # noqa: PLC0415 - only this function needs VTK (Slicer's, or slicer-core's in CI)

    path = Path(path) if path else find_term_file()
    if path is None:
        return None
    context = json.loads(path.read_text(encoding="utf-8"))["SegmentationCategoryTypeContextName"]
    names = vtk.vtkStringArray()
    terminologies_logic.GetLoadedTerminologyNames(names)
    if context not in {names.GetValue(i) for i in range(names.GetNumberOfValues())}:
        loaded = terminologies_logic.LoadTerminologyFromFile(str(path))
        if loaded != context:
            raise RuntimeError(f"Slicer could not load the terminology {path} (got {loaded!r})")
    return context


def register_terminology() -> None:
    """``load_into_slicer`` with Slicer's Terminologies module; logs instead of raising (Slicer must start)."""
    import logging

    try:
        import slicer  # noqa: PLC0415 - only inside Slicer

        load_into_slicer(slicer.modules.terminologies.logic())
    except Exception:  # noqa: BLE001
        logging.exception(f"HF-SAM: could not load {TERM_FILE_NAME} into the Terminologies module")


def normalize_name(name: str) -> str:
    """'Kidney_Right' -> 'kidney right': the key class names are matched on."""
    return re.sub(r"[\s_\-]+", " ", str(name)).strip().lower()


# Slicer's JSON spells a code CodingSchemeDesignator/CodeValue/CodeMeaning; the
# engine's class presets (Resources/class_presets.json) spell it scheme/code/meaning.
_CODE_KEYS = (("CodingSchemeDesignator", "scheme"), ("CodeValue", "code"), ("CodeMeaning", "meaning"))


def code_string(code: dict | None) -> str:
    """One code as Slicer serializes it: ``scheme^value^meaning`` (``^^`` when absent)."""
    if not code:
        return EMPTY_CODE
    return "^".join(str(code.get(slicer_key, code.get(engine_key, ""))) for slicer_key, engine_key in _CODE_KEYS)


def serialize(context: str, category: dict, type_: dict, modifier: dict | None = None) -> str:
    """The segment tag string Slicer stores for a terminology entry (no anatomic region)."""
    return "~".join(
        [context, code_string(category), code_string(type_), code_string(modifier), "", EMPTY_CODE, EMPTY_CODE]
    )


@dataclass(frozen=True)
class TermEntry:
    label: str  # Slicer's "3dSlicerLabel", e.g. "right kidney"
    meaning: str  # e.g. "Kidney, Right"
    serialized: str  # the segment's terminology tag
    color: tuple[float, float, float]  # recommended display colour, 0..1


class Terminology:
    """The entries of one terminology context file, looked up by class name."""

    def __init__(self, context: str, entries: dict[str, TermEntry]):
        self.context = context
        self._entries = entries

    @classmethod
    def from_file(cls, path: str | Path) -> Terminology:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        context = doc["SegmentationCategoryTypeContextName"]
        entries: dict[str, TermEntry] = {}
        for category in doc["SegmentationCodes"]["Category"]:
            for type_ in category.get("Type", []):
                cls._add(entries, context, category, type_, None)
                for modifier in type_.get("Modifier", []):
                    cls._add(entries, context, category, type_, modifier)
        return cls(context, entries)

    @classmethod
    def default(cls) -> Terminology | None:
        path = find_term_file()
        return cls.from_file(path) if path else None

    @staticmethod
    def _add(entries: dict, context: str, category: dict, type_: dict, modifier: dict | None) -> None:
        source = modifier or type_
        rgb = source.get("recommendedDisplayRGBValue") or type_.get("recommendedDisplayRGBValue") or [128, 128, 128]
        label = source.get("3dSlicerLabel") or type_["CodeMeaning"]
        meaning = type_["CodeMeaning"] + (f", {modifier['CodeMeaning']}" if modifier else "")
        entry = TermEntry(
            label, meaning, serialize(context, category, type_, modifier), tuple(c / 255.0 for c in rgb[:3])
        )
        names = [label, *source.get("hfsamAliases", [])]
        if modifier is None and not type_.get("Modifier"):
            names.append(type_["CodeMeaning"])
        for name in names:
            entries.setdefault(normalize_name(name), entry)

    def lookup(self, name: str) -> TermEntry | None:
        return self._entries.get(normalize_name(name))

    def __len__(self) -> int:
        return len({e.serialized for e in self._entries.values()})


def terminology_for_class(cls: dict[str, Any], table: Terminology | None) -> str | None:
    """The terminology string for one class of the engine's sidecar JSON.

    First the class name is looked up in ``table`` (Resources/HFSAM.term.json),
    so the Synapse and ACDC classes point into a context Slicer can load from
    that file (it also holds myocardium, which Slicer's General Anatomy list
    lacks). Otherwise the sidecar's own entry is used: a serialized string, or
    the engine's dict with ``category``/``type``/``modifier`` codes (written in
    Slicer's General Anatomy context, whose codes they follow).
    """
    entry = table.lookup(str(cls.get("name", ""))) if table else None
    if entry:
        return entry.serialized
    given = cls.get("terminology")
    if isinstance(given, str) and given.count("~") >= 2:
        return given
    if isinstance(given, dict) and isinstance(given.get("type"), dict):
        context = given.get("context") or SLICER_GENERAL_ANATOMY
        category = given.get("category") or ANATOMICAL_STRUCTURE
        return serialize(context, category, given["type"], given.get("modifier"))
    return None
