"""The batch summary a flow shows: the bounded cases table, the markdown page and its one line."""

from __future__ import annotations

from pathlib import Path

from pipeline.inference.results import CaseResult, PredictSummary
from pipeline.outputs.summary import MAX_TABLE_ROWS, batch_summary, summary_line, summary_markdown, table_rows


def test_the_cases_table_is_bounded_and_points_to_results_csv():
    rows = [{"case": f"case_{i:016x}", "status": "ok"} for i in range(MAX_TABLE_ROWS + 50)]
    rows[7]["status"] = rows[99]["status"] = "failed"
    assert table_rows(rows[:MAX_TABLE_ROWS]) == (rows[:MAX_TABLE_ROWS], "")
    listed, note = table_rows(rows)
    assert listed == [rows[7], rows[99]]
    assert "250 cases" in note and "results.csv" in note


def test_the_summary_counts_are_the_manifests_and_the_page_names_the_model(tmp_path):
    results = [
        CaseResult("case_a", "a.nii.gz", "ok", volumes_ml={"organ": 1.5}),
        CaseResult("case_b", "b.nii.gz", "ok", skipped=True),
        CaseResult("case_c", "c.nii.gz", "failed", "TIMEOUT"),
        CaseResult("", "broken.nii", "quarantined", "TRUNCATED"),
    ]
    summary = batch_summary(PredictSummary(out=tmp_path, results=results, ignored=2))
    counts = {k: summary[k] for k in ("cases", "ok", "processed", "skipped", "quarantined", "failed")}
    assert counts == {"cases": 4, "ok": 2, "processed": 1, "skipped": 1, "quarantined": 1, "failed": 1}
    assert summary["ignored_files"] == 2 and summary["exit_code"] == 1
    assert [r["case"] for r in summary["rows"]] == ["case_a", "case_b", "case_c", "(rejected input)"]
    assert summary["rows"][0]["volumes"] == "organ 1.5 mL"
    model = {"name": "unet-seg", "version": "7", "sha256": "ab" * 32, "run_id": "r123"}
    page = summary_markdown({**summary, "tracking": None}, model)
    assert "**unet-seg** version **7**" in page and "`abababababab`" in page and "run `r123`" in page
    assert "| 4 | 2 | 1 | 1 | 1 | 1 |" in page and str(Path(tmp_path, "report.html")) in page
    assert "not recorded" in page
    assert summary_line(summary, model) == "2 ok (1 unchanged), 1 quarantined, 1 failed; model unet-seg v7"
