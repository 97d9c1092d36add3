"""Anatomy-like phantoms defined in patient coordinates, sampled onto any acquisition's grid.

An `Anatomy` is one body in LPS millimetres (x towards the patient's left, y posterior, z
superior): an elliptical cylinder along S-I with a fat rim and a bright spine-like rod at its
back, holding a rotated ellipsoidal organ (label 1) with a smaller lesion (label 2) inside it or
bulging out of its edge. `sample(anatomy, shape, affine)` draws it onto one acquisition through
the voxel-to-RAS affine its DICOM and NIfTI headers carry, so an axial, a sagittal and an oblique
acquisition of one anatomy show the same body, and their labels agree in world coordinates.

Edges are partial-volume: a voxel holds the fraction of its box on either side of a surface (a
linear ramp as wide as the voxel measured along the surface normal, widened by a small scanner
blur), so a lesion keeps its contrast at any spacing and orientation; a label holds the voxels
whose centre lies inside, the same shapes the image was drawn from. A low-frequency texture is
part of the anatomy; a smooth multiplicative bias field and Gaussian (CT) or Rician (MR) noise
belong to the acquisition. Size, position, rotation and contrast vary with the seed, so a network
must learn shape and contrast rather than a fixed mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

MODALITIES = ("CT", "MR")
LABELS = {0: "background", 1: "organ", 2: "lesion"}
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])  # DICOM's patient frame from NIfTI's
BLUR_MM = 0.8  # the scanner's point-spread, added to every partial-volume ramp
REACHES_OUT = 0.1  # share of a lesion's surface outside its organ from which it is drawn bright


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """Local -> LPS: any turn about S-I after a tilt of up to 15 degrees about L-R."""
    a = rng.uniform(0, np.pi)
    t = np.deg2rad(rng.uniform(-15, 15))
    about_si = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    tilt = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    return about_si @ tilt


@dataclass(frozen=True, eq=False)  # arrays inside: identity, not value, equality
class Ellipsoid:
    """A solid ellipsoid in LPS mm; the columns of `rotation` are its local axes in LPS."""

    center: np.ndarray  # (3,) LPS mm
    semi_axes: np.ndarray  # (3,) mm along the local axes; inf makes a cylinder along that axis
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))  # (3, 3) local -> LPS

    def half_length(self, direction: np.ndarray) -> float:
        """Half the ellipsoid's extent along a unit `direction` (its support function)."""
        return float(np.linalg.norm(self.semi_axes * (self.rotation.T @ direction)))


class _Grid:
    """The voxel centres of one acquisition, given by its voxel (column, row, slice) -> LPS map."""

    def __init__(self, shape: tuple[int, int, int], lps: np.ndarray):
        self.shape = shape
        self.steps = lps[:, :3]  # columns: one step along column, row, slice (mm, LPS)
        self.origin = lps[:, 3]

    def coordinate(self, direction: np.ndarray, offset: float = 0.0) -> np.ndarray:
        """direction . p - offset at every voxel centre p, as a (slices, rows, columns) array.

        The map is affine, so this is a sum of three 1-D ramps: no (N, 3) array of points.
        """
        per_step = direction @ self.steps
        n, rows, cols = self.shape
        return (
            np.float32(direction @ self.origin - offset)
            + (np.arange(n, dtype=np.float32) * np.float32(per_step[2]))[:, None, None]
            + (np.arange(rows, dtype=np.float32) * np.float32(per_step[1]))[None, :, None]
            + (np.arange(cols, dtype=np.float32) * np.float32(per_step[0]))[None, None, :]
        )

    def share(self, shape: Ellipsoid, semi_axes=None) -> np.ndarray:
        """The share of each voxel's box inside `shape` (0..1; 0.5 where the surface crosses its centre).

        A linear ramp across the voxel's width along the surface normal (the root sum of squares
        of its edges' projections, so as wide as the box's spread), widened by the scanner's
        blur. The distance is the first-order one, (f - 1) / |grad f| for f the normalised
        radius: exact on the surface and good within a voxel of it, where the ramp looks; its
        sign is right everywhere. `semi_axes` may replace the shape's with arrays (a taper).
        """
        semi_axes = [  # python floats or float32 arrays: the arithmetic stays float32
            float(a) if np.isscalar(a) else np.asarray(a, np.float32)
            for a in (shape.semi_axes if semi_axes is None else semi_axes)
        ]
        axes = [j for j in range(3) if not np.isscalar(semi_axes[j]) or np.isfinite(semi_axes[j])]
        local = {j: self.coordinate(shape.rotation[:, j], shape.rotation[:, j] @ shape.center) for j in axes}
        q = {j: local[j] / semi_axes[j] for j in axes}
        f = np.sqrt(sum(q[j] * q[j] for j in axes))
        gradient = {j: q[j] / semi_axes[j] for j in axes}  # f * grad f, in local coordinates
        g = np.sqrt(sum(gradient[j] * gradient[j] for j in axes))
        distance = (f - 1.0) / np.maximum(g / np.maximum(f, 1e-9), 1e-9)  # |grad f| is 0 only at the centre
        edges = shape.rotation.T @ self.steps  # the voxel's edges in local coordinates
        spread = sum(sum(gradient[j] * np.float32(edges[j, m]) for j in axes) ** 2 for m in range(3))
        width = np.sqrt(spread / np.maximum(g * g, 1e-18) + BLUR_MM**2)
        return np.clip(0.5 - distance / width, 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True, eq=False)
