"""The stack test runs only when asked for (`make stack-test`, i.e. `pytest -m stack`): it builds
cached venvs and starts servers, minutes of work that `make test` leaves out."""

import pytest


def pytest_collection_modifyitems(config, items):
    if "stack" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="the deployment stack test: run `make stack-test`")
    for item in items:
        if item.get_closest_marker("stack"):
            item.add_marker(skip)
