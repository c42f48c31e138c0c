"""Issue 6, "nothing lost, nobody let in": bad input, interrupted and concurrent runs, untrusted files.

Every case of the issue is a row of docs/robustness.md, and every row points at a
test here or at one elsewhere that already covers it. Everything is real: the
`hfsam` command line in child processes, files written by SimpleITK, torch and
safetensors, real signals, real file-size limits (RLIMIT_FSIZE) for a full disk,
a real second user for a read-only folder. Only CUDA out-of-memory is simulated
(CI has no GPU): the model's forward raises torch's own ``OutOfMemoryError``.

The model is the tiny random-init test configuration at 64 px, so a child process
costs about its torch import; refusals that need no model come before torch is
imported and cost a fraction of a second.
"""

from __future__ import annotations

import ast
import atexit
import copy
import hashlib
import io
import json
import os
import pickle
import queue
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_volume import _copy_dicom_with_series_uid

from HFSAMCore.errors import InputError, OutOfMemory, one_line
from HFSAMCore.runtime.progress import Progress
from HFSAMCore.store.adapter_metadata import METADATA_KEY, validate_metadata
from HFSAMCore.store.adapters import load_adapter, read_metadata, save_adapter
from HFSAMCore.store.library import ModelLibrary, validate_name

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "HFSAMSegment"))  # the Slicer module's pure-Python helpers

from HFSAMSegmentLib import progress_parser  # noqa: E402 - importable only through the sys.path entry above

TINY = ("--checkpoint", "none", "--backbone", "tiny", "--img-size", "64")
SERIES_A, SERIES_B = "1.2.826.0.1.3680043.8.498.1001", "1.2.826.0.1.3680043.8.498.1002"
LOG_PREFIXES = ("warning:", "training on ")  # informational stderr lines; everything else is the error
NOBODY = 65534


# =============================================================================== helpers
def _env(home: Path) -> dict:
    # No .pyc writes: a file-size limit must hit our output, not Python's byte-code cache.
    # One thread: the tiny model gains nothing from more, and on busy CI cores OpenMP
    # threads waiting for each other make each run many times slower.
    return dict(os.environ, HFSAM_HOME=str(home), PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")


# `hfsam` as user 'nobody': Python starts as root (its installation may be unreadable to
# nobody), imports the command line, drops to nobody, then runs main() as `-m HFSAMCore` does.
AS_NOBODY = (
    f"import os, sys; from HFSAMCore import cli, io, store, runtime, model; from HFSAMCore.cli import app; "
    f"import HFSAMCore.io.read, HFSAMCore.io.write, HFSAMCore.io.outputs, HFSAMCore.store.library; "
    f"os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY}); sys.exit(cli.main(sys.argv[1:]))"
)
# `hfsam` that the kernel kills (SIGXFSZ) when a file outgrows RLIMIT_FSIZE. Python ignores
# SIGXFSZ from its start, so the default action is restored before main() runs.
KILLABLE_BY_FILE_SIZE = (
    "import signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_DFL); "
    "from HFSAMCore.cli import main; sys.exit(main(sys.argv[1:]))"
)


def hfsam(args, *, home: Path, timeout: float = 300, as_nobody: bool = False, **popen) -> subprocess.CompletedProcess:
    launcher = ["-c", AS_NOBODY] if as_nobody else ["-m", "HFSAMCore"]
    return subprocess.run(
        [sys.executable, *launcher, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(home),
        cwd=REPO,
        **popen,
    )


def events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def _file_limit(limit: int):
    """preexec_fn: no file of the child may grow past ``limit`` bytes. Python ignores SIGXFSZ,
    so a write past it fails with EFBIG, as on a full disk; under KILLABLE_BY_FILE_SIZE the
    kernel kills the child right in the middle of that write instead."""

    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a killed child leaves no core file

    return apply


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> SHA256 of every file below ``folder`` (hidden ones too)."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []


def same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-6)
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
    )


class Child:
    """`hfsam ... --progress json` in the background; its events are read as they come."""

    def __init__(self, args, *, home: Path, log: Path, launcher=("-m", "HFSAMCore"), **popen):
        self.log = log
        with open(log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, *launcher, *map(str, args), "--progress", "json"],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=_env(home),
                cwd=REPO,
                **popen,
            )
        self.events: list[dict] = []
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def wait_for(self, wanted, timeout: float = 300) -> dict | None:
        """Read events until ``wanted(event)``; None if the process ended first."""
        while (line := self._lines.get(timeout=timeout)) is not None:
            self.events.append(json.loads(line))
            if wanted(self.events[-1]):
                return self.events[-1]
        return None

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout)
        while (line := self._lines.get(timeout=timeout)) is not None:
            self.events.append(json.loads(line))
        return code, self.log.read_text()


def _step(stage: str, done: int):
    return lambda e: e.get("event") == "progress" and e.get("stage") == stage and e.get("done", -1) >= done


