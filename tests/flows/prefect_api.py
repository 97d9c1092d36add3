"""One temporary Prefect API for a test module: its own home, an ephemeral server, quiet logs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# A loaded 2-core CI machine may need far more than Prefect's default 30 s to start the server.
STARTUP_TIMEOUT_S = 300


@contextlib.contextmanager
def temporary_prefect_api(home: Path, **settings: Any) -> Iterator[str]:
    """Run the body against a fresh Prefect home and ephemeral API server; yields the API's URL.

    `settings`: more Prefect settings by name (e.g. PREFECT_UI_URL="http://...").
    """
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_LOCAL_STORAGE_PATH": str(home / "storage"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        import prefect.settings
        from prefect.testing.utilities import prefect_test_harness

        updates = {
            prefect.settings.PREFECT_HOME: str(home),
            prefect.settings.PREFECT_LOCAL_STORAGE_PATH: str(home / "storage"),
            prefect.settings.PREFECT_SERVER_ANALYTICS_ENABLED: False,
            **{getattr(prefect.settings, name): value for name, value in settings.items()},
        }
        with (
            prefect.settings.temporary_settings(updates=updates),
            prefect_test_harness(server_startup_timeout=STARTUP_TIMEOUT_S),
        ):
            yield prefect.settings.get_current_settings().api.url
