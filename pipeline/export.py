"""Writers of prediction outputs: NIfTI masks, DICOM SEG, QC montages, the batch tables and report.

Every writer is atomic (a temporary file renamed into place), so a crash never leaves a partial
file at a final path. Nothing identifying is written outside the DICOM SEG (which must carry the
source's patient and study modules to be filed beside it): tables and the report hold case IDs,
relative source paths, reason codes and numbers only.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import html
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.io.atomic import atomic_open, atomic_path, write_text
from pipeline.io.volume import Volume, save_nifti

if TYPE_CHECKING:
    from pipeline.inference import CaseResult
    from pipeline.io.dicom import SeriesGroup

# Outlier rule for the report (Iglewicz and Hoaglin): modified z = 0.6745 (x - median) / MAD;
# |z| > 3.5 is flagged. Needs at least this many ok cases with the label to say anything.
OUTLIER_Z = 3.5
OUTLIER_MIN_CASES = 4

# RGBA overlay colours per label value (tab10, background transparent).
_COLOURS = [
    (0.12, 0.47, 0.71),
    (1.0, 0.5, 0.05),
    (0.17, 0.63, 0.17),
    (0.84, 0.15, 0.16),
    (0.58, 0.4, 0.74),
    (0.55, 0.34, 0.29),
    (0.89, 0.47, 0.76),
    (0.74, 0.74, 0.13),
    (0.09, 0.75, 0.81),
]


def colour(value: int) -> tuple[float, float, float]:
    return _COLOURS[(value - 1) % len(_COLOURS)]


# ------------------------------------------------------------------------------------------
# Per case


def write_mask_nifti(path: Path, mask: np.ndarray, affine: np.ndarray) -> Path:
    """uint8 label map with the source's affine (qform == sform, code 1), written atomically."""
    return save_nifti(Volume(np.asarray(mask, dtype=np.uint8), affine, "SEG"), path)


def _segment_codes(name: str):
    """(category, type) codes for a label name (CID 7150 / 7151); a generic tissue code otherwise."""
    from pydicom.sr.codedict import codes

    known = {
        "organ": (codes.SCT.AnatomicalStructure, codes.SCT.Organ),
        "lesion": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion),
        "tumor": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm),
        "neoplasm": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm),
    }
    return known.get(name.lower(), (codes.SCT.Tissue, codes.SCT.Tissue))


