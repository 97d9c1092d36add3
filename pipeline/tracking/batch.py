"""A finished predict batch as one MLflow run (optional step 4 of `pipeline.inference.batch`).

Imported as `pipeline.tracking.batch`, not from the package: it reads the inference stage's batch
folder, and `import pipeline.tracking` stays free of it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Workdir
from pipeline.errors import Status
from pipeline.inference.batch import collect_results, label_list_of
from pipeline.io.batchdir import BatchDir
from pipeline.outputs import report, tables
from pipeline.tracking.runs import Tracker
from pipeline.tracking.store import TAG_MODEL_NAME, TAG_MODEL_VERSION, TAG_WEIGHTS_SHA, redact

log = logging.getLogger(__name__)

TRACKING_EXPERIMENT = "batch-inference"
_METRIC_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")  # what MLflow accepts in a metric name


@dataclass(frozen=True)
class BatchTracking:
    """Where `track_batch` recorded a batch in MLflow, or why it could not (no credentials in it)."""

    experiment: str
    tracking_uri: str  # credentials removed
    run_id: str | None = None
    run_url: str | None = None  # the run's page, for an http(s) tracking server
    error: str | None = None  # set when tracking failed; the batch's outputs stand regardless

    @property
    def ok(self) -> bool:
        return self.error is None and self.run_id is not None

    def to_json(self) -> dict[str, Any]:
        """The "tracking" entry of run_manifest.json: status "logged" or "failed", and the fields."""
        return {"status": "logged" if self.ok else "failed", **dataclasses.asdict(self)}


def track_batch(
    out: str | Path, *, experiment: str = TRACKING_EXPERIMENT, tracking_uri: str | None = None
) -> BatchTracking:
    """Record a finalized batch as one MLflow run; the outcome becomes run_manifest.json's "tracking".

    Params: the model (name, version, weights sha256, its training run, code version) and the
    options. Tags: model_name, model_version and weights_sha256, so a model version's batches are
    found with `tags.model_name = 'NAME' and tags.model_version = 'N'`. Metrics: the counts and
    each label's mean volume (mL) over the ok cases. Artifacts: results.csv and report.html
    without their source column (pseudonymous case IDs only; no source path leaves OUT).
    `tracking_uri` defaults to the work directory's store ($MLFLOW_TRACKING_URI or SQLite).

    Never raises for a tracking failure (server down, refused credentials): the error is
    returned, noted in the manifest and logged as a warning, and a run that was opened is ended,
    not left RUNNING. Raises FileNotFoundError when the batch was not finalized.
    """
    out = Path(out).resolve()
    meta = BatchDir(out).read_batch("prepare_batch")
    manifest_path = out / "run_manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{manifest_path} does not exist: run finalize_batch for {out} first"
        ) from None
    _, results, _ = collect_results(out, meta)
    label_list = label_list_of(meta)
    m = manifest["model"]
    params = {
        "model": {
            "name": m["name"],
            "version": m["version"],
            "weights_sha256": m["sha256"],
            "run_id": m.get("run_id") or "",
            "code_version": m.get("code_version") or "",
        },
        "options": manifest["options"],
        "write_seg": meta["write_seg"],
        "write_qc": meta["write_qc"],
        "output_version": meta["output_version"],
        "options_sha256": meta["options_sha256"],
    }
    metrics = {k: float(v) for k, v in manifest["counts"].items()}
    ok = [r for r in results if r.status == Status.OK]
    for name in label_list:
        volumes = [r.volumes_ml[name] for r in ok if name in r.volumes_ml]
        if volumes:
            metrics[f"mean_volume_ml.{_METRIC_UNSAFE.sub('_', name)}"] = float(np.mean(volumes))
    tags = {
        TAG_MODEL_NAME: m["name"],
        TAG_MODEL_VERSION: m["version"],
        TAG_WEIGHTS_SHA: m["sha256"],
    }
    uri = tracking_uri or Workdir.resolve().mlflow_tracking_uri()
    with Tracker(
        experiment=experiment, run_name=f"{m['name']} v{m['version']}", tracking_uri=uri, tags=tags
    ) as tracker:
        tracker.log_params(params)
        tracker.log_metrics(metrics)
        if tracker.active:
            with tempfile.TemporaryDirectory(prefix="unet-batch-") as tmp:
                table = tables.write_results_csv(
                    Path(tmp, "results.csv"),
                    results,
                    label_list,
                    m["name"],
                    m["version"],
                    with_sources=False,
                    case_root=out,
                )
                page = report.write_report_html(
                    Path(tmp, "report.html"), results, label_list, manifest, out, with_sources=False
                )
                tracker.log_artifacts([table, page])
    record = BatchTracking(
        experiment=experiment,
        tracking_uri=redact(uri),
        run_id=tracker.run_id,
        run_url=tracker.run_url(),
        error=tracker.tracking_error,
    )
    manifest["tracking"] = record.to_json()
    tables.write_json(manifest_path, manifest)
    if record.ok:
        log.info("batch recorded in MLflow: experiment %s, run %s", experiment, record.run_id)
    else:
        log.warning(
            "the batch is NOT recorded in MLflow (its outputs are complete; rerun the batch when "
            "the server is back: finished cases are not redone): %s",
            record.error,
        )
    return record