class Anatomy:
    """One body in patient coordinates (LPS mm): what every acquisition of it shows."""

    modality: str  # CT or MR: the contrasts below are in its units
    fov: float  # mm; the scale the body was drawn to (it fits a field of view this wide)
    body_center: np.ndarray  # (3,) LPS mm; the body's axis runs along S-I through it
    body_semi_axes: np.ndarray  # (2,) mm, L-R and A-P at the centre's level
    taper: float  # relative growth of the body's section per fov / 2 towards the head
    fat_mm: float  # thickness of the fat rim under the skin
    spine_center: np.ndarray  # (2,) LPS x, y of the spine-like rod (runs along S-I)
    spine_radius: float  # mm
    organ: Ellipsoid  # label 1 (where it is inside the body and outside the spine)
    lesion: Ellipsoid  # label 2 (same restriction); inside the organ or bulging out of its edge
    values: dict[str, float]  # air, fat, body, bone, organ, lesion in the modality's units
    texture_waves: np.ndarray  # (K, 3) rad/mm: a smooth tissue texture, part of the anatomy
    texture_phases: np.ndarray  # (K,)
    texture_amplitude: float  # its standard deviation, in the modality's units

    def organ_extent(self, direction: Sequence[float]) -> tuple[float, float]:
        """(centre, half length) of the organ along a unit `direction` (LPS): where a slab covers it."""
        direction = np.asarray(direction, float)
        return float(self.organ.center @ direction), self.organ.half_length(direction)