def write_dicom_seg(
    path: Path,
    mask: np.ndarray,
    group: SeriesGroup,
    label_names: Mapping[int, str],
    *,
    algorithm_name: str,
    algorithm_version: str,
    software_version: str,
) -> Path:
    """A BINARY DICOM SEG of `mask` (the series' (column, row, slice) grid) referencing its instances.

    One segment per model label (value k is segment k, labelled with the model's label name),
    algorithm type AUTOMATIC, identified by model name and version. Frames map to the source
    instances (or to the frames of one multi-frame source) slice by slice.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    mask = np.asarray(mask, dtype=np.uint8)
    if mask.shape != group.shape:
        raise ValueError(f"mask shape {mask.shape} != series grid {group.shape}")
    per_slice = mask.transpose(2, 1, 0)  # (slice, row, column) in the series' spatial order
    header_ids = [h for h, _ in group.frames]
    if len(set(header_ids)) == len(header_ids) and all(f == 0 for _, f in group.frames):
        sources = [pydicom.dcmread(group.headers[h].path, stop_before_pixels=True) for h in header_ids]
        pixels = per_slice
    elif len(group.headers) == 1:  # one multi-frame image: SEG frames follow its frame order
        sources = [pydicom.dcmread(group.headers[0].path, stop_before_pixels=True)]
        pixels = np.zeros((group.headers[0].number_of_frames, *per_slice.shape[1:]), np.uint8)
        for s, (_, f) in enumerate(group.frames):
            pixels[f] = per_slice[s]
    else:
        raise ValueError("a series spread over several multi-frame files: no SEG written")

    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, family=codes.cid7162.ArtificialIntelligence, version=algorithm_version
    )
    descriptions = []
    for value in sorted(v for v in label_names if v != 0):
        category, prop_type = _segment_codes(label_names[value])
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=value,
                segment_label=label_names[value],
                segmented_property_category=category,
                segmented_property_type=prop_type,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        )
    with _quiet_highdicom():
        seg = _segmentation(
            hd, sources, pixels, descriptions, algorithm_name, algorithm_version, software_version
        )
    with atomic_path(path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return path


def _segmentation(hd, sources, pixels, descriptions, algorithm_name, algorithm_version, software_version):
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,  # label-map style: value k is segment k
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(getattr(sources[0], "SeriesNumber", 0) or 0) + 2000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="unet-pipeline",
        manufacturer_model_name=algorithm_name[:64],
        software_versions=software_version[:64],
        device_serial_number="unet-pipeline",
        content_description="Automatic segmentation",
        content_label="AUTOSEG",
        series_description=f"U-Net segmentation {algorithm_name} {algorithm_version}"[:64],
        omit_empty_frames=False,  # every source instance gets its frame: simple to map back
    )


@contextlib.contextmanager
def _quiet_highdicom() -> Iterator[None]:
    """highdicom logs source SOP Instance UIDs at INFO: keep identifiers out of our logs."""
    logger = logging.getLogger("highdicom")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _window(image: np.ndarray) -> tuple[float, float]:
    sample = image[:: max(1, image.shape[0] // 64), :: max(1, image.shape[1] // 64), :]
    lo, hi = np.percentile(sample, [1, 99])
    return float(lo), float(max(hi, lo + 1e-6))


def qc_slices(mask: np.ndarray, n: int = 9) -> list[int]:
    """Up to `n` slice indices (last axis) evenly spread over the mask's extent (or the volume's)."""
    has = np.flatnonzero(mask.reshape(-1, mask.shape[2]).any(axis=0))
    lo, hi = (int(has[0]), int(has[-1])) if has.size else (0, mask.shape[2] - 1)
    return sorted(set(np.linspace(lo, hi, min(n, hi - lo + 1)).round().astype(int).tolist()))


QC_TILE_PX = 160  # slices are enlarged (nearest neighbour) to at least this many pixels across


def qc_montage(image: np.ndarray, mask: np.ndarray, picks: Sequence[int]) -> tuple[np.ndarray, int, int]:
    """(rows*h, cols*w, 3) RGB in [0, 1]: the picked slices windowed, the mask blended at 50 %.

    Composed as one array (no plotting axes): the montage of a case costs milliseconds. Slices
    are shown as radiologists read them with origin at the bottom row (RAS: anterior up).
    """
    cols = min(3, len(picks))
    rows = -(-len(picks) // cols)
    lo, hi = _window(image)
    scale = max(1, -(-QC_TILE_PX // max(image.shape[0], image.shape[1])))
    h, w = image.shape[1] * scale, image.shape[0] * scale
    canvas = np.ones((rows * h, cols * w, 3), np.float32)
    palette = np.vstack([np.zeros(3), np.asarray(_COLOURS, np.float32)])
    for n, k in enumerate(picks):
        grey = np.clip((image[:, :, k].T.astype(np.float32) - lo) / (hi - lo), 0, 1)
        lab = mask[:, :, k].T.astype(np.int64)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        labelled = lab > 0
        colours = palette[1 + (lab[labelled] - 1) % len(_COLOURS)]
        rgb[labelled] = 0.5 * rgb[labelled] + 0.5 * colours
        tile = np.flipud(rgb).repeat(scale, axis=0).repeat(scale, axis=1)
        r, c = divmod(n, cols)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = tile
    return canvas, h, w


def write_qc_png(
    path: Path, image: np.ndarray, mask: np.ndarray, label_names: Mapping[int, str], title: str = ""
) -> Path:
    """A montage of slices (along the acquisition's slice axis) with the mask overlaid, and a legend."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    picks = qc_slices(mask)
    canvas, h, w = qc_montage(image, mask, picks)
    cols = canvas.shape[1] // w
    gap, head, foot = 16, 22 if title else 4, 24  # pixels: slice captions, title, legend
    rows = canvas.shape[0] // h
    width = canvas.shape[1] + 2 * 8
    height = head + rows * (h + gap) + foot
    dpi = 72
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    for n, k in enumerate(picks):
        r, c = divmod(n, cols)
        x0, y0 = 8 + c * w, height - head - (r + 1) * (h + gap)  # bottom-left of the tile, pixels
        fig.figimage(canvas[r * h : (r + 1) * h, c * w : (c + 1) * w], xo=x0, yo=y0, origin="upper")
        fig.text((x0 + w / 2) / width, (y0 + h + 3) / height, f"slice {k}", ha="center", fontsize=8)
    if title:
        fig.text(0.5, 1 - 4 / height, title, ha="center", va="top", fontsize=9)
    entries = [(colour(v), name) for v, name in sorted(label_names.items()) if v != 0]
    x = width / 2 - 45 * len(entries)
    for rgb, name in entries:
        fig.add_artist(Rectangle((x / width, 7 / height), 10 / width, 10 / height, color=rgb))
        fig.text((x + 14) / width, 12 / height, name, va="center", fontsize=8)
        x += 90
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


# ------------------------------------------------------------------------------------------
# Batch tables


def result_columns(label_list: Sequence[str], with_sources: bool = True) -> list[str]:
    """results.csv's columns: case, source, status, reason, model, then mL and voxels per label, seconds.

    Without sources (the copy that leaves the site, e.g. to MLflow) there is no `source` column.
    """
    cols = [
        "case_id",
        *(["source"] if with_sources else []),
        "status",
        "reason",
        "model_name",
        "model_version",
    ]
    for name in label_list:
        cols += [f"{name}_ml", f"{name}_voxels"]
    return [*cols, "seconds"]


def write_results_csv(
    path: Path,
    results: Sequence[CaseResult],
    label_list: Sequence[str],
    model_name: str,
    model_version: str,
    *,
    with_sources: bool = True,
) -> Path:
    with atomic_open(path) as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(result_columns(label_list, with_sources))
        for r in results:
            source = [r.source] if with_sources else []
            row: list[Any] = [r.case_id, *source, r.status, r.reason, model_name, model_version]
            for name in label_list:
                ok = r.status == "ok"
                row += [r.volumes_ml.get(name, "") if ok else "", r.voxels.get(name, "") if ok else ""]
            writer.writerow([*row, f"{r.seconds:.3f}" if r.status == "ok" else ""])
    return path


def write_jsonl(path: Path, records: Sequence[Mapping[str, Any]]) -> Path:
    with atomic_open(path) as fh:
        for rec in records:
            fh.write(json.dumps(rec, default=str) + "\n")
    return path


def write_json(path: Path, data: Any) -> Path:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")
    return path


# ------------------------------------------------------------------------------------------
# Report


def volume_outliers(results: Sequence[CaseResult], label_list: Sequence[str]) -> dict[str, list[str]]:
    """case_id -> labels whose volume is an outlier for the batch (modified z-score, see OUTLIER_Z).

    MAD is the median absolute deviation of the ok cases' volumes of that label; when it is 0
    (most cases equal) the mean absolute deviation (x 1.2533, its normal-consistent scale) is
    used instead; when that is 0 too nothing is flagged.
    """
    flagged: dict[str, list[str]] = {}
    ok = [r for r in results if r.status == "ok"]
    if len(ok) < OUTLIER_MIN_CASES:
        return flagged
    for name in label_list:
        x = np.array([r.volumes_ml.get(name, 0.0) for r in ok], float)
        med = float(np.median(x))
        mad = float(np.median(np.abs(x - med)))
        if mad > 0:
            z = 0.6745 * (x - med) / mad
        else:
            mean_ad = float(np.mean(np.abs(x - med)))
            if mean_ad == 0:
                continue
            z = (x - med) / (1.2533 * mean_ad)
        for r, zi in zip(ok, z, strict=True):
            if abs(zi) > OUTLIER_Z:
                flagged.setdefault(r.case_id, []).append(name)
    return flagged


def _png_data_uri(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


_CSS = """
body{font-family:sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top;font-size:13px}
.ok{color:#176317}.quarantined{color:#9a6b00}.failed{color:#b00020}
.flag{background:#ffe7a8}
img{max-width:420px}
"""


def write_report_html(
    path: Path,
    results: Sequence[CaseResult],
    label_list: Sequence[str],
    manifest: Mapping[str, Any],
    out: Path,
    *,
    with_sources: bool = True,
) -> Path:
    """One self-contained page: every case with status, volumes and QC picture (inline), outliers flagged.

    Without sources (the copy that leaves the site) cases are named by their case IDs only.
    """
    esc = html.escape
    outliers = volume_outliers(results, label_list)
    model = manifest.get("model", {})
    counts = manifest.get("counts", {})
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>unet-pipeline predictions</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Batch segmentation report</h1>",
        f"<p>Model <b>{esc(str(model.get('name')))}</b> version {esc(str(model.get('version')))} "
        f"(weights sha256 {esc(str(model.get('sha256', ''))[:16])}&hellip;), code "
        f"{esc(str(manifest.get('code_version')))}. Started {esc(str(manifest.get('started')))}, "
        f"finished {esc(str(manifest.get('finished')))}.</p>",
        "<p>" + ", ".join(f"{esc(k)}: {esc(str(v))}" for k, v in counts.items()) + "</p>",
        f"<p>Volume outliers (highlighted) have a modified z-score |0.6745 (x - median) / MAD| &gt; "
        f"{OUTLIER_Z} among the batch's ok cases, per label; checked with at least "
        f"{OUTLIER_MIN_CASES} ok cases.</p>",
        "<table><tr><th>case</th>"
        + ("<th>source</th>" if with_sources else "")
        + "<th>status</th><th>reason</th>",
    ]
    parts += [f"<th>{esc(n)} mL (voxels)</th>" for n in label_list]
    parts.append("<th>seconds</th><th>QC</th></tr>")
    for r in results:
        flags = outliers.get(r.case_id, [])
        cells = [
            f"<td>{esc(r.case_id)}</td>",
            *([f"<td>{esc(r.source)}</td>"] if with_sources else []),
            f"<td class='{esc(r.status)}'>{esc(r.status)}{' (earlier run)' if r.skipped else ''}</td>",
            f"<td>{esc(r.reason)}</td>",
        ]
        for name in label_list:
            if r.status != "ok":
                cells.append("<td></td>")
                continue
            cls = " class='flag' title='volume outlier in this batch'" if name in flags else ""
            cells.append(f"<td{cls}>{r.volumes_ml.get(name, 0):.2f} ({r.voxels.get(name, 0)})</td>")
        cells.append(f"<td>{r.seconds:.2f}</td>" if r.status == "ok" else "<td></td>")
        uri = _png_data_uri(out / r.case_id / "qc.png") if r.status == "ok" and r.case_id else None
        cells.append(f"<td><img alt='QC {esc(r.case_id)}' src='{uri}'></td>" if uri else "<td></td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table></body></html>\n")
    write_text(path, "\n".join(parts))
    return path
