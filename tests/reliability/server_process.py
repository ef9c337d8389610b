"""Run the real service as a child process on 127.0.0.1 for the reliability suite: start, probe, kill -9.

Tests talk to it over HTTP like any client, so they exercise uvicorn, middleware, limits and the durable
store exactly as deployed. Only the process started here is ever signalled (by its own PID).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

API_KEY = "reliability-key-0123"
REPO = Path(__file__).resolve().parents[2]

# Small limits make the over-limit cases cheap to send while still exercising the real checks.
LIVE_LIMITS = {
    "max_payload_bytes": 1024 * 1024,
    "max_images_per_request": 8,
    "max_queue_depth": 64,
    "max_top_k": 20,
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m service.cli` with settings given as IDEMBED_* environment variables.

    `start()` returns once /readyz answers 200 (or raises with the server's log if it exits or times out);
    `start_expecting_failure()` returns the exit code and log of a start-up that must fail.
    """

    def __init__(self, workdir: Path, bundle: Path, store: Path | None = None, **settings: object) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"server-{self.port}.log"
        store = store or workdir / "identities.sqlite3"
        self.env = {
            **os.environ,
            "IDEMBED_HOST": "127.0.0.1",
            "IDEMBED_PORT": str(self.port),
            "IDEMBED_BUNDLE_PATH": str(bundle),
            "IDEMBED_STORE_URL": f"sqlite:///{store}",
            "IDEMBED_API_KEYS": API_KEY,
            "IDEMBED_LOG_FORMAT": "text",
            "IDEMBED_LOG_LEVEL": "WARNING",
            # Two cores shared by the whole suite: one onnxruntime thread keeps runs comparable.
            "IDEMBED_ORT_INTRA_OP_THREADS": "1",
            **{f"IDEMBED_{k.upper()}": str(v) for k, v in settings.items()},
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self) -> subprocess.Popen[bytes]:
        log = self.log_path.open("ab")
        # cwd is a scratch folder so a developer's .env in the repository cannot change the settings.
        return subprocess.Popen(
            [sys.executable, "-m", "service.cli"],
            cwd=self.workdir,
            env={**self.env, "PYTHONPATH": str(REPO)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout_s: float = 60.0) -> ServerProcess:
        self.proc = self._spawn()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode} during start-up:\n{self.log()}"
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"server not ready after {timeout_s:.0f} s:\n{self.log()}")

    def start_expecting_failure(self, timeout_s: float = 60.0) -> tuple[int, float, str]:
        """(exit code, seconds until exit, log) of a start-up that must fail; raises if it serves instead."""
        started = time.monotonic()
        self.proc = self._spawn()
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"server still running after {timeout_s:.0f} s:\n{self.log()}") from None
        return code, time.monotonic() - started, self.log()

    def rss_mib(self) -> float:
        """Resident memory of the server process (Linux /proc), to spot leaks across a long run."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no VmRSS for PID {self.proc.pid}")

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks, no flushing; what a power cut or OOM kill does."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if graceful shutdown hangs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
