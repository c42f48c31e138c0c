"""Few-shot training: slice selection, label geometry, loss, schedule, augmentation, determinism."""

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from HFSAMCore.errors import InputError
from HFSAMCore.io.read import read_image, read_labels
from HFSAMCore.model.hfsam import ModelSpec, build_hfsam
from HFSAMCore.runtime.progress import Progress
from HFSAMCore.train import fewshot
from HFSAMCore.train.augmentation import augment
from HFSAMCore.train.fewshot import TrainConfig, split_holdout, train
from HFSAMCore.train.losses import hfsam_loss, soft_dice_loss
from HFSAMCore.train.optim import make_optimizer
from HFSAMCore.train.schedule import lr_factor
from HFSAMCore.train.training_set import prepare_training_set


@pytest.fixture(scope="module")
def ct(ct3mm):
    return read_image(ct3mm / "image.nii.gz"), read_labels(ct3mm / "labels_synapse8.nii.gz")


def painted(labels: sitk.Image, keep: list[int]) -> sitk.Image:
    """A label map where only the slices `keep` (z index) carry labels, as a clinician paints them."""
    arr = sitk.GetArrayFromImage(labels)
    mask = np.zeros(arr.shape[0], bool)
    mask[keep] = True
    arr[~mask] = 0
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(labels)
    return out


def test_auto_takes_exactly_the_painted_slices(ct):
    image, labels = ct
    data = prepare_training_set(image, painted(labels, [3, 17, 22]), num_classes=8, img_size=64)
    assert data.slices == [3, 17, 22]
    assert data.images.shape == (3, 1, 64, 64) and data.labels.shape == (3, 64, 64)
    assert data.preset == "ct"
    assert 0.0 <= float(data.images.min()) and float(data.images.max()) <= 1.0


def test_explicit_slices_must_carry_labels(ct):
    image, labels = ct
    with pytest.raises(InputError, match="carry no label"):
        prepare_training_set(image, painted(labels, [3, 17]), num_classes=8, img_size=64, slices=[3, 4])
    data = prepare_training_set(image, painted(labels, [3, 17]), num_classes=8, img_size=64, slices=[17])
    assert data.slices == [17]


def test_no_labels_at_all_is_a_clear_error(ct):
    image, labels = ct
    with pytest.raises(InputError, match="no labeled voxel"):
        prepare_training_set(image, painted(labels, []), num_classes=8, img_size=64)


def test_more_label_values_than_class_names(ct):
    image, labels = ct
    with pytest.raises(InputError, match="class 8"):
        prepare_training_set(image, labels, num_classes=5, img_size=64)


def test_flipped_dicom_labels_land_on_the_right_pixels(ctdicom):
    """The DICOM sample's label file has a flipped y axis: slices must match by physical position."""
    image = read_image(ctdicom / "dicom")
    labels = read_labels(ctdicom / "labels_synapse8.nii.gz")
    data = prepare_training_set(image, labels, num_classes=8, img_size=512)
    want = sitk.Resample(labels, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    # canonical axial slices of a standard DICOM = the array slices (identity-like direction)
    want_arr = sitk.GetArrayFromImage(want)
    for i, k in enumerate(data.slices):
        assert np.array_equal(data.labels[i].numpy(), want_arr[k]), k
    # liver pixels sit on soft tissue (HU 0..200) of the image, not on air or fat
    hu = sitk.GetArrayFromImage(image)
    assert 0 < hu[want_arr == 5].mean() < 200


def test_soft_dice_loss_is_zero_for_a_perfect_prediction():
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, 2:5, 2:5] = 1
    perfect = torch.nn.functional.one_hot(target, 2).permute(0, 3, 1, 2).float() * 50
    assert soft_dice_loss(perfect, target) < 1e-4
    assert hfsam_loss(perfect, target) < 1e-3
    assert hfsam_loss(-perfect, target) > 0.5


