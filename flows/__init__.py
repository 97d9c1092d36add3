"""Orchestration only: Prefect flows and tasks that call pipeline functions. Nothing imports flows."""

import os

# Set before Prefect is imported (every flow module is imported through this package). Without
# network the embedded server's telemetry logs errors; each setting can still be overridden.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "false")
# The embedded server's default 20 s start-up limit is too short on a busy 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
