"""H-SAM's augmentation ("hsam"): its sampling, each transform's geometry, and labels that stay labels.

Geometry is checked with index maps: each pixel of the label holds its own index, so after a warp
every output pixel says which input pixel it was sampled from.
"""

import math

import numpy as np
import pytest
import torch

from HFSAMCore.train.augmentation import (
    HsamDraw,
    affine_from_points,
    apply_hsam,
    augment_sample,
    draw_hsam,
    gaussian_smooth,
)


def index_map(h, w):
    """label [1,h,w]: 1 + row * w + col (0 is left for 'outside')."""
    return (torch.arange(h * w).reshape(1, h, w) + 1).long()


def sampled_from(label, w):
    """(row, col) of the input pixel each output pixel came from; -1 where it came from outside."""
    v = label[0].numpy() - 1
    return np.where(v >= 0, v // w, -1), np.where(v >= 0, v % w, -1)


def test_one_transform_per_sample_with_h_sams_probabilities():
    gen = torch.Generator().manual_seed(0)
    n = 20_000
    kinds = [draw_hsam(gen, (8, 8)).kind for _ in range(n)]
    expected = {"rotate": 0.45, "crop": 0.55 * 0.75, "elastic": 0.55 * 0.25 * 0.85, "none": 0.55 * 0.25 * 0.15}
    for kind, p in expected.items():
        sd = math.sqrt(p * (1 - p) / n)
        assert abs(kinds.count(kind) / n - p) < 4 * sd, (kind, kinds.count(kind) / n)
    assert kinds.count("none") / n < 0.03  # 2 %, where independent draws leave a quarter untouched


def test_rotation_angles_and_crop_sides_are_h_sams():
    gen = torch.Generator().manual_seed(1)
    draws = [draw_hsam(gen, (40, 60)) for _ in range(3000)]
    angles = [d.angle_deg for d in draws if d.kind == "rotate"]
    assert set(angles) == set(range(-20, 20))  # numpy's randint(-20, 20): whole degrees, 19 the largest
    crops = [d.crop for d in draws if d.kind == "crop"]
    rows = np.array([c[2] for c in crops]) / 40
    cols = np.array([c[3] for c in crops]) / 60
    # the SIDE is 20-80 % (a zoom of 1.25x to 5x), the same share of both sides; an area reading would keep
    # sides of sqrt(0.2..0.8) = 45-89 %
    assert rows.min() < 0.23 and cols.min() < 0.22 and rows.max() > 0.77 and cols.max() > 0.78
    assert rows.min() >= 0.175 and rows.max() <= 0.8 and np.abs(rows - cols).max() < 1 / 40 + 1e-9
    for row0, col0, r, c in crops:  # uniform whole-pixel offsets inside the slice
        assert 0 <= row0 < 40 - r and 0 <= col0 < 60 - c


def test_rotation_turns_counter_clockwise_about_the_centre_nearest():
    size = 33
    label = index_map(size, size)
    image = label[:, None].float() / label.max()
    out_img, out_lab = apply_hsam(HsamDraw("rotate", (size, size), angle_deg=90), image, label)
    rows, cols = sampled_from(out_lab, size)
    assert (rows[11, 16], cols[11, 16]) == (16, 21)  # what was 5 px right of the centre is now 5 px above it
    # 17 degrees: every output pixel takes the nearest input pixel of the inverse rotation, zeros outside
    out_img, out_lab = apply_hsam(HsamDraw("rotate", (size, size), angle_deg=17), image, label)
    rows, cols = sampled_from(out_lab, size)
    c, s = math.cos(math.radians(17)), math.sin(math.radians(17))
    y, x = np.mgrid[0:size, 0:size] - 16.0
    want_x, want_y = 16 + c * x - s * y, 16 + s * x + c * y
    inside = rows >= 0
    assert inside.mean() > 0.8 and not inside[0, 0]
    assert np.hypot(cols - want_x, rows - want_y)[inside].max() <= math.sqrt(0.5) + 1e-6
    torch.testing.assert_close(out_img[0, 0], out_lab[0].float() / label.max())  # the image is nearest too


def test_crop_resizes_the_crop_to_the_whole_slice():
    size, (row0, col0, rows_kept, cols_kept) = 32, (5, 7, 13, 19)
    label = index_map(size, size)
    ramp = torch.arange(size).float().expand(size, size)[None, None]  # x coordinate as intensity
    out_img, out_lab = apply_hsam(HsamDraw("crop", (size, size), crop=(row0, col0, rows_kept, cols_kept)), ramp, label)
    rows, cols = sampled_from(out_lab, size)
    i = np.arange(size)
    np.testing.assert_array_equal(rows[:, 0], row0 + np.floor((i + 0.5) * rows_kept / size))
    np.testing.assert_array_equal(cols[0], col0 + np.floor((i + 0.5) * cols_kept / size))
    # the image is resampled (bicubic) at the crop's own sub-pixel positions: a ramp follows them to 0.1 px
    # (torch's bicubic, a = -0.75, does not reproduce a ramp exactly), where a one-pixel shift would be 1
    want = col0 + (i + 0.5) * cols_kept / size - 0.5
    np.testing.assert_allclose(out_img[0, 0, 10, 3:-3].numpy(), want[3:-3], atol=0.1)


def scipy_gaussian_filter(a, sigma):
    """scipy.ndimage.gaussian_filter's definition (mode 'reflect' = numpy 'symmetric', truncate 4)."""
    radius = int(4 * sigma + 0.5)
    t = np.arange(-radius, radius + 1)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k /= k.sum()
    for axis in (0, 1):
        padded = np.pad(a, [(radius, radius) if ax == axis else (0, 0) for ax in (0, 1)], mode="symmetric")
        a = np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), axis, padded)
    return a


