"""The model library as the panel sees it: list, import, export, remove adapters; base checkpoints.

Choice made here: every operation runs the engine's command line
(``python -m HFSAMCore models ...``) instead of importing ``HFSAMCore.store.library``
into Slicer's process. Why:

- the module never imports the engine (docs/design.md): its dependencies
  (safetensors, torch) may be missing until the user agreed to install them, and
  the panel must still open to offer that;
- after an extension update or a pip install the child always runs the code on
  disk, with no stale modules in Slicer's process and no restart;
- one interface: the panel, the CLI user and CI call exactly the same commands,
  and the engine alone decides where the library is and how entries are stored.

The panel never waits for one: ``start()`` returns a running ``ProcessRunner``
whose result arrives through the panel's poll timer, so opening the module or
clicking Refresh never blocks Slicer (the blocking ``_run`` is for scripts and
tests). Long operations (checkpoint download or import, which hash gigabytes)
report progress events and can be cancelled.

The backbones offered for fine-tuning come from the engine's registry
(``backbones.py``), never from a list of our own.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import backbones
from .child_process import popen_options
from .engine_command import Engine
from .errors import UserInputError
from .process_runner import ProcessRunner, RunResult
from .progress_parser import parse_line


class EngineError(RuntimeError):
    """The engine failed for a reason that is not the user's input (exit code 1, crash)."""


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the panel's model selector: what the user sees and the engine arguments it means."""

    key: str  # stored in the parameter node: "adapter:NAME", "file:PATH", "base:BACKBONE", "test:tiny"
    label: str
    args: tuple[str, ...]
    classes: tuple[str, ...] = ()


def _tiny_test_args() -> tuple[str, ...]:
    tiny = next(b for b in backbones.registry().BACKBONES.values() if b.test_only)
    return ("--checkpoint", "none", "--backbone", tiny.name, "--img-size", str(tiny.default_img_size))


# The random-weights test model: only for tests and the self-test (developer mode).
TINY_TEST_ARGS = _tiny_test_args()
BASE_PREFIX = "base:"


def base_key(backbone: str) -> str:
    return BASE_PREFIX + backbone


def backbone_of_key(key: str) -> str | None:
    """ "base:lite_medsam" -> "lite_medsam"; None for adapters, files and the test model."""
    return key[len(BASE_PREFIX) :] if key and key.startswith(BASE_PREFIX) else None


def default_base_key(installed_checkpoint_keys: Iterable[str]) -> str:
    """The "start from" a new adapter gets by default (the registry decides: LiteMedSAM without a SAM checkpoint)."""
    return base_key(backbones.default_backbone(installed_checkpoint_keys))


