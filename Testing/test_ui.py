"""The panel (.ui) and the module file, checked without Slicer: the .ui loads with PySide6's
QUiLoader (offscreen), every widget the panel code uses exists, parameter bindings match the
parameter node, the module file is thin, heavy imports stay out, and the CMake/extension files
(and the Extensions Index entry) list what is on disk.

Run ``python Testing/test_ui.py --screenshot`` to render Resources/Screenshots/panel.png.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "HFSAMSegment"
MODULE_FILE = MODULE_DIR / "HFSAMSegment.py"
LIB_DIR = MODULE_DIR / "HFSAMSegmentLib"
PANEL_FILES = (LIB_DIR / "panel.py", LIB_DIR / "library_section.py")
PARAMETERS_FILE = LIB_DIR / "parameters.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "HFSAMSegment.ui"
SCREENSHOT = REPO / "Resources" / "Screenshots" / "panel.png"

QtWidgets = pytest.importorskip("PySide6.QtWidgets")
from PySide6 import QtCore, QtGui  # noqa: E402
from slicer_widgets import app  # noqa: E402
from slicer_widgets import load_panel as _load  # noqa: E402


def load_panel():
    return _load(UI_FILE)


# -- parsing helpers ------------------------------------------------------------------------------


def ui_tree():
    return ET.parse(UI_FILE).getroot()


def ui_widgets() -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ui_tree().iter("widget")}


def ui_property(widget: ET.Element, name: str):
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            value = prop[0]
            if value.tag == "stringlist":
                return [s.text for s in value]
            return value.text
    return None


def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def module_ast() -> ast.Module:
    return parsed(MODULE_FILE)


def ui_names_used_by_panel() -> set[str]:
    """X of every ``self.ui.X`` and ``ui.X`` in the panel's code."""
    names = set()
    for node in (n for path in PANEL_FILES for n in ast.walk(parsed(path))):
        if not isinstance(node, ast.Attribute):
            continue
        value = node.value
        if (
            isinstance(value, ast.Attribute)
            and value.attr == "ui"
            and isinstance(value.value, ast.Name)
            and value.value.id == "self"
        ) or (isinstance(value, ast.Name) and value.id == "ui"):
            names.add(node.attr)
    return names


def parameter_fields() -> dict[str, str]:
    for node in parsed(PARAMETERS_FILE).body:
        if isinstance(node, ast.ClassDef) and node.name == "HFSAMSegmentParameterNode":
            return {
                item.target.id: ast.unparse(item.annotation) for item in node.body if isinstance(item, ast.AnnAssign)
            }
    raise AssertionError("HFSAMSegmentParameterNode not found")


# -- the .ui ------------------------------------------------------------------------------------------


def test_panel_loads_and_has_every_widget_the_module_uses():
    panel = load_panel()
    assert type(panel).__name__ == "qMRMLWidget" and panel.objectName() == "HFSAMSegment"
    loaded = {w.objectName() for w in panel.findChildren(QtWidgets.QWidget)}
    used = ui_names_used_by_panel()
    assert len(used) >= 20, sorted(used)  # the ast really found the panel's widget uses
    assert used - loaded == set(), f"used by panel.py but missing from the .ui: {sorted(used - loaded)}"
    # and the reverse for interactive widgets: nothing in the panel is left unwired
    interactive = {
        n
        for n, w in ui_widgets().items()
        if w.get("class")
        in (
            "QPushButton",
            "QComboBox",
            "qMRMLNodeComboBox",
            "qMRMLSegmentSelectorWidget",
            "QLineEdit",
            "QSpinBox",
            "ctkPathLineEdit",
            "QTableWidget",
            "QProgressBar",
            "QPlainTextEdit",
        )
    }
    bound = {n for n, w in ui_widgets().items() if ui_property(w, "SlicerParameterName")}
    assert interactive - used - bound == set()