# =============================================================================== inputs
class _RunsCode:
    """Unpickling this object runs code: it creates the marker file. A safe loader must refuse it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _small(array: np.ndarray, spacing=(3.0, 3.0, 3.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing[: img.GetDimension()])
    return img


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, ct3mm, ctdicom) -> Path:
    """Every bad input of the table, made from the real sample CT, plus a small trained adapter."""
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    ct = sitk.ReadImage(str(ct3mm / "image.nii.gz"))
    synapse = sitk.ReadImage(str(ct3mm / "labels_synapse8.nii.gz"))
    syn = sitk.GetArrayFromImage(synapse)

    (d / "no_dicom").mkdir()
    (d / "no_dicom" / "notes.txt").write_text("a folder without DICOM files\n")
    (d / "two_series").mkdir()
    files = sorted((ctdicom / "dicom").glob("*.dcm"))
    for i, f in enumerate(files[:2]):
        _copy_dicom_with_series_uid(f, d / "two_series" / f"a{i}.dcm", SERIES_A)
    for i, f in enumerate(files[5:8]):
        _copy_dicom_with_series_uid(f, d / "two_series" / f"b{i}.dcm", SERIES_B)

    (d / "text.nii.gz").write_text("this is a text file, not an image\n")
    whole = (ct3mm / "image.nii.gz").read_bytes()
    (d / "truncated.nii.gz").write_bytes(whole[: len(whole) * 6 // 10])
    sitk.WriteImage(ct, str(d / "full.nii"), useCompression=False)
    raw = (d / "full.nii").read_bytes()
    (d / "full.nii").unlink()
    (d / "truncated.nii").write_bytes(raw[: len(raw) * 6 // 10])
    vol = rng.normal(0, 100, (8, 16, 16)).astype(np.float32)
    sitk.WriteImage(sitk.JoinSeries([_small(vol), _small(vol + 1)]), str(d / "4d.nii.gz"))
    rgb = sitk.GetImageFromArray(rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(d / "rgb.nrrd"))
    sitk.WriteImage(_small(vol[0]), str(d / "2d.nii.gz"))
    sitk.WriteImage(_small(np.full((8, 16, 16), -1000, np.int16)), str(d / "constant.nii.gz"))
    nan, inf = vol.copy(), vol.copy()
    nan[4, 8, 8] = np.nan
    inf[1, 2, 3] = np.inf
    sitk.WriteImage(_small(nan), str(d / "nan.nii.gz"))
    sitk.WriteImage(_small(inf), str(d / "inf.nrrd"))

    elsewhere = sitk.Image(synapse)
    elsewhere.SetOrigin(tuple(np.add(synapse.GetOrigin(), (5000.0, 0.0, 0.0))))  # 5 m away
    sitk.WriteImage(elsewhere, str(d / "labels_elsewhere.nii.gz"))

    def labels_like(array: np.ndarray, name: str) -> None:
        img = sitk.GetImageFromArray(array.astype(np.uint8))
        img.CopyInformation(synapse)
        sitk.WriteImage(img, str(d / name))

    liver = syn == 5
    labels_like(liver, "labels_liver.nii.gz")
    sparse = np.zeros_like(liver)
    sparse[10:13] = liver[10:13]  # only slices 10, 11 and 12 painted
    labels_like(sparse, "labels_sparse.nii.gz")
    labels_like(np.zeros_like(liver), "labels_empty.nii.gz")
    # A long volume (300 slices) for interrupting a segmentation mid-run: the sample CT 10 times over.
    long = sitk.GetImageFromArray(np.tile(sitk.GetArrayViewFromImage(ct), (10, 1, 1)))
    long.SetSpacing(ct.GetSpacing())
    long.SetOrigin(ct.GetOrigin())
    long.SetDirection(ct.GetDirection())
    sitk.WriteImage(long, str(d / "long.nrrd"), useCompression=False)

    import torch

    from HFSAMCore.model.hfsam import ModelSpec, build_hfsam

    torch.save({"fc.weight": torch.zeros(2, 2)}, d / "not_sam.pth")
    torch.save(build_hfsam(ModelSpec("tiny", 64, 1, 2)).state_dict(), d / "sam_tiny.pth")
    data = (d / "sam_tiny.pth").read_bytes()
    (d / "sam_tiny.pth").unlink()
    (d / "truncated_sam.pth").write_bytes(data[: len(data) // 2])
    torch.save({"image_encoder.patch_embed.proj.weight": _RunsCode(d / "pwned_by_checkpoint")}, d / "evil.pth")
    (d / "evil.safetensors").write_bytes(pickle.dumps({"lora": _RunsCode(d / "pwned_by_adapter")}))

    # A real adapter (1 class, liver) from the real command, and one whose tensors lie about its rank.
    proc = hfsam(
        [
            "finetune",
            ct3mm / "image.nii.gz",
            d / "labels_liver.nii.gz",
            "-o",
            d / "liver.safetensors",
            "--classes",
            "liver",
            *TINY,
            "--steps",
            "2",
            "--holdout",
            "0",
            "--batch-size",
            "2",
        ],
        home=d / "library",
    )
    assert proc.returncode == 0, proc.stderr
    shutil.rmtree(d / "library", ignore_errors=True)
    tensors, meta = load_adapter(d / "liver.safetensors")
    save_adapter(d / "forged_rank.safetensors", tensors, {**meta, "rank": 3})
    return d


@pytest.fixture(scope="module")
def inputs_state(inputs) -> dict[str, str]:
    return snapshot(inputs)


# =============================================================================== bad input
@dataclass(frozen=True)
class Row:
    id: str
    args: tuple
    expect: tuple  # fragments of the one error line
    how: str = "plain"  # plain | read-only | disk-full
    existing: tuple = ()  # files in the output folder before the run (they must survive untouched)


def _seg(src: str, *more: str, out: str = "{out}/seg.nrrd") -> tuple:
    return ("segment", src, "-o", out, *TINY, *more)


def _ft(labels: str, *more: str) -> tuple:
    return (
        "finetune",
        "{ct}/image.nii.gz",
        labels,
        "-o",
        "{out}/a.safetensors",
        *TINY,
        "--steps",
        "2",
        "--holdout",
        "0",
        *more,
    )


def _with_adapter(adapter: str, *more: str) -> tuple:
    return ("segment", "{ct}/image.nii.gz", "-o", "{out}/seg.nrrd", "--adapter", adapter, *more)


def _with_checkpoint(checkpoint: str) -> tuple:
    return (
        "segment",
        "{ct}/image.nii.gz",
        "-o",
        "{out}/seg.nrrd",
        "--checkpoint",
        checkpoint,
        "--backbone",
        "tiny",
        "--img-size",
        "64",
    )


ROWS = [
    Row("missing-path", _seg("{inp}/no_such_scan.nii.gz"), ("does not exist",)),
    Row("folder-without-dicom", _seg("{inp}/no_dicom"), ("no DICOM series",)),
    Row(
        "dicom-two-series",
        _seg("{inp}/two_series"),
        ("holds 2 DICOM series", f"{SERIES_A} (2 files", f"{SERIES_B} (3 files", "::SERIES_UID"),
    ),
    Row("text-as-nifti", _seg("{inp}/text.nii.gz"), ("text.nii.gz is a text file", "not a NIfTI")),
    Row("truncated-nifti-gz", _seg("{inp}/truncated.nii.gz"), ("truncated",)),
    Row("truncated-nifti", _seg("{inp}/truncated.nii"), ("truncated",)),
    Row("4d-image", _seg("{inp}/4d.nii.gz"), ("4D image",)),
    Row("rgb-image", _seg("{inp}/rgb.nrrd"), ("3 components per voxel",)),
    Row("2d-image", _seg("{inp}/2d.nii.gz"), ("2D image",)),
    Row("constant-volume", _seg("{inp}/constant.nii.gz"), ("blank", "-1000")),
    Row("nan-voxels", _seg("{inp}/nan.nii.gz"), ("NaN or infinite",)),
    Row("inf-voxels", _seg("{inp}/inf.nrrd"), ("NaN or infinite",)),
    Row(
        "labels-elsewhere",
        _ft("{inp}/labels_elsewhere.nii.gz", "--classes", "synapse"),
        ("do not overlap in physical space",),
    ),
    Row(
        "labels-unknown-to-adapter",
        (
            "finetune",
            "{ct}/image.nii.gz",
            "{ct}/labels_synapse8.nii.gz",
            "-o",
            "{out}/a.safetensors",
            "--adapter",
            "{inp}/liver.safetensors",
            "--steps",
            "2",
        ),
        ("labels hold value 8", "knows 1 class(es) (liver)"),
    ),
    Row(
        "labels-unknown-to-classes",
        _ft("{ct}/labels_synapse8.nii.gz", "--classes", "liver"),
        ("labels hold value 8", "only 1 class name", "'8:name'"),
    ),
    Row(
        "slices-outside",
        _ft("{inp}/labels_liver.nii.gz", "--classes", "liver", "--slices", "12,40"),
        ("slice 40 is outside the volume (0..29)",),
    ),
    Row(
        "slices-unlabeled",
        _ft("{inp}/labels_sparse.nii.gz", "--classes", "liver", "--slices", "10,20"),
        ("slice(s) 20 carry no label", "10, 11, 12"),
    ),
    Row(
        "slices-unreadable",
        _ft("{inp}/labels_liver.nii.gz", "--classes", "liver", "--slices", "10,x"),
        ("cannot read 'x'",),
    ),
    Row("zero-labeled-slices", _ft("{inp}/labels_empty.nii.gz", "--classes", "liver"), ("no labeled voxel",)),
    Row(
        "adapter-other-backbone",
        _with_adapter("{inp}/liver.safetensors", "--backbone", "vit_b"),
        ("trained for backbone tiny", "not --backbone vit_b"),
    ),
    Row(
        "adapter-other-size",
        _with_adapter("{inp}/liver.safetensors", "--img-size", "224"),
        ("img-size 64", "not --img-size 224"),
    ),
    Row("adapter-other-rank", _with_adapter("{inp}/liver.safetensors", "--rank", "8"), ("rank 5", "not --rank 8")),
    Row(
        "adapter-tensors-other-rank",
        _with_adapter("{inp}/forged_rank.safetensors"),
        ("tensors do not fit the model", "wrong shape"),
    ),
    Row(
        "adapter-other-base-checkpoint",
        _with_adapter("{inp}/liver.safetensors", "--checkpoint", "{inp}/not_sam.pth"),
        ("was trained on a random test model, not on", "drop --checkpoint"),
    ),
    Row("adapter-pickle-runs-code", _with_adapter("{inp}/evil.safetensors"), ("not a readable HF-SAM adapter",)),
    Row("checkpoint-not-sam", _with_checkpoint("{inp}/not_sam.pth"), ("not a SAM checkpoint",)),
    Row(
        "checkpoint-truncated",
        _with_checkpoint("{inp}/truncated_sam.pth"),
        ("not a loadable SAM checkpoint (damaged, truncated",),
    ),
    Row(
        "checkpoint-pickle-runs-code",
        _with_checkpoint("{inp}/evil.pth"),
        ("not a loadable SAM checkpoint", "could run code when loaded, so it was refused"),
    ),
    Row(
        "output-folder-missing",
        _seg("{ct}/image.nii.gz", out="{out}/missing/seg.nrrd"),
        ("output folder", "does not exist"),
    ),
    Row("output-folder-read-only", _seg("{ct}/image.nii.gz"), ("is not writable",), how="read-only"),
    Row(
        "library-name-escapes",
        (
            "finetune",
            "{ct}/image.nii.gz",
            "{inp}/labels_liver.nii.gz",
            "--name",
            "../../escaped",
            "--classes",
            "liver",
            *TINY,
            "--steps",
            "2",
        ),
        ("invalid library entry name",),
    ),
    Row(
        "disk-full-segment",
        _seg("{ct}/image.nii.gz", out="{out}/seg.nii"),
        ("could not write", "seg.nii"),
        how="disk-full",
    ),
    Row(
        "disk-full-segment-overwrite",
        _seg("{ct}/image.nii.gz", "--overwrite", out="{out}/seg.nii"),
        ("could not write",),
        how="disk-full",
        existing=("seg.nii", "seg.json"),
    ),
    Row(
        "disk-full-adapter",
        _ft("{inp}/labels_liver.nii.gz", "--classes", "liver"),
        ("cannot write", "a.safetensors", "File too large"),
        how="disk-full",
    ),
    Row(
        "disk-full-library",
        (
            "finetune",
            "{ct}/image.nii.gz",
            "{inp}/labels_liver.nii.gz",
            "--name",
            "liver",
            "--classes",
            "liver",
            *TINY,
            "--steps",
            "2",
            "--holdout",
            "0",
        ),
        ("cannot write", "liver.safetensors"),
        how="disk-full",
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row, inputs, inputs_state, ct3mm, tmp_path):
    """Exit 2, one error line (no traceback) that the JSON error event repeats, nothing written, inputs intact."""
    home = tmp_path / "library"
    popen = {}
    if row.how == "read-only":
        # Root ignores permission bits: the child then runs as 'nobody', which cannot write there.
        out = Path(tempfile.mkdtemp(prefix="hfsam-ro-"))
        out.chmod(0o555)
        if os.geteuid() == 0:
            popen = {"as_nobody": True}
            home = out / "library"  # never created: the run stops before it needs one
    else:
        out = tmp_path / "out"
        out.mkdir()
    if row.how == "disk-full":
        popen = {"preexec_fn": _file_limit(64_000)}
    for name in row.existing:
        (out / name).write_bytes(f"the previous result: {name}\n".encode())
    before = snapshot(out)
    args = [str(a).format(inp=inputs, ct=ct3mm, out=out) for a in row.args]
    try:
        proc = hfsam([*args, "--progress", "json"], home=home, **popen)
        after = snapshot(out)
    finally:
        if row.how == "read-only":
            out.chmod(0o755)
            shutil.rmtree(out)

    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith(LOG_PREFIXES)]
    assert len(lines) == 1 and lines[0].startswith("hfsam: error: "), proc.stderr
    message = lines[0][len("hfsam: error: ") :]
    for fragment in row.expect:
        assert fragment in message, message
    last = events(proc.stdout)[-1]
    assert last == {"event": "error", "message": message, "exit_code": 2}
    assert after == before  # nothing new, nothing changed, no temp or lock file left
    assert not (home / "adapters").exists() or os.listdir(home / "adapters") == []
    assert snapshot(inputs) == inputs_state  # inputs are never modified; no pickle ran (no marker file)


def test_the_rows_adapter_works_and_options_that_agree_with_it_are_fine(inputs, ct3mm, tmp_path):
    """The refusals above are not the tool refusing everything: the adapter the rows use segments,
    and explicit options that agree with it are accepted."""
    proc = hfsam(
        [
            "segment",
            ct3mm / "image.nii.gz",
            "-o",
            tmp_path / "seg.nrrd",
            "--adapter",
            inputs / "liver.safetensors",
            "--backbone",
            "tiny",
            "--img-size",
            "64",
        ],
        home=tmp_path / "lib",
    )
    assert proc.returncode == 0, proc.stderr
    seg = sitk.ReadImage(str(tmp_path / "seg.nrrd"))
    assert same_geometry(seg, sitk.ReadImage(str(ct3mm / "image.nii.gz")))
    assert json.loads((tmp_path / "seg.json").read_text())["classes"][0]["name"] == "liver"
    assert sorted(os.listdir(tmp_path)) == ["seg.json", "seg.nrrd"]


# =============================================================================== interrupted runs
def _finetune(steps: int, out: str = "{out}/a.safetensors", name: str = "liver") -> tuple:
    return (
        "finetune",
        "{ct}/image.nii.gz",
        "{inp}/labels_liver.nii.gz",
        "-o",
        out,
        "--name",
        name,
        "--classes",
        "liver",
        *TINY,
        "--steps",
        str(steps),
        "--holdout",
        "0",
        "--batch-size",
        "2",
    )


def _segment(source: str, out: str = "{out}/seg.nrrd", size: str = "64") -> tuple:
    return (
        "segment",
        source,
        "-o",
        out,
        "--checkpoint",
        "none",
        "--backbone",
        "tiny",
        "--img-size",
        size,
        "--batch-size",
        "1",
    )


@dataclass(frozen=True)
class Kill:
    id: str
    args: tuple
    signals: tuple  # sent one after the other once `when` matches
    when: object = None  # predicate on the progress events; None: no waiting (the file-size limit kills)
    outcome: str = "cancelled"  # cancelled | cancelled-or-complete | killed | killed-while-writing
    source: str = "{ct}/image.nii.gz"  # the image the outputs must match
    late: float = 0.0  # up to this many seconds of random extra delay before the signal
    freeze: bool = True  # stop the child (SIGSTOP) the moment `when` matches, so the signal lands right there


def _warning(e):
    return e.get("event") == "warning"


KILLS = [
    Kill("finetune-SIGINT-while-loading", _finetune(100_000), (signal.SIGINT,), _warning),
    Kill("finetune-SIGTERM-mid-training", _finetune(100_000), (signal.SIGTERM,), _step("finetune", 3)),
    Kill(
        "finetune-SIGINT-twice-mid-training", _finetune(100_000), (signal.SIGINT, signal.SIGINT), _step("finetune", 3)
    ),
    Kill(
        "finetune-SIGINT-after-last-step",
        _finetune(12),
        (signal.SIGINT,),
        _step("finetune", 12),
        "cancelled-or-complete",
    ),
    Kill("finetune-SIGKILL-while-loading", _finetune(100_000), (signal.SIGKILL,), _warning, "killed"),
    Kill("finetune-SIGKILL-mid-training", _finetune(100_000), (signal.SIGKILL,), _step("finetune", 3), "killed"),
    Kill(
        "finetune-SIGKILL-after-last-step",
        _finetune(12),
        (signal.SIGKILL,),
        _step("finetune", 12),
        "killed",
        late=0.05,
        freeze=False,
    ),
    Kill("finetune-killed-while-writing", _finetune(2), (), None, "killed-while-writing"),
    Kill(
        "segment-SIGINT-mid-run",
        _segment("{inp}/long.nrrd"),
        (signal.SIGINT,),
        _step("segment", 5),
        source="{inp}/long.nrrd",
    ),
    Kill(
        "segment-SIGTERM-mid-run",
        _segment("{inp}/long.nrrd"),
        (signal.SIGTERM,),
        _step("segment", 5),
        source="{inp}/long.nrrd",
    ),
    Kill(
        "segment-SIGINT-after-last-slice",
        _segment("{ct}/image.nii.gz"),
        (signal.SIGINT,),
        _step("segment", 30),
        "cancelled-or-complete",
    ),
    Kill(
        "segment-SIGKILL-mid-run",
        _segment("{inp}/long.nrrd"),
        (signal.SIGKILL,),
        _step("segment", 5),
        "killed",
        source="{inp}/long.nrrd",
    ),
    Kill(
        "segment-SIGKILL-after-last-slice",
        _segment("{ct}/image.nii.gz"),
        (signal.SIGKILL,),
        _step("segment", 30),
        "killed",
        late=0.05,
        freeze=False,
    ),
    Kill(
        "segment-killed-while-writing",
        _segment("{ct}/image.nii.gz", out="{out}/seg.nii"),
        (),
        None,
        "killed-while-writing",
    ),
]
KILL_LIMIT = 100_000  # bytes: above the sidecar and lock files, below the adapter (~440 kB) and seg.nii (370 kB)


def check_outputs(out: Path, home: Path, source: Path, *, leftovers_allowed: bool) -> list[str]:
    """Whatever exists under a final name is complete and valid; returns the final names present."""
    names = visible(out)
    assert set(names) <= {"a.safetensors", "seg.nrrd", "seg.nii", "seg.json"}, names
    if "a.safetensors" in names:
        tensors, meta = load_adapter(out / "a.safetensors")
        assert meta["name"] == "liver" and meta["classes"][0]["name"] == "liver" and len(tensors) > 50
    for seg in {"seg.nrrd", "seg.nii"} & set(names):
        labels = sitk.ReadImage(str(out / seg))
        assert same_geometry(labels, sitk.ReadImage(str(source))) and labels.GetPixelID() == sitk.sitkUInt8
        assert "seg.json" in names  # the label volume is renamed last: its sidecar is there
    if "seg.json" in names:
        assert json.loads((out / "seg.json").read_text())["run"]["axis"] == "axial"
    library = ModelLibrary(home)
    entries = library.list_adapters()  # the library stays readable
    assert all("error" not in e for e in entries), entries
    assert [e["name"] for e in entries] in ([], ["liver"])
    if not leftovers_allowed:
        assert hidden(out) == [] and hidden(library.adapters_dir) == []
    return names


@pytest.mark.parametrize("kill", KILLS, ids=[k.id for k in KILLS])
def test_interrupted_run_leaves_nothing_half_written(kill, inputs, ct3mm, tmp_path):
    out, home = tmp_path / "out", tmp_path / "library"
    out.mkdir()
    fill = {"inp": inputs, "ct": ct3mm, "out": out}
    args = [str(a).format(**fill) for a in kill.args]
    source = Path(kill.source.format(**fill))
    popen = {}
    if kill.outcome == "killed-while-writing":
        popen = {"preexec_fn": _file_limit(KILL_LIMIT), "launcher": ("-c", KILLABLE_BY_FILE_SIZE)}
    child = Child(args, home=home, log=tmp_path / "stderr.txt", **popen)
    try:
        if kill.when is not None:
            assert child.wait_for(kill.when) is not None, "the run ended before the point to interrupt it"
            if kill.freeze:
                child.proc.send_signal(signal.SIGSTOP)
            if kill.late:
                threading.Event().wait(random.Random(kill.id).uniform(0, kill.late))
            for sig in kill.signals:
                child.proc.send_signal(sig)
            child.proc.send_signal(signal.SIGCONT)
        code, stderr = child.finish()
    finally:
        if child.proc.poll() is None:
            child.proc.kill()

    outcome = kill.outcome
    if outcome == "cancelled-or-complete":  # the signal came before the write started, or during it
        outcome = "complete" if code == 0 else "cancelled"
    if outcome == "cancelled":
        assert code == 130, stderr
        assert child.events[-1] == {"event": "error", "message": "cancelled; nothing was written", "exit_code": 130}
        assert "Traceback" not in stderr
        assert check_outputs(out, home, source, leftovers_allowed=False) == []
        return  # nothing at all is left: a rerun is exactly a first run
    if outcome == "complete":
        assert check_outputs(out, home, source, leftovers_allowed=False) != []
    elif outcome == "killed":
        assert code == -signal.SIGKILL
        check_outputs(out, home, source, leftovers_allowed=True)
    else:  # killed by the kernel in the middle of writing the adapter or the label volume
        assert code == -signal.SIGXFSZ, stderr
        assert check_outputs(out, home, source, leftovers_allowed=True) == []
        partial = [p for p in out.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]
        assert partial, "the kill did not come during the write"  # the test hit what it means to hit
    # The rerun (with --overwrite, as the user would after a kill) succeeds despite stale locks and temp files.
    rerun = list(args)
    if "--steps" in rerun:
        rerun[rerun.index("--steps") + 1] = "2"
    proc = hfsam([*rerun, "--overwrite"], home=home)
    assert proc.returncode == 0, proc.stderr
    names = check_outputs(out, home, source, leftovers_allowed=True)
    assert names in (["a.safetensors"], ["seg.json", "seg.nrrd"], ["seg.json", "seg.nii"])
    locks = [*out.glob(".*.lock"), *(home / "adapters").glob(".*.lock")]
    assert locks == []  # stale locks were cleared, and the rerun's own released


# =============================================================================== concurrent runs
def test_two_runs_racing_for_one_output_one_wins(inputs, ct3mm, tmp_path):
    """Started together, without --overwrite: one writes, the other is refused; the file is one run's whole output."""
    out = tmp_path / "out"
    out.mkdir()
    args = ["segment", ct3mm / "image.nii.gz", "-o", out / "seg.nrrd", *TINY]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "HFSAMCore", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(tmp_path / "library"),
            cwd=REPO,
        )
        for _ in range(2)
    ]
    results = []
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        results.append((proc.returncode, err))
    results.sort()
    assert [code for code, _ in results] == [0, 2], results
    loser = results[1][1]
    assert "being written by another process" in loser or "already exists" in loser, loser
    assert visible(out) == ["seg.json", "seg.nrrd"] and hidden(out) == []
    check_outputs(out, tmp_path / "library", ct3mm / "image.nii.gz", leftovers_allowed=False)


