"""Anatomy-like 3D phantoms with a two-label ground truth: a body, an organ (1) and a lesion (2).

Each phantom is a body outline (an elliptical cylinder with a fat rim and a bright spine-like
distractor) holding a rotated ellipsoidal organ, with a smaller lesion inside it or bulging out of
its edge. Intensities are smooth with partial-volume edges, a low-frequency texture, Gaussian (CT)
or Rician (MR) noise and a smooth multiplicative bias field. Size, position, rotation and
contrast vary with the seed, so a network must learn shape and contrast rather than a fixed mask,
while every structure crosses most slices so that a 2D U-Net can learn it in minutes on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

MODALITIES = ("CT", "MR")
LABELS = {0: "background", 1: "organ", 2: "lesion"}


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """A rotation mostly about the slice axis (any angle) with a small tilt (up to 15 degrees)."""
    a = rng.uniform(0, np.pi)
    t = np.deg2rad(rng.uniform(-15, 15))
    in_plane = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    tilt = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    return in_plane @ tilt


def _ellipsoid(axes: Sequence[np.ndarray], center, semi_axes, rotation: np.ndarray) -> np.ndarray:
    """Normalized radius (<= 1 inside) of a rotated ellipsoid on the grid given by 1D mm axes (z, y, x)."""
    rel = [(a - c).astype(np.float32) for a, c in zip(axes, center, strict=True)]
    grids = [rel[0][:, None, None], rel[1][None, :, None], rel[2][None, None, :]]
    total = 0.0
    for i in range(3):  # local coordinate i = sum_j R[j, i] * rel_j, as separable broadcasts
        local = grids[0] * rotation[0, i] + grids[1] * rotation[1, i] + grids[2] * rotation[2, i]
        total = total + (local / semi_axes[i]) ** 2
    return np.sqrt(total)


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], coarse=(3, 4, 4)) -> np.ndarray:
    """A smooth random field of unit-ish amplitude: coarse noise spread by separable Gaussian bumps."""
    grid = rng.standard_normal(coarse)
    bases = []
    for n, c in zip(shape, coarse, strict=True):
        t = np.linspace(0.0, c - 1.0, n)[:, None] - np.arange(c)[None, :]
        basis = np.exp(-0.5 * (t / 0.6) ** 2)
        bases.append(basis / basis.sum(axis=1, keepdims=True))
    return np.einsum("abc,za,yb,xc->zyx", grid, *bases, optimize=True).astype(np.float32)


def make_phantom(
    shape: Sequence[int],
    spacing: Sequence[float] = (3.0, 1.2, 1.2),
    seed: int = 0,
    modality: str = "CT",
) -> tuple[np.ndarray, np.ndarray]:
    """Return (image float32, label uint8), both of `shape` (slices, rows, columns).

    `spacing` is (slice, row, column) in mm, so the structures are ellipsoids in millimetres.
    CT images are in Hounsfield units (air -1000, soft tissue ~40, organ 60..100, lesion 40..70 HU
    above or below the organ, fat -100, bone-like 400..700); MR images are positive arbitrary
    units (background near 0 with Rician noise). Labels: 0 background, 1 organ, 2 lesion.
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}; got {modality!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 4:
        raise ValueError(f"shape must be 3 sizes (slices, rows, columns) of at least 4; got {shape}")
    spacing = np.asarray(spacing, float)
    if spacing.shape != (3,) or (spacing <= 0).any():
        raise ValueError(f"spacing must be 3 positive mm values (slice, row, column); got {spacing}")
    rng = np.random.default_rng(seed)

    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]  # mm, centred
    extent = np.asarray(shape) * spacing  # mm along z, y, x
    plane = min(extent[1], extent[2])
    zc = axes[0].astype(np.float32)[:, None, None]
    yc = axes[1].astype(np.float32)[None, :, None]
    xc = axes[2].astype(np.float32)[None, None, :]

    # Body: an elliptical cylinder that tapers slightly along z; fat rim; spine-like disc at the back.
    body_ab = np.array([rng.uniform(0.38, 0.45) * extent[1], rng.uniform(0.40, 0.46) * extent[2]])
    taper = 1.0 + rng.uniform(-0.08, 0.08) * zc / (extent[0] / 2)
    body_r = np.sqrt((yc / (body_ab[0] * taper)) ** 2 + (xc / (body_ab[1] * taper)) ** 2)
    body = body_r <= 1.0
    fat = body & (body_r > 1.0 - rng.uniform(6, 10) / body_ab.min())
    spine_c = (0.62 * body_ab[0], rng.uniform(-0.05, 0.05) * body_ab[1])
    spine_2d = np.hypot(yc - spine_c[0], xc - spine_c[1]) <= rng.uniform(0.08, 0.11) * plane
    spine = np.broadcast_to(spine_2d, shape)

    # Organ: rotated ellipsoid off-centre in the body, long along z so it crosses nearly every slice.
    rot = _rotation(rng)
    organ_axes = np.array(
        [
            rng.uniform(0.55, 0.75) * extent[0],
            rng.uniform(0.16, 0.24) * plane,
            rng.uniform(0.20, 0.28) * plane,
        ]
    )
    organ_c = np.array(
        [
            rng.uniform(-0.06, 0.06) * extent[0],
            rng.uniform(-0.15, 0.05) * extent[1],
            rng.uniform(-0.12, 0.12) * extent[2],
        ]
    )
    organ = (_ellipsoid(axes, organ_c, organ_axes, rot) <= 1.0) & body & ~spine

    # Lesion: inside the organ, or (one seed in four) bulging out of its edge.
    beside = rng.random() < 0.25
    direction = rng.normal(size=2)
    direction /= np.linalg.norm(direction)
    reach = rng.uniform(0.65, 0.85) if beside else rng.uniform(0.0, 0.4)
    lesion_c = organ_c + rot @ np.array([0.0, *(direction * reach * organ_axes[1:])])
    lesion_c[0] = organ_c[0] + rng.uniform(-0.05, 0.05) * extent[0]
    lesion_axes = np.array(
        [
            rng.uniform(0.40, 0.55) * extent[0],
            max(rng.uniform(0.35, 0.5) * organ_axes[1], 3 * spacing[1]),
            max(rng.uniform(0.35, 0.5) * organ_axes[2], 3 * spacing[2]),
        ]
    )
    lesion = (_ellipsoid(axes, lesion_c, lesion_axes, _rotation(rng)) <= 1.0) & body & ~spine

    label = np.zeros(shape, np.uint8)
    label[organ] = 1
    label[lesion] = 2

    texture = _smooth_field(rng, shape)
    bias = np.exp(
        _smooth_field(rng, shape, coarse=(2, 3, 3)) * np.float32(0.03 if modality == "CT" else 0.12)
    )
    if modality == "CT":
        organ_v = rng.uniform(60, 100)
        lesion_v = organ_v + rng.choice([-1, 1]) * rng.uniform(40, 70)
        values = {"air": -1000.0, "body": 40.0, "fat": -100.0, "bone": rng.uniform(400, 700)}
    else:
        organ_v = rng.uniform(400, 550)
        lesion_v = organ_v * (rng.uniform(1.5, 1.8) if rng.random() < 0.5 else rng.uniform(0.45, 0.6))
        values = {"air": 0.0, "body": 250.0, "fat": 700.0, "bone": 120.0}
    image = np.full(shape, values["air"], np.float32)
    image[body] = values["body"]
    image[fat] = values["fat"]
    image[spine & body] = values["bone"]
    image[organ] = organ_v
    image[lesion] = lesion_v
    image[body] += texture[body] * (6.0 if modality == "CT" else 15.0)
    # Partial-volume edges: blur in-plane by about a voxel, less across the thick slices.
    image = ndimage.gaussian_filter(image, sigma=(0.3, 0.8, 0.8))
    if modality == "CT":
        image = (image + np.float32(1000.0)) * bias - np.float32(1000.0)
        image += rng.standard_normal(shape, dtype=np.float32) * np.float32(rng.uniform(8, 14))
    else:
        image *= bias
        sigma = np.float32(rng.uniform(10, 18))
        real = image + rng.standard_normal(shape, dtype=np.float32) * sigma
        image = np.hypot(real, rng.standard_normal(shape, dtype=np.float32) * sigma)
    return image.astype(np.float32), label