def test_parameter_bindings_match_the_parameter_node():
    fields = parameter_fields()
    assert {"inputVolume", "outputSegmentation", "device", "adapterName", "steps", "model"} <= set(fields)
    for name, widget in ui_widgets().items():
        parameter = ui_property(widget, "SlicerParameterName")
        if not parameter:
            continue
        assert parameter in fields, f"{name} is bound to unknown parameter {parameter!r}"
        annotation, cls = fields[parameter], widget.get("class")
        if cls == "qMRMLNodeComboBox":
            assert annotation.startswith("vtkMRML") and annotation in ui_property(widget, "nodeTypes"), (
                name,
                annotation,
            )
        elif cls == "QComboBox":
            assert annotation.startswith("Annotated[str, Choice("), (
                name,
                annotation,
            )  # Slicer's combo connector needs Choice
        elif cls == "QLineEdit":
            assert annotation == "str", (name, annotation)
        elif cls == "QSpinBox":
            assert annotation.startswith("Annotated[int") or annotation == "int", (name, annotation)
        else:
            raise AssertionError(f"{name}: no parameterNodeWrapper connector for {cls}")


def test_every_mrml_widget_receives_the_scene():
    root = ui_tree()
    mrml = {n for n, w in ui_widgets().items() if w.get("class") in ("qMRMLNodeComboBox", "qMRMLSegmentSelectorWidget")}
    receivers = {
        c.findtext("receiver")
        for c in root.iter("connection")
        if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
        and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    assert mrml and mrml == receivers


def test_segment_selector_is_multi_selection_and_output_can_be_new():
    widgets = ui_widgets()
    assert ui_property(widgets["trainingSegmentSelector"], "multiSelection") == "true"
    output = widgets["outputSegmentationSelector"]
    assert (
        ui_property(output, "noneEnabled") == "true" and ui_property(output, "noneDisplay") == "Create new segmentation"
    )


def render_panel(path: Path) -> QtGui.QImage:
    """Render the panel offscreen with example content (Slicer fills these from the scene at run time)."""
    panel = load_panel()
    panel.findChild(QtWidgets.QComboBox, "inputVolumeSelector").addItem("CT abdomen")
    panel.findChild(QtWidgets.QComboBox, "modelSelector").addItem("liver_spleen_5slices (vit_b, 2 classes)")
    panel.findChild(QtWidgets.QComboBox, "deviceSelector").addItems(["auto", "cuda", "cpu"])
    panel.findChild(QtWidgets.QComboBox, "outputSegmentationSelector").addItem("Create new segmentation")
    panel.findChild(QtWidgets.QComboBox, "baseModelSelector").addItem("SAM ViT-B (new adapter)")
    selector = panel.findChild(QtWidgets.QWidget, "trainingSegmentSelector")
    selector.node.addItem("my labels")
    for name in ("liver", "spleen"):
        item = QtWidgets.QListWidgetItem(name)
        item.setCheckState(QtCore.Qt.Checked)
        selector.segments.addItem(item)
    panel.findChild(QtWidgets.QLabel, "labeledSlicesLabel").setText("5 slices (K index): 8, 12, 16, 20, 24")
    panel.findChild(QtWidgets.QLineEdit, "adapterNameLineEdit").setText("liver_spleen_5slices")
    panel.findChild(QtWidgets.QPushButton, "segmentButton").setEnabled(True)
    finetune = panel.findChild(QtWidgets.QPushButton, "finetuneButton")
    finetune.setText("Fine-tune on these 5 labeled slices")
    finetune.setEnabled(True)
    panel.findChild(QtWidgets.QProgressBar, "progressBar").setValue(40)
    panel.findChild(QtWidgets.QLabel, "lossLabel").setText("step 120: loss 0.2143, held-out Dice 0.812")
    panel.findChild(QtWidgets.QLabel, "statusLabel").setText("finetune 120/300, about 1 min 30 s left")
    table = panel.findChild(QtWidgets.QTableWidget, "adaptersTable")
    table.setRowCount(1)
    for column, text in enumerate(["liver_spleen_5slices", "vit_b", "liver, spleen", "2025-06-01T10:12:00Z"]):
        table.setItem(0, column, QtWidgets.QTableWidgetItem(text))
    table.resizeColumnsToContents()
    panel.findChild(QtWidgets.QLabel, "checkpointStatusLabel").setText(
        "Base SAM checkpoint (ViT-B): ~/.hfsam/checkpoints/sam_vit_b_01ec64.pth"
    )
    panel.findChild(QtWidgets.QPushButton, "downloadCheckpointButton").setEnabled(False)
    panel.resize(520, 960)  # grows to the layout's minimum size if that is larger
    panel.show()
    for _ in range(3):  # layouts settle over a few passes (word-wrapped labels need their width first)
        panel.layout().activate()
        app().processEvents()
    image = panel.grab().toImage()
    assert image.save(str(path)), f"could not write {path}"
    panel.close()
    return image


def test_panel_renders(tmp_path):
    image = render_panel(tmp_path / "panel.png")
    assert image.width() >= 520 and image.height() >= 960
    assert QtGui.QImage(str(tmp_path / "panel.png")).size() == image.size()
    colours = {image.pixel(x, y) for x in range(0, image.width(), 7) for y in range(0, image.height(), 7)}
    assert len(colours) > 20, "the rendered panel is blank"
    assert SCREENSHOT.is_file(), "run `python Testing/test_ui.py --screenshot` to create the README screenshot"


# -- the module file -------------------------------------------------------------------------------------


def test_module_metadata_and_citation():
    text = MODULE_FILE.read_text(encoding="utf-8")
    assert re.search(r'self\.parent\.title = _\("HF-SAM Segment"\)', text)
    assert 'translate("qSlicerAbstractCoreModule", "Segmentation")' in text
    for needle in ("Liu &amp; Xu", "104389", "Computer Vision and Image Understanding 258 (2025)", "Kirillov et al."):
        assert needle in text, needle
    classes = {n.name: [ast.unparse(b) for b in n.bases] for n in module_ast().body if isinstance(n, ast.ClassDef)}
    assert classes == {
        "HFSAMSegment": ["ScriptedLoadableModule"],
        "HFSAMSegmentWidget": ["ScriptedLoadableModuleWidget"],
        "HFSAMSegmentLogic": ["ScriptedLoadableModuleLogic", "ModuleLogic"],
        "HFSAMSegmentTest": ["ScriptedLoadableModuleTest"],
    }
    wrapper = next(
        n for n in parsed(PARAMETERS_FILE).body if isinstance(n, ast.ClassDef) and n.name == "HFSAMSegmentParameterNode"
    )
    assert [ast.unparse(d) for d in wrapper.decorator_list] == ["parameterNodeWrapper"]


def test_the_module_file_is_thin():
    """Only the four classes Slicer looks for, each a few lines; the behaviour lives in HFSAMSegmentLib."""
    tree = module_ast()
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef)]
    assert [c.name for c in classes] == ["HFSAMSegment", "HFSAMSegmentWidget", "HFSAMSegmentLogic", "HFSAMSegmentTest"]
    assert [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))] == []
    for cls in classes:
        methods = [m for m in cls.body if isinstance(m, ast.FunctionDef)]
        assert len(methods) <= 6, (cls.name, [m.name for m in methods])
        for method in methods:
            body_lines = method.end_lineno - method.body[0].lineno + 1
            limit = 25 if (cls.name, method.name) == ("HFSAMSegment", "__init__") else 12  # metadata texts
            assert body_lines <= limit, f"{cls.name}.{method.name} has {body_lines} lines"
    assert len(MODULE_FILE.read_text(encoding="utf-8").splitlines()) <= 130