CLAIMS = {
    # a long first run, then second runs that target the same output or library entry (with --overwrite)
    "segment-output": (
        _segment("{inp}/long.nrrd"),
        "segment",
        [_segment("{inp}/long.nrrd") + ("--overwrite",)],
        "{inp}/long.nrrd",
    ),
    "finetune-output-and-library-entry": (
        _finetune(100),
        "finetune",
        [
            _finetune(2, name="other") + ("--overwrite",),  # the same -o file
            _finetune(2, out="{out}/b.safetensors") + ("--overwrite",),
        ],  # the same library entry
        "{ct}/image.nii.gz",
    ),
}


@pytest.mark.parametrize("case", CLAIMS, ids=list(CLAIMS))
def test_a_second_writer_is_refused_while_the_first_runs(case, inputs, ct3mm, tmp_path):
    """Even with --overwrite a second run cannot replace what a running one is writing: it is refused at
    once (exit 2, one line), writes nothing, and the first run finishes normally."""
    first, stage, seconds, source = CLAIMS[case]
    out, home = tmp_path / "out", tmp_path / "library"
    out.mkdir()
    fill = {"inp": inputs, "ct": ct3mm, "out": out}
    child = Child([str(a).format(**fill) for a in first], home=home, log=tmp_path / "first.txt")
    try:
        assert child.wait_for(_step(stage, 1)) is not None
        child.proc.send_signal(signal.SIGSTOP)  # hold it mid-run: the race is now certain, not likely
        before = snapshot(out), snapshot(home)
        for second in seconds:
            proc = hfsam([str(a).format(**fill) for a in second], home=home)
            assert proc.returncode == 2, proc.stderr
            assert "is being written by another process" in proc.stderr and "Traceback" not in proc.stderr
            assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert (snapshot(out), snapshot(home)) == before
        child.proc.send_signal(signal.SIGCONT)
        code, stderr = child.finish()
    finally:
        if child.proc.poll() is None:
            child.proc.kill()
    assert code == 0, stderr
    names = check_outputs(out, home, Path(source.format(**fill)), leftovers_allowed=False)
    assert names == (["seg.json", "seg.nrrd"] if stage == "segment" else ["a.safetensors"])