@pytest.mark.parametrize("shape,sigma", [((20, 30), 2.3), ((6, 7), 2.0)])  # the second: a kernel wider than it
def test_gaussian_smooth_is_scipys_gaussian_filter(shape, sigma):
    a = np.random.default_rng(0).uniform(-1, 1, shape)
    got = gaussian_smooth(torch.from_numpy(a)[None], sigma)[0].numpy()
    np.testing.assert_allclose(got, scipy_gaussian_filter(a, sigma), atol=1e-10)


def test_elastic_is_a_sheared_affine_plus_a_smooth_field_of_h_sams_size():
    gen = torch.Generator().manual_seed(2)
    draws = [d for d in (draw_hsam(gen, (64, 64)) for _ in range(400)) if d.kind == "elastic"]
    assert len(draws) > 25
    non_similarity = []
    for d in draws:
        m = affine_from_points(d.points, d.moved)
        ones = torch.ones(3, 1, dtype=torch.float64)
        torch.testing.assert_close(torch.cat((d.points, ones), 1) @ m.T, d.moved)
        assert (d.moved - d.points).abs().max() <= 0.08 * 64
        a = m[:, :2]
        non_similarity.append(float((a[0, 0] - a[1, 1]).abs() + (a[0, 1] + a[1, 0]).abs()))
    assert np.mean(non_similarity) > 0.05  # shear and anisotropic scaling, not only rotation and zoom
    # the displacement: alpha 2W times uniform noise smoothed with sigma 0.08W: about 4 px at any width
    for w in (64, 128):
        noise = torch.rand(40, w, w, generator=gen, dtype=torch.float64) * 2 - 1
        disp = gaussian_smooth(noise, 0.08 * w) * 2 * w
        radius = int(4 * 0.08 * w + 0.5)
        t = torch.arange(-radius, radius + 1, dtype=torch.float64)
        k = torch.exp(-0.5 * (t / (0.08 * w)) ** 2)
        k = k / k.sum()
        want = 2 * w * (k**2).sum() / math.sqrt(3)  # std of smoothed U(-1, 1) away from the border
        centre = disp[:, w // 2 - 4 : w // 2 + 4, w // 2 - 4 : w // 2 + 4]
        assert 3.5 < want < 4.6 and abs(float(centre.std()) / float(want) - 1) < 0.25


def test_elastic_samples_the_affine_of_the_displaced_point():
    gen = torch.Generator().manual_seed(4)
    d = next(d for d in (draw_hsam(gen, (32, 32)) for _ in range(200)) if d.kind == "elastic")
    label = index_map(32, 32)
    _, out = apply_hsam(d, label[:, None].float(), label)
    rows, cols = sampled_from(out, 32)
    disp = gaussian_smooth(d.noise.double(), 0.08 * 32) * 64
    y, x = np.mgrid[0:32, 0:32].astype(float)
    qx, qy = x + disp[0].numpy(), y + disp[1].numpy()
    m = np.vstack([affine_from_points(d.points, d.moved).numpy(), [0, 0, 1]])
    src = np.linalg.inv(m) @ np.stack([qx.ravel(), qy.ravel(), np.ones(qx.size)])
    sx, sy = src[0].reshape(32, 32), src[1].reshape(32, 32)
    inside_q = (qx >= 0) & (qx <= 31) & (qy >= 0) & (qy <= 31)
    inside_src = (sx > 0.5) & (sx < 30.5) & (sy > 0.5) & (sy < 30.5)  # away from the mirrored border
    check = inside_q & inside_src
    assert check.mean() > 0.5
    assert np.hypot(cols - sx, rows - sy)[check].max() <= math.sqrt(0.5) + 1e-6
    assert (rows[~inside_q] == -1).all()  # displaced outside the slice: background, as map_coordinates


def test_labels_stay_the_labels_they_were():
    """H-SAM interpolates labels linearly in its elastic branch (class 2 between 5 and 0); here never."""
    label = torch.zeros(1, 32, 32, dtype=torch.long)
    label[0, 4:20, 4:14], label[0, 10:28, 16:30] = 5, 8
    image = label[:, None].float() / 8
    seen = set()
    for seed in range(60):
        out_img, out_lab = augment_sample("hsam", image, label, torch.Generator().manual_seed(seed))
        assert out_lab.dtype == torch.long and set(out_lab.unique().tolist()) <= {0, 5, 8}
        seen.add(bool(torch.equal(out_lab, label)))
        again = augment_sample("hsam", image, label, torch.Generator().manual_seed(seed))
        assert torch.equal(again[0], out_img) and torch.equal(again[1], out_lab)  # a sample's draw is its seed's
    assert seen == {True, False}
    with pytest.raises(ValueError, match="augmentation must be one of"):
        augment_sample("flip", image, label, torch.Generator())
