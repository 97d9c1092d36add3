"""results.csv: its columns, and no volumes for a case that is not ok."""

from __future__ import annotations

import csv

from pipeline.inference.results import CaseResult
from pipeline.outputs import tables


def _result(case_id: str, organ_ml: float, status: str = "ok") -> CaseResult:
    return CaseResult(
        case_id,
        f"src/{case_id}",
        status,
        "" if status == "ok" else "TRUNCATED",
        {"organ": organ_ml, "lesion": 1.0},
        {"organ": int(organ_ml * 1000), "lesion": 1000},
        1.5,
    )


def test_results_csv(tmp_path):
    results = [_result(f"c{i}", v) for i, v in enumerate([100, 102, 98, 101, 99, 400])]
    results.append(_result("", 0, status="quarantined"))
    tables.write_results_csv(tmp_path / "results.csv", results, ["organ", "lesion"], "unet", "3")
    with open(tmp_path / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == tables.result_columns(["organ", "lesion"])
    assert rows[0]["model_version"] == "3" and rows[-1]["organ_ml"] == ""
