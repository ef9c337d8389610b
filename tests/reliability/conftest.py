"""Fixtures of the reliability suite: tiny bundles and a live server process shared per session.

The helpers (`fault_bundles`, the server process, `load_generator`) live in the `testkit` package.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from testkit import fault_bundles
from testkit.reliability import API_KEY, LIVE_LIMITS, ServerProcess


@pytest.fixture(scope="session")
def good_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fault_bundles.write_good(tmp_path_factory.mktemp("bundles") / "good")


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory, good_bundle: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path_factory.mktemp("live"), good_bundle, **LIVE_LIMITS).start()
    yield server
    server.stop()


@pytest.fixture
def client(live_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server.url, timeout=30.0, headers={"X-API-Key": API_KEY}) as c:
        yield c