# =============================================================================== in-process runs
@pytest.fixture
def one_thread():
    """In-process model runs: one thread (see _env), restored afterwards for the other test files."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cli_in_process(monkeypatch):
    """Run cli.main() here (to patch the model) without leaving its SIGINT/SIGTERM handlers behind."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setenv("HFSAM_HOME", "/nonexistent/hfsam-library")
    from HFSAMCore.cli import app as cli

    yield cli.main
    for s, h in handlers.items():
        signal.signal(s, h)


def test_a_failed_library_write_takes_the_adapter_file_back(
    inputs, ct3mm, tmp_path, monkeypatch, cli_in_process, one_thread, capsys
):
    """`finetune -o F --name N`: F is written first; if the library entry then fails (disk full), the run
    exits 2 and leaves F as it was before the run: absent, or with --overwrite its previous content."""
    from HFSAMCore.store.library import ModelLibrary as Library

    def full_disk(self, name, tensors, metadata, *, overwrite=False):
        raise InputError(f"cannot write {self.adapter_path(name)}: No space left on device")

    monkeypatch.setattr(Library, "save_adapter", full_disk)
    adapter = tmp_path / "a.safetensors"
    args = [
        "finetune",
        str(ct3mm / "image.nii.gz"),
        str(inputs / "labels_liver.nii.gz"),
        "-o",
        str(adapter),
        "--name",
        "liver",
        "--classes",
        "liver",
        *TINY,
        "--steps",
        "1",
        "--holdout",
        "0",
        "--library",
        str(tmp_path / "library"),
    ]
    assert cli_in_process(args) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["library"] and os.listdir(tmp_path / "library" / "adapters") == []
    adapter.write_bytes(b"the previous adapter")
    assert cli_in_process([*args, "--overwrite"]) == 2
    assert adapter.read_bytes() == b"the previous adapter" and hidden(tmp_path) == []