def model_choices(
    adapters: Sequence[dict], *, for_finetune: bool = False, developer: bool = False
) -> list[ModelChoice]:
    """Selector entries: library adapters (unreadable ones left out), every pretrained backbone for fine-tuning,
    the tiny test model in developer mode."""
    choices: list[ModelChoice] = []
    if for_finetune:
        for info in backbones.pretrained():
            choices.append(
                ModelChoice(base_key(info.name), f"{info.title}: new adapter", backbones.model_args(info.name))
            )
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
        self._catalog = None  # ((path, mtime), checkpoints) of the last catalog read

    def _run(self, *args: str) -> dict:
        """Run ``models <args> --progress json`` and wait; return the payload of its result event (scripts, tests)."""
        argv = self.engine.models(*args)
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
                **popen_options(),
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

    def start(
        self, *args: str, on_done: Callable[[dict | None, str, str], None], on_event=None, watched: bool = False
    ) -> ProcessRunner:
        """Start ``models <args>`` in the background; returns the runner (poll it from the GUI thread).

        ``on_done(payload, status, message)``: the result event (None unless status is "done"), the
        runner's status ("done", "bad_input", "cancelled", "error") and its one-line message.
        """

        def finished(run: RunResult) -> None:
            if run.ok and run.result is None:
                on_done(
                    None, "error", f"'models {args[0]}' sent no result event; is the engine older than this module?"
                )
            else:
                on_done(run.result if run.ok else None, run.status, run.message)

        runner = ProcessRunner(
            self.engine.models(*args, watched=watched), env=self.engine.env(), on_event=on_event, on_finished=finished
        )
        runner.start()
        return runner

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
    def catalog(self) -> dict:
        """The engine's checkpoint catalog; {} if unreadable.

        Read from $HFSAM_CATALOG, else from Resources/models.json beside HFSAMCore.
        """
        catalog_file = Path(
            self.engine.env().get("HFSAM_CATALOG")
            or ((self.engine.engine_dir or Path(".")) / "Resources" / "models.json")
        )
        try:
            stamp = (str(catalog_file), catalog_file.stat().st_mtime_ns)
            if self._catalog is None or self._catalog[0] != stamp:  # the panel asks at every GUI update
                checkpoints = json.loads(catalog_file.read_text(encoding="utf-8"))["checkpoints"]
                self._catalog = (stamp, checkpoints if isinstance(checkpoints, dict) else {})
        except (OSError, ValueError, KeyError, TypeError):
            return {}
        return self._catalog[1]

    def checkpoint_file(self, key: str, library_path: str | Path) -> Path | None:
        """The base checkpoint ``key`` in ``library_path``/checkpoints; None if absent or not the catalog's size.

        Reads the catalog and the folder by the engine's rules
        (``ModelLibrary.checkpoint_path``); the SHA256 was verified when the file
        was downloaded or imported. No child process: the library path comes
        from an earlier ``models path``.
        """
        entry = self.catalog().get(key)
        if not isinstance(entry, dict) or not entry.get("filename"):
            return None
        path = Path(library_path) / "checkpoints" / entry["filename"]
        if not path.is_file() or (entry.get("size") and path.stat().st_size != entry["size"]):
            return None
        return path

    def installed_checkpoints(self, library_path: str | Path) -> set[str]:
        """Catalog keys of the base checkpoints present in the library."""
        return {key for key in self.catalog() if self.checkpoint_file(key, library_path) is not None}

    def checkpoint_status(self, backbone: str = "vit_b") -> Path | None:
        """Blocking variant of ``checkpoint_file`` (runs ``models path``): for scripts and tests."""
        info = backbones.info(backbone)
        key = info.checkpoint if info is not None else backbone
        return self.checkpoint_file(key, self.library_path()) if key else None

    def download_checkpoint(
        self,
        backbone: str = "vit_b",
        *,
        on_event: Callable[[dict], None] | None = None,
        on_finished: Callable[[RunResult], None] | None = None,
    ) -> ProcessRunner:
        """A started runner that downloads (or resumes) the checkpoint, verified by SHA256; Cancel keeps the .part."""
        names = [b.name for b in backbones.pretrained()]
        if backbone not in names:
            raise UserInputError(f"unknown backbone {backbone!r}; choose one of {', '.join(names)}")
        return self._start(["download", backbone], on_event, on_finished)

    def import_checkpoint(
        self,
        file: str | Path,
        *,
        on_event: Callable[[dict], None] | None = None,
        on_finished: Callable[[RunResult], None] | None = None,
    ) -> ProcessRunner:
        """A started runner that copies a local checkpoint into the library, identifying it by its SHA256."""
        if not Path(file).is_file():
            raise UserInputError(f"{file} does not exist; pick the downloaded checkpoint (.pth) file")
        return self._start(["import-checkpoint", str(file)], on_event, on_finished)

    def _start(self, args: list[str], on_event, on_finished) -> ProcessRunner:
        runner = ProcessRunner(
            self.engine.models(*args, watched=True), env=self.engine.env(), on_event=on_event, on_finished=on_finished
        )
        runner.start()
        return runner
