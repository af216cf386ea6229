"""Shared test settings: a private SynthFaces cache per test session, and small thread counts for 2-core CI."""
from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session", autouse=True)
def _facekd_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Hermetic: generated SynthFaces never leak between test sessions or into the user's cache.
    if "FACEKD_TEST_KEEP_CACHE" not in os.environ:
        os.environ["FACEKD_CACHE"] = str(tmp_path_factory.mktemp("facekd-cache"))
