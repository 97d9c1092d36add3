"""report.html: one self-contained page a reviewer reads without a server.

A summary first (cases by status, the model and its validation Dice, the distribution of each
label's volume over the batch with outliers marked), then a table of every case, sortable by any
column, each row linking to its mask, DICOM SEG and QC picture and showing the picture inline.
Pictures are inlined as data URIs and the plots are inline SVG, so the page is one file that can
be mailed or archived; the links to the per-case files are relative to the page.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import Status
from pipeline.inference.results import CaseResult
from pipeline.io.atomic import write_text
from pipeline.outputs.qc import label_list_colours

# Outlier rule (Iglewicz and Hoaglin): modified z = 0.6745 (x - median) / MAD; |z| > 3.5 is
# flagged. Needs at least this many ok cases with the label to say anything.
OUTLIER_Z = 3.5
OUTLIER_MIN_CASES = 4

# Per-case files the table links to, when present (relative to the case folder).
CASE_FILES = (("mask", "seg.nii.gz"), ("SEG", "seg.dcm"), ("QC", "qc.png"))

STATUS_ORDER = (Status.OK, Status.QUARANTINED, Status.FAILED, Status.PUSH_FAILED)


def volume_outliers(results: Sequence[CaseResult], label_list: Sequence[str]) -> dict[str, list[str]]:
    """case_id -> labels whose volume is an outlier for the batch (modified z-score, see OUTLIER_Z).

    MAD is the median absolute deviation of the ok cases' volumes of that label; when it is 0
    (most cases equal) the mean absolute deviation (x 1.2533, its normal-consistent scale) is
    used instead; when that is 0 too nothing is flagged.
    """
    flagged: dict[str, list[str]] = {}
    ok = [r for r in results if r.status == Status.OK]
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


def volume_plot_svg(
    results: Sequence[CaseResult], label_list: Sequence[str], outliers: Mapping[str, list[str]]
) -> str:
    """Inline SVG: per label, one dot per ok case on a mL axis, the median as a bar, outliers red.

    Each dot's tooltip names its case and volume. Empty string when no case is ok.
    """
    ok = [r for r in results if r.status == Status.OK]
    if not ok or not label_list:
        return ""
    esc = html.escape
    colours = label_list_colours(label_list)
    row_h, left, width, right = 46, 120, 560, 20
    height = row_h * len(label_list) + 24
    parts = [
        f"<svg width='{left + width + right}' height='{height}' role='img' aria-label='volume per label'>"
    ]
    for i, name in enumerate(label_list):
        values = [(r.case_id, float(r.volumes_ml.get(name, 0.0))) for r in ok]
        vmax = max(v for _, v in values) or 1.0
        y = 14 + i * row_h + row_h / 2
        axis_y = y + 12
        parts.append(
            f"<text x='{left - 8}' y='{y + 4:.1f}' text-anchor='end' font-size='12'>{esc(name)}</text>"
        )
        parts.append(
            f"<line x1='{left}' y1='{axis_y:.1f}' x2='{left + width}' y2='{axis_y:.1f}' stroke='#999'/>"
        )
        for tick in np.linspace(0, vmax, 5):
            tx = left + width * tick / vmax
            parts.append(
                f"<text x='{tx:.1f}' y='{y + 23:.1f}' text-anchor='middle' font-size='9' fill='#555'>"
                f"{tick:.3g}</text>"
            )
        med = float(np.median([v for _, v in values]))
        mx = left + width * med / vmax
        parts.append(
            f"<line x1='{mx:.1f}' y1='{y - 12:.1f}' x2='{mx:.1f}' y2='{y + 10:.1f}' stroke='#333' "
            f"stroke-width='2'><title>median {med:.2f} mL</title></line>"
        )
        for n, (case_id, v) in enumerate(values):
            x = left + width * v / vmax
            jitter = ((n * 7919) % 13 - 6) * 1.2  # deterministic spread so equal volumes stay visible
            flagged = name in outliers.get(case_id, [])
            fill = "#d62728" if flagged else colours[name]
            r = 5 if flagged else 3.5
            parts.append(
                f"<circle cx='{x:.1f}' cy='{y + jitter:.1f}' r='{r}' fill='{fill}' fill-opacity='0.8'>"
                f"<title>{esc(case_id)}: {v:.2f} mL{' (outlier)' if flagged else ''}</title></circle>"
            )
    parts.append(
        f"<text x='{left + width}' y='{height - 2}' text-anchor='end' font-size='10' fill='#555'>mL</text>"
        "</svg>"
    )
    return "".join(parts)


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h2{margin-top:1.4em;font-size:1.15em}
table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top;font-size:13px}
td{overflow-wrap:anywhere}
th{background:#f3f3f3;cursor:pointer;user-select:none;white-space:nowrap}
th[aria-sort=ascending]::after{content:' \\25B2'}th[aria-sort=descending]::after{content:' \\25BC'}
.ok{color:#176317}.quarantined{color:#9a6b00}.failed,.push_failed{color:#b00020}
.flag{background:#ffe7a8}
.badge{display:inline-block;padding:6px 12px;margin:0 8px 8px 0;border-radius:6px;background:#f3f3f3}
.badge b{font-size:1.4em;display:block}
td img{max-width:320px;display:block}
.num{text-align:right;font-variant-numeric:tabular-nums}
"""

