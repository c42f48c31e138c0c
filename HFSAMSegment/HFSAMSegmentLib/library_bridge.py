"""The model library as the panel sees it: list, import, export, remove adapters; base checkpoints.

Choice made here: every operation runs the engine's command line
(``python -m HFSAMCore models ...``) instead of importing ``HFSAMCore.library``
into Slicer's process. Why:

- the module never imports the engine (DESIGN.md): its dependencies
  (safetensors, torch) may be missing until the user agreed to install them, and
  the panel must still open to offer that;
- after an extension update or a pip install the child always runs the code on
  disk, with no stale modules in Slicer's process and no restart;
- one interface: the panel, the CLI user and CI call exactly the same commands,
  and the engine alone decides where the library is and how entries are stored.

The cost is a Python start-up (a fraction of a second) per click, acceptable for
a list or an import. Long operations (checkpoint download or import, which hash
gigabytes) run through ``ProcessRunner`` with progress events and Cancel.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .engine_command import Engine
from .errors import UserInputError
from .process_runner import ProcessRunner, RunResult
from .progress_parser import parse_line

BACKBONES = ("vit_b", "vit_l", "vit_h")


class EngineError(RuntimeError):
    """The engine failed for a reason that is not the user's input (exit code 1, crash)."""


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the panel's model selector: what the user sees and the engine arguments it means."""

    key: str  # stored in the parameter node: "adapter:NAME", "file:PATH", "base:vit_b", "test:tiny"
    label: str
    args: tuple[str, ...]
    classes: tuple[str, ...] = ()


# The random-weights tiny model: only for tests and the self-test (developer mode).
TINY_TEST_ARGS = ("--checkpoint", "none", "--backbone", "tiny", "--img-size", "224")


def model_choices(adapters: Sequence[dict], *, for_finetune: bool = False, developer: bool = False) -> list[ModelChoice]:
    """Selector entries: library adapters (unreadable ones left out), base SAM for fine-tuning, tiny test model."""
    choices: list[ModelChoice] = []
    if for_finetune:
        choices.append(ModelChoice("base:vit_b", "SAM ViT-B (new adapter)", ("--backbone", "vit_b")))
    for entry in adapters:
        if "error" in entry or not entry.get("name"):
            continue
        classes = tuple(str(c) for c in entry.get("classes", []))
        detail = f"{entry.get('backbone', '?')}, {len(classes)} classes"
        label = f"continue training {entry['name']} ({detail})" if for_finetune else f"{entry['name']} ({detail})"
        choices.append(ModelChoice(f"adapter:{entry['name']}", label, ("--adapter", entry["name"]), classes))
    if developer:
        extra = () if for_finetune else ("--classes", "synapse")
        choices.append(ModelChoice("test:tiny", "Tiny random model (tests only)", TINY_TEST_ARGS + extra))
    return choices


def adapter_file_choice(path: str | Path) -> ModelChoice:
    path = Path(path)
    return ModelChoice(f"file:{path}", f"{path.name} (file)", ("--adapter", str(path)))


def _error_message(stdout: str, stderr: str, code: int) -> str:
    """The engine's one-line reason: its error event, else its 'hfsam: error:' line, else the last stderr line."""
    for line in reversed(stdout.splitlines()):
        event = parse_line(line)
        if event and event["event"] == "error":
            return event["message"]
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if "error:" in line:
            return line.split("error:", 1)[1].strip()
    return lines[-1] if lines else f"the engine stopped with exit code {code}"


