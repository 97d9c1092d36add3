"""The `unet-pipeline` console script: the library's commands plus those that run flows.

pipeline.cli holds every command that needs no orchestration; this module adds `demo` (and
is the entry point), so imports keep going one way: flows -> pipeline.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from flows.reporting import demo_lines
from pipeline.cli import app
from pipeline.logs import setup_logging

__all__ = ["app"]


def _embedded_environment(workdir: Path) -> None:
    """Point Prefect and MLflow at the work directory's embedded stores, quietly."""
    os.environ["UNET_PIPELINE_WORKDIR"] = str(workdir)
    os.environ.setdefault("PREFECT_HOME", str(workdir / "prefect"))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


@app.command("demo")
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo's data, stores and results go.")] = Path(
        "demo-work"
    ),
    # 48: the held-out fifth is then ten cases (CT and MR, every acquisition plane). With 24 its
    # five swung by 0.06 between fresh splits, one hard lesion away from any figure, and training
    # saw two or three cases of each modality and plane. Training time is set by its epochs, not
    # by the cases: 48 cost about a minute more than 24 (generation, ingest, validation, predict).
    cases: Annotated[int, typer.Option(help="Labelled cases to generate.")] = 48,
    epochs: Annotated[
        int | None,
        typer.Option(help="Training epochs (default: the config's, ending earlier on convergence)."),
    ] = None,
    train_minutes: Annotated[
        float | None,
        typer.Option(
            help="A wall-clock training budget (off: the model then depends on the machine's load)."
        ),
    ] = None,
) -> None:
    """The main job end to end on generated data: ingest -> train -> register -> gate -> predict."""
    import json
    import time

    workdir = workdir.resolve()
    _embedded_environment(workdir)
    setup_logging(verbose=False)  # library notices (MONAI's optional GPU decoder, ...) off the terminal
    from pipeline.config import Workdir
    from pipeline.synthetic.dataset import make_demo_dataset
    from pipeline.tracking import mlflow_ui_command

    start = time.perf_counter()
    data = workdir / "data"
    typer.echo(f"unet-pipeline demo in {workdir}")
    if not (data / "expected.json").is_file():
        typer.echo(f"  generating {cases} synthetic cases (DICOM series with SEG annotations)...")
        make_demo_dataset(data, n_cases=cases, seed=0)
    typer.echo("  running end_to_end_flow on Prefect's embedded API (ingest, train, gate, predict)...")

    from flows.end_to_end import end_to_end_flow

    summary = end_to_end_flow(
        str(data / "dicom"),
        str(workdir),
        config_overrides={
            "train": {"time_budget_minutes": train_minutes} | ({"epochs": epochs} if epochs else {})
        },
        secret_file=str(workdir / "site-secret"),
    )
    typer.echo("")
    for line in demo_lines(summary, workdir / "predictions"):
        typer.echo(line)
    typer.echo("web UIs:")
    typer.echo(f"  PREFECT_HOME={os.environ['PREFECT_HOME']} .venv/bin/prefect server start")
    typer.echo(f"  .venv/bin/{mlflow_ui_command(Workdir.resolve(workdir).root)}")
    typer.echo(f"done in {time.perf_counter() - start:.0f} s")
    (workdir / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")


@app.command("listen")
def listen(
    aet: Annotated[str, typer.Option(help="Our AE title (the senders' destination).")],
    port: Annotated[int, typer.Option(help="TCP port to listen on.")],
    out: Annotated[Path, typer.Option("--out", help="INCOMING folder: receiving/ and studies/ in it.")],
    quiet: Annotated[
        float, typer.Option(help="Seconds without an instance before a study is complete.")
    ] = 30.0,
    allow: Annotated[
        list[str] | None, typer.Option(help="Calling AE title allowed to send (repeat; default: any).")
    ] = None,
    bind: Annotated[str, typer.Option(help="Address to bind (default: every interface).")] = "",
    deployment: Annotated[
        str | None,
        typer.Option(help="Deployment to run per complete study (FLOW/DEPLOYMENT), e.g. batch-inference/..."),
    ] = None,
    results: Annotated[
        Path | None, typer.Option(help="With --deployment: the runs' out folder (one sub-folder per study).")
    ] = None,
    secret_file: Annotated[
        Path | None,
        typer.Option(help="Site secret keying the study folders (default: <workdir>/site-secret)."),
    ] = None,
) -> None:
    """A DICOM C-STORE SCP: files each study, and starts a deployment run when it is complete."""
    import logging
    import signal
    import threading

    from pipeline.io.batchdir import resolve_secret
    from pipeline.pacs.listener import StudyListener

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if deployment and results is None:
        typer.echo("error: --deployment needs --results (where the runs write)", err=True)
        raise typer.Exit(code=2)

    def start_run(folder: Path) -> None:
        if not deployment:
            typer.echo(f"study complete: {folder}")
            return
        from prefect.deployments import run_deployment

        run = run_deployment(
            deployment,
            parameters={"source": str(folder), "out": str(results / folder.name)},
            timeout=0,  # start it, do not wait: the listener keeps receiving
        )
        typer.echo(f"study complete: {folder} -> flow run {run.id} of {deployment}")

    secret = resolve_secret(secret_file)
    try:
        listener = StudyListener(
            out,
            aet=aet,
            port=port,
            secret=secret,
            quiet_s=quiet,
            on_complete=start_run,
            allowed_aets=allow or (),
            bind=bind,
        ).start()
    except (ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    typer.echo(f"listening as {aet} on port {port}; files under {out.resolve()} (Ctrl-C stops)")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    listener.stop()
    typer.echo(f"stopped: {listener.received} instances received, {len(listener.completed)} studies complete")


if __name__ == "__main__":
    app()
