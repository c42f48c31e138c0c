"""The Python API (HFSAMCore.workflows): the jobs the command line runs, called directly.

A Python user gets the same checks, claims, atomic writes and sidecars as `hfsam`; these tests
call the workflows in this process with the tiny random-init model on the real sample CT.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import SimpleITK as sitk

from HFSAMCore.errors import InputError
from HFSAMCore.store.adapters import read_metadata
from HFSAMCore.workflows import (
    ModelOptions,
    RunOptions,
    TrainingOptions,
    evaluate_files,
    finetune_adapter,
    segment_file,
)
from HFSAMCore.workflows.options import fixed_by_adapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ModelOptions(checkpoint="none", backbone="tiny", img_size=64)
META = {
    "backbone": "lite_medsam",
    "img_size": 256,
    "rank": 5,
    "fusion": "two_step",
    "axis": "axial",
    "intensity_preset": "ct",
}


def test_an_adapter_fixes_what_its_model_sees_and_a_python_callers_choice_is_checked():
    model, run = fixed_by_adapter(ModelOptions(), RunOptions(), META, "liver5.safetensors")
    assert (model.backbone, model.img_size, run.axis, run.preset) == ("lite_medsam", 256, "axial", "ct")
    assert model.chosen == frozenset() and run.chosen == frozenset()  # the adapter's values are not choices
    with pytest.raises(InputError, match="trained for .* not --axis coronal"):
        fixed_by_adapter(ModelOptions(), RunOptions(axis="coronal"), META, "liver5.safetensors")
    # A value equal to the adapter's is accepted; "auto" gives way; the command line's typed set wins.
    _, run = fixed_by_adapter(ModelOptions(backbone="lite_medsam"), RunOptions(preset="auto"), META, "a")
    assert run.preset == "ct"
    _, run = fixed_by_adapter(ModelOptions(), RunOptions(axis="coronal", typed=frozenset()), META, "a")
    assert run.axis == "axial"


def test_finetune_segment_evaluate_through_the_api(ct3mm, tmp_path):
    image, labels = ct3mm / "image.nii.gz", ct3mm / "labels_synapse8.nii.gz"
    library = str(tmp_path / "lib")
    model = ModelOptions(checkpoint="none", backbone="tiny", img_size=64, library=library)
    trained = finetune_adapter(
        image,
        [labels],
        output=tmp_path / "a.safetensors",
        name="tiny8",
        training=TrainingOptions(slices="10,15,20", classes="synapse", steps=2, low_level_dropout=0.25),
        model=model,
    )
    assert trained["adapter"] == str(tmp_path / "a.safetensors") and trained["name"] == "tiny8"
    training_record = read_metadata(tmp_path / "a.safetensors")["training"]
    assert training_record["low_level_dropout"] == 0.25
    assert training_record["max_grad_norm"] is None  # the tiny backbone's recipe does not clip
    assert trained["steps"] == 2 and [c["name"] for c in trained["classes"]][:2] == ["spleen", "right kidney"]

    out = tmp_path / "seg.nrrd"
    result = segment_file(image, out, model=ModelOptions(adapter="tiny8", library=library))
    assert result["output"] == str(out) and result["slices"] == 30
    seg, img = sitk.ReadImage(str(out)), sitk.ReadImage(str(image))
    assert seg.GetSize() == img.GetSize()
    assert max(abs(a - b) for a, b in zip(seg.GetOrigin(), img.GetOrigin())) < 1e-6
    assert max(abs(a - b) for a, b in zip(seg.GetDirection(), img.GetDirection())) < 1e-6
    sidecar = json.loads((tmp_path / "seg.json").read_text())
    assert sidecar["output"] == "seg.nrrd" and len(sidecar["classes"]) == 8

    scores = evaluate_files(labels, out)
    assert [c["name"] for c in scores["classes"]][:1] == ["spleen"]  # names from the sidecar
    assert all(0.0 <= c["dice"] <= 1.0 for c in scores["classes"] if c["dice"] is not None)

    # The same output again, without overwrite: refused before any work, the file kept as it was.
    before = out.read_bytes()
    with pytest.raises(InputError, match="already exists"):
        segment_file(image, out, model=ModelOptions(adapter="tiny8", library=library))
    assert out.read_bytes() == before
    # An option the adapter fixes, chosen otherwise: refused, naming it.
    with pytest.raises(InputError, match="not --axis coronal"):
        segment_file(
            image,
            tmp_path / "other.nrrd",
            model=ModelOptions(adapter="tiny8", library=library),
            run=RunOptions(axis="coronal"),
        )
    assert not (tmp_path / "other.nrrd").exists()


def test_the_command_line_parser_loads_no_torch(repo_root):
    """Bad input is refused before torch loads: building every command's parser must not import it."""
    code = "import sys; from HFSAMCore.cli.app import build_parser; build_parser(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_importing_the_api_loads_neither_torch_nor_simpleitk(repo_root):
    code = (
        "import sys, HFSAMCore.workflows; print(sorted(m for m in ('torch', 'SimpleITK', 'numpy') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"training": TrainingOptions(lr=float("nan"))}, "--lr must be a positive learning rate"),
        ({"training": TrainingOptions(steps=0)}, "--steps must be a whole number of at least 1"),
        ({"run": RunOptions(batch_size=0)}, "--batch-size must be a whole number of at least 1"),
        ({"model": ModelOptions(img_size=100)}, "--img-size must be a multiple of 16"),
    ],
)
def test_the_api_refuses_a_number_out_of_range_before_any_work(kwargs, message, tmp_path):
    """The same ranges as the command line's, checked first: nothing is read, nothing is written."""
    with pytest.raises(InputError, match=message):
        finetune_adapter(
            tmp_path / "missing.nii.gz",
            [tmp_path / "missing_labels.nii.gz"],
            output=tmp_path / "a.safetensors",
            **kwargs,
        )
    assert list(tmp_path.iterdir()) == []


def test_one_label_path_given_alone_is_one_label_map(ct3mm, tmp_path):
    """`labels` as a single path (not a list) is that label map, never its characters."""
    result = finetune_adapter(
        ct3mm / "image.nii.gz",
        str(ct3mm / "labels_synapse8.nii.gz"),
        output=tmp_path / "a.safetensors",
        training=TrainingOptions(slices="14", steps=1),
        model=ModelOptions(checkpoint="none", backbone="tiny", img_size=64, library=str(tmp_path / "lib")),
    )
    assert result["adapter"] == str(tmp_path / "a.safetensors") and len(result["classes"]) == 8