def _oom_above(limit: int, calls: list):
    """A forward that fails like a CUDA GPU out of memory for batches larger than ``limit`` (a simulation:
    torch's own OutOfMemoryError, raised where the real one would be)."""
    import torch

    from HFSAMCore.model.hfsam import HFSAM

    real = HFSAM.forward

    def forward(self, images):
        calls.append(images.shape[0])
        if images.shape[0] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(self, images)

    return forward


def test_out_of_memory_retries_with_smaller_batches_and_says_so(
    ct3mm, tmp_path, monkeypatch, cli_in_process, one_thread, capsys
):
    from HFSAMCore.model.hfsam import HFSAM

    image = ct3mm / "image.nii.gz"
    base = ["segment", str(image), "--precision", "fp32", *TINY, "--progress", "json"]
    assert cli_in_process([*base, "-o", str(tmp_path / "reference.nrrd"), "--batch-size", "2"]) == 0
    capsys.readouterr()
    calls: list[int] = []
    monkeypatch.setattr(HFSAM, "forward", _oom_above(2, calls))
    assert cli_in_process([*base, "-o", str(tmp_path / "seg.nrrd"), "--batch-size", "8"]) == 0
    stdout = capsys.readouterr().out
    assert calls[:3] == [8, 4, 2] and set(calls[3:]) == {2}  # halved twice, then every batch of 2 fits
    warnings = [progress_parser.parse_line(line) for line in stdout.splitlines()]
    warnings = [w["message"] for w in warnings if w and w["event"] == "warning" and "memory" in w["message"]]
    assert warnings == ["out of memory: retrying with batch size 4", "out of memory: retrying with batch size 2"]
    assert json.loads((tmp_path / "seg.json").read_text())["run"]["batch_size"] == 2
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "reference.nrrd")))
    result = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "seg.nrrd")))
    assert np.array_equal(result, reference) and len(np.unique(reference)) > 1


