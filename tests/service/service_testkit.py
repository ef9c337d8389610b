"""Helpers shared by the service tests: the tiny bundle handle, test API key, and a live-server launcher.

Kept out of conftest.py because `from conftest import ...` is ambiguous when several test folders each have
a conftest module (the whole suite imports whichever came first).
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import tiny_bundle

API_KEY = "test-key-0123456789"
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class TinyBundle:
    path: Path
    weights: np.ndarray
    bias: np.ndarray
    images: np.ndarray  # uint8 digits [n, 8, 8]
    labels: np.ndarray

    def png(self, i: int) -> bytes:
        return tiny_bundle.png_bytes(self.images[i])

    def reference(self, idx: list[int]) -> np.ndarray:
        return tiny_bundle.embed_reference(self.images[idx], self.weights, self.bias)

    def of_digit(self, digit: int, count: int) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.labels == digit)[:count]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    """`idembed-serve` in a child process on 127.0.0.1."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


def start_server(env_overrides: dict[str, str], log_path: Path, timeout: float = 60.0) -> LiveServer:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDEMBED_")}
    env.update({"IDEMBED_HOST": "127.0.0.1", "IDEMBED_PORT": str(port), "IDEMBED_LOG_LEVEL": "INFO"})
    env.update(env_overrides)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    server = LiveServer(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=1.0).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"server not ready within {timeout} s:\n{server.log()}")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@asynccontextmanager
async def serving(settings: object) -> AsyncIterator[httpx.AsyncClient]:
    """The app of `settings` in-process (lifespan run as uvicorn would), through httpx.ASGITransport."""
    from service.app import create_app

    app = create_app(settings)  # type: ignore[arg-type]
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        yield c
