"""Where the engine is and how to call it: the argv of every engine command.

The module never imports HFSAMCore (it imports torch and SAM); it runs
``<python> -m HFSAMCore <command> ... --progress json`` as a child process.
This file is the single place that knows the command line, so the panel, the
self-test and the CI tests build exactly the same commands.

Long commands (segment, finetune, checkpoint download/import) run through
``parent_watch.py``, which stops the engine and removes the job's folder when
Slicer exits or crashes mid-run (the runner holds the child's stdin as a
lifeline); quick library commands run the engine directly.

Layouts where HFSAMCore is found (the folder that *contains* HFSAMCore/):
- source tree:  <repo>/HFSAMCore beside <repo>/HFSAMSegment/
- installed extension: <...>/qt-scripted-modules/HFSAMCore beside HFSAMSegment.py
  (the extension's CMakeLists.txt installs it there).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

DEVICES = ("auto", "cuda", "cpu")
PARENT_WATCH = Path(__file__).resolve().with_name("parent_watch.py")


def find_engine_dir(start: Path | None = None) -> Path | None:
    """The folder that contains ``HFSAMCore/__init__.py``, looking from this file upwards (3 levels)."""
    here = Path(start or __file__).resolve()
    for folder in [here, *here.parents][:4]:
        if (folder / "HFSAMCore" / "__init__.py").is_file():
            return folder
    return None


def find_python() -> str:
    """The interpreter for the child: Slicer's own Python (PythonSlicer) inside Slicer, else this one.

    Inside Slicer ``sys.executable`` is the application, not a Python that
    accepts ``-m``; ``PythonSlicer`` is the launcher for Slicer's Python
    environment (the one the installer puts torch and SAM into).
    """
    return shutil.which("PythonSlicer") or sys.executable


@dataclass(frozen=True)
class Engine:
    """How to start the engine: which Python, where HFSAMCore lies, which model library."""

    python: str
    engine_dir: Path | None = None  # None: HFSAMCore is an installed package of ``python``
    library: Path | None = None  # None: the engine's default library (a per-user folder)

    @classmethod
    def locate(cls, python: str | None = None, library: str | Path | None = None) -> Engine:
        return cls(python or find_python(), find_engine_dir(), Path(library) if library else None)

    def argv(self, *args: str, watched: bool = False, job_dir: str | Path | None = None) -> list[str]:
        """``python -m HFSAMCore ARGS``; ``watched``: under parent_watch.py (needs a runner holding stdin),
        which removes ``job_dir`` if the parent dies."""
        head = [self.python]
        if watched:
            head += [str(PARENT_WATCH), *(["--remove", str(job_dir)] if job_dir else [])]
        return [*head, "-m", "HFSAMCore", *[str(a) for a in args]]

    def env(self, base: dict | None = None) -> dict:
        """The child's environment: HFSAMCore importable, output unbuffered, UTF-8."""
        env = dict(os.environ if base is None else base)
        if self.engine_dir is not None:
            parts = [str(self.engine_dir)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
            env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))  # no duplicates, order kept
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONIOENCODING"] = "utf-8"
        return env

    def library_args(self) -> list[str]:
        return ["--library", str(self.library)] if self.library else []

    # -- commands ---------------------------------------------------------------
    def segment(
        self,
        image: str | Path,
        output: str | Path,
        model_args: Sequence[str],
        *,
        device: str = "auto",
        classes: str | None = None,
        batch_size: int | None = None,
        overwrite: bool = False,
        job_dir: str | Path | None = None,
    ) -> list[str]:
        """argv of ``segment IMAGE -o OUT`` (writes OUT and its sidecar OUT-with-.json)."""
        _check_device(device)
        args = ["segment", str(image), "-o", str(output), *model_args, "--device", device]
        if classes:
            args += ["--classes", classes]
        if batch_size:
            args += ["--batch-size", str(int(batch_size))]
        if overwrite:
            args.append("--overwrite")
        return self.argv(*args, *self.library_args(), "--progress", "json", watched=True, job_dir=job_dir)

    def finetune(
        self,
        image: str | Path,
        labels: str | Path,
        adapter_out: str | Path | None = None,
        *,
        slices: Iterable[int] | str = "auto",
        classes: Sequence[str] = (),
        model_args: Sequence[str] = (),
        name: str | None = None,
        steps: int | None = None,
        minutes: float | None = None,
        device: str = "auto",
        seed: int | None = None,
        job_dir: str | Path | None = None,
    ) -> list[str]:
        """argv of ``finetune IMAGE LABELS [-o ADAPTER] [--name NAME]``: a file, a library entry, or both."""
        _check_device(device)
        if adapter_out is None and not name:
            raise ValueError("finetune needs an output file (adapter_out) or a library name (name)")
        slice_text = slices if isinstance(slices, str) else ",".join(str(int(s)) for s in slices)
        args = ["finetune", str(image), str(labels)]
        if adapter_out is not None:
            args += ["-o", str(adapter_out)]
        args += ["--slices", slice_text]
        if classes:
            args += ["--classes", ",".join(classes)]
        args += list(model_args)
        if steps is not None:
            args += ["--steps", str(int(steps))]
        elif minutes is not None:
            args += ["--minutes", f"{float(minutes):g}"]
        args += ["--device", device]
        if seed is not None:
            args += ["--seed", str(int(seed))]
        if name:
            args += ["--name", name]
        return self.argv(*args, *self.library_args(), "--progress", "json", watched=True, job_dir=job_dir)

    def models(self, *args: str, watched: bool = False) -> list[str]:
        """argv of ``models <args> --progress json``.

        For list, import, export, remove, download, import-checkpoint and path.
        """
        return self.argv("models", *args, *self.library_args(), "--progress", "json", watched=watched)


def _check_device(device: str) -> None:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, not {device!r}")