def _loss_by_the_equations(logits, target):
    """0.1 CE + 0.9 soft Dice written out on NCHW logits (H-SAM's DiceLoss: per class, pooled over the batch)."""
    probs = logits.softmax(1)
    onehot = torch.nn.functional.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
    inter = (probs * onehot).sum((0, 2, 3))
    denom = (probs * probs).sum((0, 2, 3)) + (onehot * onehot).sum((0, 2, 3))
    dice = (1 - (2 * inter + 1e-5) / (denom + 1e-5)).mean()
    return 0.1 * torch.nn.functional.cross_entropy(logits, target) + 0.9 * dice


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_loss_and_its_gradient_are_the_equations_in_either_memory_layout(layout):
    """The decoder's logits are channels-last in memory: on either layout the loss must be the same
    number, with the same gradient, as the equations on NCHW."""
    gen = torch.Generator().manual_seed(0)
    base = 3 * torch.randn(2, 9, 16, 12, generator=gen)
    target = torch.randint(0, 9, (2, 16, 12), generator=gen)
    got_in = base.clone().contiguous(memory_format=layout).requires_grad_(True)
    want_in = base.clone().requires_grad_(True)
    got, want = hfsam_loss(got_in, target), _loss_by_the_equations(want_in, target)
    got.backward()
    want.backward()
    assert float(got.detach()) == pytest.approx(float(want.detach()), abs=1e-6)
    assert torch.allclose(got_in.grad, want_in.grad, atol=1e-7)
    assert float(soft_dice_loss(got_in.detach(), target)) == pytest.approx(
        float((want.detach() - 0.1 * torch.nn.functional.cross_entropy(base, target)) / 0.9), abs=1e-6
    )


def test_schedule_warms_up_then_decays_to_zero():
    f = [lr_factor(s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))
    assert lr_factor(100, 100, 10) == 0.0


def test_augmentation_moves_labels_with_the_image():
    gen = torch.Generator().manual_seed(0)
    labels = torch.zeros(4, 64, 64, dtype=torch.long)
    labels[:, 20:40, 10:30] = 1
    labels[:, 45:55, 40:60] = 2
    images = labels[:, None].float() / 2  # the image *is* the label map
    out_img, out_lab = augment(images, labels, gen)
    assert out_lab.dtype == torch.long and set(out_lab.unique().tolist()) <= {0, 1, 2}
    agree = (out_img[:, 0] * 2).round().long() == out_lab
    assert agree.float().mean() > 0.97  # only pixels on an edge may differ (bilinear vs nearest)
    assert not torch.equal(out_lab, labels)  # something did move


def test_holdout_split():
    assert split_holdout(4, None) == ([0, 1, 2, 3], [])
    assert split_holdout(5, None) == ([0, 1, 3, 4], [2])
    with pytest.raises(InputError):
        split_holdout(2, 2)


def _train_once(data, seed):
    torch.manual_seed(0)
    model = build_hfsam(ModelSpec("tiny", 64, 8, 2))
    report = train(model, data, TrainConfig(steps=12, batch_size=2, seed=seed, holdout=0))
    return model, report


def test_training_is_deterministic_on_the_cpu_and_the_loss_falls(ct):
    image, labels = ct
    data = prepare_training_set(image, labels, num_classes=8, img_size=64, slices=[10, 15, 20])
    a, ra = _train_once(data, seed=1)
    b, rb = _train_once(data, seed=1)
    c, rc = _train_once(data, seed=2)
    for k, v in a.trainable_state_dict().items():
        assert torch.equal(v, b.trainable_state_dict()[k]), k
    assert ra.losses == rb.losses and ra.losses != rc.losses
    assert np.mean(ra.losses[-3:]) < np.mean(ra.losses[:3])
    # frozen weights never move
    torch.manual_seed(0)
    fresh = build_hfsam(ModelSpec("tiny", 64, 8, 2)).state_dict()
    trained = a.state_dict()
    for name in ("image_encoder.blocks.0.attn.qkv.weight", "image_encoder.patch_embed.proj.weight"):
        assert torch.equal(trained[name], fresh[name]), name
    assert not torch.equal(trained["mask_decoder.awffm_2.fuse.weight"], fresh["mask_decoder.awffm_2.fuse.weight"])


