"""Which Slicer, MRML, VTK and CTK names the module's code uses: read from its source with ``ast``.

Shared by ``build_list.py`` (which looks them up in Slicer's sources) and ``Testing/test_slicer_api.py``
(which checks them against the committed list). Python does not say what type a variable has, so a
use is checked as precisely as the code shows:

- ``slicer.util.f``, ``from slicer.X import f``, ``slicer.packaging.f``: a function of Slicer's Python;
- ``slicer.vtkFoo.Bar``, ``vtk.vtkFoo.Bar``, ``slicer.app.bar``, ``slicer.mrmlScene.Bar``: member
  ``Bar`` of that class (or of a base class);
- ``ui.widget.bar`` / ``self.ui.widget.bar`` and ``host.connect(ui.widget, "signal(...)")``: a member
  of the widget's class in the .ui file (a CTK or qMRML class; Qt's own classes are not checked);
- ``self.bar`` in a class derived from one of Slicer's Python classes (ScriptedLoadableModule*,
  VTKObservationMixin), ``arg.bar`` for a parameter annotated with one of them, and ``self.p.bar``
  in the panel (the parameter node wrapper);
- ``"vtkMRMLFoo"`` given to AddNewNodeByClass / GetNodesByClass / IsA ...: the class exists;
- any other ``x.Bar`` with a capitalised name (VTK/MRML style) on anything but a known non-Slicer
  module (SimpleITK, numpy, os...): some indexed class has a member ``Bar``.

A use inside ``try:`` ... ``except ImportError`` (``from slicer import packaging``, Slicer 5.12+)
is *guarded*: it must exist in the newest Slicer, not in the oldest.
"""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

NOT_SLICER = {"sitk", "SimpleITK", "np", "numpy", "os", "sys", "json", "re", "shutil", "subprocess", "tempfile",
              "threading", "signal", "queue", "importlib", "math", "platform", "shlex", "atexit", "runpy", "traceback",
              "logging", "contextlib", "dataclasses", "collections", "time", "Path", "typing", "numpy_support",
              "qt", "_thread", "errno",
              "PyTorchUtils"}  # the PyTorch extension's module, not Slicer's
