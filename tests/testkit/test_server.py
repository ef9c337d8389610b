"""testkit.server: the child-server launcher the tests and benchmarks share (spawn, readiness, stop)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from testkit.server import ServerProcess, ServerStartError, free_port, http_status, wait_ready

# A stand-in server: /readyz answers 503 for the first two probes, then 200; it exits 0 on SIGTERM.
READY_AFTER_TWO = """
import http.server, os, signal, sys
probes = 0
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        global probes
        probes += 1
        code = 200 if self.path == "/readyz" and probes > 2 else 503
        self.send_response(code); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a): pass
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
http.server.HTTPServer(("127.0.0.1", int(os.environ["IDEMBED_PORT"])), H).serve_forever()
"""


def test_free_port_is_bindable_and_nothing_answers_on_it() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    assert http_status(port, "/readyz") is None


def test_start_waits_for_200_and_stop_signals_the_pid(tmp_path: Path) -> None:
    server = ServerProcess({}, tmp_path / "s.log", argv=[sys.executable, "-c", READY_AFTER_TWO])
    with server:
        assert server.ready_s is not None and server.ready_s > 0
        assert http_status(server.port, "/readyz") == 200
        assert server.url == f"http://127.0.0.1:{server.port}"
    assert server.proc is not None and server.proc.returncode == 0


def test_a_server_that_exits_during_start_up_is_reported_with_its_log(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "print('bundle is broken'); raise SystemExit(3)"]
    with pytest.raises(ServerStartError, match=r"exited with 3(.|\n)*bundle is broken"):
        ServerProcess({}, tmp_path / "s.log", argv=argv).start(timeout_s=30)


def test_a_server_never_ready_times_out_and_is_killed(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    server = ServerProcess({}, tmp_path / "s.log", argv=argv)
    with pytest.raises(ServerStartError, match=r"not 200 after 0\.5 s"):
        server.start(timeout_s=0.5)
    assert server.proc is not None and server.proc.returncode == -signal.SIGKILL


def test_wait_ready_returns_the_seconds_until_200(tmp_path: Path) -> None:
    server = ServerProcess({}, tmp_path / "s.log", argv=[sys.executable, "-c", READY_AFTER_TWO])
    proc = server.spawn()
    try:
        assert wait_ready(proc, server.port, timeout_s=30) > 0
    finally:
        assert server.stop(signal.SIGTERM) == 0


def test_service_children_do_not_inherit_this_process_settings(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("IDEMBED_STORE_URL", "sqlite:///from-the-developer-shell")
    server = ServerProcess({"IDEMBED_LOG_LEVEL": "WARNING"}, tmp_path / "s.log")
    assert "IDEMBED_STORE_URL" not in server.env
    assert server.env["IDEMBED_PORT"] == str(server.port) and server.env["IDEMBED_HOST"] == "127.0.0.1"
    inheriting = ServerProcess({}, tmp_path / "t.log", inherit_idembed=True)
    assert inheriting.env["IDEMBED_STORE_URL"] == "sqlite:///from-the-developer-shell"