def make_anatomy(seed: int, modality: str = "CT", fov: float = 140.0, center=(0.0, 0.0, 0.0)) -> Anatomy:
    """Draw an anatomy from `seed`, sized to a field of view `fov` mm wide, centred at `center` (LPS).

    CT contrasts are Hounsfield units (air -1000, soft tissue 40, organ 60..100, lesion 40..70
    HU above or below the organ, fat -100, bone-like 400..700); MR contrasts are positive
    arbitrary units (fat bright, lesion 1.5..1.8 or 0.45..0.6 times the organ). A lesion that
    reaches past the organ's surface (`REACHES_OUT`) is the brighter kind, so it shows against
    the soft tissue round the organ as well.
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}; got {modality!r}")
    if not fov > 0:
        raise ValueError(f"fov must be a positive width in mm; got {fov}")
    rng = np.random.default_rng(seed)
    center = np.asarray(center, float)
    body = np.array([rng.uniform(0.40, 0.46), rng.uniform(0.34, 0.42)]) * fov  # L-R, A-P
    spine_center = center[:2] + np.array([rng.uniform(-0.05, 0.05) * body[0], 0.62 * body[1]])

    # Organ: off-centre in the body (more often anterior, away from the spine), long along S-I
    # so that an axial slab crosses it on nearly every slice.
    organ_rot = _rotation(rng)
    organ_axes = np.array([rng.uniform(0.20, 0.28), rng.uniform(0.16, 0.24), rng.uniform(0.42, 0.55)]) * fov
    organ_c = center + np.array(
        [rng.uniform(-0.12, 0.12), rng.uniform(-0.15, 0.05), rng.uniform(-0.06, 0.06)]
    ) * np.array([2 * body[0], 2 * body[1], fov])

    # Lesion: inside the organ, or (one seed in four) bulging out of its edge in the organ's plane.
    beside = rng.random() < 0.25
    direction = rng.normal(size=2)
    direction /= np.linalg.norm(direction)
    reach = rng.uniform(0.65, 0.85) if beside else rng.uniform(0.0, 0.4)
    lesion_c = organ_c + organ_rot @ np.array([*(direction * reach * organ_axes[:2]), 0.0])
    lesion_c[2] += rng.uniform(-0.05, 0.05) * fov
    shrink = np.array([rng.uniform(0.4, 0.55), rng.uniform(0.4, 0.55), rng.uniform(0.55, 0.75)])
    lesion = Ellipsoid(lesion_c, organ_axes * shrink, _rotation(rng))

    # A lesion with part of its border past the organ's surface borders the tissue round the organ
    # there, and a darker one would be about as dark as that tissue (CT 40 HU, MR 250 here): that
    # border would not show, and no reader could draw its ground truth. A lesion with a tenth or
    # more of its surface outside the organ is drawn brighter than the organ; one inside it is
    # brighter or darker (the same random draws either way).
    organ = Ellipsoid(organ_c, organ_axes, organ_rot)
    reaches_out = surface_share_outside(lesion, organ) >= REACHES_OUT
    if modality == "CT":
        organ_v = rng.uniform(60, 100)
        drawn = rng.choice([-1, 1])
        sign = 1 if reaches_out else drawn
        lesion_v = organ_v + sign * rng.uniform(40, 70)
        values = {"air": -1000.0, "body": 40.0, "fat": -100.0, "bone": rng.uniform(400, 700)}
    else:
        organ_v = rng.uniform(400, 550)
        bright = rng.random() < 0.5 or reaches_out
        lesion_v = organ_v * (rng.uniform(1.5, 1.8) if bright else rng.uniform(0.45, 0.6))
        values = {"air": 0.0, "body": 250.0, "fat": 700.0, "bone": 120.0}
    values |= {"organ": float(organ_v), "lesion": float(lesion_v)}
    waves, phases = _random_waves(rng, 8, np.array([0.20, 0.45]) * fov)
    return Anatomy(
        modality=modality,
        fov=float(fov),
        body_center=center,
        body_semi_axes=body,
        taper=float(rng.uniform(-0.08, 0.08)),
        fat_mm=float(rng.uniform(0.04, 0.07) * fov),
        spine_center=spine_center,
        spine_radius=float(rng.uniform(0.08, 0.11) * fov),
        organ=organ,
        lesion=lesion,
        values={key: float(v) for key, v in values.items()},
        texture_waves=waves,
        texture_phases=phases,
        texture_amplitude=2.0 if modality == "CT" else 5.0,
    )


def surface_share_outside(inner: Ellipsoid, outer: Ellipsoid, points: int = 2000) -> float:
    """The share of `inner`'s surface outside `outer` (of `points` spread evenly over it)."""
    k = np.arange(points) + 0.5
    polar, azimuth = np.arccos(1.0 - 2.0 * k / points), np.pi * (1.0 + 5**0.5) * k  # a Fibonacci sphere
    unit = np.stack([np.sin(polar) * np.cos(azimuth), np.sin(polar) * np.sin(azimuth), np.cos(polar)])
    surface = inner.center[:, None] + inner.rotation @ (inner.semi_axes[:, None] * unit)  # (3, points) LPS
    local = outer.rotation.T @ (surface - outer.center[:, None]) / outer.semi_axes[:, None]
    return float((np.sum(local * local, axis=0) > 1.0).mean())


