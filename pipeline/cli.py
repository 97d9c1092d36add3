"""`unet-pipeline`: the command line. It talks to the person; the library logs."""

from __future__ import annotations

import platform
import sys
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated

import typer

from pipeline import __version__
from pipeline.errors import Status
from pipeline.logs import setup_logging

app = typer.Typer(
    name="unet-pipeline",
    help="Batch medical-image segmentation: ingest DICOM/NIfTI, train a U-Net, predict masks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

REPORTED_PACKAGES = ("torch", "monai", "prefect", "mlflow", "pydicom", "highdicom", "nibabel", "numpy")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"unet-pipeline {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    _version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version and exit.", callback=_version_callback, is_eager=True
        ),
    ] = False,
) -> None:
    """Batch medical-image segmentation pipeline."""


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


@app.command()
def doctor(
    workdir: Annotated[
        Path | None, typer.Option(help="Work directory (default $UNET_PIPELINE_WORKDIR or ~/.unet-pipeline).")
    ] = None,
) -> None:
    """Print versions, the compute device and where the embedded stores live."""
    from pipeline.config import Workdir
    from pipeline.runtime import configure_threads, describe_device, resolve_device

    typer.echo(f"unet-pipeline {__version__}")
    typer.echo(f"  python     {platform.python_version()} ({platform.machine()})")
    for name in REPORTED_PACKAGES:
        typer.echo(f"  {name:<10} {_package_version(name)}")
    configure_threads()
    info = describe_device(resolve_device("auto"))
    if info.kind == "cuda":
        typer.echo(f"device: CUDA - {info.name}, {info.memory_gib:.1f} GiB")
    else:
        typer.echo(f"device: CPU - {info.name}, {info.threads} threads (no CUDA GPU visible)")
    wd = Workdir.resolve(workdir)
    typer.echo(f"workdir: {wd.root}")
    typer.echo(f"  mlflow tracking  {wd.mlflow_tracking_uri()}")
    typer.echo(f"  prefect api      {wd.prefect_api()}")