class LibraryBridge:
    """Runs ``models`` commands of the engine and returns plain Python values."""

    def __init__(self, engine: Engine, *, timeout_s: float = 120.0):
        self.engine = engine
        self.timeout_s = timeout_s

    def _run(self, *args: str) -> dict:
        """Run ``models <args> --progress json``; return the payload of its result event."""
        argv = self.engine.models(*args, "--progress", "json")
        try:
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                encoding="utf-8",
                errors="replace",
                env=self.engine.env(),
                timeout=self.timeout_s,
            )
        except OSError as exc:
            raise EngineError(f"could not start {argv[0]}: {exc}") from exc
        except subprocess.TimeoutExpired as exc:
            raise EngineError(f"'models {args[0]}' did not finish in {self.timeout_s:.0f} s") from exc
        if done.returncode == 2:
            raise UserInputError(_error_message(done.stdout, done.stderr, 2))
        if done.returncode != 0:
            raise EngineError(_error_message(done.stdout, done.stderr, done.returncode))
        for line in reversed(done.stdout.splitlines()):
            event = parse_line(line)
            if event and event["event"] == "result":
                return event
        raise EngineError(f"'models {args[0]}' sent no result event; is the engine older than this module?")

    # -- adapters --------------------------------------------------------------
    def list_adapters(self) -> list[dict]:
        """Summaries of the library's adapters (name, path, backbone, img_size, classes, created, metrics)."""
        adapters = self._run("list").get("adapters")
        if not isinstance(adapters, list):
            raise EngineError("'models list' did not return a list of adapters")
        return [entry for entry in adapters if isinstance(entry, dict)]

    def import_adapter(self, file: str | Path, name: str | None = None, *, overwrite: bool = False) -> str:
        """Copy an adapter file into the library; returns the entry's name (the engine's choice without ``name``)."""
        args = ["import", str(file)] + (["--name", name] if name else []) + (["--overwrite"] if overwrite else [])
        return str(self._run(*args)["adapter"]["name"])

    def export_adapter(self, name: str, dest: str | Path, *, overwrite: bool = False) -> Path:
        """Copy a library adapter to ``dest`` (a file, or a folder); returns the file written."""
        args = ["export", name, str(dest)] + (["--overwrite"] if overwrite else [])
        return Path(self._run(*args)["adapter"]["path"])

    def remove_adapter(self, name: str) -> None:
        self._run("remove", name)

    def library_path(self) -> Path:
        return Path(self._run("path")["path"])

    # -- base checkpoints ---------------------------------------------------------
    def checkpoint_status(self, backbone: str = "vit_b") -> Path | None:
        """The base checkpoint file if the library has it (of the catalog's size), else None.

        Reads the catalog and looks in the library's checkpoints/ folder, by the
        engine's rules (``ModelLibrary.checkpoint_path``: catalog from
        $HFSAM_CATALOG, else Resources/models.json; same size as the catalog
        says); the SHA256 was verified when the file was downloaded or imported.
        The engine's ``models list`` reports adapters only, hence this.
        """
        catalog_file = self.engine.env().get("HFSAM_CATALOG") or (
            (self.engine.engine_dir or Path(".")) / "Resources" / "models.json"
        )
        catalog_file = Path(catalog_file)
        try:
            entry = json.loads(catalog_file.read_text(encoding="utf-8"))["checkpoints"][backbone]
        except (OSError, ValueError, KeyError):
            return None
        path = self.library_path() / "checkpoints" / entry["filename"]
        if not path.is_file() or (entry.get("size") and path.stat().st_size != entry["size"]):
            return None
        return path

    def download_checkpoint(
        self,
        backbone: str = "vit_b",
        *,
        on_event: Callable[[dict], None] | None = None,
        on_finished: Callable[[RunResult], None] | None = None,
    ) -> ProcessRunner:
        """A started runner that downloads (or resumes) the checkpoint, verified by SHA256; Cancel keeps the .part."""
        if backbone not in BACKBONES:
            raise UserInputError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
        return self._start(["download", backbone], on_event, on_finished)

    def import_checkpoint(
        self,
        file: str | Path,
        *,
        on_event: Callable[[dict], None] | None = None,
        on_finished: Callable[[RunResult], None] | None = None,
    ) -> ProcessRunner:
        """A started runner that copies a local SAM checkpoint into the library, checking its SHA256."""
        if not Path(file).is_file():
            raise UserInputError(f"{file} does not exist; pick the downloaded sam_vit_*.pth file")
        return self._start(["import-checkpoint", str(file)], on_event, on_finished)

    def _start(self, args: list[str], on_event, on_finished) -> ProcessRunner:
        argv = self.engine.models(*args, "--progress", "json")
        runner = ProcessRunner(argv, env=self.engine.env(), on_event=on_event, on_finished=on_finished)
        runner.start()
        return runner
