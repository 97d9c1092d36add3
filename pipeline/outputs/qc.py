"""QC pictures a radiologist can judge at a glance: contours over the anatomy, three planes and a montage.

    write_qc_png(path, image, mask, label_names, affine=..., modality="CT", truth=None)

draws, from the source volume and its predicted mask on the same grid:

- a top row of three orthogonal planes (axial, coronal, sagittal) through the centroid of the
  labelled voxels, in the radiological convention (patient's right on the image's left, anterior
  and superior up), with square pixels in millimetres whatever the voxel spacing;
- below it, an axial montage of up to nine slices spread over the labels' extent;
- a legend naming each label in its colour.

Each label is a light fill (so the anatomy underneath stays visible) edged by a solid contour (so
a reviewer sees whether the boundary follows the organ's edge). With a ground truth on the same grid
(training's validation pictures), each true label is drawn over it as a dashed contour, dashes of the
label's colour alternating with white, so prediction and truth are told apart where they differ;
the planes then pass through the centroid of both. The slice is shown at a window
that suits the modality: CT at a fixed soft-tissue window in Hounsfield units, anything else
(MR, PET, unknown) between the 1st and 99th percentile of the body's voxels.

The reorientation is for display only: nothing written beside the picture is reoriented.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from scipy import ndimage

from pipeline.io.atomic import atomic_path

# Label colours (tab10 without its grey), by label value 1, 2, ...
COLOURS: tuple[tuple[float, float, float], ...] = (
    (0.12, 0.47, 0.71),
    (1.0, 0.5, 0.05),
    (0.17, 0.63, 0.17),
    (0.84, 0.15, 0.16),
    (0.58, 0.4, 0.74),
    (0.55, 0.34, 0.29),
    (0.89, 0.47, 0.76),
    (0.74, 0.74, 0.13),
    (0.09, 0.75, 0.81),
)

# CT soft-tissue window (level 40 HU, width 400 HU): the abdominal/thoracic organ reading default.
CT_WINDOW = (-160.0, 240.0)
FILL_ALPHA = 0.22  # light enough that the anatomy under a label stays readable
TRUTH_DASH = (1.0, 1.0, 1.0)  # the colour alternating with the label's along a ground-truth contour
DASH_PX = 3  # length of one dash of a ground-truth contour, in pixels
PLANE_PX = 220  # the longer side of each orthogonal plane, in pixels
MONTAGE_PX = 150  # the longer side of each montage tile
MONTAGE_SLICES = 9
BLACK = (0.0, 0.0, 0.0)
FRAME = (0.6, 0.6, 0.6)  # the line around each picture on the white page
SIDE_LETTER = (1.0, 1.0, 0.0)  # the patient's side at a plane's edges: yellow over the anatomy
# zlib level of the PNG: 1 writes the flat-coloured page several times faster than the usual 6,
# for a somewhat larger file (one QC picture per case, for a person to look at).
PNG_COMPRESS_LEVEL = 1
# The patient's side at each plane's left and right edge (radiological convention).
_SIDES = {"axial": "RL", "coronal": "RL", "sagittal": "AP"}


def colour(value: int) -> tuple[float, float, float]:
    """The RGB colour (0..1) of label `value` (>= 1) in every picture and in the report."""
    return COLOURS[(int(value) - 1) % len(COLOURS)]


def display_window(image: np.ndarray, modality: str | None) -> tuple[float, float]:
    """(low, high) intensities mapped to black and white.

    CT: the soft-tissue window when the values look like Hounsfield units (air near -1000);
    otherwise, and for every other modality, the 1st-99th percentile of the voxels above the
    volume's lowest value (the body, not the air around it), sampled on a coarse grid.
    """
    step = tuple(max(1, n // 96) for n in image.shape)
    sample = np.asarray(image[tuple(slice(None, None, s) for s in step)], dtype=np.float32)
    if (modality or "").upper() == "CT" and sample.size and float(sample.min()) < -500:
        return CT_WINDOW
    body = sample[sample > sample.min()] if sample.size else sample
    if body.size < 16:
        body = sample
    if not body.size:
        return 0.0, 1.0
    lo, hi = np.percentile(body, [1, 99])
    return float(lo), float(max(hi, lo + 1e-6))


@dataclass(frozen=True)
class Canonical:
    """A volume and its mask (and ground truth, if any) turned to RAS axis order for display, with
    the voxel size per axis."""

    image: np.ndarray  # (x: right->left reversed below, y: posterior->anterior, z: inferior->superior)
    mask: np.ndarray
    spacing: tuple[float, float, float]  # mm along x, y, z after reorientation
    truth: np.ndarray | None = None  # the ground-truth labels, reoriented as `mask`

    @classmethod
    def from_grid(
        cls,
        image: np.ndarray,
        mask: np.ndarray,
        affine: np.ndarray | None,
        truth: np.ndarray | None = None,
    ) -> Canonical:
        if image.shape != mask.shape:
            raise ValueError(f"image shape {image.shape} and mask shape {mask.shape} differ")
        if truth is not None and truth.shape != mask.shape:
            raise ValueError(f"ground truth shape {truth.shape} and mask shape {mask.shape} differ")
        if image.ndim != 3:
            raise ValueError(f"expected a 3-D volume, got shape {image.shape}")
        affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
        ornt = io_orientation(affine)
        to_ras = ornt_transform(ornt, axcodes2ornt(("R", "A", "S")))
        zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        spacing = tuple(float(zooms[int(np.flatnonzero(ornt[:, 0] == ax)[0])]) for ax in range(3))
        return cls(
            apply_orientation(image, to_ras),
            apply_orientation(mask, to_ras),
            spacing,  # type: ignore[arg-type]
            None if truth is None else apply_orientation(truth, to_ras),
        )

    def labelled(self) -> np.ndarray:
        """Where the mask, or the ground truth, has a label."""
        fg = self.mask > 0
        return fg if self.truth is None else fg | (self.truth > 0)

    def centroid(self) -> tuple[int, int, int]:
        """Voxel index (x, y, z) of the labelled voxels' centre of mass; the volume's centre if none."""
        fg = self.labelled()
        if not fg.any():
            return tuple(n // 2 for n in self.mask.shape)  # type: ignore[return-value]
        com = ndimage.center_of_mass(fg)
        return tuple(round(c) for c in com)  # type: ignore[return-value]

    def plane(self, name: str, index: int) -> tuple[np.ndarray, np.ndarray, float, float]:
        """One plane as (image, mask, row mm, column mm), rows top->bottom as a viewer shows it.

        axial: rows anterior->posterior, columns patient right->left; coronal: rows superior->
        inferior, columns right->left; sagittal: rows superior->inferior, columns anterior->posterior.
        """
        img, row_mm, col_mm = self._cut(self.image, name, index)
        return img, self._cut(self.mask, name, index)[0], row_mm, col_mm

    def truth_plane(self, name: str, index: int) -> np.ndarray | None:
        """The ground truth's plane, as `plane` cuts the mask; None without a ground truth."""
        return None if self.truth is None else self._cut(self.truth, name, index)[0]

    def _cut(self, volume: np.ndarray, name: str, index: int) -> tuple[np.ndarray, float, float]:
        sx, sy, sz = self.spacing
        if name == "axial":  # rows y, columns x
            return volume[:, :, index].T[::-1, ::-1], sy, sx
        if name == "coronal":  # rows z, columns x
            return volume[:, index, :].T[::-1, ::-1], sz, sx
        if name == "sagittal":  # rows z, columns y
            return volume[index, :, :].T[::-1, ::-1], sz, sy
        raise ValueError(f"unknown plane {name!r}; valid: axial, coronal, sagittal")


