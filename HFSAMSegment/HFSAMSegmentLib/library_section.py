"""The panel's Model library section: adapters, base checkpoints, and what the engine says about them.

Part of ``panel.Panel`` (which owns it as ``panel.library``): it reads the
library in the background (``models list``, then ``models path``), fills the
adapters table, runs import / export / remove, and downloads or imports base
checkpoints with a progress dialog. It tells the panel when the library was
read (``panel.on_library_read``), so the model selectors follow.
"""

from __future__ import annotations

from . import backbones
from .progress_parser import format_seconds

ADAPTER_FILTER = "HF-SAM adapter (*.safetensors);;All files (*)"


class LibrarySection:
    def __init__(self, panel) -> None:
        self.panel = panel
        self.ui, self.logic, self.host = panel.ui, panel.logic, panel.host
        self.adapters = []  # the library's adapter summaries (`models list`)
        self.path = None  # the library folder, once `models path` answered
        self.installed_checkpoints = set()  # catalog keys of the base checkpoints in the library
        self.download = None  # the running checkpoint download/import, if any
        self._dialog = None
        self._error = ""
        self._reading = False
        self._refresh_again = False
        self._pending_select = self._pending_offer = None

    def connect(self) -> None:
        connect, ui = self.host.connect, self.ui
        connect(ui.refreshLibraryButton, "clicked(bool)", lambda *_: self.refresh())
        connect(ui.importAdapterButton, "clicked(bool)", lambda *_: self.on_import_adapter())
        connect(ui.exportAdapterButton, "clicked(bool)", lambda *_: self.on_export_adapter())
        connect(ui.removeAdapterButton, "clicked(bool)", lambda *_: self.on_remove_adapter())
        connect(ui.downloadCheckpointButton, "clicked(bool)", lambda *_: self.on_download_checkpoint())
        connect(ui.importCheckpointButton, "clicked(bool)", lambda *_: self.on_import_checkpoint())

    def _run(self, *args, on_done) -> None:
        self.panel.run_in_background(self.logic.library.start(*args, on_done=on_done))

    def refresh(self, select=None, then_offer_segment=None) -> None:
        """Read the library in the background (`models list`, then `models path`); the panel updates when they answer.

        ``select``: the model to pick once the list is in; ``then_offer_segment``: an adapter to offer segmenting with.
        """
        self._pending_select = select or self._pending_select
        self._pending_offer = then_offer_segment or self._pending_offer
        if self._reading:
            self._refresh_again = True  # answered by a second read once this one is done
            return
        self._reading = True
        self.panel.run_in_background(self.logic.library.start("list", on_done=self._on_adapter_list))

    def _on_adapter_list(self, payload, status, message) -> None:
        if payload is not None and isinstance(payload.get("adapters"), list):
            self.adapters = [e for e in payload["adapters"] if isinstance(e, dict)]
            self._error = ""
        else:
            self.adapters = []
            self._error = message
        self._fill_adapter_table()
        self.panel.on_library_read()
        self.panel.run_in_background(self.logic.library.start("path", on_done=self._on_library_path))

    def _on_library_path(self, payload, status, message) -> None:
        self.path = payload.get("path") if payload else None
        if self.path:
            self.installed_checkpoints = self.logic.library.installed_checkpoints(self.path)
            self.ui.libraryPathLabel.setText(f"Library folder: {self.path}")
        else:
            self.ui.libraryPathLabel.setText(
                f"The model library cannot be read yet ({self._error or message}). "
                "Click Segment or Fine-tune to check the Python packages."
            )
        self._reading = False
        self.panel.on_library_read()
        if self._refresh_again:
            self._refresh_again = False
            self.refresh()
            return
        select, offer = self._pending_select, self._pending_offer
        self._pending_select = self._pending_offer = None
        self.panel.after_library_read(select, offer)

    def _fill_adapter_table(self) -> None:
        table = self.ui.adaptersTable
        table.setRowCount(len(self.adapters))
        for row, entry in enumerate(self.adapters):
            cells = [
                entry.get("name", ""),
                entry.get("backbone", "?"),
                ", ".join(entry.get("classes", [])),
                entry.get("created", "") if "error" not in entry else "unreadable: " + str(entry["error"]),
            ]
            for column, text in enumerate(cells):
                table.setItem(row, column, self.host.table_item(str(text)))
        table.resizeColumnsToContents()

    def _selected_adapter(self):
        row = self.ui.adaptersTable.currentRow()
        if row < 0 or row >= len(self.adapters):
            self.host.warning("Select an adapter in the table first.")
            return None
        return self.adapters[row]["name"]

    def _library_done(self, what):
        def on_done(payload, status, message):
            if payload is None:
                self.panel.set_status(f"{what} failed: {message}")
                self.host.error(f"{what} failed.\n\n{message}")
            else:
                adapter = payload.get("adapter") or {}
                self.panel.set_status(f"{what}: '{adapter.get('name', '')}' {adapter.get('path', '')}".strip())
            self.refresh()

        return on_done

    def on_import_adapter(self) -> None:
        path = self.host.open_file("Import adapter", ADAPTER_FILTER)
        if path:
            self._run("import", path, on_done=self._library_done("Import"))

    def on_export_adapter(self) -> None:
        name = self._selected_adapter()
        if not name:
            return
        path = self.host.save_file("Export adapter", f"{name}.safetensors", ADAPTER_FILTER)
        if path:
            # The save dialog already asked whether to replace an existing file.
            self._run("export", name, path, "--overwrite", on_done=self._library_done("Export"))

    def on_remove_adapter(self) -> None:
        name = self._selected_adapter()
        if name and self.host.confirm(f"Delete adapter '{name}' from the model library?"):
            self._run("remove", name, on_done=self._library_done("Remove"))

    # -- base checkpoints -----------------------------------------------------------------------------------------
    def update_checkpoint_status(self) -> None:
        backbone = self.panel.base_backbone()
        info = backbones.info(backbone) if backbone else None
        if info is None or info.checkpoint is None or self.path is None:
            self.ui.checkpointStatusLabel.setText(
                "Base checkpoint: (the model library has not been read yet)"
                if self.path is None
                else "Base checkpoint: none needed"
            )
            self.ui.downloadCheckpointButton.setEnabled(False)
            return
        path = self.logic.library.checkpoint_file(info.checkpoint, self.path)
        available = path is not None or self.logic.checkpointAvailable(backbone, self.path)
        if path is not None:
            text = f"{info.title}: {path}"
        elif available:
            text = f"{info.title}: comes with its Python package, copied into the library on first use"
        else:
            text = f"{info.title}: not in the library (needed to fine-tune from it). Download it, or import a copy."
        self.ui.checkpointStatusLabel.setText(text)
        self.ui.downloadCheckpointButton.setText(f"Download {info.name}")
        self.ui.downloadCheckpointButton.setEnabled(not available and self.download is None)

    def on_download_checkpoint(self) -> None:
        backbone = self.panel.base_backbone()
        if not backbone or self.download is not None or not self.panel.ensure_dependencies():
            return
        self._run_checkpoint_task(
            f"Downloading the {backbone} checkpoint (checked by SHA256)...",
            lambda **cb: self.logic.library.download_checkpoint(backbone, **cb),
        )

    def on_import_checkpoint(self) -> None:
        path = self.ui.checkpointPathLineEdit.currentPath
        if not path:
            self.host.warning("Choose the checkpoint file (.pth) first.")
            return
        if self.download is not None or not self.panel.ensure_dependencies():
            return
        self._run_checkpoint_task(
            f"Importing {path} (checking its SHA256)...", lambda **cb: self.logic.library.import_checkpoint(path, **cb)
        )

    def _run_checkpoint_task(self, label, start) -> None:
        def on_event(event):
            if event["event"] == "progress" and event["fraction"] is not None and self._dialog is not None:
                self._dialog.setValue(int(round(100 * event["fraction"])))
                if event.get("eta_s") is not None:
                    self._dialog.setLabelText(f"{label}\nabout {format_seconds(event['eta_s'])} left")

        def on_finished(result):
            self.download = None
            self.close_dialog()
            if result.status == "cancelled":
                self.panel.set_status("Cancelled; a partial download is kept and resumed next time.")
            elif not result.ok:
                self.host.error(result.message, details=result.stderr_tail)
            else:
                self.panel.set_status("Base checkpoint ready.")
            self.refresh()

        self._dialog = self.host.progress_dialog(label, "HF-SAM model library")
        with self.panel.reported("Could not start."):
            self.download = start(on_event=on_event, on_finished=on_finished)
            self.host.connect(self._dialog, "canceled()", self.download.cancel)
            self.panel.run_in_background(self.download)
        if self.download is None:  # it could not start: never leave the dialog on screen
            self.close_dialog()
        self.update_checkpoint_status()

    def close_dialog(self) -> None:
        if self._dialog is not None:
            self._dialog.close()
            self._dialog = None
