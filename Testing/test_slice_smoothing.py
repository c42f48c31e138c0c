"""Slice smoothing: neighbouring slices' class probabilities averaged with a Gaussian in mm.

The streaming smoother is checked against a direct, whole-volume computation written out here;
``segment_image`` against the model's own per-slice probabilities smoothed by that computation,
on the DICOM sample (2 mm slices, 0.98 mm in-plane), so that a wrong spacing would show.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch.nn import functional as F

from HFSAMCore.model.slice_smoothing import (
    DEFAULT_SLICE_SMOOTHING_MM,
    MAX_RADIUS,
    SliceSmoother,
    is_truncated,
    slice_weights,
)


def smoothed_directly(probs: np.ndarray, sigma_slices: float) -> np.ndarray:
    """Slice i = sum_j w(i - j) p_j / sum_j w(i - j) over the slices j that exist, |i - j| <= 3 sigma."""
    n = len(probs)
    out = np.zeros_like(probs, dtype=np.float64)
    for i in range(n):
        js = [j for j in range(n) if abs(i - j) <= math.ceil(3 * sigma_slices)]
        w = np.array([math.exp(-0.5 * ((i - j) / sigma_slices) ** 2) for j in js])
        out[i] = np.tensordot(w / w.sum(), probs[js].astype(np.float64), axes=1)
    return out


def test_the_weights_are_a_gaussian_in_millimetres():
    assert slice_weights(0, 3.0) == [1.0]
    w = slice_weights(3.0, 3.0)  # sigma one slice: offsets -3..3
    assert len(w) == 7 and w[3] == 1.0 and w[2] == w[4] == pytest.approx(math.exp(-0.5), abs=1e-12)
    thin = slice_weights(3.0, 1.0)  # the same 3 mm over 1 mm slices: three slices per sigma
    assert len(thin) == 19 and thin[9 + 3] == pytest.approx(math.exp(-0.5), abs=1e-12)
    thick = slice_weights(3.0, 5.0)
    assert len(thick) == 5 and thick[3] == pytest.approx(math.exp(-0.5 * (5 / 3) ** 2), abs=1e-12)
    # Very thin slices: the window stops at MAX_RADIUS either side, so its memory stays bounded.
    micro = slice_weights(3.0, 0.1)
    assert len(micro) == 2 * MAX_RADIUS + 1 and micro[0] == pytest.approx(math.exp(-0.5 * (32 / 30) ** 2), abs=1e-12)
    assert is_truncated(3.0, 0.1) and not is_truncated(3.0, 0.5) and not is_truncated(3.0, 3.0)
    # A width far below a slice is no smoothing (and no overflow on the way).
    assert slice_weights(1e-300, 3.0) == [1.0] and slice_weights(0.2, 3.0) == [1.0]


@pytest.mark.parametrize("n, batch", [(11, 1), (11, 2), (11, 4), (11, 5), (11, 11), (2, 1), (2, 4), (1, 1), (30, 3)])
def test_streaming_gives_every_slice_once_in_order_as_the_whole_volume_average(n, batch):
    probs = np.random.default_rng(n * 100 + batch).random((n, 3, 4, 5), dtype=np.float32)
    smoother = SliceSmoother(slice_weights(3.0, 3.0), n)
    got, next_slice = [], 0
    for a in range(0, n, batch):
        ready = smoother.push(torch.from_numpy(probs[a : a + batch]))
        if ready is not None:
            first, out = ready
            assert first == next_slice
            next_slice += len(out)
            got.append(out.numpy())
    assert next_slice == n
    np.testing.assert_allclose(np.concatenate(got), smoothed_directly(probs, 1.0), rtol=0, atol=1e-6)
    assert smoother.buffer is not None and len(smoother.buffer) <= 2 * smoother.r + batch


def test_segment_image_smooths_the_models_own_probabilities_along_the_slice_axis(ctdicom, one_torch_thread):
    """The DICOM sample's slices are 2 mm apart, so the default 3 mm is 1.5 slices."""
    from HFSAMCore.io.read import read_image
    from HFSAMCore.io.slices import SliceView, choose_preset, normalize, volume_stats
    from HFSAMCore.model.inference import segment_image, to_model_input
    from HFSAMCore.model.loading import load_model

    image = read_image(ctdicom / "dicom")
    torch.manual_seed(0)
    model = load_model(checkpoint="none", backbone="tiny", img_size=64, classes="a,b,c").model.eval()
    view = SliceView.from_image(image)
    assert view.slice_thickness_mm == pytest.approx(2.0, abs=1e-6)
    stack = view.to_slices(sitk.GetArrayViewFromImage(image))
    preset = choose_preset(image)
    with torch.no_grad():
        x = to_model_input(normalize(stack, preset, stats=volume_stats(stack, preset)), 64, torch.device("cpu"))
        logits = model(x)
    probs = logits.softmax(dim=1).numpy()

    def labels_of(maps):  # resized to the slices, then argmax, as segment does
        return F.interpolate(torch.as_tensor(maps).float(), size=view.slice_shape, mode="bilinear").argmax(dim=1)

    expected = labels_of(np.log(smoothed_directly(probs, 1.5)))  # resized as logits, as segment does

    labels, info = segment_image(image, model, batch_size=3)
    got = view.to_slices(sitk.GetArrayFromImage(labels))
    assert info["slice_smoothing_mm"] == DEFAULT_SLICE_SMOOTHING_MM
    assert labels.GetSpacing() == image.GetSpacing() and labels.GetOrigin() == image.GetOrigin()
    # Summation order differs (float32 stream against float64 here): a near-tie may fall either way.
    assert (got == expected.numpy()).mean() > 0.9999
    changed = (expected != labels_of(logits)).float().mean().item()
    assert changed > 0.001, "the smoothing changed nothing: the check above would not tell it from none"

    # 0: each slice's own logits, resized and argmaxed, exactly as before smoothing existed.
    unsmoothed, info0 = segment_image(image, model, batch_size=3, slice_smoothing_mm=0)
    assert info0["slice_smoothing_mm"] == 0
    assert np.array_equal(view.to_slices(sitk.GetArrayFromImage(unsmoothed)), labels_of(logits).numpy())


