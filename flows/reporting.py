"""What the flows report: their summaries, the markdown of their Prefect artifacts, the demo's lines.

Plain functions of the summaries the library and the tasks return (no Prefect here), so a flow
body only calls them; identifiers never appear (pseudonymous case IDs and counts only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.pacs.record import PushStatus


def pacs_summary(
    pulled: dict, inference: dict, pushed: list[dict], *, destination_given: bool, seconds: dict[str, float]
) -> dict[str, Any]:
    """pacs_batch_flow's summary: the pull report (no folder), the batch (no rows), the pushes."""
    return {
        "pull": {k: v for k, v in pulled.items() if k != "folder"},
        "inference": {k: v for k, v in inference.items() if k != "rows"},
        "push": {
            "destination_given": destination_given,
            "pushed": sum(p["status"] == PushStatus.PUSHED for p in pushed),
            "pushed_now": sum(p["pushed_now"] for p in pushed),
            "push_failed": sum(p["status"] == PushStatus.PUSH_FAILED for p in pushed),
            "reasons": sorted({p["reason"] for p in pushed if p["reason"]}),
        },
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }


def pacs_message(summary: dict) -> str:
    """One line for the flow run's state and log."""
    counts, inference, push = summary["pull"].get("counts", {}), summary["inference"], summary["push"]
    return (
        f"{counts.get('series_complete', 0)} series pulled "
        f"({counts.get('series_incomplete', 0)} incomplete), "
        f"{inference['ok']} cases ok, {inference['failed']} failed, "
        f"{push['pushed']} pushed, {push['push_failed']} push_failed"
    )


def pacs_markdown(summary: dict, out: str) -> str:
    """The pacs-batch-summary artifact: one table row of counts and where the details are."""
    counts, inference, push = summary["pull"].get("counts", {}), summary["inference"], summary["push"]
    seconds = summary["seconds"]
    return (
        "# PACS batch\n\n| series found | complete | incomplete | cases ok | failed | pushed | "
        "push_failed |\n|---|---|---|---|---|---|---|\n"
        f"| {counts.get('series_found', 0)} | {counts.get('series_complete', 0)} | "
        f"{counts.get('series_incomplete', 0)} | {inference['ok']} | {inference['failed']} | "
        f"{push['pushed']} | {push['push_failed']} |\n\n"
        f"Pull {seconds['pull']:.1f} s, predict {seconds['predict']:.1f} s, push {seconds['push']:.1f} s. "
        f"Details: `{out}/pull_report.json`, `{out}/results.csv`.\n"
    )


def end_to_end_markdown(summary: dict, predictions: str) -> str:
    """The end-to-end-summary artifact: what was staged, trained, gated and scored."""
    ingest, trained = summary["ingest"], summary["train"]
    held_out = summary["holdout"].get("dice_mean", float("nan"))
    return (
        f"# End to end\n\nStaged {ingest['cases']} cases ({ingest['quarantined']} files quarantined). "
        f"Model **{trained['model_name']}** v{trained['model_version']} "
        f"({'champion' if trained['champion'] else 'challenger'}), validation Dice "
        f"{trained['val_dice']['mean']:.3f}; held-out Dice {held_out:.3f}.\n\n"
        f"Masks, QC pictures and the report: `{predictions}`."
    )


def demo_lines(summary: dict, out: Path) -> list[str]:
    """The demo's result, as the terminal shows it: end_to_end_flow's summary, where its outputs are."""
    ingest, trained, batch, holdout = (summary[k] for k in ("ingest", "train", "inference", "holdout"))
    reasons = ", ".join(f"{k} {v}" for k, v in ingest["by_reason"].items()) or "none"
    dice = trained["val_dice"]
    per_label = ", ".join(f"{k} {v:.3f}" for k, v in dice.items() if k != "mean")
    alias = "champion" if trained["champion"] else "challenger"
    return [
        f"ingested     {ingest['cases']} cases; {ingest['quarantined']} files quarantined ({reasons}), "
        f"{ingest['ignored']} ignored",
        f"validation   mean Dice {dice['mean']:.3f} ({per_label})",
        f"registered   {trained['model_name']} version {trained['model_version']} -> alias '{alias}'",
        f"held-out     {batch.get('ok', 0)} of {batch.get('cases', 0)} cases predicted, "
        f"mean Dice {holdout.get('dice_mean', float('nan')):.3f}",
        f"masks        {out}/<case_id>/seg.nii.gz and seg.dcm",
        f"QC pictures  {out}/<case_id>/qc.png",
        f"report       {out}/report.html",
    ]
