"""Training augmentation, by name: the one list of augmentation recipes (``AUGMENTATIONS``).

``hsam``         H-SAM's ``RandomGenerator`` (``datasets/dataset_synapse.py`` of Cccccczh404/H-SAM, the
                 module HF-SAM's released trainer imports), reproduced in its sampling. Each sample gets
                 AT MOST ONE transform, chosen by three successive draws:

                     rotation      p = 0.45                        (first draw > 0.55)
                     crop-resize   p = 0.55 x 0.75       = 0.4125  (second draw > 0.25)
                     elastic       p = 0.55 x 0.25 x 0.85 = 0.1169 (third draw > 0.15)
                     nothing       p = 0.55 x 0.25 x 0.15 = 0.0206

                 rotation: a whole number of degrees in [-20, 19] (numpy's randint(-20, 20)) about the
                 slice centre, counter-clockwise as displayed (scipy's ``ndimage.rotate``), zeros outside;
                 image AND label nearest (H-SAM rotates both with order 0).
                 crop-resize: a crop whose SIDE is s = U(0.2, 0.8) of each side (rows ``int(H s)``,
                 columns ``int(W s)``, offsets uniform over whole pixels), resized back to the full slice:
                 a zoom of 1.25x to 5x; image bicubic (H-SAM: cubic spline), label nearest.
                 elastic: a random affine with shear (three points at the centre +- min(H, W)//3, each
                 coordinate moved by U(-0.08 W, 0.08 W), mirrored at the border), then a displacement
                 field: uniform noise in [-1, 1] per pixel, Gaussian-smoothed (sigma 0.08 W, scipy's
                 ``gaussian_filter``: mirrored edges, kernel radius int(4 sigma + 0.5)) and scaled by
                 2 W, zeros outside; image bilinear.
                 All sizes are in pixels of the slice as stored (before resizing to the model input),
                 as H-SAM draws them; the warp is applied once, to the resized slice.

``independent``  the few-shot fine-tuner's own, milder recipe (``augment`` below): rotation (p 0.5),
                 crop (p 0.3, 20-80 % of the AREA) and a coarse elastic warp (p 0.3), drawn
                 independently, so a quarter of the samples get none.
``none``         no augmentation.

Deliberate differences from H-SAM, all sub-pixel or a bug not reproduced: labels are always resampled
nearest (H-SAM's elastic branch interpolates the LABEL bilinearly and then truncates it to an integer,
which invents classes along organ borders, e.g. 2 = left kidney between liver 5 and background 0);
H-SAM interpolates twice in the elastic branch (affine, then displacement) where this does it once;
pixel-centre conventions (align_corners=False) where scipy's zoom aligns corners. No flips, as H-SAM.

Randomness comes from a ``torch.Generator`` per sample, so a sample is warped alike on any
number of processes (see dataset_training.py); H-SAM's own draws are unseeded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported inside the functions: the CLI reads AUGMENTATIONS without it
    import torch

AUGMENTATIONS = ("hsam", "independent", "none")

# H-SAM's RandomGenerator, as numbers (see the module docstring).
HSAM_ROTATE_ABOVE, HSAM_CROP_ABOVE, HSAM_ELASTIC_ABOVE = 0.55, 0.25, 0.15
HSAM_ANGLES = (-20, 20)  # numpy randint: low inclusive, high exclusive
HSAM_CROP_SIDE = (0.2, 0.8)
HSAM_ELASTIC_ALPHA, HSAM_ELASTIC_SIGMA, HSAM_ELASTIC_AFFINE = 2.0, 0.08, 0.08  # times the slice width
GAUSSIAN_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default


@dataclass
class HsamDraw:
    """One sample's draw: which transform and its parameters, in pixels of the stored slice."""

    kind: str  # "rotate" | "crop" | "elastic" | "none"
    size: tuple[int, int]  # (H, W) of the stored slice
    angle_deg: int = 0
    crop: tuple[int, int, int, int] = (0, 0, 0, 0)  # row0, col0, rows, cols
    points: torch.Tensor | None = None  # [3, 2] (x, y) before the affine
    moved: torch.Tensor | None = None  # [3, 2] (x, y) after it
    noise: torch.Tensor | None = None  # [2, H, W] uniform in [-1, 1): x then y displacement