def test_out_of_memory_even_at_batch_size_1_is_one_clear_line(
    ct3mm, tmp_path, monkeypatch, cli_in_process, one_thread, capsys
):
    from HFSAMCore.model.hfsam import HFSAM

    calls: list[int] = []
    monkeypatch.setattr(HFSAM, "forward", _oom_above(0, calls))
    code = cli_in_process(
        [
            "segment",
            str(ct3mm / "image.nii.gz"),
            "-o",
            str(tmp_path / "seg.nrrd"),
            *TINY,
            "--batch-size",
            "4",
            "--progress",
            "json",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1 and calls == [4, 2, 1]
    last = json.loads(captured.out.splitlines()[-1])
    assert last["event"] == "error" and last["message"].startswith("out of memory even at batch size 1")
    errors = [ln for ln in captured.err.splitlines() if not ln.startswith("warning:")]
    assert errors == [f"hfsam: error: {last['message']}"]  # one line, no traceback
    assert os.listdir(tmp_path) == []


# =============================================================================== untrusted files
def test_the_engine_never_unpickles():
    """Every torch.load in the engine passes weights_only=True, and nothing calls pickle/marshal loads:
    a new loader that could run code from a file fails this test."""
    unsafe = []
    for path in sorted((REPO / "HFSAMCore").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            if owner == "torch" and node.func.attr == "load":
                safe = any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in node.keywords
                )
                if not safe:
                    unsafe.append(where)
            if owner in ("pickle", "marshal", "dill", "joblib") and node.func.attr in ("load", "loads"):
                unsafe.append(where)
    assert unsafe == []


def _good_adapter_bytes() -> bytes:
    import torch
    from safetensors.torch import save

    meta = validate_metadata(
        {
            "name": "liver",
            "backbone": "tiny",
            "img_size": 64,
            "rank": 2,
            "fusion": "two_step",
            "low_level_blocks": [1],
            "classes": [{"value": 1, "name": "liver", "color": [221, 130, 101]}],
        }
    )
    return save({"lora_a": torch.ones(2, 3)}, metadata={METADATA_KEY: json.dumps(meta)})


GOOD_ADAPTER = _good_adapter_bytes()
_FUZZ_DIR = Path(tempfile.mkdtemp(prefix="hfsam-fuzz-"))  # hypothesis examples share it (no per-test tmp_path)
atexit.register(shutil.rmtree, _FUZZ_DIR, True)
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=16,
)


@st.composite
def adapter_files(draw) -> bytes:
    """Bytes an attacker or a damaged disk could hand the adapter reader."""
    kind = draw(st.sampled_from(["flipped", "cut", "header", "metadata", "random"]))
    if kind == "flipped":  # a good file with a few bytes changed
        data = bytearray(GOOD_ADAPTER)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "cut":
        return GOOD_ADAPTER[: draw(st.integers(0, len(GOOD_ADAPTER) - 1))]
    if kind == "header":  # any JSON as the safetensors header, with any length prefix
        header = json.dumps(draw(_json_values)).encode()
        size = draw(st.one_of(st.just(len(header)), st.integers(0, 2**64 - 1)))
        return size.to_bytes(8, "little") + header + draw(st.binary(max_size=16))
    if kind == "metadata":  # a well-formed file whose metadata is a mutated good one (or anything at all)
        meta = json.loads(
            json.loads(GOOD_ADAPTER[8 : 8 + int.from_bytes(GOOD_ADAPTER[:8], "little")])["__metadata__"][METADATA_KEY]
        )
        if draw(st.booleans()):
            meta[draw(st.sampled_from(sorted(meta) + ["extra_field"]))] = draw(_json_values)
            text = json.dumps(meta)
        else:
            text = draw(st.text(max_size=40))
        from safetensors.numpy import save

        return save({"t": np.zeros(2, np.float32)}, metadata={METADATA_KEY: text})
    return draw(st.binary(max_size=200))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(adapter_files())
def test_fuzz_adapter_reader_refuses_with_one_line(data):
    path = _FUZZ_DIR / "fuzzed.safetensors"
    path.write_bytes(data)
    try:
        meta = read_metadata(path)
    except InputError as err:
        assert "\n" not in str(err) and str(err)
        return
    assert meta == validate_metadata(meta)  # what it accepts is complete and valid


@settings(max_examples=500, deadline=None)
@given(st.text(st.characters(exclude_categories=())))  # every code point, lone surrogates included
def test_fuzz_every_engine_error_is_one_line(text):
    """Every message the engine raises is one line, whatever a file put in it (line breaks of every kind
    Python knows, terminal escapes, lone surrogates from an undecodable file name, bidi overrides); other
    text, non-ASCII letters, spaces and joiners included, is kept as it is."""
    message = str(InputError(f"list file {text} names nothing; check the file"))
    assert len(message.splitlines()) == 1
    assert not any(
        unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp") or 0x202A <= ord(ch) <= 0x202E for ch in message
    )
    message.encode("utf-8")  # printable on any UTF-8 terminal (a lone surrogate would raise here)
    if text.isprintable():
        assert message == f"list file {text} names nothing; check the file"


def test_out_of_memory_survives_pickle_and_copy():
    """An error crosses processes pickled (a DataLoader worker, bench's row processes): it must read the same."""
    for device in ("cuda", "cpu"):
        err = OutOfMemory(device)
        for again in (pickle.loads(pickle.dumps(err)), copy.copy(err), copy.deepcopy(err)):
            assert type(again) is OutOfMemory and str(again) == str(err) and again.device_type == device


def test_names_in_any_script_stay_readable_in_messages():
    """Only what breaks or disguises a line is escaped: a Persian name's joiner, a macOS screenshot's narrow
    no-break space and a Windows path stay as they are; a right-to-left override does not."""
    # Persian words; the first ("goes") is written with a zero-width non-joiner (U+200C)
    persian = "\u0645\u06cc\u200c\u0631\u0648\u062f \u0645\u0627\u0647\u0648\u0627\u0631\u0647"
    kept = f"{persian} | Screenshot 10.41.02\u202fAM | C:\\Users\\new\\table.nii"
    assert str(InputError(kept)) == kept
    assert str(InputError("scan\u202egpj.exe")) == "scan\\u202egpj.exe"


def test_a_file_name_with_line_breaks_and_escapes_is_refused_on_one_line(tmp_path):
    """A real refusal quoting a hostile path: exit 2, one stderr line, the characters shown as escapes."""
    odd = tmp_path / "adapter\u2028\x0b\x1b[31mred\tx.safetensors"
    proc = hfsam(
        ["segment", tmp_path / "ct.nii.gz", "-o", tmp_path / "seg.nrrd", "--adapter", odd], home=tmp_path / "home"
    )
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("hfsam: error: "), proc.stderr
    assert "adapter\\u2028\\x0b\\x1b[31mred\\tx.safetensors does not exist" in lines[0]
    assert "\x1b" not in proc.stderr and not (tmp_path / "seg.nrrd").exists()


_event_fields = st.dictionaries(
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=10).filter(
        lambda k: k not in ("event", "stage", "done", "total", "eta_s")
    ),
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats() | st.text(max_size=30),
    max_size=5,
)


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(["progress", "metric", "warning", "error", "result"]),
    stage=st.text(max_size=20),
    done=st.integers(0, 10**6),
    total=st.integers(0, 10**6),
    extra=_event_fields,
    message=st.text(max_size=60),
)
def test_fuzz_every_engine_event_is_one_strict_json_line_the_module_reads(kind, stage, done, total, extra, message):
    """The engine's progress stream and the Slicer module's parser agree, whatever the values
    (NaN losses, newlines in messages, odd keys). The parser's own fuzz with arbitrary lines is
    Testing/test_runner.py::test_parser_never_raises."""
    buffer = io.StringIO()
    progress = Progress("json", out=buffer, err=io.StringIO())
    if kind == "progress":
        progress.progress(stage, done, total, **extra)
    elif kind == "metric":
        progress.metric(**extra)
    elif kind == "warning":
        progress.warn(message)
    elif kind == "error":
        progress.error(message, exit_code=2)
    else:
        progress.result(**extra)
    line = buffer.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1
    raw = json.loads(line, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    event = progress_parser.parse_line(line)
    assert event is not None and event["event"] == kind == raw["event"]
    if kind == "progress":
        assert (event["stage"], event["done"], event["total"]) == (stage, done, total)
    elif kind == "warning":  # one line in the panel's log too
        assert event["message"] == one_line(message)
    elif kind == "error":
        assert event["message"] == message or (not message and event["message"])
    if kind == "error":
        assert event["exit_code"] == 2


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.text(max_size=70),
        st.text(alphabet="./\\:~-_ aA0\x00", max_size=12),
        st.sampled_from(
            ["..", "../x", "/etc/passwd", "a/../../b", "C:\\x", "~root", ".hidden", "x.", "NUL", "con.txt", "a" * 65]
        ),
    )
)
def test_fuzz_library_names_never_leave_the_library(name):
    library = ModelLibrary(_FUZZ_DIR / "library")
    try:
        validate_name(name)
    except InputError as err:
        assert "\n" not in str(err)
        with pytest.raises(InputError):
            library.adapter_path(name)
        return
    path = library.adapter_path(name)
    assert path.parent == library.adapters_dir and path.name == f"{name}.safetensors"
    assert not name.startswith(".") and os.sep not in name and "/" not in name and ".." not in name
    assert path.resolve().parent == library.adapters_dir.resolve()