SLICER_PYTHON_BASES = {"ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                       "ScriptedLoadableModuleTest", "VTKObservationMixin"}
CLASS_NAME_CALLS = {"AddNewNodeByClass", "GetNodesByClass", "GetFirstNodeByClass", "CreateNodeByClass", "IsA"}
# Objects Slicer puts into the `slicer` module at start-up, and their C++ classes.
SLICER_GLOBALS = {"app": "qSlicerApplication", "mrmlScene": "vtkMRMLScene"}


@dataclass(frozen=True, order=True)
class Use:
    kind: str  # "python" (module, name) | "member" (class, name) | "class" (class) | "any" (name) | "module" (name)
    owner: str  # python module, class name, or "" for "any"/"class"/"module"
    name: str
    where: str  # file:line, for messages
    guarded: bool = False


def ui_classes(ui_file: Path) -> dict[str, str]:
    """widget name -> class, from the .ui."""
    return {w.get("name"): w.get("class") for w in ET.parse(ui_file).getroot().iter("widget")}


def _dotted(node) -> list[str] | None:
    """a.b.c -> ["a", "b", "c"]; None when the chain does not start at a plain name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *reversed(parts)]
    return None


def _guarded_lines(tree) -> set[int]:
    """Lines inside a `try:` whose handlers catch ImportError (feature detection of a newer Slicer)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            caught = {ast.unparse(h.type) for h in node.handlers if h.type is not None}
            if any("ImportError" in c or "ModuleNotFoundError" in c for c in caught):
                for child in node.body:
                    lines.update(range(child.lineno, child.end_lineno + 1))
    return lines


def uses_in_file(path: Path, widgets: dict[str, str], root: Path) -> list[Use]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    rel = path.relative_to(root).as_posix()
    guarded = _guarded_lines(tree)
    out: list[Use] = []
    aliases: dict[str, tuple[str, bool]] = {}  # local name -> python module of Slicer ("slicer.packaging"), guarded?

    def add(kind, owner, name, node, guard=False):
        out.append(Use(kind, owner, name, f"{rel}:{node.lineno}", guard or node.lineno in guarded))

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "slicer":
            for alias in node.names:
                if node.module == "slicer":
                    if alias.name[:3] in ("vtk", "qMR", "qSl") or alias.name[:1] == "q":
                        add("class", "", alias.name, node)
                    else:  # a submodule: from slicer import packaging
                        add("python", "slicer", alias.name, node)
                        aliases[alias.asname or alias.name] = (f"slicer.{alias.name}", node.lineno in guarded)
                else:
                    add("python", node.module, alias.name, node)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("slicer."):
                    add("python", "slicer", alias.name.split(".")[1], node)

    ranges = []  # (first line, last line, Slicer Python bases, own members) of each class deriving from them
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            bases = {ast.unparse(b).split(".")[-1] for b in node.bases} & SLICER_PYTHON_BASES
            if bases:
                members = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
                for sub in ast.walk(node):  # attributes the class sets on itself
                    if isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store) and _dotted(sub) == ["self", sub.attr]:
                        members.add(sub.attr)
                ranges.append((node.lineno, node.end_lineno, bases, members))

    typed_params: dict[tuple[int, int, str], str] = {}  # (first line, last line, parameter) -> Slicer Python class
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            for arg in node.args.args:
                hint = ast.unparse(arg.annotation).strip("'\"") if arg.annotation is not None else ""
                if hint in SLICER_PYTHON_BASES:
                    typed_params[(node.lineno, node.end_lineno, arg.arg)] = hint

    def param_class(name, line):
        return next((c for (a, b, n), c in typed_params.items() if n == name and a <= line <= b), None)

    def slicer_bases_at(line):
        for start, end, bases, members in ranges:
            if start <= line <= end:
                return bases, members
        return set(), set()

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in CLASS_NAME_CALLS and node.args and isinstance(node.args[0], ast.Constant) and isinstance(
                    node.args[0].value, str) and node.args[0].value.startswith(("vtk", "qMRML")):
                add("class", "", node.args[0].value, node)
            # host.connect(ui.widget, "signal(args)", slot) / widget.connect("signal(args)", slot)
            if name == "connect" and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
                chain = _dotted(node.args[0])
                signal = str(node.args[1].value).split("(")[0]
                if chain and chain[-2:-1] == ["ui"] and chain[-1] in widgets:
                    add("member", widgets[chain[-1]], signal, node)
            if name == "connect" and isinstance(func, ast.Attribute) and node.args and isinstance(node.args[0], ast.Constant):
                chain = _dotted(func.value)
                if chain and chain[:2] == ["slicer", "app"]:
                    add("member", "qSlicerApplication", str(node.args[0].value).split("(")[0], node)
        if not isinstance(node, ast.Attribute):
            continue
        chain = _dotted(node)
        if chain is None:
            if node.attr[:1].isupper():
                add("any", "", node.attr, node)
            continue
        head = chain[0]
        if head in aliases and len(chain) >= 2 and node.attr == chain[1] and len(chain) == 2:
            module, guard = aliases[head]
            add("python", module, chain[1], node, guard)
            continue
        if head == "slicer" and len(chain) >= 2:
            if node is not None and len(chain) == 2:
                second = chain[1]
                if second in SLICER_GLOBALS or second in ("util", "modules", "app", "mrmlScene", "i18n", "packaging"):
                    continue  # checked with their member below
                add("class" if second[:3] in ("vtk", "qMR", "qSl") else "python",
                    "" if second[:3] in ("vtk", "qMR", "qSl") else "slicer", second, node)
            elif len(chain) == 3 and node.attr == chain[2]:
                second, third = chain[1], chain[2]
                if second == "util":
                    add("python", "slicer.util", third, node)
                elif second == "packaging":
                    add("python", "slicer.packaging", third, node)
                elif second == "modules":
                    add("module", "", third, node)
                elif second in SLICER_GLOBALS:
                    add("member", SLICER_GLOBALS[second], third, node)
                elif second[:3] in ("vtk", "qMR", "qSl"):
                    add("member", second, third, node)
            continue
        if head == "vtk" and len(chain) >= 2:
            if len(chain) == 2 and chain[1].startswith("vtk"):
                add("class", "", chain[1], node)
            elif len(chain) == 3 and node.attr == chain[2] and chain[1].startswith("vtk"):
                add("member", chain[1], chain[2], node)
            elif len(chain) == 2:
                add("python", "vtk", chain[1], node)
            continue
        if head in NOT_SLICER:
            continue
        # ui.widget.member / self.ui.widget.member
        ui_chain = chain[1:] if head == "self" else chain
        if len(ui_chain) == 3 and ui_chain[0] == "ui" and ui_chain[1] in widgets and node.attr == ui_chain[2]:
            add("member", widgets[ui_chain[1]], ui_chain[2], node)
            continue
        if head == "self" and len(chain) == 3 and chain[1] == "p" and node.attr == chain[2] and rel.endswith("panel.py"):
            add("python", "slicer.parameterNodeWrapper.wrapper", chain[2], node)
            continue
        typed = param_class(head, node.lineno)
        if typed and len(chain) == 2:  # def f(widget: "ScriptedLoadableModuleWidget"): widget.layout
            add("python", f"slicer:{typed}", chain[1], node)
            continue
        if head == "self" and len(chain) == 2:
            bases, members = slicer_bases_at(node.lineno)
            if bases and chain[1] not in members:
                add("python", "slicer:" + "|".join(sorted(bases)), chain[1], node)
                continue
        if node.attr[:1].isupper() and not re.fullmatch(r"[A-Z0-9_]+", node.attr) or re.fullmatch(r"[A-Z][A-Z0-9_]+", node.attr):
            if head in ("self",) and len(chain) == 2:
                continue  # our own attribute
            add("any", "", node.attr, node)
    return out


def module_uses(root: Path) -> list[Use]:
    """Every use in HFSAMSegment/ (the module file and HFSAMSegmentLib), sorted."""
    module_dir = root / "HFSAMSegment"
    widgets = ui_classes(module_dir / "Resources" / "UI" / "HFSAMSegment.ui")
    files = [module_dir / "HFSAMSegment.py", *sorted((module_dir / "HFSAMSegmentLib").glob("*.py"))]
    uses = set()
    for path in files:
        uses.update(uses_in_file(path, widgets, root))
    return sorted(uses)


def own_names(root: Path) -> set[str]:
    """Capitalised names the module defines itself (its classes, constants): never Slicer's."""
    names = set()
    for path in [*(root / "HFSAMSegment").rglob("*.py"), root / "HFSAMCore" / "model" / "registry.py"]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                names.add(node.name)
                names.update(n.name for n in node.body if isinstance(n, ast.FunctionDef))
            elif isinstance(node, ast.Assign):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
    return names