def draw_hsam(gen: torch.Generator, size: tuple[int, int]) -> HsamDraw:
    """H-SAM's three successive draws (rotation, else crop, else elastic, else nothing) for one slice."""
    import torch

    h, w = int(size[0]), int(size[1])

    def uniform() -> float:
        return float(torch.rand((), generator=gen))

    def randint(low: int, high: int) -> int:  # numpy's randint: [low, high)
        return int(torch.randint(low, high, (), generator=gen))

    if uniform() > HSAM_ROTATE_ABOVE:
        return HsamDraw("rotate", (h, w), angle_deg=randint(*HSAM_ANGLES))
    if uniform() > HSAM_CROP_ABOVE:
        side = HSAM_CROP_SIDE[0] + uniform() * (HSAM_CROP_SIDE[1] - HSAM_CROP_SIDE[0])
        rows, cols = int(h * side), int(w * side)
        col0 = randint(0, w - cols)
        row0 = randint(0, h - rows)
        return HsamDraw("crop", (h, w), crop=(row0, col0, rows, cols))
    if uniform() > HSAM_ELASTIC_ABOVE:
        centre = torch.tensor([h // 2, w // 2], dtype=torch.float64)  # H-SAM passes (H//2, W//2) to cv2 as (x, y)
        half = min(h, w) // 3
        points = torch.stack((centre + half, torch.stack((centre[0] + half, centre[1] - half)), centre - half))
        moved = points + (torch.rand(3, 2, generator=gen, dtype=torch.float64) * 2 - 1) * HSAM_ELASTIC_AFFINE * w
        noise = torch.rand(2, h, w, generator=gen) * 2 - 1
        return HsamDraw("elastic", (h, w), points=points, moved=moved, noise=noise)
    return HsamDraw("none", (h, w))


def affine_from_points(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """The 2x3 matrix M with M [x, y, 1]^T = dst for the three (x, y) points src (cv2.getAffineTransform)."""
    import torch

    a = torch.cat((src, torch.ones(3, 1, dtype=src.dtype)), dim=1)  # [3, 3]
    return torch.linalg.solve(a, dst).T  # [2, 3]


def gaussian_smooth(field: torch.Tensor, sigma: float) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter(field, sigma) on each [H, W] of ``field`` [N, H, W]: mode 'reflect'
    (the edge pixel repeated: d c b a | a b c d | d c b a), kernel radius int(4 sigma + 0.5)."""
    import torch
    from torch.nn import functional as F

    radius = int(GAUSSIAN_TRUNCATE * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(field.dtype).to(field.device)

    def along_last(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1]
        index = torch.arange(-radius, n + radius) % (2 * n)
        index = torch.where(index >= n, 2 * n - 1 - index, index).to(x.device)
        padded = x.index_select(-1, index)
        return F.conv1d(padded.reshape(-1, 1, padded.shape[-1]), kernel.view(1, 1, -1)).reshape(x.shape)

    return along_last(along_last(field).transpose(-1, -2)).transpose(-1, -2)


def _source_coords(d: HsamDraw, out_size: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """For each pixel of the S x S output, where it samples the stored slice: (x, y) in stored pixels,
    and for the elastic branch a mask of the points that fall inside it (elsewhere zeros)."""
    import torch
    from torch.nn import functional as F

    h, w = d.size
    i = torch.arange(out_size, dtype=torch.float64, device=device)
    if d.kind == "crop":  # the output spans the crop: output pixel centres onto crop pixel coordinates
        row0, col0, rows, cols = d.crop
        y = row0 + (i + 0.5) * rows / out_size - 0.5
        x = col0 + (i + 0.5) * cols / out_size - 0.5
        return x[None, :].expand(out_size, -1), y[:, None].expand(-1, out_size), None
    # the output spans the whole slice (before H-SAM's resize to the model size)
    y = ((i + 0.5) * h / out_size - 0.5)[:, None].expand(-1, out_size)
    x = ((i + 0.5) * w / out_size - 0.5)[None, :].expand(out_size, -1)
    if d.kind == "rotate":
        c, s = math.cos(math.radians(d.angle_deg)), math.sin(math.radians(d.angle_deg))
        cy, cx = (h - 1) / 2, (w - 1) / 2
        dy, dx = y - cy, x - cx
        return cx - s * dy + c * dx, cy + c * dy + s * dx, None
    if d.kind == "elastic":
        assert d.noise is not None and d.points is not None and d.moved is not None  # draw_hsam sets all three
        disp = gaussian_smooth(d.noise.to(device), HSAM_ELASTIC_SIGMA * w) * (HSAM_ELASTIC_ALPHA * w)  # [2, H, W]
        if (h, w) != (out_size, out_size):  # the field is smooth (sigma = 0.08 W): bilinear is exact enough
            grid = torch.stack(((x + 0.5) * 2 / w - 1, (y + 0.5) * 2 / h - 1), dim=-1)[None].to(disp.dtype)
            disp = F.grid_sample(disp[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
        x, y = x + disp[0].double(), y + disp[1].double()
        inside = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)  # map_coordinates, mode 'constant'
        inverse = torch.linalg.inv(
            torch.cat((affine_from_points(d.points, d.moved), torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)))
        )
        inverse = inverse.to(device)
        return (
            inverse[0, 0] * x + inverse[0, 1] * y + inverse[0, 2],
            inverse[1, 0] * x + inverse[1, 1] * y + inverse[1, 2],
            inside,
        )
    return x, y, None


def apply_hsam(d: HsamDraw, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp one sample (image [1,C,S,S], label [1,S,S], the stored slice resized to S) as drawn."""
    import torch
    from torch.nn import functional as F

    if d.kind == "none":
        return image, label
    size = image.shape[-1]
    h, w = d.size
    x, y, inside = _source_coords(d, size, image.device)
    grid = torch.stack(((x + 0.5) * 2 / w - 1, (y + 0.5) * 2 / h - 1), dim=-1)[None].to(image.dtype)
    image_mode = {"rotate": "nearest", "crop": "bicubic", "elastic": "bilinear"}[d.kind]
    padding = {"rotate": "zeros", "crop": "border", "elastic": "reflection"}[d.kind]
    out = F.grid_sample(image, grid, mode=image_mode, padding_mode=padding, align_corners=False)
    lab = (
        F.grid_sample(label[:, None].to(image.dtype), grid, mode="nearest", padding_mode=padding, align_corners=False)[
            :, 0
        ]
        .round()
        .long()
    )
    if inside is not None:
        out = out * inside.to(out.dtype)
        lab = lab * inside.long()
    return out, lab


def augment_sample(
    kind: str,
    image: torch.Tensor,
    label: torch.Tensor,
    gen: torch.Generator,
    source_size: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment one sample (image [1,C,S,S], label [1,S,S]) by the recipe ``kind`` (AUGMENTATIONS).

    ``source_size``: the (H, W) of the slice as stored, before it was resized to S (default S x S);
    H-SAM's sizes are relative to it.
    """
    if kind == "hsam":
        return apply_hsam(draw_hsam(gen, source_size or (image.shape[-2], image.shape[-1])), image, label)
    if kind == "independent":
        return augment(image, label, gen)
    if kind == "none":
        return image, label
    raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, not {kind!r}")


ROTATION_DEG = 20.0


CROP_AREA = (0.2, 0.8)  # area kept by a random crop, resized back


P_ROTATE, P_CROP, P_ELASTIC = 0.5, 0.3, 0.3


# -- augmentation -------------------------------------------------------------
def augment(images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One random affine (+ optional elastic) warp per sample; images bilinear, labels nearest.

    The few-shot recipe ("independent" in augmentation.py): rotation, crop and elastic drawn
    independently (P_ROTATE, P_CROP, P_ELASTIC), the crop keeping 20-80 % of the AREA. Milder than
    H-SAM's (augmentation.py, "hsam"), which suits a handful of slices of one patient; not measured
    against it.
    """
    import torch
    from torch.nn import functional as F

    b = images.shape[0]
    dev = images.device

    def rand(*shape):
        return torch.rand(*shape, generator=gen).to(dev)

    angle = torch.where(rand(b) < P_ROTATE, (rand(b) * 2 - 1) * math.radians(ROTATION_DEG), torch.zeros(b, device=dev))
    area = CROP_AREA[0] + rand(b) * (CROP_AREA[1] - CROP_AREA[0])
    side = torch.where(rand(b) < P_CROP, area.sqrt(), torch.ones(b, device=dev))
    shift = (rand(b, 2) * 2 - 1) * (1 - side)[:, None]
    cos, sin = torch.cos(angle) * side, torch.sin(angle) * side
    theta = torch.stack((torch.stack((cos, -sin, shift[:, 0]), 1), torch.stack((sin, cos, shift[:, 1]), 1)), 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    elastic = rand(b) < P_ELASTIC
    if elastic.any():
        coarse = torch.randn(b, 2, 4, 4, generator=gen).to(dev) * 0.03
        field_ = F.interpolate(coarse, size=images.shape[-2:], mode="bicubic", align_corners=False)
        grid = grid + field_.permute(0, 2, 3, 1) * elastic[:, None, None, None]
    out_img = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out_lab = F.grid_sample(labels[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out_img, out_lab[:, 0].long()
