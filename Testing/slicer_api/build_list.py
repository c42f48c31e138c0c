"""Build slicer_api.json: the API of the oldest supported Slicer (5.8.1) that the module can call.

    python Testing/slicer_api/build_list.py --slicer SLICER.git --ctk CTK.git --vtk VTK.git

Each argument is a git clone (a bare one will do): github.com/Slicer/Slicer, github.com/commontk/CTK,
github.com/Kitware/VTK. Nothing is checked out; files are read with `git show`. For every Slicer tag
in TAGS, the CTK and VTK commits are the ones that tag's SuperBuild pins (External_CTK.cmake;
External_VTK.cmake for the VTK version that tag builds by default: Slicer's VTK fork is upstream VTK
at the commit named in the pin's comment, plus a few backports).

The list has, for the oldest tag: the members of every class in CLASSES and of the classes used by
the module (its .ui widgets, the node classes it names), with their base classes; Slicer's Python
(slicer.util, ScriptedLoadableModule, parameterNodeWrapper, i18n) and the loadable module names.
For each newer tag it records what of that disappeared, and what Slicer's Python added (for uses
guarded by feature detection, e.g. slicer.packaging in 5.12). Testing/test_slicer_api.py checks
every use of the module against it. Run it again when the module starts using a new class, or when
the oldest supported Slicer changes, and commit the result.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import usage  # noqa: E402

TAGS = ("v5.8.1", "v5.10.0", "v5.12.3", "main")  # oldest supported first
OUTPUT = HERE / "slicer_api.json"

# Classes whose objects the module handles (beyond those it names): what its calls return.
CLASSES = (
    "vtkMRMLScene", "vtkMRMLNode", "vtkMRMLScalarVolumeNode", "vtkMRMLLabelMapVolumeNode", "vtkMRMLSegmentationNode",
    "vtkMRMLSegmentationDisplayNode", "vtkMRMLScriptedModuleNode", "vtkMRMLSubjectHierarchyNode",
    "vtkMRMLLinearTransformNode", "vtkSegment", "vtkSegmentation", "vtkSegmentationConverter", "vtkOrientedImageData",
    "vtkSlicerSegmentationsModuleLogic", "vtkSlicerSubjectHierarchyModuleLogic", "vtkSlicerTerminologiesModuleLogic",
    "vtkSlicerTerminologyEntry", "qSlicerApplication",
    "vtkCommand", "vtkMatrix4x4", "vtkImageData", "vtkPointData", "vtkDataArray", "vtkStringArray", "vtkCollection",
)
SLICER_PYTHON = {  # module -> file under Base/Python/slicer
    "slicer.util": "util.py",
    "slicer.ScriptedLoadableModule": "ScriptedLoadableModule.py",
    "slicer.i18n": "i18n.py",
    "slicer.packaging": "packaging.py",
}
KEYWORDS = {"if", "for", "while", "switch", "return", "sizeof", "catch", "static_cast", "dynamic_cast", "const_cast",
            "reinterpret_cast", "decltype", "alignof", "operator", "new", "delete", "throw", "defined", "assert", "typeid"}


class Repo:
    def __init__(self, path: str):
        self.path = path

    def git(self, *args: str) -> str:
        return subprocess.run(["git", "-C", self.path, *args], capture_output=True, text=True, check=True,
                              errors="replace").stdout

    def resolve(self, rev: str) -> str:
        return self.git("rev-parse", f"{rev}^{{commit}}").strip()

    @lru_cache(maxsize=None)
    def files(self, commit: str) -> dict[str, str]:
        """basename -> path of every header and Python file at ``commit``."""
        out = {}
        for path in self.git("ls-tree", "-r", "--name-only", commit).splitlines():
            if path.endswith((".h", ".py")) and "/Testing/" not in path and "ThirdParty" not in path:
                out.setdefault(path.rsplit("/", 1)[-1], path)
        return out

    def show(self, commit: str, path: str) -> str:
        return self.git("show", f"{commit}:{path}")


def pins(slicer: Repo, tag: str) -> tuple[str, str]:
    """(CTK commit, upstream VTK commit) that Slicer ``tag`` builds with."""
    ctk = re.search(r'Slicer_\$\{proj\}_GIT_TAG\s*\n\s*"([0-9a-f]{40})"', slicer.show(tag, "SuperBuild/External_CTK.cmake"))
    vtk_cmake = slicer.show(tag, "SuperBuild/External_VTK.cmake")
    top = slicer.show(tag, "CMakeLists.txt")
    minor = re.search(r'set\(_default_vtk_minor_version "(\d+)"\)', top)
    candidates = []  # (VTK minor version, upstream commit) from comments like "# slicer-v9.2.20230607-1ff325c54-2"
    for branch in re.findall(r'set\(_git_tag "[0-9a-f]{40}"\)\s*#\s*(slicer-v9\.\S+)', vtk_cmake):
        upstream = next(t for t in reversed(branch.split("-")) if re.fullmatch(r"[0-9a-f]{7,}", t) and not t.isdigit())
        candidates.append((branch.split(".")[1], upstream))
    if minor:
        candidates = [c for c in candidates if c[0] == minor.group(1)]
    if not ctk or not candidates:
        raise SystemExit(f"{tag}: cannot read the CTK/VTK pins from SuperBuild/")
    return ctk.group(1), candidates[0][1]


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def _class_body(text: str, name: str) -> tuple[list[str], str] | None:
    match = re.search(rf"\bclass\s+(?:\w+\s+)*?{name}\b(?:\s+final)?\s*(?::\s*([^{{;]+))?\{{", text)
    if not match:
        return None
    bases = [re.sub(r"\b(public|protected|private|virtual)\b", "", b).strip() for b in (match.group(1) or "").split(",")]
    depth, start = 1, match.end()
    i = start
    while depth and i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return [b for b in bases if b], text[start:i]


def parse_class(text: str, name: str) -> dict | None:
    """bases and member names of class ``name`` in a C++ header."""
    found = _class_body(_strip_comments(text), name)
    if found is None:
        return None
    bases, body = found
    members = set()
    for ident in re.findall(r"\b([A-Za-z_]\w*)\s*\(", body):
        if ident not in KEYWORDS and not re.fullmatch(r"[A-Z][A-Z0-9_]+", ident) and not ident.endswith("Macro"):
            members.add(ident)
    for kind, ident in re.findall(r"\bvtk(Get|Set)\w*?Macro\s*\(\s*(\w+)", body):
        members.add(kind + ident)
    for ident in re.findall(r"\bvtkBooleanMacro\s*\(\s*(\w+)", body):
        members.update({ident + "On", ident + "Off"})
    if re.search(r"\bvtk(Type|MRMLNodeNew|Standard\w*)Macro\s*\(", body) or "vtkTypeMacro" in body:
        members.update({"New", "SafeDownCast", "IsA", "IsTypeOf", "NewInstance", "GetClassName"})
    for enum in re.findall(r"\benum\b[^{;]*\{([^}]*)\}", body):
        for item in enum.split(","):
            ident = item.split("=")[0].strip()
            if re.fullmatch(r"[A-Za-z_]\w*", ident):
                members.add(ident)
    for prop in re.findall(r"Q_PROPERTY\s*\(([^)]*)\)", body):
        words = prop.split()
        if len(words) >= 2:
            members.add(words[1].lstrip("*&"))
        for key in ("READ", "WRITE", "NOTIFY"):
            if key in words and words.index(key) + 1 < len(words):
                members.add(words[words.index(key) + 1])
    if name == "vtkCommand":  # its event ids are an enum made from a macro list outside the class
        members.update(re.findall(r"_vtk_add_event\((\w+)\)", text))
    members.discard(name)
    members.discard("~" + name)
    bases = [re.sub(r"<.*", "", b).split("::")[-1] for b in bases]
    return {"bases": bases, "members": sorted(members)}


def index_classes(repos: dict[str, tuple[Repo, str]], names) -> dict[str, dict]:
    """Parse each class (and, recursively, its bases) from whichever repository has its header."""
    classes: dict[str, dict] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in classes:
            continue
        for repo, commit in repos.values():
            path = repo.files(commit).get(f"{name}.h")
            if path is None:
                continue
            parsed = parse_class(repo.show(commit, path), name)
            if parsed is not None:
                classes[name] = parsed
                todo.extend(b for b in parsed["bases"] if b.startswith(("vtk", "ctk", "qMRML", "qSlicer")))
                break
        else:
            classes[name] = None  # not found: reported by the test as an unknown class
    return classes


def inherited_members(classes: dict[str, dict], name: str) -> set[str]:
    """Members of ``name`` and of its indexed base classes (Qt's own classes are not indexed)."""
    members, todo = set(), [name]
    while todo:
        info = classes.get(todo.pop())
        if info:
            members.update(info["members"])
            todo.extend(info["bases"])
    return members


def python_names(slicer: Repo, tag: str) -> dict[str, list[str]]:
    """Public names of Slicer's Python modules; "slicer:Class" for the members of its Python classes."""
    out: dict[str, set[str]] = {}
    files = slicer.git("ls-tree", "-r", "--name-only", tag, "Base/Python/slicer").splitlines()
    for module, name in SLICER_PYTHON.items():
        path = f"Base/Python/slicer/{name}"
        if path in files:
            _python_file(slicer.show(tag, path), module, out)
    out["slicer"] = {p.split("/")[3].removesuffix(".py") for p in files if p.count("/") >= 3}
    wrapper_package = "Base/Python/slicer/parameterNodeWrapper/"
    for path in files:
        if path.startswith(wrapper_package) and path.endswith(".py"):
            text = slicer.show(tag, path)
            _python_file(text, "slicer.parameterNodeWrapper", out)
            if path.endswith("wrapper.py"):
                wrapper = out.setdefault("slicer.parameterNodeWrapper.wrapper", set())
                wrapper.update(re.findall(r'checkedSetAttr\(classtype,\s*"(\w+)"', text))
                wrapper.update(re.findall(r"self\.(\w+)\s*=", text))
    return {k: sorted(v) for k, v in out.items()}


def _python_file(text: str, module: str, out: dict[str, set[str]]) -> None:
    tree = ast.parse(text)
    names = out.setdefault(module, set())
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            members = out.setdefault(f"slicer:{node.name}", set())
            for item in ast.walk(node):
                if isinstance(item, ast.FunctionDef):
                    members.add(item.name)
                elif isinstance(item, ast.Attribute) and isinstance(item.ctx, ast.Store) and \
                        isinstance(item.value, ast.Name) and item.value.id == "self":
                    members.add(item.attr)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))


