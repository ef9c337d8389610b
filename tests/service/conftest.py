"""Service test fixtures: a real tiny ONNX bundle, settings on temp stores, in-process and live servers."""

from __future__ import annotations

import itertools
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from service.app import create_app
from service.core.config import Settings
from testkit import tiny_bundle
from testkit.service_helpers import API_KEY, LiveServer, TinyBundle, start_server


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyBundle:
    root = tmp_path_factory.mktemp("models")
    weights, bias = tiny_bundle.build(root / "default")
    images, labels = tiny_bundle.digits()
    return TinyBundle(root / "default", weights, bias, images, labels)


@pytest.fixture
def models(tmp_path: Path, tiny: TinyBundle) -> Path:
    """A models folder with two same-dimension bundles of different models: `v1` (tiny-digits:1, the session's
    tiny bundle) and `v2` (tiny-digits:2, other weights), for reloads and restarts between models."""
    root = tmp_path / "models"
    shutil.copytree(tiny.path, root / "v1")
    tiny_bundle.build(root / "v2", seed=1, version="2")
    return root


@pytest.fixture
def make_settings(tiny: TinyBundle, tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: object) -> Settings:
        fields: dict[str, object] = {
            "bundle_path": tiny.path,
            "store_url": f"sqlite:///{tmp_path / 'identities.sqlite3'}",
            "api_keys": [API_KEY],
            "log_level": "WARNING",
            # Reads opened explicitly: these tests are about other things; test_auth.py checks the default.
            "require_key_for_reads": False,
        }
        fields.update(overrides)
        return Settings(_env_file=None, **fields)  # type: ignore[arg-type]

    return make


@pytest_asyncio.fixture
async def client(make_settings: Callable[..., Settings]) -> AsyncIterator[httpx.AsyncClient]:
    """The app in-process (lifespan run explicitly, as uvicorn would), called through httpx.ASGITransport."""
    app = create_app(make_settings())
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c,
    ):
        yield c


@pytest.fixture
def server_env(tiny: TinyBundle, tmp_path: Path) -> dict[str, str]:
    return {
        "IDEMBED_BUNDLE_PATH": str(tiny.path),
        "IDEMBED_STORE_URL": f"sqlite:///{tmp_path / 'live.sqlite3'}",
        "IDEMBED_API_KEYS": API_KEY,
        "IDEMBED_REQUIRE_KEY_FOR_READS": "false",
    }


@pytest.fixture(scope="session")
def live_server(tiny: TinyBundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One real uvicorn server for the whole session (start-up costs ~1 s of a 2-core machine)."""
    tmp = tmp_path_factory.mktemp("live")
    env = {
        "IDEMBED_BUNDLE_PATH": str(tiny.path),
        "IDEMBED_STORE_URL": f"sqlite:///{tmp / 'live.sqlite3'}",
        "IDEMBED_API_KEYS": API_KEY,
        "IDEMBED_REQUIRE_KEY_FOR_READS": "false",
    }
    server = start_server(env, tmp / "server.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A throwaway local PostgreSQL with pgvector for one test module; skipped where none can start."""
    pytest.importorskip("psycopg", reason="PostgreSQL tests need the pg extra: pip install '.[pg]'")
    pytest.importorskip("pgvector", reason="PostgreSQL tests need the pg extra: pip install '.[pg]'")
    from testkit.pg_local import LocalPostgresUnavailable, local_postgres

    try:
        with local_postgres() as url:
            yield url
    except LocalPostgresUnavailable as exc:
        pytest.skip(f"no local PostgreSQL with pgvector could be started: {exc}")


_pg_databases = itertools.count()


@pytest.fixture
def pg_database(pg_url: str) -> str:
    """A fresh, empty database on the module's PostgreSQL server, for one test."""
    import psycopg

    name = f"idembed_test_{next(_pg_databases)}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return pg_url.rsplit("/", 1)[0] + "/" + name
