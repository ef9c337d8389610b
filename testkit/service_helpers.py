"""Helpers shared by the service tests: the tiny bundle handle, test API key, and a live-server launcher.

Kept out of conftest.py because `from conftest import ...` is ambiguous when several test folders each have
a conftest module (the whole suite imports whichever came first).
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from testkit import tiny_bundle
from testkit.server import REPO, ServerProcess

__all__ = ["API_KEY", "REPO", "LiveServer", "TinyBundle", "b64", "serving", "start_server"]

API_KEY = "test-key-0123456789"


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


class LiveServer(ServerProcess):
    """`idembed-serve` in a child process on 127.0.0.1 (`testkit.server.ServerProcess`)."""

    @property
    def process(self) -> subprocess.Popen[bytes]:
        assert self.proc is not None, "not started"
        return self.proc


def start_server(env_overrides: dict[str, str], log_path: Path, timeout: float = 60.0) -> LiveServer:
    """Start the service with these IDEMBED_* settings (this process's own IDEMBED_* are not inherited)
    and return it once /readyz answers 200."""
    server = LiveServer({"IDEMBED_LOG_LEVEL": "INFO", **env_overrides}, log_path)
    server.start(timeout_s=timeout)
    return server


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