def loadable_modules(slicer: Repo, tag: str) -> list[str]:
    """slicer.modules.<name>: Slicer's own modules, lower case (Terminologies -> terminologies)."""
    names = set()
    for folder in ("Modules/Loadable", "Modules/Scripted", "Modules/CLI"):
        for entry in slicer.git("ls-tree", "--name-only", f"{tag}:{folder}").splitlines():
            names.add(entry.lower())
    return sorted(names)


def vtk_python_names(vtk: Repo, commit: str) -> list[str]:
    names = []
    if any(p.endswith("PyVTKReference.cxx") for p in vtk.git("ls-tree", "-r", "--name-only", commit,
                                                            "Wrapping/PythonCore").splitlines()):
        names.append("reference")
    return names


def used_classes() -> set[str]:
    uses = usage.module_uses(REPO)
    named = {u.name for u in uses if u.kind == "class"} | {u.owner for u in uses if u.kind == "member"}
    return {n for n in named if n.startswith(("vtk", "ctk", "qMRML", "qSlicer"))}


def build(slicer: Repo, ctk: Repo, vtk: Repo) -> dict:
    wanted = sorted(set(CLASSES) | used_classes())
    per_tag = {}
    for tag in TAGS:
        ctk_commit, vtk_short = pins(slicer, tag)
        repos = {"slicer": (slicer, slicer.resolve(tag)), "ctk": (ctk, ctk.resolve(ctk_commit)),
                 "vtk": (vtk, vtk.resolve(vtk_short))}
        print(f"{tag}: Slicer {repos['slicer'][1][:10]}, CTK {repos['ctk'][1][:10]}, VTK {repos['vtk'][1][:10]}",
              file=sys.stderr)
        per_tag[tag] = {
            "sources": {k: c for k, (_, c) in repos.items()},
            "classes": index_classes(repos, wanted),
            "python": python_names(slicer, tag),
            "modules": loadable_modules(slicer, tag),
            "vtk_python": vtk_python_names(vtk, repos["vtk"][1]),
        }
    oldest, newer = per_tag[TAGS[0]], {t: per_tag[t] for t in TAGS[1:]}
    removed, added_python = {}, {}
    for tag, data in newer.items():
        gone = []
        for cls, info in oldest["classes"].items():
            if info is not None:
                kept = inherited_members(data["classes"], cls)  # a member may have moved to a new base class
                gone += [f"{cls}.{m}" for m in info["members"] if m not in kept]
        for module, names in oldest["python"].items():
            kept = set(data["python"].get(module, []))
            gone += [f"python:{module}.{n}" for n in names if n not in kept]
        removed[tag] = sorted(gone)
        added_python[tag] = {m: n for m, n in data["python"].items() if m not in oldest["python"]}
    return {
        "about": "The Slicer 5.8.1 API (with CTK and VTK) the HF-SAM module can call; made by build_list.py, "
                 "checked by Testing/test_slicer_api.py. Do not edit by hand.",
        "oldest": TAGS[0],
        "sources": {t: d["sources"] for t, d in per_tag.items()},
        "classes": oldest["classes"],
        "python": oldest["python"],
        "modules": oldest["modules"],
        "vtk_python": oldest["vtk_python"],
        "removed_in": removed,
        "python_added_in": added_python,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example:\n  python Testing/slicer_api/build_list.py --slicer ~/src/Slicer "
                                            "--ctk ~/src/CTK --vtk ~/src/VTK")
    parser.add_argument("--slicer", required=True, help="git clone of github.com/Slicer/Slicer (with its tags)")
    parser.add_argument("--ctk", required=True, help="git clone of github.com/commontk/CTK")
    parser.add_argument("--vtk", required=True, help="git clone of github.com/Kitware/VTK")
    parser.add_argument("-o", "--output", default=str(OUTPUT), help=f"default: {OUTPUT.relative_to(REPO)}")
    args = parser.parse_args(argv)
    data = build(Repo(args.slicer), Repo(args.ctk), Repo(args.vtk))
    missing = sorted(c for c, info in data["classes"].items() if info is None)
    Path(args.output).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {args.output}: {len(data['classes'])} classes" + (f"; not found: {', '.join(missing)}" if missing else ""),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
