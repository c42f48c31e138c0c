"""The Slicer application, as the panel needs it: dialogs, timers, settings, folders, signals.

The only Lib module that needs Slicer's GUI (``qt``, ``slicer.app``,
``slicer.util``'s dialogs), so it is imported only inside Slicer. CI gives the
panel a recording stand-in with the same methods (Testing/test_panel.py).
"""

from __future__ import annotations

import contextlib
import os

import qt
import slicer

from .panel import Panel
from .terminology import register_terminology


def create_panel(widget: ScriptedLoadableModuleWidget, logic) -> Panel:  # noqa: F821 - Slicer's class, by name
    """Load the .ui into the module widget (a ScriptedLoadableModuleWidget) and hand it to a set-up Panel."""
    ui_widget = slicer.util.loadUI(widget.resourcePath("UI/HFSAMSegment.ui"))
    widget.layout.addWidget(ui_widget)
    ui_widget.setMRMLScene(slicer.mrmlScene)
    host = SlicerHost(widget.parent)
    panel = Panel(slicer.util.childWidgetVariables(ui_widget), logic, host, slicer.mrmlScene)
    panel.setup()
    host.on_quit(panel.cleanup)  # a run in progress is stopped and its temporary files removed
    register_terminology()  # again, for a module added after start-up (does nothing when already loaded)
    return panel


class SlicerHost:
    def __init__(self, parent=None) -> None:
        self.parent = parent  # the module panel: dialogs are centred on it

    # -- signals and timers ----------------------------------------------------------------------
    @staticmethod
    def connect(widget, signature: str, slot) -> None:
        widget.connect(signature, slot)

    @staticmethod
    def timer(interval_ms: int, callback, single_shot: bool = False):
        timer = qt.QTimer()
        timer.setInterval(interval_ms)
        timer.setSingleShot(single_shot)
        timer.connect("timeout()", callback)
        return timer

    @staticmethod
    def on_quit(callback) -> None:
        slicer.app.connect("aboutToQuit()", callback)

    # -- dialogs -----------------------------------------------------------------------------------------
    def confirm(self, text: str, title: str = "HF-SAM") -> bool:
        return slicer.util.confirmYesNoDisplay(text, windowTitle=title, parent=self.parent)

    def error(self, text: str, title: str = "HF-SAM", details: str = "") -> None:
        # (Slicer only logs it in testing mode, so a self-test never hangs on a modal box.)
        extra = {"detailedText": details} if details else {}
        slicer.util.errorDisplay(text, windowTitle=title, parent=self.parent, **extra)

    def warning(self, text: str) -> None:
        slicer.util.warningDisplay(text, windowTitle="HF-SAM", parent=self.parent)

    def progress_dialog(self, label: str, title: str):
        return slicer.util.createProgressDialog(
            parent=self.parent, value=0, maximum=100, labelText=label, windowTitle=title
        )

    @staticmethod
    @contextlib.contextmanager
    def busy():
        slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
        try:
            yield
        finally:
            slicer.app.restoreOverrideCursor()

    def open_file(self, title: str, name_filter: str) -> str:
        return qt.QFileDialog.getOpenFileName(self.parent, title, self.documents_folder(), name_filter) or ""

    def save_file(self, title: str, file_name: str, name_filter: str) -> str:
        return (
            qt.QFileDialog.getSaveFileName(
                self.parent, title, os.path.join(self.documents_folder(), file_name), name_filter
            )
            or ""
        )

    # -- widgets and views --------------------------------------------------------------------------------
    @staticmethod
    def table_item(text: str):
        return qt.QTableWidgetItem(text)

    @staticmethod
    def show_volume(volume) -> None:
        if volume is not None:
            slicer.util.setSliceViewerLayers(background=volume)

    # -- settings and folders -----------------------------------------------------------------------------
    @staticmethod
    def developer_mode() -> bool:
        return slicer.util.settingsValue("Developer/DeveloperMode", False, converter=slicer.util.toBool)

    @staticmethod
    def temp_root() -> str:
        """Slicer's temporary folder (Application Settings > General), where jobs put their files."""
        return slicer.app.temporaryPath

    @staticmethod
    def documents_folder() -> str:
        """Where file dialogs open: the user's documents, never Slicer's installation folder."""
        return qt.QStandardPaths.writableLocation(qt.QStandardPaths.DocumentsLocation)
