"""deploy/healthcheck.py, the container's HEALTHCHECK: exit 0 only when /readyz answers 200."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "healthcheck.py"


class _Readyz(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = self.status if self.path == "/readyz" else 404
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_service() -> Iterator[tuple[int, type[_Readyz]]]:
    handler = type("Handler", (_Readyz,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], handler
    server.shutdown()
    server.server_close()


def probe(port: int, host: str = "0.0.0.0") -> subprocess.CompletedProcess[str]:
    env = {"IDEMBED_HOST": host, "IDEMBED_PORT": str(port), "IDEMBED_HEALTHCHECK_TIMEOUT": "2"}
    return subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)


def test_ready_service_is_healthy_even_when_bound_to_all_interfaces(fake_service) -> None:
    port, _ = fake_service
    result = probe(port, host="0.0.0.0")
    assert result.returncode == 0, result.stderr
    assert f"http://127.0.0.1:{port}/readyz" in result.stdout


def test_not_ready_service_is_unhealthy(fake_service) -> None:
    port, handler = fake_service
    handler.status = 503
    result = probe(port, host="127.0.0.1")
    assert result.returncode == 1
    assert "503" in result.stderr


def test_nothing_listening_is_unhealthy_with_the_url_named() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = probe(port)
    assert result.returncode == 1
    assert "/readyz" in result.stderr
