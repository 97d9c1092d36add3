"""Inference: a verified model over a batch of cases, to masks in each source's own geometry.

The modules, in the order a batch meets them (import each by its own name; this package
re-exports nothing, so `results` stays a leaf the output writers can import):

- `model`: loading and verifying the model (ModelHandle, ModelLoadError), the per-process cache,
  the model staged in the batch's work folder;
- `cases`: the cases of a source (PredictCase, plan_cases), loading one case's image;
- `predictor`: one volume through the network, with test-time mirroring (PredictOptions,
  predict_volume, predict_prepared);
- `postprocess`: largest connected component and hole filling, per label;
- `batch`: prepare_batch -> predict_case -> finalize_batch, and `predict` running all three;
- `worker`: one case run step by step to its done-marker (what predict_case runs), in two
  halves (`predict_loaded`, `write_case`) that `predict` overlaps;
- `writers`: the bounded pool of threads that writes finished cases while the model works;
- `records`: a case's output names, its settings and done-marker, a step's failure (CaseFailed);
- `memory`, `footprint`: planned memory of a case (loading ahead; cases in flight per worker);
- `results`: CaseResult and PredictSummary, a leaf module.

The batch's work folder (OUT/.batch/: case and failure records, locks) is the protocol ingest
shares, `pipeline.io.batchdir`. The batch's MLflow run is `pipeline.tracking.batch.track_batch`.
"""
