"""Orchestration only: Prefect flows and tasks that call pipeline functions. Nothing imports flows."""

import os

# Set before Prefect is imported (every flow module is imported through this package). Without
# network the embedded server's telemetry logs errors; each setting can still be overridden.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "false")
# The embedded server's default 20 s start-up limit is too short on a busy 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")

# Deployments send the library's records to each flow run's page (PREFECT_LOGGING_EXTRA_LOGGERS
# =pipeline, deploy/). The library logs progress at INFO, below the WARNING of Prefect's root
# logger, so such a process gives the `pipeline` logger a level of its own; elsewhere (the CLI,
# the demo) nothing changes.
if "pipeline" in os.environ.get("PREFECT_LOGGING_EXTRA_LOGGERS", "").replace(" ", "").split(","):
    import logging

    logging.getLogger("pipeline").setLevel(os.environ.get("UNET_PIPELINE_LOG_LEVEL", "INFO"))
