"""Several server processes on one identity store: `idembed-serve serve --processes N`.

Real processes on 127.0.0.1: two services on one PostgreSQL store see each other's enrollments and deletions
(bounded wait), `--processes 2` runs two workers on one port that serve the same gallery, and a SQLite store
is refused with a clear error (its processes would not see each other's writes; shown here too).
"""

from __future__ import annotations

import base64
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from testkit.server import ServerProcess, child_pids, service_env
from testkit.service_helpers import API_KEY, TinyBundle

pytestmark = pytest.mark.slow
AUTH = {"X-API-Key": API_KEY}


def settings(tiny: TinyBundle, store_url: str) -> dict[str, str]:
    return {
        "IDEMBED_BUNDLE_PATH": str(tiny.path),
        "IDEMBED_STORE_URL": store_url,
        "IDEMBED_API_KEYS": API_KEY,
        "IDEMBED_LOG_LEVEL": "WARNING",
        "IDEMBED_ORT_INTRA_OP_THREADS": "1",
    }


def enroll(url: str, name: str, png: bytes) -> None:
    r = httpx.post(
        f"{url}/v1/identities",
        json={"name": name, "images": [base64.b64encode(png).decode()]},
        headers=AUTH,
        timeout=30,
    )
    assert r.status_code in (200, 201), r.text


def enrolled_matches(url: str, png: bytes) -> set[str]:
    # A new connection per call: behind one port, each request may reach another worker process.
    r = httpx.post(
        f"{url}/v1/identify",
        json={"images": [base64.b64encode(png).decode()], "top_k": 20},
        headers=AUTH,
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return {m["identity"] for m in r.json()["results"][0]["matches"] if m["source"] == "enrolled"}


def worker_pids(supervisor: int) -> list[int]:
    """uvicorn's worker processes (spawned interpreters), not multiprocessing's resource tracker."""
    return [p for p in child_pids(supervisor) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]


def eventually(check: Callable[[], bool], timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def test_two_processes_on_one_postgres_store_see_each_others_writes(
    pg_url: str, tiny: TinyBundle, tmp_path: Path
) -> None:
    env = settings(tiny, pg_url)
    with ServerProcess(env, tmp_path / "a.log") as a, ServerProcess(env, tmp_path / "b.log") as b:
        assert a.pid != b.pid
        enroll(a.url, "person-via-a", tiny.png(3))
        assert eventually(lambda: "person-via-a" in enrolled_matches(b.url, tiny.png(3))), b.log()
        r = httpx.delete(f"{b.url}/v1/identities/person-via-a", headers=AUTH, timeout=30)
        assert r.status_code in (200, 204), r.text
        assert eventually(lambda: "person-via-a" not in enrolled_matches(a.url, tiny.png(3))), a.log()


def test_processes_option_runs_workers_on_one_port_that_share_the_gallery(
    pg_url: str, tiny: TinyBundle, tmp_path: Path
) -> None:
    argv = [sys.executable, "-m", "service.cli", "serve", "--processes", "2"]
    with ServerProcess(settings(tiny, pg_url), tmp_path / "n.log", argv=argv) as server:
        # uvicorn's supervisor and its two workers (spawned interpreters).
        deadline = time.monotonic() + 30
        while len(worker_pids(server.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(worker_pids(server.pid)) == 2, server.log()
        enroll(server.url, "shared", tiny.png(7))
        # Twenty requests in a row, each on a new connection (any worker may take it), all find it.
        assert eventually(
            lambda: all("shared" in enrolled_matches(server.url, tiny.png(7)) for _ in range(20))
        ), server.log()
        assert server.stop() in (0, -signal.SIGTERM), server.log()


def test_processes_with_a_sqlite_store_is_refused_naming_postgresql(tiny: TinyBundle, tmp_path: Path) -> None:
    env = service_env(settings(tiny, f"sqlite:///{tmp_path / 'ids.sqlite3'}"))
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--processes", "2"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "--processes needs a store" in result.stderr and "PostgreSQL" in result.stderr


def test_two_sqlite_servers_on_one_file_follow_each_others_writes(tiny: TinyBundle, tmp_path: Path) -> None:
    """SQLite's change feed is followed too, so the refusal above is about erasure, not visibility: two
    single-process servers on one file see each other's enrollments and deletions within the poll interval."""
    env = settings(tiny, f"sqlite:///{tmp_path / 'ids.sqlite3'}")
    with ServerProcess(env, tmp_path / "a.log") as a, ServerProcess(env, tmp_path / "b.log") as b:
        enroll(a.url, "from-a", tiny.png(3))
        assert eventually(lambda: "from-a" in enrolled_matches(b.url, tiny.png(3))), b.log()


def test_workers_get_the_command_line_settings_and_a_share_of_the_cores(tiny: TinyBundle) -> None:
    import os

    from service.core.config import Settings
    from service.multiprocess import child_environment

    cores = len(os.sched_getaffinity(0))
    overrides = {"bundle_path": tiny.path, "port": 9123, "log_level": None}
    env = child_environment(Settings(bundle_path=tiny.path, inference_workers=1), overrides, 2)
    assert env["IDEMBED_BUNDLE_PATH"] == str(tiny.path) and env["IDEMBED_PORT"] == "9123"
    assert "IDEMBED_LOG_LEVEL" not in env  # not given: each worker reads it from the environment as usual
    assert env["IDEMBED_ORT_INTRA_OP_THREADS"] == str(max(1, cores // 2))
    # A thread count the operator set is kept.
    pinned = child_environment(Settings(bundle_path=tiny.path, ort_intra_op_threads=3), {}, 4)
    assert "IDEMBED_ORT_INTRA_OP_THREADS" not in pinned
