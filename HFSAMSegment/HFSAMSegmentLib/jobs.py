"""The two long jobs of the panel, without Qt: Segment and Fine-tune.

Each job is: write the inputs to a private temporary folder (mrml_adapter),
run one engine command in a child process (ProcessRunner), and when it ends
bring the result back into the scene (mrml_adapter) or report why not. The
temporary folder is removed in every case, so a cancelled or failed run leaves
nothing behind.

The widget drives a job with a QTimer calling ``poll()``; tests and the
self-test call ``wait()``. Either way the MRML work after the run happens in
the caller's thread (ProcessRunner's rule), never in a reader thread.

The temporary folder lies under ``temp_root`` (Slicer's configured temporary
folder, ``slicer.app.temporaryPath``) and is never left behind:

- run ends (done, failed, cancelled): removed by the job;
- Slicer exits mid-run: ``stop_all()`` (called on ``aboutToQuit`` and from
  ``atexit``) stops the child and removes it;
- Slicer crashes mid-run: the child notices (parent_watch.py), stops, and
  removes it itself.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import mrml_adapter
from .engine_command import Engine
from .errors import UserInputError
from .process_runner import ProcessRunner, RunResult
from .terminology import Terminology


@dataclass
class JobOutcome:
    status: str  # "done", "bad_input", "cancelled", "error" (ProcessRunner's statuses)
    message: str = ""
    run: RunResult | None = None
    segmentation_node: object = None  # Segment: the node that holds the result
    adapter_name: str | None = None  # Fine-tune: the library entry written
    slices: list = field(default_factory=list)  # Fine-tune: slices trained on
    metrics: dict = field(default_factory=dict)  # Fine-tune: final loss, held-out Dice, ...

    @property
    def ok(self) -> bool:
        return self.status == "done"


_RUNNING: set = set()  # jobs started and not finished: what stop_all() stops


def stop_all(grace_s: float = 5.0) -> int:
    """Stop every running job and remove its folder (Slicer exits); returns how many were running."""
    jobs = list(_RUNNING)
    for job in jobs:
        job.stop(grace_s)
    return len(jobs)


atexit.register(stop_all)


class _Job:
    """Shared plumbing: temp folder, runner, completion in the caller's thread."""

    def __init__(
        self,
        engine: Engine,
        *,
        on_event=None,
        on_log=None,
        on_done: Callable[[JobOutcome], None] | None = None,
        temp_root: str | Path | None = None,
    ):
        self.engine = engine
        self.on_event = on_event
        self.on_log = on_log
        self.on_done = on_done
        self.temp_root = Path(temp_root) if temp_root else None  # None: the system's temporary folder
        self.workdir: Path | None = None
        self.runner: ProcessRunner | None = None
        self.outcome: JobOutcome | None = None

    def _start_runner(self, argv: Sequence[str]) -> None:
        self.runner = ProcessRunner(
            argv, env=self.engine.env(), on_event=self.on_event, on_log=self.on_log, on_finished=self._finished
        )
        _RUNNING.add(self)
        self.runner.start()

    def start(self) -> None:
        if self.temp_root is not None and not self.temp_root.is_dir():
            raise UserInputError(
                f"the temporary folder {self.temp_root} does not exist; "
                "choose another one in Slicer's Application Settings (General > Temporary directory)"
            )
        self.workdir = Path(tempfile.mkdtemp(prefix="hfsam-job-", dir=self.temp_root))
        try:
            self._prepare_and_run()
        except BaseException:
            self._cleanup()
            raise

    def _prepare_and_run(self) -> None:
        raise NotImplementedError

    def poll(self) -> bool:
        """Deliver progress; True while running. Call from the GUI thread (QTimer)."""
        return self.runner.poll() if self.runner else False

    def cancel(self) -> None:
        if self.runner:
            self.runner.cancel()

    def stop(self, grace_s: float = 5.0) -> None:
        """Cancel, wait for the child to be gone, remove the folder; deliver nothing (shutdown)."""
        if self.runner:
            self.runner.stop(grace_s)
        self._cleanup()
        self.outcome = self.outcome or JobOutcome("cancelled", "stopped: Slicer is closing")

    def wait(self, timeout: float | None = None) -> JobOutcome:
        if self.runner is None:
            raise RuntimeError("start() the job first")
        self.runner.wait(timeout)
        assert self.outcome is not None
        return self.outcome

    @property
    def running(self) -> bool:
        return self.runner is not None and self.outcome is None

    def _finished(self, run: RunResult) -> None:
        try:
            if run.ok:
                outcome = self._collect(run)
            else:
                outcome = JobOutcome(run.status, run.message, run)
        except UserInputError as exc:
            outcome = JobOutcome("bad_input", str(exc), run)
        except Exception as exc:  # noqa: BLE001 - reported to the user, never lost in a callback
            outcome = JobOutcome("error", f"{type(exc).__name__}: {exc}", run)
        finally:
            self._cleanup()
        if self.outcome is not None:  # stopped meanwhile (scene closed, Slicer exits): nobody waits for it
            return
        self.outcome = outcome
        if self.on_done:
            self.on_done(outcome)

    def _collect(self, run: RunResult) -> JobOutcome:
        raise NotImplementedError

    def _cleanup(self) -> None:
        _RUNNING.discard(self)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