# Click a header to sort by that column (numbers numerically, empty cells last); click again to reverse.
_SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function(th, col){
  th.addEventListener('click', function(){
    var table = th.closest('table'), body = table.tBodies[0];
    var asc = th.getAttribute('aria-sort') !== 'ascending';
    table.querySelectorAll('th').forEach(function(h){ h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
    var key = function(tr){
      var c = tr.cells[col];
      return c.dataset.sort !== undefined ? c.dataset.sort : c.textContent.trim();
    };
    Array.from(body.rows).sort(function(a, b){
      var x = key(a), y = key(b);
      if (x === '' || y === '') return (x === '') - (y === '');
      var nx = parseFloat(x), ny = parseFloat(y);
      var d = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? d : -d;
    }).forEach(function(tr){ body.appendChild(tr); });
  });
});
"""


def _summary(results: Sequence[CaseResult], manifest: Mapping[str, Any]) -> list[str]:
    esc = html.escape
    model = manifest.get("model", {})
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    statuses = [s for s in STATUS_ORDER if s in counts] + sorted(set(counts) - set(STATUS_ORDER))
    skipped = sum(1 for r in results if r.skipped)
    badges = [f"<span class='badge'><b>{len(results)}</b>cases</span>"]
    badges += [f"<span class='badge {esc(s)}'><b>{counts[s]}</b>{esc(s)}</span>" for s in statuses]
    if skipped:
        badges.append(f"<span class='badge'><b>{skipped}</b>done by an earlier run</span>")
    ignored = manifest.get("counts", {}).get("ignored_files")
    if ignored:
        badges.append(f"<span class='badge'><b>{ignored}</b>files ignored (not images)</span>")
    dice = model.get("val_dice")
    dice_text = f", validation Dice <b>{float(dice):.3f}</b>" if isinstance(dice, int | float) else ""
    return [
        "<p>" + "".join(badges) + "</p>",
        f"<p>Model <b>{esc(str(model.get('name')))}</b> version {esc(str(model.get('version')))}{dice_text} "
        f"(weights sha256 {esc(str(model.get('sha256', ''))[:16])}&hellip;), code "
        f"{esc(str(manifest.get('code_version')))}. Started {esc(str(manifest.get('started')))}, "
        f"finished {esc(str(manifest.get('finished')))}.</p>",
    ]


def write_report_html(
    path: Path,
    results: Sequence[CaseResult],
    label_list: Sequence[str],
    manifest: Mapping[str, Any],
    out: Path,
    *,
    with_sources: bool = True,
) -> Path:
    """Write the batch report (summary, volume plot, sortable table with QC pictures) atomically.

    Without sources (the copy that leaves the site, e.g. to MLflow) cases are named by their case
    IDs only and no per-case files are linked.
    """
    esc = html.escape
    outliers = volume_outliers(results, label_list)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>unet-pipeline predictions</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Batch segmentation report</h1>",
        *_summary(results, manifest),
    ]
    plot = volume_plot_svg(results, label_list, outliers)
    if plot:
        parts += [
            "<h2>Volume per label</h2>",
            plot,
            f"<p>Each dot is an ok case (hover for its ID); the bar is the median. Red dots are "
            f"volume outliers: a modified z-score |0.6745 (x - median) / MAD| &gt; {OUTLIER_Z} among "
            f"the batch's ok cases, checked with at least {OUTLIER_MIN_CASES} ok cases.</p>",
        ]
    parts += ["<h2>Cases</h2><p>Click a column's header to sort by it.</p>"]
    parts.append("<table class='sortable'><thead><tr>")
    head = ["case", *(["source"] if with_sources else []), "status", "reason", "message"]
    head += [f"{n} mL (voxels)" for n in label_list]
    head += ["seconds", *(["files"] if with_sources else []), "QC"]
    parts.append("".join(f"<th>{esc(h)}</th>" for h in head) + "</tr></thead><tbody>")
    for r in results:
        flags = outliers.get(r.case_id, [])
        # A failure's message may quote a file name: only in the copy that stays on site.
        message = str(getattr(r, "message", "") or "") if with_sources else ""
        cells = [
            f"<td>{esc(r.case_id)}</td>",
            *([f"<td>{esc(r.source)}</td>"] if with_sources else []),
            f"<td class='{esc(r.status)}'>{esc(r.status)}{' (earlier run)' if r.skipped else ''}</td>",
            f"<td>{esc(r.reason or '')}</td>",
            f"<td>{esc(message)}</td>",
        ]
        for name in label_list:
            if r.status != Status.OK:
                cells.append("<td data-sort=''></td>")
                continue
            ml = r.volumes_ml.get(name, 0.0)
            cls = "num flag" if name in flags else "num"
            tip = " title='volume outlier in this batch'" if name in flags else ""
            cells.append(
                f"<td class='{cls}'{tip} data-sort='{ml:.6f}'>{ml:.2f} ({r.voxels.get(name, 0)})</td>"
            )
        seconds = f"{r.seconds:.2f}" if r.status == Status.OK else ""
        cells.append(f"<td class='num' data-sort='{seconds}'>{seconds}</td>")
        case_dir = out / r.case_id if r.case_id else None
        if with_sources:
            links = [
                f"<a href='{esc(r.case_id)}/{name}'>{label}</a>"
                for label, name in CASE_FILES
                if case_dir is not None and (case_dir / name).is_file()
            ]
            cells.append(f"<td>{' '.join(links)}</td>")
        uri = _png_data_uri(case_dir / "qc.png") if r.status == Status.OK and case_dir is not None else None
        cells.append(f"<td><img alt='QC {esc(r.case_id)}' src='{uri}'></td>" if uri else "<td></td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append(f"</tbody></table><script>{_SORT_JS}</script></body></html>\n")
    write_text(Path(path), "\n".join(parts))
    return Path(path)
