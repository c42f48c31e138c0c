"""Stand-ins for Slicer's widget classes, so that PySide6's QUiLoader can build the module's panel.

The ONLY widget fakes of the test suite: ctk* and qMRML* widgets exist only inside Slicer (C++
classes wrapped by PythonQt), not in PySide6. Each look-alike has just the properties, methods and
signals the panel uses (named as in CTK and Slicer, which Testing/test_slicer_compat.py checks
against Slicer's sources); it implements no MRML behaviour.
"""

from __future__ import annotations

import os
import types

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6 import QtCore, QtWidgets  # noqa: E402
from PySide6.QtCore import Property, Signal  # noqa: E402
from PySide6.QtUiTools import QUiLoader  # noqa: E402


class ctkCollapsibleButton(QtWidgets.QGroupBox):  # noqa: N801 - must carry Slicer's class name
    """Stand-in: a titled box (Slicer's collapses; the title is its 'text' property)."""

    contentsCollapsed = Signal(bool)

    def _text(self):
        return self.title()

    def _set_text(self, value):
        self.setTitle(("\u25b8 " if self._collapsed else "\u25be ") + value)

    def _get_collapsed(self):
        return self._collapsed

    def setCollapsed(self, value):
        self._collapsed = bool(value)
        self.contentsCollapsed.emit(self._collapsed)

    _collapsed = False
    text = Property(str, _text, _set_text)
    collapsed = Property(bool, _get_collapsed, setCollapsed)


class qMRMLWidget(QtWidgets.QWidget):  # noqa: N801
    """Stand-in: the panel's top-level widget."""


class qMRMLNodeComboBox(QtWidgets.QComboBox):  # noqa: N801
    """Stand-in: a node selector (shows one placeholder item)."""


class qMRMLSegmentSelectorWidget(QtWidgets.QWidget):  # noqa: N801
    """Stand-in: a segmentation selector plus a checkable segment list."""

    currentNodeChanged = Signal(object)
    segmentSelectionChanged = Signal(list)

    def __init__(self, parent=None):
        super().__init__(parent)
        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.node = QtWidgets.QComboBox()
        self.segments = QtWidgets.QListWidget()
        self.segments.setFixedHeight(52)
        layout.addWidget(self.node)
        layout.addWidget(self.segments)
        self._current = None
        self._selected = []

    def setCurrentNode(self, node):
        if node is not self._current:
            self._current = node
            self.currentNodeChanged.emit(node)

    def currentNode(self):
        return self._current

    def setSelectedSegmentIDs(self, ids):
        if list(ids) != self._selected:
            self._selected = list(ids)
            self.segmentSelectionChanged.emit(list(ids))

    def selectedSegmentIDs(self):
        return list(self._selected)


class ctkPathLineEdit(QtWidgets.QLineEdit):  # noqa: N801
    """Stand-in: a path field ('currentPath' is its property in CTK)."""

    def _path(self):
        return self.text()

    currentPath = Property(str, _path, QtWidgets.QLineEdit.setText)


STAND_INS = (ctkCollapsibleButton, qMRMLWidget, qMRMLNodeComboBox, qMRMLSegmentSelectorWidget, ctkPathLineEdit)


def app():
    return QtWidgets.QApplication.instance() or QtWidgets.QApplication([])


def load_panel(ui_file):
    app()
    loader = QUiLoader()
    for cls in STAND_INS:
        loader.registerCustomWidget(cls)
    handle = QtCore.QFile(str(ui_file))
    assert handle.open(QtCore.QFile.ReadOnly)
    try:
        widget = loader.load(handle)
    finally:
        handle.close()
    assert widget is not None, loader.errorString()
    return widget


def child_widget_variables(widget):
    """What slicer.util.childWidgetVariables returns: every named child widget as an attribute."""
    return types.SimpleNamespace(
        **{w.objectName(): w for w in widget.findChildren(QtWidgets.QWidget) if w.objectName()}
    )