def montage_slices(mask: np.ndarray, n: int = MONTAGE_SLICES) -> list[int]:
    """Up to `n` indices along the last axis, evenly spread over the mask's extent (or the volume's)."""
    has = np.flatnonzero(mask.reshape(-1, mask.shape[2]).any(axis=0))
    lo, hi = (int(has[0]), int(has[-1])) if has.size else (0, mask.shape[2] - 1)
    return sorted(set(np.linspace(lo, hi, min(n, hi - lo + 1)).round().astype(int).tolist()))


def _resample(image: np.ndarray, *labels: np.ndarray, row_mm: float, col_mm: float, longest: int):
    """Nearest-neighbour resampling of a plane and its label planes to square pixels, the longer
    side `longest` pixels: the resampled arrays in the order given."""
    height_mm, width_mm = image.shape[0] * row_mm, image.shape[1] * col_mm
    px_mm = max(height_mm, width_mm) / longest
    h, w = max(1, round(height_mm / px_mm)), max(1, round(width_mm / px_mm))
    rows = np.minimum((np.arange(h) + 0.5) * px_mm / row_mm, image.shape[0] - 1).astype(np.intp)
    cols = np.minimum((np.arange(w) + 0.5) * px_mm / col_mm, image.shape[1] - 1).astype(np.intp)
    return tuple(a[np.ix_(rows, cols)] for a in (image, *labels))