class SegmentJob(_Job):
    """Volume node -> engine ``segment`` -> segmentation node."""

    def __init__(
        self,
        engine: Engine,
        scene,
        volume_node,
        model_args: Sequence[str],
        *,
        device: str = "auto",
        output_node=None,
        segmentation_name: str | None = None,
        terminology: Terminology | None = None,
        batch_size: int | None = None,
        **callbacks,
    ):
        super().__init__(engine, **callbacks)
        if volume_node is None:
            raise UserInputError("no input volume selected; pick the volume to segment")
        if scene is None:
            raise UserInputError(f"volume '{volume_node.GetName()}' is not in a scene; add it to the scene first")
        self.scene = scene
        self.volume_node = volume_node
        self.model_args = list(model_args)
        self.device = device
        self.output_node = output_node
        self.segmentation_name = segmentation_name
        self.terminology = terminology
        self.batch_size = batch_size

    def _prepare_and_run(self) -> None:
        image = mrml_adapter.export_volume(self.volume_node, self.workdir / "image.nrrd")
        self.output_path = self.workdir / "segmentation.nrrd"
        self._start_runner(
            self.engine.segment(
                image,
                self.output_path,
                self.model_args,
                device=self.device,
                batch_size=self.batch_size,
                job_dir=self.workdir,
            )
        )

    def _collect(self, run: RunResult) -> JobOutcome:
        if self.volume_node.GetScene() is not self.scene or (
            self.output_node is not None and self.output_node.GetScene() is not self.scene
        ):
            # The scene was closed (or the node deleted) while the engine ran: never import into another scene.
            return JobOutcome(
                "cancelled",
                "the input volume or the output segmentation left the scene during the run; nothing was imported",
                run,
            )
        result = run.result or {}
        output = Path(result.get("output") or self.output_path)
        sidecar = result.get("sidecar") or mrml_adapter.sidecar_path(output)
        node = mrml_adapter.import_segmentation(
            output,
            self.scene,
            self.volume_node,
            sidecar=sidecar,
            segmentation_node=self.output_node,
            name=self.segmentation_name,
            terminology=self.terminology,
        )
        return JobOutcome("done", "", run, segmentation_node=node)


class FinetuneJob(_Job):
    """Volume + painted segments -> engine ``finetune --name`` -> a new adapter in the library."""

    def __init__(
        self,
        engine: Engine,
        volume_node,
        segmentation_node,
        segment_ids: Sequence[str],
        adapter_name: str,
        *,
        model_args: Sequence[str] = (),
        steps: int | None = None,
        minutes: float | None = None,
        device: str = "auto",
        seed: int | None = None,
        overwrite: bool = False,
        **callbacks,
    ):
        super().__init__(engine, **callbacks)
        if volume_node is None:
            raise UserInputError("no volume selected; pick the volume your labeled slices belong to")
        if not adapter_name or not adapter_name.strip():
            raise UserInputError("no adapter name given; type a name for the new model (e.g. liver_5slices)")
        self.volume_node = volume_node
        self.segmentation_node = segmentation_node
        self.segment_ids = list(segment_ids)
        self.adapter_name = adapter_name.strip()
        self.model_args = list(model_args)
        self.steps = steps
        self.minutes = minutes
        self.device = device
        self.seed = seed
        self.overwrite = overwrite
        self.labels: mrml_adapter.TrainingLabels | None = None

    def _prepare_and_run(self) -> None:
        self.labels = mrml_adapter.export_training_labels(
            self.segmentation_node, self.segment_ids, self.volume_node, self.workdir / "labels.nrrd"
        )
        image = mrml_adapter.export_volume(self.volume_node, self.workdir / "image.nrrd")
        argv = self.engine.finetune(
            image,
            self.labels.path,
            slices=self.labels.slices,
            classes=self.labels.class_names,
            model_args=self.model_args,
            name=self.adapter_name,
            steps=self.steps,
            minutes=self.minutes,
            device=self.device,
            seed=self.seed,
            job_dir=self.workdir,
        )
        if self.overwrite:
            argv.append("--overwrite")
        self._start_runner(argv)

    def _collect(self, run: RunResult) -> JobOutcome:
        result = run.result or {}
        metrics = {k: result[k] for k in ("final_loss", "heldout_dice", "steps", "seconds") if k in result}
        return JobOutcome(
            "done",
            "",
            run,
            adapter_name=result.get("name") or self.adapter_name,
            slices=list(result.get("slices") or (self.labels.slices if self.labels else [])),
            metrics=metrics,
        )