def _random_waves(rng: np.random.Generator, k: int, wavelengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(k, 3) wave vectors (rad/mm) in random directions, wavelengths in the given mm range; phases."""
    waves = rng.normal(size=(k, 3))
    lengths = rng.uniform(wavelengths[0], wavelengths[1], k)
    waves *= (2 * np.pi / lengths / np.linalg.norm(waves, axis=1))[:, None]
    return waves, rng.uniform(0, 2 * np.pi, k)


def _waves(grid: _Grid, waves: np.ndarray, phases: np.ndarray, center: np.ndarray) -> np.ndarray:
    """A smooth field of unit variance on `grid`: a sum of plane waves through `center`."""
    total = sum(np.cos(grid.coordinate(w, w @ center - p)) for w, p in zip(waves, phases, strict=True))
    return (total * np.float32(np.sqrt(2.0 / len(phases)))).astype(np.float32)


def sample(
    anatomy: Anatomy, shape: Sequence[int], affine: np.ndarray, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Draw `anatomy` on one acquisition's grid: (image float32, label uint8) of `shape`.

    `shape` is (slices, rows, columns); `affine` maps voxel (column, row, slice) to RAS mm, as
    NIfTI headers and `dataset.dicom_affine` give it (columns, rows and slices may run along any
    patient direction). `seed` drives what belongs to this acquisition, not to the anatomy: the
    bias field and the noise. Labels: 0 background, 1 organ, 2 lesion.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be 3 positive sizes (slices, rows, columns); got {shape}")
    affine = np.asarray(affine, float)
    if affine.shape != (4, 4) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise ValueError(f"affine must be an invertible 4 x 4 voxel-to-RAS matrix; got shape {affine.shape}")
    grid = _Grid(shape, LPS_FROM_RAS @ affine[:3])
    a = anatomy
    z = grid.coordinate(np.array([0.0, 0.0, 1.0]), a.body_center[2])
    scale = 1.0 + np.float32(a.taper / (a.fov / 2)) * z  # the body's section along S-I
    trunk = Ellipsoid(a.body_center, np.array([*a.body_semi_axes, np.inf]))
    body = grid.share(trunk, [a.body_semi_axes[0] * scale, a.body_semi_axes[1] * scale, np.inf])
    under_fat = np.maximum(a.body_semi_axes - a.fat_mm, 1.0)
    inner = grid.share(trunk, [under_fat[0] * scale, under_fat[1] * scale, np.inf])
    rod = Ellipsoid(np.array([*a.spine_center, 0.0]), np.array([a.spine_radius, a.spine_radius, np.inf]))
    spine = grid.share(rod) * body
    organ = grid.share(a.organ) * body * (1.0 - spine)
    lesion = grid.share(a.lesion) * body * (1.0 - spine)

    v = a.values
    image = np.float32(v["air"]) + body * np.float32(v["fat"] - v["air"])
    for share, value in ((inner, v["body"]), (spine, v["bone"]), (organ, v["organ"]), (lesion, v["lesion"])):
        image += share * (np.float32(value) - image)
    image += (
        body
        * _waves(grid, a.texture_waves, a.texture_phases, a.body_center)
        * np.float32(a.texture_amplitude)
    )
    label = np.zeros(shape, np.uint8)
    label[organ > 0.5] = 1  # the voxel's centre is inside (the ramp is 0.5 on the surface)
    label[lesion > 0.5] = 2

    rng = np.random.default_rng(seed)
    bias_field = _waves(grid, *_random_waves(rng, 4, np.array([1.0, 2.0]) * a.fov), a.body_center)
    bias = np.exp(bias_field * np.float32(0.01 if a.modality == "CT" else 0.036))  # 1 % or 3.6 % std
    if a.modality == "CT":
        image = (image + np.float32(1000.0)) * bias - np.float32(1000.0)
        image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(8, 14))
    else:
        image *= bias
        sigma = np.float32(rng.uniform(10, 18))
        real = image + rng.standard_normal(image.shape, dtype=np.float32) * sigma
        image = np.hypot(real, rng.standard_normal(image.shape, dtype=np.float32) * sigma)
    return image.astype(np.float32), label


def axial_affine(shape: Sequence[int], spacing: Sequence[float], center=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Voxel (column, row, slice) -> RAS mm of a head-first axial grid centred at `center` (LPS).

    Columns run to the patient's left, rows posterior, slices superior (DICOM's axial default);
    `shape` is (slices, rows, columns) and `spacing` (slice, row, column) mm.
    """
    n, rows, cols = shape
    steps = np.diag([spacing[2], spacing[1], spacing[0]]).astype(float)  # LPS step per column, row, slice
    lps = np.eye(4)
    lps[:3, :3] = steps
    lps[:3, 3] = np.asarray(center, float) - steps @ ((np.array([cols, rows, n]) - 1) / 2)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def make_phantom(
    shape: Sequence[int],
    spacing: Sequence[float] = (3.0, 1.2, 1.2),
    seed: int = 0,
    modality: str = "CT",
) -> tuple[np.ndarray, np.ndarray]:
    """Return (image float32, label uint8), both of `shape` (slices, rows, columns): one axial scan.

    `spacing` is (slice, row, column) in mm. The anatomy (`make_anatomy(seed)`) is sized to the
    grid's smaller in-plane width, and the grid is centred on the body in-plane and on the organ
    along S-I, so the organ crosses nearly every slice of a slab up to about the in-plane width.
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}; got {modality!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 4:
        raise ValueError(f"shape must be 3 sizes (slices, rows, columns) of at least 4; got {shape}")
    spacing = np.asarray(spacing, float)
    if spacing.shape != (3,) or (spacing <= 0).any():
        raise ValueError(f"spacing must be 3 positive mm values (slice, row, column); got {spacing}")
    anatomy = make_anatomy(seed, modality, fov=min(shape[1] * spacing[1], shape[2] * spacing[2]))
    center = np.array([*anatomy.body_center[:2], anatomy.organ.center[2]])
    noise_seed = int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])
    return sample(anatomy, shape, axial_affine(shape, spacing, center), seed=noise_seed)