@app.command("smoke")
def smoke(
    size: Annotated[int, typer.Option(help="Height and width of the test slice.")] = 64,
) -> None:
    """Run one forward pass of a small U-Net on a random slice and report the shapes."""
    import time

    import torch

    from pipeline.runtime import configure_threads, prepare_model, resolve_device, to_input
    from unet_model import UNet, UNetConfig, count_parameters

    configure_threads()
    device = resolve_device("auto")
    model = prepare_model(UNet(UNetConfig(base_channels=16)).eval(), device)
    x = to_input(torch.randn(1, 1, size, size), device)
    start = time.perf_counter()
    with torch.inference_mode():
        logits = model(x)
    ms = (time.perf_counter() - start) * 1000
    typer.echo(
        f"forward ok: input {tuple(x.shape)} -> logits {tuple(logits.shape)} on {device.type} "
        f"({count_parameters(model) / 1e6:.2f} M parameters, {ms:.0f} ms)"
    )


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Argument(help="Folder to write (replaced if it holds an earlier demo set).")],
    cases: Annotated[int, typer.Option(help="Number of labelled cases.")] = 12,
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same files, byte for byte.")] = 0,
    size: Annotated[int, typer.Option(help="Nominal in-plane matrix size (at least 32).")] = 112,
) -> None:
    """Generate the labelled demo dataset: DICOM series + SEG, an MSD copy and broken inputs."""
    import time

    from pipeline.synthetic.dataset import make_demo_dataset

    start = time.perf_counter()
    try:
        info = make_demo_dataset(out, n_cases=cases, seed=seed, size=size)
    except (ValueError, FileExistsError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    n_files = sum(len(c.dicom_files) for c in info.cases)
    modalities = ", ".join(f"{m} {sum(c.modality == m for c in info.cases)}" for m in ("CT", "MR"))
    n_train = sum(c.split == "train" for c in info.cases)
    typer.echo(f"demo dataset in {info.root} ({time.perf_counter() - start:.1f} s, seed {seed})")
    typer.echo(f"  {len(info.cases)} cases ({modalities}), {n_files} DICOM images, {len(info.cases)} SEGs")
    typer.echo(f"  dicom/        hospital-like tree; SEGs in {info.dicom_root.name}/annotations/")
    typer.echo(f"  msd/          dataset.json, {n_train} training and {len(info.cases) - n_train} test cases")
    typer.echo(f"  dicom/qa/     broken series; with strays {len(info.dicom_quarantine)} files to quarantine")
    typer.echo(f"  broken_nifti/ {len(info.nifti_quarantine)} files the NIfTI checks must reject")
    typer.echo("  expected.json what ingest should make of it all")


@app.command("ingest")
def ingest_command(
    source: Annotated[
        str, typer.Argument(help="DICOM folder tree, NIfTI files, an MSD dataset or a PACS URL (see README).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Staging folder to write (made if absent).")],
    secret_file: Annotated[
        Path | None, typer.Option(help="Site secret keying case IDs (default: <workdir>/site-secret).")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Parallel conversion processes (default: CPUs).")
    ] = None,
    max_pixels: Annotated[
        int | None,
        typer.Option(help="Largest Rows x Columns x frames of one DICOM file (default: from the budget)."),
    ] = None,
    accept_partial_series: Annotated[
        bool | None,
        typer.Option(
            "--accept-partial-series/--refuse-partial-series",
            help="Stage a DICOM series some of whose files were refused, marked partial "
            "(default: the config's data.accept_partial_series, false: refused as SERIES_INCOMPLETE).",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="YAML configuration: its `ingest` and `data` sections (see `config --show`)."),
    ] = None,
    ca_bundle: Annotated[Path | None, typer.Option(help="PEM CA bundle to verify a PACS's TLS.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each step.")] = False,
) -> None:
    """Validate and convert a source into a staging dataset; quarantine what is wrong, with reasons.

    Exit code 0 when cases are staged and nothing is quarantined (ignored non-inputs such as
    reports do not count), 1 when cases are staged and something is quarantined, 2 when no case
    is staged (or bad arguments).
    """
    from pipeline.config import ConfigError
    from pipeline.ingest import ingest, ingest_limits

    setup_logging(verbose)
    folder = _pull_source(source, out, secret_file, ca_bundle, include_derived=True)
    try:
        overrides: dict = (
            {} if accept_partial_series is None else {"accept_partial_series": accept_partial_series}
        )
        if max_pixels:
            overrides["max_pixels_per_file"] = max_pixels
        limits = ingest_limits(config, **overrides)
        report = ingest(
            folder,
            out,
            secret_file=secret_file,
            workers=workers,
            limits=limits,
            progress=sys.stderr.isatty(),
        )
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    typer.echo(
        f"ingest: {report.cases} cases staged ({report.cases_converted} converted, "
        f"{report.cases_skipped} unchanged) in {out}"
    )
    typer.echo(
        f"  files: {report.discovered} discovered = {report.accepted} accepted + "
        f"{report.quarantined} quarantined + {report.ignored} ignored"
    )
    for reason, count in report.by_reason.items():
        typer.echo(f"  {reason:<24} {count}")
    if report.by_reason:
        typer.echo(f"  details: {out / 'quarantine.jsonl'}")
    if report.partial:
        typer.echo(f"  partial: {len(report.partial)} case(s) staged from incomplete series (see manifest)")
    if report.cases == 0:
        raise typer.Exit(code=2)
    if not report.clean:
        raise typer.Exit(code=1)


@app.command("config")
def config_command(
    show: Annotated[bool, typer.Option("--show", help="Print the resolved configuration as YAML.")] = False,
    config: Annotated[Path | None, typer.Option(help="YAML file to validate and resolve.")] = None,
) -> None:
    """Validate a configuration file; with --show print it resolved (defaults filled in)."""
    from pipeline.config import ConfigError, load_config

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    if show:
        typer.echo(cfg.to_yaml(), nl=False)
    else:
        typer.echo(f"configuration {'in ' + str(config) if config else '(defaults)'} is valid")


@app.command("train")
def train_command(
    staging: Annotated[Path, typer.Argument(help="Staging folder written by `unet-pipeline ingest`.")],
    config: Annotated[Path | None, typer.Option(help="YAML configuration (see `config --show`).")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default <workdir>/runs/<time>).")] = None,
    register: Annotated[str | None, typer.Option(help="Register the model under this name.")] = None,
    folds: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="K-fold cross-validation: one model per fold, registered as their ensemble "
            "(data.folds; 1: one hold-out split).",
        ),
    ] = None,
    workdir: Annotated[
        Path | None, typer.Option(help="Work directory (default $UNET_PIPELINE_WORKDIR).")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress.")] = False,
) -> None:
    """Train a U-Net on the staged cases, log it to MLflow, register and gate it; print one JSON line.

    With --folds K it trains one U-Net per fold, each validated on its held-out fold, and the
    model is their ensemble (the mean of their softmax); its score is the out-of-fold Dice.
    With --register NAME the new version becomes `champion` when its validation Dice is not worse
    than the champion's (re-scored on the same cases) by more than tracking.champion_margin.
    """
    import json
    import time

    from pipeline.config import ConfigError, Workdir, load_config
    from pipeline.tracking.release import gate, register_model, train_and_log

    setup_logging(verbose)
    try:
        cfg = load_config(config)
        if folds is not None:
            cfg = cfg.replace(data={"folds": folds})
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    wd = Workdir.resolve(workdir)
    out = out or wd.root / "runs" / time.strftime("%Y%m%d-%H%M%S")
    uri = wd.mlflow_tracking_uri()
    try:
        trained = train_and_log(staging, out, cfg, tracking_uri=uri)
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    version, champion = None, False
    if register and trained.model_uri:
        version = register_model(trained.model_uri, register, tracking_uri=uri)
        champion = gate(register, version, trained, staging, cfg, tracking_uri=uri)
    typer.echo(json.dumps({**trained.summary(), "model_version": version, "champion": champion}))