@pytest.mark.parametrize("value", [None, True, -1.0, float("nan"), float("inf"), 51, "3"])
def test_the_api_refuses_a_width_out_of_range_before_any_work(value, tmp_path):
    from HFSAMCore.errors import InputError
    from HFSAMCore.workflows import segment_file

    with pytest.raises(InputError, match="--slice-smoothing must be a width in mm from 0 "):
        segment_file(tmp_path / "missing.nii.gz", tmp_path / "seg.nrrd", slice_smoothing=value)
    assert list(tmp_path.iterdir()) == []


def test_the_command_line_records_the_smoothing_and_zero_turns_it_off(ct3mm, tmp_path, cli_main, capsys):
    tiny = ("--checkpoint", "none", "--backbone", "tiny", "--img-size", "64", "--classes", "a,b")
    outputs = {}
    for mm in ("3", "0", "-0"):
        out = tmp_path / f"seg{mm}.nrrd"
        argv = ["segment", str(ct3mm / "image.nii.gz"), "-o", str(out), *tiny, "--slice-smoothing", mm]
        assert cli_main(argv) == 0, capsys.readouterr().err
        recorded = json.loads(out.with_suffix(".json").read_text())["run"]["slice_smoothing_mm"]
        assert recorded == float(mm) and math.copysign(1, recorded) == 1  # -0 is recorded as 0
        outputs[mm] = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert outputs["3"].shape == outputs["0"].shape and not np.array_equal(outputs["3"], outputs["0"])
    assert np.array_equal(outputs["-0"], outputs["0"])


def out_of_memory_on(real, calls):
    """``real``, except that the calls numbered in ``calls`` (from 1) raise torch's out-of-memory error:
    the only way to reach the back-off paths on a machine with memory to spare."""
    count = 0

    def wrapper(*args, **kwargs):
        nonlocal count
        count += 1
        if count in calls:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (test)")
        return real(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("where", ["model", "push", "resize"])
def test_out_of_memory_anywhere_halves_the_batch_and_gives_the_same_labels(where, monkeypatch):
    """In the model, in the smoother, or resizing the smoothed slices (the last batch releases 2r+1 slices):
    the batch is halved, nothing is pushed twice or skipped, and the labels are those of a run without it."""
    from HFSAMCore.model import inference
    from HFSAMCore.runtime.progress import Progress

    n, size = 13, 8
    maps = torch.from_numpy(np.random.default_rng(7).normal(size=(n, 3, size, size)).astype(np.float32))

    def run(fail_in_model=False):
        model = lambda x: maps[x[:, 0, 0, 0].long()]  # noqa: E731  each input names its slice
        batches = lambda a, b: torch.arange(a, b, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, size, size)  # noqa: E731
        warnings = []
        progress = Progress("none")
        progress.warn = warnings.append
        out, batch = inference.predict_batches(
            out_of_memory_on(model, {2}) if fail_in_model else model,
            n,
            batches,
            (11, 9),
            batch_size=4,
            device=torch.device("cpu"),
            dtype=torch.float32,
            progress=progress,
            slice_weights=slice_weights(3.0, 3.0),
        )
        return out, batch, warnings

    expected, batch, warnings = run()
    assert (batch, warnings) == (4, [])
    if where == "push":
        monkeypatch.setattr(SliceSmoother, "_smooth", out_of_memory_on(SliceSmoother._smooth, {1}))
    if where == "resize":
        resize = out_of_memory_on(inference.probabilities_to_labels, {3})
        monkeypatch.setattr(inference, "probabilities_to_labels", resize)
    got, batch, warnings = run(fail_in_model=where == "model")
    assert np.array_equal(got, expected)
    assert batch == 2 and warnings == ["out of memory: retrying with batch size 2"]


def test_without_neighbours_the_labels_are_those_of_the_logits():
    """Probabilities are resized through their logarithm: a slice with no neighbour in reach (one slice,
    or slices far apart) gets exactly the labels of its own logits, smoothing on or off."""
    from HFSAMCore.model.inference import logits_to_labels, probabilities_to_labels

    logits = torch.from_numpy(np.random.default_rng(3).normal(scale=4, size=(2, 9, 16, 16)).astype(np.float32))
    assert np.array_equal(probabilities_to_labels(logits.softmax(dim=1), (37, 29)), logits_to_labels(logits, (37, 29)))