def test_minutes_budget_stops_training(ct):
    image, labels = ct
    data = prepare_training_set(image, labels, num_classes=8, img_size=64, slices=[15])
    model = build_hfsam(ModelSpec("tiny", 64, 8, 2))
    report = train(model, data, TrainConfig(steps=None, minutes=0.02, batch_size=1, holdout=0))
    assert 1 <= report.steps and report.seconds < 10


def test_minutes_budget_with_cached_steps_sizes_the_schedule_to_the_time(ct):
    image, labels = ct
    data = prepare_training_set(image, labels, num_classes=8, img_size=64, slices=[15])
    model = build_hfsam(ModelSpec("tiny", 64, 8, 2))
    lrs = []

    class Seen(Progress):
        def metric(self, **fields):
            lrs.append(fields["lr"])

    report = train(
        model,
        data,
        TrainConfig(steps=None, minutes=0.25, batch_size=1, holdout=0, cached_steps=10**6, eval_every=1),
        Seen("none"),
    )
    assert 5 <= report.steps == report.cached_steps and report.seconds < 40
    # the schedule is sized from the cached steps' speed, so it never runs out before the time does (a
    # placeholder length would leave the later steps at lr 0); how far it decays depends on the machine's load
    assert len(lrs) == report.steps and min(lrs) > 0


def test_out_of_memory_retries_with_a_smaller_batch(ct):
    """CUDA OOM cannot happen on the CPU: the model raises torch's own OOM error once (a simulation)."""
    image, labels = ct
    data = prepare_training_set(image, labels, num_classes=8, img_size=64, slices=[15])
    model = build_hfsam(ModelSpec("tiny", 64, 8, 2))
    real_forward = model.forward
    calls = []

    def forward(x):
        calls.append(x.shape[0])
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(x)

    model.forward = forward
    import io

    from HFSAMCore.runtime.progress import Progress

    err = io.StringIO()
    report = train(model, data, TrainConfig(steps=3, batch_size=8, holdout=0), Progress("none", err=err))
    assert report.batch_size == 2 and report.steps == 3
    assert calls[:3] == [8, 4, 2]
    assert "retrying with batch size 4" in err.getvalue()


def test_out_of_memory_in_a_clipped_fp16_step_retries_with_a_smaller_batch(ct, monkeypatch):
    """fp16 with clipping unscales the gradient before the optimizer step; running out of memory in that
    step (AdamW's state, on a GPU) left the scaler refusing to unscale again ("unscale_() has already been
    called"), so the retry failed. The optimizer's first step raises torch's own OOM error (a simulation)."""
    image, labels = ct
    data = prepare_training_set(image, labels, num_classes=8, img_size=64, slices=[15])
    model = build_hfsam(ModelSpec("tiny", 64, 8, 2))
    failed = []

    def optimizer_that_runs_out_once(model, lr, weight_decay):
        optimizer = make_optimizer(model, lr, weight_decay)
        real_step = optimizer.step

        def step(*args, **kwargs):
            if not failed:
                failed.append(True)
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return real_step(*args, **kwargs)

        optimizer.step = step
        return optimizer

    monkeypatch.setattr(fewshot, "make_optimizer", optimizer_that_runs_out_once)
    cfg = TrainConfig(steps=3, batch_size=4, holdout=0, precision=torch.float16, max_grad_norm=1.0)
    report = train(model, data, cfg)
    assert failed and report.batch_size == 2 and report.steps == 3
    assert all(math.isfinite(v) for v in report.losses)