@app.command("evaluate")
def evaluate_command(
    pred: Annotated[Path, typer.Option(help="Folder of predicted label maps (<case>.nii.gz).")],
    truth: Annotated[Path, typer.Option(help="Folder of reference label maps (same names).")],
    out: Annotated[Path | None, typer.Option(help="CSV to write (default PRED/metrics.csv).")] = None,
) -> None:
    """Per-case Dice and HD95 of predicted against reference label maps (CSV), and the means."""
    from pipeline.training.metrics import evaluate_folders

    try:
        csv_path, means = evaluate_folders(pred, truth, out)
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    typer.echo(f"per-case metrics: {csv_path}")
    for key, value in means.items():
        typer.echo(f"  {key:<16} {value:.4f}")


@app.command("predict")
def predict_command(
    source: Annotated[
        str, typer.Argument(help="DICOM tree, NIfTI files, MSD dataset, staging folder or a PACS URL.")
    ],
    model: Annotated[str, typer.Option(help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/..., folder.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (reruns skip done cases).")],
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    batch_size: Annotated[int | None, typer.Option(help="Slices per forward pass (default: config).")] = None,
    postprocess: Annotated[
        bool | None,
        typer.Option("--postprocess/--no-postprocess", help="Largest component, fill holes."),
    ] = None,
    secret_file: Annotated[
        Path | None, typer.Option(help="Site secret keying case IDs (default: <workdir>/site-secret).")
    ] = None,
    push: Annotated[
        str | None,
        typer.Option(
            help="Send each case's DICOM SEG to dicomweb+http(s)://... (STOW-RS) or dimse://AET@HOST:PORT."
        ),
    ] = None,
    push_sr: Annotated[
        bool, typer.Option(help="With --push, also send an SR of the volumes (TID 1500).")
    ] = False,
    ca_bundle: Annotated[Path | None, typer.Option(help="PEM CA bundle to verify a PACS's TLS.")] = None,
    memory_gb: Annotated[
        float | None,
        typer.Option(help="Memory for cases in flight, GB (default: half of the memory available).", min=0.1),
    ] = None,
    model_streams: Annotated[
        int | None,
        typer.Option(help="Cases in the network at once (default: one per core up to 4; 1 on a GPU).", min=1),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each case.")] = False,
) -> None:
    """Segment every case of SOURCE; masks, DICOM SEG, QC, results.csv and report.html in OUT.

    Exit code 0 when every case is ok (and pushed), 1 when some are quarantined or failed (or a
    PACS series was incomplete, or a push failed), 2 when none is ok.
    """
    from pipeline.inference.batch import BatchSettings, predict
    from pipeline.inference.model import ModelLoadError
    from pipeline.io.batchdir import check_out_folder

    setup_logging(verbose)
    try:
        check_out_folder(out)  # before a pull or the model: a wrong --out costs nothing
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    if push:
        _check_push_url(push)
    folder = _pull_source(source, out, secret_file, ca_bundle, include_derived=False)
    try:
        summary = predict(
            folder,
            model,
            out,
            BatchSettings(
                device=device,
                batch_size=batch_size,
                postprocess_masks=postprocess,
                secret_file=secret_file,
                memory_budget=int(memory_gb * 2**30) if memory_gb else None,
                model_streams=model_streams,
            ),
            progress=sys.stderr.isatty(),
        )
    except (ModelLoadError, OSError, ValueError, RuntimeError) as exc:
        # One line, no traceback: a bad argument or an OUT that cannot be written (a case's own
        # failures never get here: they are its record).
        typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(
        f"predict: {summary.count(Status.OK)} ok "
        f"({summary.processed} predicted, {summary.skipped} done earlier), "
        f"{summary.count(Status.QUARANTINED)} quarantined, {summary.count(Status.FAILED)} failed"
    )
    code = summary.exit_code
    if push and summary.count(Status.OK):
        code = max(code, _push_results(summary, push, ca_bundle, push_sr))
    if (summary.out / "pull_report.json").is_file() and _pull_incomplete(summary.out):
        code = max(code, 1)
    typer.echo(f"  results: {summary.out / 'results.csv'}")
    typer.echo(f"  report:  {summary.out / 'report.html'}")
    raise typer.Exit(code=code)


# ------------------------------------------------------------------------------------------
# PACS sources and push (pipeline.pacs): a URL source becomes a spool folder before the folder
# code path; credentials only from the environment (UNET_PACS_*, UNET_PUSH_*).


def _pacs_credentials(ca_bundle: Path | None, push: bool = False):
    from dataclasses import replace

    from pipeline.pacs.common import PULL_PREFIX, PUSH_PREFIX, Credentials

    try:
        creds = Credentials.from_env(PUSH_PREFIX, fallback=PULL_PREFIX) if push else Credentials.from_env()
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    return replace(creds, ca_bundle=str(ca_bundle)) if ca_bundle else creds


def _check_push_url(push: str) -> None:
    from pipeline.pacs.push import destination

    try:
        destination(push)
    except ValueError as exc:
        typer.echo(f"error: --push: {exc}", err=True)
        raise typer.Exit(code=2) from exc


def _pull_source(
    source: str, out: Path, secret_file: Path | None, ca_bundle: Path | None, *, include_derived: bool
) -> Path:
    """A folder as is; a PACS URL pulled into OUT/.spool/ (the folder of its complete series)."""
    from pipeline.pacs.common import PacsError
    from pipeline.pacs.pull import resolve_source
    from pipeline.pacs.url import is_pacs_url

    if not is_pacs_url(source):
        return Path(source)
    try:
        folder, report = resolve_source(
            source,
            out,
            secret_file=secret_file,
            credentials=_pacs_credentials(ca_bundle),
            include_derived=include_derived,
        )
    except (PacsError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    counts = report.to_json()["counts"]
    typer.echo(
        f"pull: {counts['series_found']} series found: {counts['series_complete']} complete, "
        f"{counts['series_incomplete']} incomplete, {counts['series_skipped']} skipped; "
        f"{counts['instances_fetched']} instances fetched, {counts['instances_reused']} already spooled "
        f"({report.bytes / 1e6:.1f} MB in {report.seconds:.1f} s)"
    )
    for record in report.quarantine():
        typer.echo(f"  {record['reason']:<24} {record['path']}: {record['message']}")
    return folder


def _pull_incomplete(out: Path) -> bool:
    import json

    report = json.loads((out / "pull_report.json").read_text(encoding="utf-8"))
    return bool(report["counts"]["series_incomplete"])


def _push_results(summary, push: str, ca_bundle: Path | None, with_sr: bool) -> int:
    """Push the ok cases, refresh results.csv's push columns; 1 when any push failed, else 0."""
    from pipeline.inference.batch import finalize_batch
    from pipeline.pacs.push import push_batch
    from pipeline.pacs.record import PushStatus

    ok = [r.case_id for r in summary.results if r.status == Status.OK]
    report = push_batch(
        summary.out, push, ok, credentials=_pacs_credentials(ca_bundle, push=True), with_sr=with_sr
    )
    finalize_batch(summary.out)  # results.csv gains the push columns from the push records
    failed = report.count(PushStatus.PUSH_FAILED)
    typer.echo(
        f"push: {report.count(PushStatus.PUSHED)} cases stored at {report.destination} "
        f"({report.to_json()['pushed_now']} objects sent now), {failed} push_failed"
    )
    reasons = Counter(c["reason"] for c in report.cases.values() if c["status"] == PushStatus.PUSH_FAILED)
    for reason, n in reasons.items():
        typer.echo(f"  {reason:<24} {n} (a rerun retries them)")
    return 1 if failed else 0
