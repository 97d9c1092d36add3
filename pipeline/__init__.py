"""The domain library: ingest, preprocessing, training, inference, tracking and the CLI.

Never imports Prefect; flows/ orchestrates these functions.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("unet-pipeline")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
