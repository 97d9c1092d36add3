"""The flows' summaries and artifact texts, from plain dictionaries (no Prefect)."""

from __future__ import annotations

from flows.reporting import end_to_end_markdown, pacs_markdown, pacs_message, pacs_summary
from pipeline.pacs.record import PushStatus


def _pushed(status: PushStatus, reason: str = "", now: int = 0) -> dict:
    return {"case_id": "case_x", "status": status.value, "reason": reason, "pushed_now": now, "bytes": 0}


def test_the_pacs_summary_counts_pushes_and_drops_folders_and_rows():
    pulled = {"folder": "/spool", "counts": {"series_found": 3, "series_complete": 2, "series_incomplete": 1}}
    inference = {"ok": 2, "failed": 1, "rows": [{"case": "case_a"}]}
    pushed = [
        _pushed(PushStatus.PUSHED, now=2),
        _pushed(PushStatus.PUSH_FAILED, "PUSH_UNREACHABLE"),
        _pushed(PushStatus.PUSH_FAILED, "PUSH_UNREACHABLE"),
        _pushed(PushStatus.NOTHING_TO_PUSH),
    ]
    seconds = {"pull": 1.23456, "predict": 2.0, "push": 0.5}
    summary = pacs_summary(pulled, inference, pushed, destination_given=True, seconds=seconds)
    assert "folder" not in summary["pull"] and "rows" not in summary["inference"]
    assert summary["push"] == {
        "destination_given": True,
        "pushed": 1,
        "pushed_now": 2,
        "push_failed": 2,
        "reasons": ["PUSH_UNREACHABLE"],
    }
    assert summary["seconds"]["pull"] == 1.235
    assert pacs_message(summary) == (
        "2 series pulled (1 incomplete), 2 cases ok, 1 failed, 1 pushed, 2 push_failed"
    )
    assert "| 3 | 2 | 1 | 2 | 1 | 1 | 2 |" in pacs_markdown(summary, "/out")


def test_the_end_to_end_artifact_without_a_held_out_score_says_nan():
    summary = {
        "ingest": {"cases": 6, "quarantined": 0},
        "train": {"model_name": "m", "model_version": "3", "champion": False, "val_dice": {"mean": 0.8}},
        "holdout": {},
    }
    text = end_to_end_markdown(summary, "/preds")
    assert "**m** v3 (challenger), validation Dice 0.800; held-out Dice nan" in text