def _edges(labels: np.ndarray, thickness: int):
    """(value, region, its contour `thickness` pixels wide) for each label present but 0."""
    for value in np.unique(labels):
        if value == 0:
            continue
        region = labels == value
        yield (
            int(value),
            region,
            region & ~ndimage.binary_erosion(region, iterations=thickness, border_value=0),
        )


def overlay(
    image: np.ndarray,
    mask: np.ndarray,
    window: tuple[float, float],
    *,
    thickness: int = 1,
    truth: np.ndarray | None = None,
) -> np.ndarray:
    """(h, w, 3) RGB in [0, 1]: the windowed slice, each label a light fill edged by its contour;
    with `truth`, each true label's contour dashed (its colour alternating with `TRUTH_DASH`) on top."""
    lo, hi = window
    grey = np.clip((image.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    for value, region, edge in _edges(mask, thickness):
        tint = np.asarray(colour(value), np.float32)
        rgb[region] = (1 - FILL_ALPHA) * rgb[region] + FILL_ALPHA * tint
        rgb[edge] = tint
    if truth is not None:
        rows, cols = np.indices(truth.shape)
        white = (rows + cols) // DASH_PX % 2 == 1  # diagonal stripes: dashes along any contour
        for value, _, edge in _edges(truth, thickness):
            rgb[edge & ~white] = colour(value)
            rgb[edge & white] = TRUTH_DASH
    return rgb


def _tile(canon: Canonical, plane: str, index: int, window: tuple[float, float], longest: int) -> np.ndarray:
    img, lab, row_mm, col_mm = canon.plane(plane, index)
    truth = canon.truth_plane(plane, index)
    img, lab, *rest = _resample(
        img, lab, *([] if truth is None else [truth]), row_mm=row_mm, col_mm=col_mm, longest=longest
    )
    return overlay(img, lab, window, thickness=max(1, longest // 160), truth=rest[0] if rest else None)


def write_qc_png(
    path: Path,
    image: np.ndarray,
    mask: np.ndarray,
    label_names: Mapping[int, str],
    *,
    affine: np.ndarray | None = None,
    modality: str | None = None,
    title: str = "",
    truth: np.ndarray | None = None,
) -> Path:
    """Write the QC picture (three planes through the labels' centroid, an axial montage, a legend).

    `image` and `mask` (and `truth`, a ground-truth label map drawn as dashed contours) share one
    grid whose voxel-to-patient `affine` (RAS, as NIfTI) orients the display; without it the grid's
    axes are taken as RAS. Written atomically.
    """
    canon = Canonical.from_grid(
        np.asarray(image), np.asarray(mask), affine, None if truth is None else np.asarray(truth)
    )
    window = display_window(canon.image, modality)
    cx, cy, cz = canon.centroid()
    planes = [
        ("axial", cz, _tile(canon, "axial", cz, window, PLANE_PX)),
        ("coronal", cy, _tile(canon, "coronal", cy, window, PLANE_PX)),
        ("sagittal", cx, _tile(canon, "sagittal", cx, window, PLANE_PX)),
    ]
    picks = montage_slices(canon.labelled())
    tiles = [(k, _tile(canon, "axial", k, window, MONTAGE_PX)) for k in picks]
    cols = min(len(tiles), 5)
    rows = -(-len(tiles) // cols)
    tile_h = max(t.shape[0] for _, t in tiles)
    tile_w = max(t.shape[1] for _, t in tiles)
    plane_h = max(t.shape[0] for *_, t in planes)

    key = "" if truth is None else "fill and solid line: prediction; dashed line: ground truth"
    pad, caption, foot = 10, 16, 28  # pixels
    head = 6 + 18 * (bool(title) + bool(key))
    width = max(sum(t.shape[1] for *_, t in planes) + 4 * pad, cols * (tile_w + pad) + pad)
    height = head + plane_h + caption + pad + rows * (tile_h + caption) + foot
    page = np.ones((height, width, 3), np.float32)  # white
    texts: list[tuple[tuple[int, int], str, str, int, tuple[float, float, float]]] = []

    def place(tile: np.ndarray, x0: int, top: int, text: str, sides: str = "") -> None:
        page[top : top + tile.shape[0], x0 : x0 + tile.shape[1]] = tile
        # A grey frame one pixel outside the tile: bright bone at its edge stays apart from the page.
        h, w = tile.shape[:2]
        page[max(top - 1, 0), max(x0 - 1, 0) : x0 + w + 1] = FRAME
        page[min(top + h, height - 1), max(x0 - 1, 0) : x0 + w + 1] = FRAME
        page[max(top - 1, 0) : top + h + 1, max(x0 - 1, 0)] = FRAME
        page[max(top - 1, 0) : top + h + 1, min(x0 + w, width - 1)] = FRAME
        texts.append(((x0 + tile.shape[1] // 2, top + tile.shape[0] + 3), text, "mt", 8, BLACK))
        for side, letter in zip(("left", "right"), sides, strict=False):
            at = x0 + 3 if side == "left" else x0 + tile.shape[1] - 3
            texts.append(((at, top + 3), letter, "lt" if side == "left" else "rt", 8, SIDE_LETTER))

    x = pad
    for plane, index, tile in planes:
        place(tile, x, head, f"{plane} {index}", _SIDES[plane])
        x += tile.shape[1] + pad
    top = head + plane_h + caption + pad
    for n, (k, tile) in enumerate(tiles):
        r, c = divmod(n, cols)
        place(tile, pad + c * (tile_w + pad), top + r * (tile_h + caption), f"axial {k}", _SIDES["axial"])
    for n, text in enumerate(t for t in (title, key) if t):
        texts.append(((width // 2, 5 + 18 * n), text, "mt", 10 - 2 * n, BLACK))
    swatches = []
    lx = pad
    for value, name in sorted(label_names.items()):
        if int(value) == 0:
            continue
        swatches.append((lx, colour(value)))
        texts.append(((lx + 16, height - 14), name, "lm", 9, BLACK))
        lx += 24 + 7 * len(name)
    texts.append(((width - pad, height - 14), _window_caption(window, modality), "rm", 8, BLACK))
    _save_png(path, page, texts, swatches)
    return Path(path)


def _save_png(
    path: Path,
    page: np.ndarray,
    texts: Sequence[tuple[tuple[int, int], str, str, int, tuple[float, float, float]]],
    swatches: Sequence[tuple[int, tuple[float, float, float]]],
) -> None:
    """The page (RGB in [0, 1]) with its texts ((x, y), text, PIL anchor, size px, RGB) and
    legend swatches (left x, RGB; 12 px squares edged in black, 8 px above the bottom), as a PNG,
    written atomically.

    Pillow, not a matplotlib Figure: the same picture (matplotlib's own font) at about a third of
    the cost, most of which was matplotlib's text layout; predict writes one per case in threads
    that share the cores with the model.
    """
    from PIL import Image, ImageDraw

    picture = Image.fromarray(np.round(page * 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(picture)
    height = page.shape[0]
    for x, rgb in swatches:
        draw.rectangle((x, height - 20, x + 12, height - 8), fill=_rgb255(rgb), outline=(0, 0, 0))
    for at, text, anchor, size, rgb in texts:
        draw.text(at, text, fill=_rgb255(rgb), font=_font(size), anchor=anchor)
    with atomic_path(Path(path)) as tmp:
        picture.save(tmp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)


def _rgb255(rgb: tuple[float, float, float]) -> tuple[int, int, int]:
    return tuple(round(255 * c) for c in rgb)  # type: ignore[return-value]


@functools.lru_cache(maxsize=8)
def _font(size: int):
    """matplotlib's default sans-serif face (DejaVu Sans, shipped with it) at `size` pixels."""
    from matplotlib import font_manager
    from PIL import ImageFont

    return ImageFont.truetype(font_manager.findfont(font_manager.FontProperties()), size)


def _window_caption(window: tuple[float, float], modality: str | None) -> str:
    lo, hi = window
    if window == CT_WINDOW:
        return f"CT window L {int((lo + hi) / 2)} W {int(hi - lo)} HU"
    return f"{(modality or 'image').upper()} window {lo:.4g} to {hi:.4g} (1st-99th percentile)"


def label_list_colours(names: Sequence[str]) -> dict[str, str]:
    """Label name -> CSS hex colour, in label order (value 1, 2, ...), for the report's plots."""
    return {name: "#" + "".join(f"{int(255 * c):02x}" for c in colour(i + 1)) for i, name in enumerate(names)}
