"""Every Slicer, MRML, VTK and CTK name the module uses exists in the oldest supported Slicer (5.8.1),
and none of them disappeared in a later one (5.10.0, 5.12.3, main).

CI cannot run Slicer 5.8 (slicer-core on PyPI starts at 5.11), so this checks the module's source
(Testing/slicer_api/usage.py) against the committed list Testing/slicer_api/slicer_api.json, which
Testing/slicer_api/build_list.py makes from the Slicer, CTK and VTK sources at the commits each
Slicer tag pins. A new use of a class the list does not cover fails here with the command that
extends the list.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Testing" / "slicer_api"))
import build_list  # noqa: E402
import usage  # noqa: E402

API = json.loads((REPO / "Testing" / "slicer_api" / "slicer_api.json").read_text(encoding="utf-8"))
REBUILD = (
    "python Testing/slicer_api/build_list.py --slicer SLICER.git --ctk CTK.git --vtk VTK.git "
    "(clones of Slicer/Slicer, commontk/CTK, Kitware/VTK)"
)


def _parameter_fields() -> set[str]:
    import ast

    tree = ast.parse((REPO / "HFSAMSegment" / "HFSAMSegmentLib" / "parameters.py").read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef))
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}


def members(name: str, classes: dict = API["classes"]) -> set[str] | None:
    """Members of an indexed class and its bases; a Qt base contributes what PySide6 has (Qt's API is stable)."""
    if classes.get(name) is None:
        return None
    found = build_list.inherited_members(classes, name)
    todo = [name]
    while todo:
        info = classes.get(todo.pop())
        if info:
            for base in info["bases"]:
                if base.startswith("Q"):
                    found |= qt_members(base)
                else:
                    todo.append(base)
    return found


def qt_members(qt_class: str) -> set[str]:
    QtWidgets = pytest.importorskip("PySide6.QtWidgets")
    from PySide6 import QtCore, QtGui

    for module in (QtWidgets, QtCore, QtGui):
        if hasattr(module, qt_class):
            return set(dir(getattr(module, qt_class)))
    return set()


ALL_MEMBERS = set().union(*(set(i["members"]) for i in API["classes"].values() if i))
REMOVED = {tag: set(names) for tag, names in API["removed_in"].items()}


def simpleitk_names() -> set[str]:
    import SimpleITK as sitk

    return set(dir(sitk.Image)) | set(dir(sitk.ImageSeriesReader)) | set(dir(sitk))


def problems(uses) -> list[str]:
    out = []
    fields = _parameter_fields()
    own = usage.own_names(REPO)
    sitk_names = simpleitk_names()
    python = API["python"]
    for use in uses:
        if use.guarded:  # feature detection of a newer Slicer: must exist in the newest
            newest = API["python_added_in"][build_list.TAGS[-1]]
            have = set(newest.get(use.owner, [])) | set(python.get(use.owner, []))
            if use.owner == "slicer":
                have |= {m.split(".", 1)[1] for m in newest if m.startswith("slicer.")}
            if use.name not in have:
                out.append(
                    f"{use.where}: {use.owner}.{use.name} (behind a feature check) is not in the newest Slicer either"
                )
            continue
        if use.kind == "python":
            if use.owner.startswith("slicer:"):
                have = set().union(*(set(python.get(f"slicer:{b}", [])) for b in use.owner[7:].split("|")))
            elif use.owner == "slicer.parameterNodeWrapper.wrapper":
                have = set(python.get(use.owner, [])) | fields
            elif use.owner == "vtk":
                have = set(API["vtk_python"])
            else:
                have = set(python.get(use.owner, []))
            if use.name not in have:
                out.append(f"{use.where}: {use.owner}.{use.name} does not exist in Slicer {API['oldest']}")
            gone = [t for t, names in REMOVED.items() if f"python:{use.owner}.{use.name}" in names]
            if gone:
                out.append(f"{use.where}: {use.owner}.{use.name} is gone in Slicer {gone[0]}")
        elif use.kind == "class":
            if API["classes"].get(use.name) is None:
                out.append(
                    f"{use.where}: class {use.name} is not in the list; add it to CLASSES in build_list.py: {REBUILD}"
                )
        elif use.kind == "module":
            if use.name not in API["modules"]:
                out.append(f"{use.where}: slicer.modules.{use.name} does not exist in Slicer {API['oldest']}")
        elif use.kind == "member":
            if use.owner.startswith("Q"):
                have = qt_members(use.owner)
            else:
                have = members(use.owner)
                if have is None:
                    out.append(f"{use.where}: class {use.owner} is not in the list; add it to CLASSES: {REBUILD}")
                    continue
            if use.name not in have:
                out.append(f"{use.where}: {use.owner}.{use.name} does not exist in Slicer {API['oldest']}")
            gone = [
                t
                for t, names in REMOVED.items()
                if f"{use.owner}.{use.name}" in names and use.name not in qt_members_of_bases(use.owner)
            ]
            if gone:
                out.append(f"{use.where}: {use.owner}.{use.name} is gone in Slicer {gone[0]}")
        elif use.kind == "any":
            if use.name in own:
                continue
            if use.name not in ALL_MEMBERS:
                if use.name in sitk_names:
                    continue  # a SimpleITK image's method (mrml_adapter converts between the two)
                out.append(
                    f"{use.where}: .{use.name} is not a member of any class of Slicer {API['oldest']} in the list "
                    f"(if it belongs to a class the list lacks, add that class to CLASSES: {REBUILD})"
                )
                continue
            owners = [c for c, i in API["classes"].items() if i and use.name in i["members"]]
            for tag, names in REMOVED.items():
                if all(f"{c}.{use.name}" in names for c in owners):
                    out.append(f"{use.where}: .{use.name} is gone in Slicer {tag}")
                    break
    return out


def qt_members_of_bases(name: str) -> set[str]:
    info = API["classes"].get(name)
    found = set()
    for base in (info or {}).get("bases", []):
        found |= qt_members(base) if base.startswith("Q") else qt_members_of_bases(base)
    return found


def test_every_use_exists_in_slicer_5_8_and_later():
    uses = usage.module_uses(REPO)
    assert len(uses) > 150 and {u.kind for u in uses} >= {"python", "member", "class", "any", "module"}
    found = problems(uses)
    assert found == [], "\n".join(found)


def test_the_list_covers_the_classes_of_the_script_and_the_pinned_sources():
    assert API["oldest"] == build_list.TAGS[0] == "v5.8.1"
    assert sorted(API["sources"]) == sorted(build_list.TAGS)
    assert (
        API["sources"]["v5.8.1"]["ctk"] == "82cae5781621845486bad2697aed095f04cfbe76"
    )  # SuperBuild/External_CTK.cmake
    assert API["sources"]["v5.8.1"]["vtk"].startswith("1ff325c54")  # slicer-v9.2.20230607-1ff325c54-2
    missing = [c for c in set(build_list.CLASSES) | build_list.used_classes() if API["classes"].get(c) is None]
    assert missing == [], f"not in slicer_api.json: {missing}; run {REBUILD}"


@pytest.mark.parametrize(
    "snippet, expected",
    [
        # The 5.8 crashes of issue 13: each must be caught.
        ("def f(logic, ctx):\n    return logic.IsTerminologyContextLoaded(ctx)\n", "IsTerminologyContextLoaded"),
        ("def f(segment):\n    segment.SetTerminology('x')\n", "SetTerminology"),
        ("import slicer\ndef f():\n    return slicer.util.pip_ensure(['x'])\n", "slicer.util.pip_ensure"),
        (
            "import slicer\ndef f():\n    return slicer.vtkSegment.GetTerminologyEntryTagNam()\n",
            "GetTerminologyEntryTagNam",
        ),
        ("from slicer import packaging\n", "slicer.packaging"),
        ("import slicer\ndef f():\n    slicer.app.connect('noSuchSignal()', f)\n", "noSuchSignal"),
    ],
)
def test_the_check_catches_calls_that_slicer_5_8_lacks(tmp_path, snippet, expected):
    folder = tmp_path / "HFSAMSegment"
    folder.mkdir()
    path = folder / "snippet.py"
    path.write_text(snippet)
    found = problems(usage.uses_in_file(path, {}, tmp_path))
    assert any(expected in p for p in found), found


def test_guarded_uses_of_newer_slicer_pass(tmp_path):
    snippet = (
        "def f():\n    try:\n        from slicer import packaging\n    except ImportError:\n        packaging = None\n"
        "    return packaging.pip_ensure\n"
    )
    root = tmp_path
    (root / "HFSAMSegment").mkdir()
    path = root / "HFSAMSegment" / "guarded.py"
    path.write_text(snippet)
    uses = usage.uses_in_file(path, {}, root)
    assert {(u.owner, u.name, u.guarded) for u in uses} >= {
        ("slicer", "packaging", True),
        ("slicer.packaging", "pip_ensure", True),
    }
    assert problems(uses) == []
