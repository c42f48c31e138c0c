"""A real few-shot run on LiteMedSAM: 3 labeled slices of ct_abdomen_3mm, a short budget of the
backbone's recipe (steps on cached encoder features), the other slices scored; then the adapter's round trip;
then the same on an MR-like contrast made from the CT (no MR volume is available here).

The budget is small so that the suite stays short; the full-budget figures are in
benchmarks/RESULTS.md (`hfsam bench fewshot`).
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from HFSAMCore.io.geometry import labels_onto_image
from HFSAMCore.io.read import read_image, read_labels
from HFSAMCore.io.slices import SliceView
from HFSAMCore.model.inference import segment_image
from HFSAMCore.model.loading import load_model
from HFSAMCore.runtime.device import resolve_precision
from HFSAMCore.store.adapters import load_adapter, save_adapter
from HFSAMCore.store.library import ModelLibrary
from HFSAMCore.train.fewshot import recipe_config, train
from HFSAMCore.train.training_set import prepare_training_set
from HFSAMCore.workflows.demo import evaluate_held_out

TRAIN = [10, 14, 19]
STEPS = 60  # all on cached features, as the recipe does (LoRA steps are tested on the tiny model)
LIVER = 5  # synapse order


def mr_like(ct: sitk.Image) -> sitk.Image:
    """The CT in an MR's clothes: positive arbitrary units, no air at -1000 HU and no DICOM modality (so the
    auto preset is MR: percentile window, not the CT's HU window), and CT's soft-tissue contrast inverted:
    air dark, fat bright, enhanced vessels and kidneys darker than the liver. A contrast LiteMedSAM has not
    seen as such, not a real MR."""
    hu = sitk.GetArrayFromImage(ct).astype(np.float32)
    mr = np.where(hu < -500, 20.0, (275 - np.clip(hu, -125, 275)) * 4 + 100)
    out = sitk.GetImageFromArray(mr.astype(np.float32))
    out.CopyInformation(ct)
    return out


def _train(image, labels, library):
    torch.manual_seed(0)
    lm = load_model(backbone="lite_medsam", classes="synapse", library=library)
    assert lm.spec.img_size == 256 and lm.spec.pixel_norm == "unit"
    data = prepare_training_set(image, labels, num_classes=8, img_size=256, slices=TRAIN)
    dtype = resolve_precision("auto", torch.device("cpu"))
    cfg = recipe_config("lite_medsam", steps=STEPS, batch_size=4, holdout=0, seed=0, precision=dtype, pool=4)
    report = train(lm.model, data, cfg)
    prediction, _ = segment_image(image, lm.model, dtype=dtype)
    return image, labels, library, lm, data, report, prediction, dtype


@pytest.fixture(scope="module")
def run(ct3mm, tmp_path_factory):
    image = read_image(ct3mm / "image.nii.gz")
    labels = read_labels(ct3mm / "labels_synapse8.nii.gz")
    return _train(image, labels, ModelLibrary(tmp_path_factory.mktemp("lib")))


def _liver_dice(image, labels, prediction) -> tuple[float, float]:
    """(Dice of the prediction, Dice of 'liver everywhere') for the liver on the slices not trained on."""
    view = SliceView.from_image(image)
    ref_img = labels_onto_image(labels, image)  # kept alive: the array views borrow its memory
    ref = view.to_slices(sitk.GetArrayViewFromImage(ref_img))
    pred = view.to_slices(sitk.GetArrayViewFromImage(prediction))
    trained = [view.canonical_index(s) for s in TRAIN]
    names = {c: str(c) for c in range(1, 9)}
    result = evaluate_held_out(image, view, ref, pred, trained, names)
    liver = next(c["dice"] for c in result["classes"] if c["name"] == str(LIVER))
    held = np.ones(view.n_slices, bool)
    held[trained] = False
    truth = ref[held] == LIVER
    everywhere = 2 * truth.sum() / (truth.sum() + truth.size)
    return liver, float(everywhere)


def test_few_shot_lite_medsam_learns_the_liver(run):
    image, labels, _, _, _, report, prediction, _ = run
    assert (report.steps, report.cached_steps) == (STEPS, STEPS)
    liver, everywhere = _liver_dice(image, labels, prediction)
    assert everywhere < 0.3
    print(f"liver Dice {liver:.3f}, liver everywhere {everywhere:.3f}")
    # 60 steps are a fifth of the recipe, and where they end depends on rounding: on an Intel Xeon with AMX
    # the liver gave 0.75-0.79 over seeds 0-2, fp32 and bf16 (above 0.85 on an AMD EPYC), and at 100
    # steps 0.79-0.92, before the recipe clipped the gradient; 0.865 with seed 0 since. A model that has not
    # learned the liver scores at most "liver everywhere" (0.19) or near 0.
    assert liver > 0.6, f"liver Dice {liver:.3f} after {STEPS} steps on 3 slices"


def test_adapter_round_trip_with_lite_medsam(run, tmp_path):
    _, _, library, lm, data, _, _, _ = run
    path = tmp_path / "liver.safetensors"
    metadata = {
        "name": "t",
        **lm.spec.as_dict(),
        "base_checkpoint": lm.base,
        "classes": lm.classes,
        "intensity_preset": data.preset,
        "axis": "axial",
    }
    metadata.pop("num_classes")
    save_adapter(path, lm.model.trainable_state_dict(), metadata)
    tensors, meta = load_adapter(path)
    assert meta["backbone"] == "lite_medsam" and meta["pixel_norm"] == "unit" and meta["img_size"] == 256
    assert sum(t.numel() for t in tensors.values()) == lm.model.parameter_counts()["trainable"]
    again = load_model(adapter=str(path), library=library)
    assert again.spec == lm.spec
    for name, value in lm.model.trainable_state_dict().items():
        assert torch.equal(again.model.trainable_state_dict()[name], value), name
    with torch.no_grad():  # the same model: the same logits, bit for bit
        assert torch.equal(again.model.eval()(data.images), lm.model.eval()(data.images))


def test_few_shot_lite_medsam_learns_the_liver_on_an_mr_contrast(ct3mm, tmp_path):
    """The MR preset end to end: chosen automatically for a volume without air at -1000 HU, its percentile
    window applied, and the model learns an unfamiliar contrast in the same short budget."""
    image = mr_like(read_image(ct3mm / "image.nii.gz"))
    labels = read_labels(ct3mm / "labels_synapse8.nii.gz")
    _, _, _, _, data, _, prediction, _ = _train(image, labels, ModelLibrary(tmp_path / "lib"))
    assert data.preset == "mr"
    assert float(data.images.min()) == 0.0 and float(data.images.max()) == 1.0  # the percentile window
    liver, everywhere = _liver_dice(image, labels, prediction)
    print(f"MR-like contrast: liver Dice {liver:.3f}, liver everywhere {everywhere:.3f}")
    assert everywhere < 0.3 and liver > 0.6, f"liver Dice {liver:.3f} after {STEPS} steps on 3 slices"
