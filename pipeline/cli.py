"""`unet-pipeline`: the command line. It talks to the person; the library logs."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated

import typer

from pipeline import __version__

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
