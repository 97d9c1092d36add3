"""Fixtures for the io tests."""

from pathlib import Path

import pytest


@pytest.fixture
def root(tmp_path) -> Path:
    """An empty source root for one test's DICOM files."""
    path = tmp_path / "source"
    path.mkdir()
    return path
