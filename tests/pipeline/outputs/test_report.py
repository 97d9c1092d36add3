"""report.html: the summary, the volume plot with outliers, the sortable table and its links."""

from __future__ import annotations

import re

from pipeline.inference.results import CaseResult
from pipeline.outputs import report


def _result(case_id: str, organ_ml: float, status: str = "ok", skipped: bool = False) -> CaseResult:
    ok = status == "ok"
    return CaseResult(
        case_id,
        f"src/{case_id}",
        status,
        "" if ok else "TRUNCATED",
        {"organ": organ_ml, "lesion": 1.0} if ok else {},
        {"organ": int(organ_ml * 1000), "lesion": 1000} if ok else {},
        1.5,
        skipped=skipped,
    )


def test_outliers_by_modified_z_score():
    results = [_result(f"c{i}", v) for i, v in enumerate([100, 102, 98, 101, 99, 400])]
    assert report.volume_outliers(results, ["organ", "lesion"]) == {"c5": ["organ"]}
    assert report.volume_outliers(results[:3], ["organ"]) == {}  # too few cases to judge
    same = [_result(f"c{i}", 50.0) for i in range(5)]
    assert report.volume_outliers(same, ["organ"]) == {}


def test_volume_plot_marks_each_case_and_the_outlier():
    results = [_result(f"c{i}", v) for i, v in enumerate([100, 102, 98, 101, 99, 400])]
    svg = report.volume_plot_svg(results, ["organ", "lesion"], {"c5": ["organ"]})
    assert svg.count("<circle") == 12  # one dot per ok case per label
    assert len(re.findall(r"fill='#d62728'[^>]*><title>c5: 400.00 mL \(outlier\)", svg)) == 1
    assert report.volume_plot_svg([_result("q", 0, status="quarantined")], ["organ"], {}) == ""


def test_report_summary_table_links_and_no_external_resources(tmp_path):
    results = [_result(f"c{i}", v) for i, v in enumerate([100, 102, 98, 101, 99, 400])]
    results.append(_result("c6", 100, skipped=True))
    results.append(_result("", 0, status="quarantined"))
    results.append(_result("c8", 0, status="failed"))
    (tmp_path / "c0").mkdir()
    (tmp_path / "c0" / "seg.nii.gz").write_bytes(b"x")
    (tmp_path / "c0" / "seg.dcm").write_bytes(b"x")
    manifest = {"model": {"name": "unet", "version": "3", "val_dice": 0.9123}, "counts": {"ignored_files": 2}}
    page = report.write_report_html(
        tmp_path / "report.html", results, ["organ", "lesion"], manifest, tmp_path
    )
    text = page.read_text()
    summary = text[: text.index("<table")]
    # The summary comes first: counts by status, the model and its validation Dice, the plot.
    assert "<b>9</b>cases" in summary and "<b>7</b>ok" in summary
    assert "<b>1</b>quarantined" in summary and "<b>1</b>failed" in summary
    assert "<b>1</b>done by an earlier run" in summary and "<b>2</b>files ignored" in summary
    assert "validation Dice <b>0.912</b>" in summary and "<svg" in summary
    # The table: sortable, the outlier highlighted, links only to files that exist.
    assert "class='sortable'" in text and "aria-sort" in text
    assert text.count("class='num flag'") == 1
    assert "href='c0/seg.nii.gz'" in text and "href='c0/seg.dcm'" in text
    assert "href='c0/qc.png'" not in text and "href='c1/" not in text
    assert "http" not in text  # self-contained: nothing fetched from elsewhere


def test_report_without_sources_has_no_paths_or_links(tmp_path):
    results = [_result("c0", 10.0)]
    (tmp_path / "c0").mkdir()
    (tmp_path / "c0" / "seg.nii.gz").write_bytes(b"x")
    page = report.write_report_html(tmp_path / "r.html", results, ["organ"], {}, tmp_path, with_sources=False)
    text = page.read_text()
    assert "src/c0" not in text and "href=" not in text