@pytest.mark.parametrize(
    "src,dst,plain_is_off",
    [((101, 122), (256, 256), False), ((512, 512), (256, 256), True), ((30, 40), (224, 224), True)],
)
def test_labels_are_resized_onto_the_images_pixel_grid(src, dst, plain_is_off):
    """A labeled rectangle and the same rectangle as image intensity land on the same pixels after resizing.

    The image is resized as the model sees it (bilinear, segment.to_model_input), the labels with
    train/training_set.resize_labels. torch's plain "nearest" is shifted by half a source pixel, which shows
    as half an output pixel where the sizes allow it (the negative control).
    """
    import torch
    from torch.nn import functional as F

    from HFSAMCore.model.inference import to_model_input
    from HFSAMCore.train.training_set import resize_labels

    h, w = src
    mask = np.zeros(src, np.float32)
    mask[h // 3 : 2 * h // 3, w // 4 : w // 2] = 1
    image = to_model_input(mask[None], dst[0], torch.device("cpu"))[0, 0].numpy()
    labels = resize_labels(torch.from_numpy(mask.astype(np.int64))[None], dst)[0]

    def offset(m):
        ys, xs = np.nonzero(m)
        iy, ix = np.nonzero(image > 0.5)
        return max(abs(ys.mean() - iy.mean()), abs(xs.mean() - ix.mean()))

    assert labels.dtype == torch.int64 and tuple(labels.shape) == dst
    assert offset(labels.numpy() > 0) < 0.05
    plain = F.interpolate(torch.from_numpy(mask)[None, None], size=dst, mode="nearest")[0, 0].numpy()
    assert (offset(plain > 0) >= 0.4) == plain_is_off


def _train_tiny(data, rank=2, **cfg):
    torch.manual_seed(0)
    model = build_hfsam(ModelSpec("tiny", 64, 8, rank))
    report = train(model, data, TrainConfig(steps=6, batch_size=2, seed=3, holdout=0, **cfg))
    return model, report


def test_cached_steps_compute_what_the_whole_model_computes(ct):
    """Steps on cached encoder features are the same optimisation as end-to-end steps when the encoder
    does not train: with the same batches (no augmentation, one copy) the losses and weights agree."""
    image, labels = ct
    data = prepare_training_set(image, labels, num_classes=8, img_size=64, slices=[10, 15, 20])
    live, rl = _train_tiny(data, rank=0, augment=False, cached_steps=0)
    cached, rc = _train_tiny(data, rank=0, augment=False, cached_steps=6, pool=1)
    assert rc.cached_steps == 6 and rl.cached_steps == 0
    np.testing.assert_allclose(rc.losses, rl.losses, rtol=1e-5)
    # Weights of outputs with ~zero gradient (absent classes, k biases) follow Adam's rounding noise, so
    # the comparison is on what the models predict
    with torch.no_grad():
        pa, pb = live.eval()(data.images).argmax(1), cached.eval()(data.images).argmax(1)
    assert (pa == pb).float().mean() > 0.999


def test_lora_waits_for_the_cached_steps_then_trains(ct):
    image, labels = ct
    data = prepare_training_set(image, labels, num_classes=8, img_size=64, slices=[10, 15, 20])
    torch.manual_seed(0)
    fresh = build_hfsam(ModelSpec("tiny", 64, 8, 2)).trainable_state_dict()
    lora = [n for n in fresh if "lora" in n]
    cached, _ = _train_tiny(data, cached_steps=6, pool=2)
    assert lora and all(torch.equal(cached.trainable_state_dict()[n], fresh[n]) for n in lora)
    mixed, report = _train_tiny(data, cached_steps=3, pool=2)
    m = mixed.trainable_state_dict()
    assert report.cached_steps == 3 and any(not torch.equal(m[n], fresh[n]) for n in lora)
    assert all(p.requires_grad for n, p in cached.named_parameters() if "lora" in n)  # trainable again


def test_recipe_config_keeps_the_recipes_share_of_cached_steps():
    from HFSAMCore.model.registry import get_backbone_info
    from HFSAMCore.train.fewshot import recipe_config

    recipe = get_backbone_info("lite_medsam").recipe
    assert 0 < recipe.cached_steps <= recipe.steps
    cfg = recipe_config("lite_medsam")
    assert (cfg.steps, cfg.cached_steps) == (recipe.steps, recipe.cached_steps)
    half = recipe_config("lite_medsam", steps=recipe.steps // 2)
    assert half.cached_steps == round(recipe.steps // 2 * recipe.cached_steps / recipe.steps)
    assert recipe_config("lite_medsam", steps=50, cached_steps=0).cached_steps == 0
    timed = recipe_config("lite_medsam", minutes=2)
    assert timed.steps is None and timed.cached_steps == recipe.cached_steps
    assert recipe_config("vit_b").cached_steps == 0  # the paper's recipe: every step end to end
    with pytest.raises(InputError, match="--cached-steps"):
        recipe_config("tiny", cached_steps=-1)


def test_recipe_config_takes_the_recipes_gradient_clipping_unless_told():
    from HFSAMCore.model.registry import get_backbone_info
    from HFSAMCore.train.fewshot import recipe_config

    lite = get_backbone_info("lite_medsam").recipe.max_grad_norm
    assert lite is not None and lite > 0 and recipe_config("lite_medsam").max_grad_norm == lite
    assert recipe_config("lite_medsam", max_grad_norm=None).max_grad_norm is None
    assert recipe_config("vit_b").max_grad_norm is None  # the paper's recipe does not clip
    assert TrainConfig().max_grad_norm is None  # nor the U-Net baseline or a bare TrainConfig


@pytest.mark.parametrize("norm", [0.0, -1.0, float("nan"), float("inf")])
def test_a_clipping_norm_that_would_spoil_the_gradient_is_refused_before_training(ct, norm):
    """clip_grad_norm_ reverses the gradient for a negative norm, zeroes it for 0 and poisons it with NaN."""
    image, labels = ct
    data = prepare_training_set(image, labels, num_classes=8, img_size=64, slices=[15])
    model = build_hfsam(ModelSpec("tiny", 64, 8, 2))
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    with pytest.raises(InputError, match="max_grad_norm must be a norm above 0"):
        train(model, data, TrainConfig(steps=2, batch_size=1, holdout=0, max_grad_norm=norm))
    assert all(torch.equal(v, before[k]) for k, v in model.trainable_state_dict().items())


@pytest.mark.parametrize("precision", [torch.float32, torch.float16])
def test_train_step_clips_the_whole_gradient_before_the_optimizer_step(precision):
    """Clipped: the gradient of all parameters together is scaled to the norm, its direction kept, and
    the optimizer steps with it (plain SGD, lr 1: the step is minus the gradient). fp16 goes through the
    GradScaler, whose scaled gradient must be unscaled before clipping."""
    from HFSAMCore.train.optim import grad_scaler, train_step

    torch.manual_seed(0)
    x, y = torch.rand(2, 1, 64, 64), torch.randint(0, 9, (2, 16, 16))

    def one_step(max_grad_norm):
        torch.manual_seed(1)
        model = build_hfsam(ModelSpec("tiny", 64, 8, 2))
        params = [p for p in model.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        sgd = torch.optim.SGD(params, lr=1.0)
        scaler = grad_scaler(precision, torch.device("cpu"))
        train_step(model, sgd, x, y, lr=1.0, precision=precision, scaler=scaler, max_grad_norm=max_grad_norm)
        grads = torch.cat([p.grad.flatten() for p in params])
        moved = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, params)])
        return grads, moved

    free, _ = one_step(None)
    assert float(free.norm()) > 0.01
    clipped, moved = one_step(0.01)
    assert float(clipped.norm()) == pytest.approx(0.01, rel=1e-3)
    torch.testing.assert_close(clipped, free * (0.01 / free.norm()), rtol=1e-3, atol=1e-8)
    torch.testing.assert_close(moved, clipped, rtol=1e-3, atol=1e-6)


def test_low_level_dropout_leaves_out_whole_samples_and_only_in_training():
    from HFSAMCore.model.hfsam import LowLevelDropout

    low = torch.randn(64, 4, 3, 3) + 10  # no element is 0 by chance
    drop = LowLevelDropout(0.5)
    drop.generator = torch.Generator().manual_seed(0)
    out = drop.train()(low)
    kept, left_out = (out == low).flatten(1).all(1), (out == 0).flatten(1).all(1)
    assert bool((kept ^ left_out).all()) and 0 < int(left_out.sum()) < 64  # whole samples, never rescaled
    drop.generator = torch.Generator().manual_seed(0)
    assert torch.equal(drop(low), out)  # the draws are the generator's
    assert torch.equal(drop.eval()(low), low)
    assert torch.equal(LowLevelDropout(0.0).train()(low), low)


def test_a_left_out_low_level_feature_decodes_as_a_model_without_one():
    """Each sample decodes either with its low-level feature or as if the branch gave zeros."""
    torch.manual_seed(0)
    model = build_hfsam(ModelSpec("tiny", 64, 8, 2)).train()
    with torch.no_grad():
        embedding, taps = model.encoder_features(torch.rand(8, 1, 64, 64))
        full = model.decode(embedding, taps)
        model.low_level_dropout.p, model.low_level_dropout.generator = 0.5, torch.Generator().manual_seed(1)
        mixed = model.decode(embedding, taps)
        model.low_level_dropout.p = 0.0
        for proj in model.low_level_proj:
            proj.weight.zero_()
            proj.bias.zero_()
        without = model.decode(embedding, taps)
    assert not torch.allclose(full, without)  # the low-level feature matters in this model
    as_full = [torch.allclose(m, f, atol=1e-6) for m, f in zip(mixed, full)]
    as_without = [torch.allclose(m, w, atol=1e-6) for m, w in zip(mixed, without)]
    assert all(a != b for a, b in zip(as_full, as_without)) and any(as_full) and any(as_without)


def _train_with_dropout(data, p, *, global_seed=0, fusion="two_step", progress=None):
    torch.manual_seed(0)
    model = build_hfsam(ModelSpec("tiny", 64, 8, 2, fusion=fusion))
    torch.manual_seed(global_seed)  # the run's draws must come from its own seed alone
    cfg = TrainConfig(steps=6, batch_size=2, seed=3, holdout=0, low_level_dropout=p)
    return model, train(model, data, cfg, progress)


def test_low_level_dropout_in_training_follows_the_runs_seed_and_ends_with_the_run(ct):
    image, labels = ct
    data = prepare_training_set(image, labels, num_classes=8, img_size=64, slices=[10, 15, 20])
    a, ra = _train_with_dropout(data, 0.5, global_seed=1)
    b, _ = _train_with_dropout(data, 0.5, global_seed=2)
    c, rc = _train_with_dropout(data, 0.0, global_seed=1)
    wa, wb, wc = (m.trainable_state_dict() for m in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    assert (ra.low_level_dropout, rc.low_level_dropout) == (0.5, 0.0)
    assert a.low_level_dropout.p == 0.0 and a.low_level_dropout.generator is None
    warnings = []
    progress = Progress("none")
    progress.warn = warnings.append
    _, rn = _train_with_dropout(data, 0.5, fusion="none", progress=progress)  # no branch: nothing to leave out
    assert rn.low_level_dropout == 0.0
    assert warnings == [
        "--low-level-dropout 0.5 has no effect: this model has no low-level branch (--fusion none); the adapter "
        "records 0"
    ]
