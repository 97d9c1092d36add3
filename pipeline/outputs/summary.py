"""The batch in a few lines for an orchestrator's UI: counts, a bounded cases table, markdown.

Built from `PredictSummary` (the counts run_manifest.json records) and the batch's tracking
record; nothing identifying (case IDs, reason codes, volumes, the folders' paths).
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import Status
from pipeline.inference.results import PredictSummary

# Up to this many cases the table lists every case; above, those needing attention (bounded).
MAX_TABLE_ROWS = 200


def batch_summary(summary: PredictSummary) -> dict[str, Any]:
    """The counts (`PredictSummary.counts`), exit code, where the tables are, one row per case."""
    return {
        **summary.counts(),
        "exit_code": summary.exit_code,
        "results": str(summary.out / "results.csv"),
        "report": str(summary.out / "report.html"),
        "rows": [
            {
                "case": r.case_id or "(rejected input)",
                "status": r.status,
                "reason": r.reason,
                "skipped": r.skipped,
                "volumes": "; ".join(f"{k} {v} mL" for k, v in r.volumes_ml.items()),
            }
            for r in summary.results
        ],
    }


def table_rows(rows: list[dict]) -> tuple[list[dict], str]:
    """The cases table: every case up to MAX_TABLE_ROWS, else those not ok (bounded), and a note."""
    if len(rows) <= MAX_TABLE_ROWS:
        return rows, ""
    attention = [r for r in rows if r["status"] != Status.OK][:MAX_TABLE_ROWS]
    return attention, (
        f"; {len(rows)} cases: only the {len(attention)} not ok are listed here, every case is in results.csv"
    )


def tracking_markdown(tracked: dict | None) -> str:
    """One paragraph on the batch's MLflow run (`BatchTracking.to_json`), or why there is none."""
    if tracked is None:
        return "MLflow: not recorded (no experiment given).\n"
    if tracked["status"] == "logged":
        link = f" ([open in MLflow]({tracked['run_url']}))" if tracked.get("run_url") else ""
        run, experiment = tracked["run_id"], tracked["experiment"]
        return f"Recorded in MLflow: run `{run}` of experiment **{experiment}**{link}.\n"
    return (
        f"**MLflow tracking failed**: this batch is not recorded in experiment "
        f"**{tracked['experiment']}** ({tracked['error']}). The masks, results.csv and the report are "
        f"complete; rerun the batch when the server is back (finished cases come from the cache).\n"
    )


def summary_markdown(summary: dict[str, Any], model: dict[str, Any]) -> str:
    """The batch summary page: the model, the counts, where the results are, the MLflow run.

    `summary` is `batch_summary`'s (with "tracking"); `model` holds name, version, sha256 and
    run_id of the model that predicted.
    """
    run = f", MLflow run `{model['run_id']}`" if model.get("run_id") else ""
    return (
        f"# Batch inference\n\nModel **{model['name']}** version **{model['version']}** "
        f"(weights sha256 `{model['sha256'][:12]}`{run}).\n\n"
        f"| cases | ok | run now | unchanged | quarantined | failed |\n|---|---|---|---|---|---|\n"
        f"| {summary['cases']} | {summary['ok']} | {summary['processed']} | {summary['skipped']} "
        f"| {summary['quarantined']} | {summary['failed']} |\n\n"
        f"Results: `{summary['results']}`\n\nQC report: `{summary['report']}`\n\n"
        + tracking_markdown(summary.get("tracking"))
    )


def summary_line(summary: dict[str, Any], model: dict[str, Any]) -> str:
    """The batch in one line (the flow run's state message)."""
    return (
        f"{summary['ok']} ok ({summary['skipped']} unchanged), {summary['quarantined']} quarantined, "
        f"{summary['failed']} failed; model {model['name']} v{model['version']}"
    )