HEAVY = {"torch", "torchvision", "segment_anything", "HFSAMCore", "safetensors"}


def imports_of(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


SLICER_APP_ONLY = {"parameters", "slicer_host"}  # need Slicer's own Python (parameterNodeWrapper, qt)
MRML_FACING = {
    "mrml_adapter",
    "selftest",
    "panel",
}  # (library_section is plain Python)  # import slicer/vtk (slicer-core in CI)


def test_no_heavy_imports_and_no_qt_in_lib():
    lib_files = sorted(LIB_DIR.glob("*.py"))
    for path in [MODULE_FILE, *lib_files]:
        assert imports_of(path, top_level_only=False) & HEAVY == set(), f"{path.name} imports the engine or torch"
    for path in lib_files:
        if path.stem not in SLICER_APP_ONLY:
            assert imports_of(path, top_level_only=False) & {"qt", "ctk", "PySide6", "PyQt5", "PythonQt"} == set(), (
                path.name
            )
        if path.stem not in MRML_FACING | SLICER_APP_ONLY:
            assert imports_of(path, top_level_only=True) & {"slicer", "vtk", "vtkmodules"} == set(), (
                f"{path.name} touches MRML"
            )
    # Slicer imports every scripted module at start-up: keep its top level light.
    assert imports_of(MODULE_FILE, top_level_only=True) <= {"slicer", "HFSAMSegmentLib"}
    lib_at_start = {
        n.module for n in module_ast().body if isinstance(n, ast.ImportFrom) and n.module.startswith("HFSAMSegmentLib")
    }
    assert lib_at_start == {"HFSAMSegmentLib.logic", "HFSAMSegmentLib.terminology"}


def test_lib_pieces_import_without_mrml_or_simpleitk_or_torch():
    """What Slicer imports at start-up (logic, terminology) and the pieces CI uses without MRML stay light:
    the backbone registry comes from HFSAMCore, and nothing heavy with it."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import HFSAMSegmentLib.progress_parser, HFSAMSegmentLib.process_runner, HFSAMSegmentLib.engine_command,"
        " HFSAMSegmentLib.library_bridge, HFSAMSegmentLib.installer, HFSAMSegmentLib.terminology,"
        " HFSAMSegmentLib.logic, HFSAMSegmentLib.backbones, HFSAMSegmentLib.child_process;"
        "assert HFSAMSegmentLib.backbones.pretrained();"
        "print(sorted(m for m in ('slicer', 'vtk', 'SimpleITK', 'torch', 'numpy', 'HFSAMCore.model.backbone',"
        " 'HFSAMCore.store.library') if m in sys.modules), 'HFSAMCore.model.registry' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(MODULE_DIR)], capture_output=True, text=True, check=True, cwd=MODULE_DIR
    )
    assert done.stdout.strip() == "[] True"


def test_module_code_parses_as_python_3_9():
    """Slicer 5.8 runs Python 3.9.10: no 3.10+ syntax (match, parenthesised context managers, ...) in the module,
    and every `X | Y` annotation is postponed (PEP 563) where the file uses one."""
    files = [
        MODULE_FILE,
        *sorted(LIB_DIR.glob("*.py")),
        REPO / "HFSAMCore" / "model" / "registry.py",
        REPO / "HFSAMCore" / "errors.py",
    ]
    for path in files:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text, filename=str(path), feature_version=(3, 9))
        postponed = any(
            isinstance(n, ast.ImportFrom) and n.module == "__future__" and any(a.name == "annotations" for a in n.names)
            for n in tree.body
        )
        for node in ast.walk(tree):
            annotation = getattr(node, "annotation", None) or getattr(node, "returns", None)
            if annotation is not None and any(
                isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(annotation)
            ):
                assert postponed, (
                    f"{path.name}:{node.lineno} uses `X | Y` in an annotation "
                    "without `from __future__ import annotations`"
                )


# -- packaging ---------------------------------------------------------------------------------------


def cmake_list(text: str, variable: str) -> list[str]:
    block = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S).group(1)
    return [line.strip().replace("${MODULE_NAME}", "HFSAMSegment") for line in block.splitlines() if line.strip()]


def test_module_cmakelists_lists_every_script_and_resource():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    scripts, resources = cmake_list(text, "MODULE_PYTHON_SCRIPTS"), cmake_list(text, "MODULE_PYTHON_RESOURCES")
    on_disk = sorted(str(p.relative_to(MODULE_DIR)) for p in MODULE_DIR.rglob("*.py") if "__pycache__" not in p.parts)
    assert sorted(scripts) == on_disk
    resources_on_disk = sorted(
        str(p.relative_to(MODULE_DIR)) for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file()
    )
    assert sorted(resources) == resources_on_disk
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    assert "slicerMacroBuildScriptedModule(" in text


def test_extension_cmakelists_and_s4ext_agree():
    top = (REPO / "CMakeLists.txt").read_text()
    assert "add_subdirectory(HFSAMSegment)" in top
    for needle in (
        "file(GLOB_RECURSE HFSAMCORE_PYTHON_SCRIPTS",  # every engine module, in every stage folder
        "HFSAMCore/*.py",
        "Resources/*.json",
        "ctkMacroCompilePythonScript(",
        "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}",
    ):
        assert needle in top, needle
    meta = dict(re.findall(r'set\((EXTENSION_\w+) "([^"]*)"\)', top))
    s4ext = {}
    for line in (REPO / "HFSAMExtension.s4ext").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            s4ext[key] = value.strip()
    for key in (
        "scm",
        "scmurl",
        "scmrevision",
        "depends",
        "homepage",
        "contributors",
        "category",
        "iconurl",
        "status",
        "description",
        "screenshoturls",
        "enabled",
    ):
        assert s4ext.get(key), f"s4ext lacks {key}"
    assert s4ext["scm"] == "git" and s4ext["scmrevision"] == "main" and s4ext["enabled"] == "1"
    assert s4ext["category"] == meta["EXTENSION_CATEGORY"] == "Segmentation"
    assert s4ext["depends"] == meta["EXTENSION_DEPENDS"] == "PyTorch"
    assert s4ext["homepage"] == meta["EXTENSION_HOMEPAGE"] and s4ext["scmurl"].startswith(meta["EXTENSION_HOMEPAGE"])
    assert s4ext["iconurl"] == meta["EXTENSION_ICONURL"] and s4ext["iconurl"].endswith("Resources/Icons/HFSAM.png")
    assert s4ext["screenshoturls"].endswith("Resources/Screenshots/panel.png")


def test_icons_are_128_pixel_pngs():
    for path in (REPO / "Resources" / "Icons" / "HFSAM.png", MODULE_DIR / "Resources" / "Icons" / "HFSAMSegment.png"):
        image = QtGui.QImage(str(path))
        assert not image.isNull() and (image.width(), image.height()) == (128, 128), path


if __name__ == "__main__":
    if "--screenshot" in sys.argv:
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        render_panel(SCREENSHOT)
        print(f"wrote {SCREENSHOT}")
    else:
        print(__doc__)


def test_extensions_index_entry_follows_the_catalog_schema_and_agrees_with_cmake_and_s4ext():
    """The Extensions Index reads <name>.json (schema slicer-extension-catalog-entry-schema-v1.0.1), whose
    name must equal the top-level project() name; its checks also want LF endings and a known category."""
    top = (REPO / "CMakeLists.txt").read_text()
    project = re.search(r"^project\(\s*(\w+)", top, re.M).group(1)
    path = REPO / f"{project}.json"
    assert project == "HFSAMExtension" and path.is_file() and (REPO / f"{project}.s4ext").is_file()
    raw = path.read_bytes()
    assert b"\r" not in raw and raw.endswith(b"\n")
    entry = json.loads(raw)
    allowed = {
        "$schema": str,
        "category": str,
        "scm_url": str,
        "scm_revision": str,
        "scm_type": str,
        "build_dependencies": list,
        "build_subdirectory": str,
        "enabled": bool,
        "tier": int,
    }
    assert set(entry) <= set(allowed) and {"$schema", "category", "scm_url"} <= set(entry)
    assert all(isinstance(entry[k], allowed[k]) for k in entry) and 1 <= entry["tier"] <= 5
    assert entry["$schema"].endswith("/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json#")
    s4ext = dict(
        line.split(" ", 1)
        for line in (REPO / f"{project}.s4ext").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    meta = dict(re.findall(r'set\((EXTENSION_\w+) "([^"]*)"\)', top))
    assert entry["category"] == s4ext["category"] == meta["EXTENSION_CATEGORY"] == "Segmentation"
    assert entry["scm_url"] == s4ext["scmurl"] and entry["scm_revision"] == s4ext["scmrevision"]
    assert entry["build_dependencies"] == s4ext["depends"].split() == meta["EXTENSION_DEPENDS"].split()
    assert entry["build_subdirectory"] == s4ext["build_subdirectory"]
    repository = entry["scm_url"].rstrip("/").rsplit("/", 1)[-1].removesuffix(".git")
    assert repository.startswith("Slicer") and not project.lower().startswith("slicer")  # the index's naming rules
    assert "PLACEHOLDER" in top and "PLACEHOLDER" in (REPO / f"{project}.s4ext").read_text()