# =============================================================================== the table
def test_the_table_points_at_tests_that_exist_and_lists_every_case_here():
    """docs/robustness.md names tests as `R::test[id]` (this file), `N::test[id]`
    (test_no_silent_wrong_answer.py), `FILE.py::test`, `::test` (same file), `[id]` (same test) and
    `R::...[id]` (the interrupted-run test): each must exist, and every parametrized case of both
    files must appear in the table."""
    import re

    from test_no_silent_wrong_answer import CASES as ISSUE_12

    cases = {
        "test_bad_input": {r.id for r in ROWS},
        "test_interrupted_run_leaves_nothing_half_written": {k.id for k in KILLS},
        "test_a_second_writer_is_refused_while_the_first_runs": set(CLAIMS),
        "test_refused_or_warned_before_any_work": {c.id for c in ISSUE_12},
        "test_evaluate_stops_when_cancelled": {"SIGTERM", "SIGINT"},
    }
    text = (REPO / "docs" / "robustness.md").read_text(encoding="utf-8")
    here = Path(__file__).name
    aliases = {"R": here, "N": "test_no_silent_wrong_answer.py"}
    file = name = None
    named: set[tuple[str, str]] = set()
    for span in re.findall(r"`([^`]+)`", text):
        ref = re.fullmatch(r"(?:(R|N|\w+\.py)?::)?(\w+|\.\.\.)?(?:\[([\w-]+)\])?", span)
        if not ref or not (ref[2] or ref[3]) or not ("::" in span or span.startswith("[")):
            continue  # ordinary code in the text
        if ref[1]:
            file = aliases.get(ref[1], ref[1])
        if ref[2] == "...":
            name = "test_interrupted_run_leaves_nothing_half_written"
        elif ref[2]:
            name = ref[2]
        source = (REPO / "Testing" / file).read_text(encoding="utf-8")
        assert re.search(rf"^def {name}\(", source, re.M), f"{span}: no test {file}::{name}"
        if ref[3]:
            assert ref[3] in cases.get(name, ()), f"{span}: {name} has no case {ref[3]}"
            named.add((name, ref[3]))
    missing = {(n, c) for n, ids in cases.items() for c in ids} - named
    assert missing == set(), f"cases missing from docs/robustness.md: {sorted(missing)}"
