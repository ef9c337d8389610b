"""Server processes for tests and benchmarks: a free 127.0.0.1 port, spawn, poll readiness, stop by PID.

The one implementation of "start `python -m service.cli` (or any HTTP server) as a child process and wait
until a probe answers 200" that the reliability suite, the service tests and the benchmarks share. It needs
only the standard library (the readiness probe is a raw HTTP/1.1 request), so benchmarks measure no client
library's start-up and a server in another virtual environment (Triton) is probed the same way.

Only processes started here are ever signalled, by their own PID.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVICE_ARGV = (sys.executable, "-m", "service.cli")


class ServerStartError(RuntimeError):
    """The server exited during start-up, or its readiness probe did not answer 200 in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_status(port: int, path: str, *, host: str = "127.0.0.1", timeout_s: float = 0.5) -> int | None:
    """Status code of `GET path` on host:port, or None if nothing answers (refused, reset, timed out)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            head = s.recv(64)
    except OSError:
        return None
    if not head.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")) or len(head) < 12:
        return None
    try:
        return int(head[9:12])
    except ValueError:
        return None


def wait_ready(
    proc: subprocess.Popen[bytes],
    port: int,
    path: str = "/readyz",
    *,
    timeout_s: float = 60.0,
    interval_s: float = 0.02,
    log: Callable[[], str] | None = None,
) -> float:
    """Seconds until `path` answers 200; raises `ServerStartError` (with the log's tail) if the process exits
    first or the time runs out. The process is left running on timeout: the caller decides how to stop it."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        if proc.poll() is not None:
            raise ServerStartError(f"server exited with {proc.returncode} during start-up:\n{_tail(log)}")
        if http_status(port, path) == 200:
            return time.perf_counter() - start
        time.sleep(interval_s)
    raise ServerStartError(f"{path} on port {port} not 200 after {timeout_s:g} s:\n{_tail(log)}")


def _tail(log: Callable[[], str] | None, chars: int = 4000) -> str:
    return log()[-chars:] if log is not None else "(no log captured)"


def stop_process(proc: subprocess.Popen[bytes], *, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
    """Signal the process by its PID (SIGTERM: graceful), SIGKILL it if it has not exited after `timeout_s`;
    returns its exit code."""
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
    return proc.wait(timeout_s)


def rss_mib(pid: int) -> float:
    """Resident memory of a process (Linux /proc), to spot leaks across a long run."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for PID {pid}")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """PIDs of a process's direct children (Linux /proc), e.g. the workers of a multi-process server."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = task / "children"
        if children.exists():
            found += [int(p) for p in children.read_text().split()]
    return sorted(set(found))


def service_env(
    settings: Mapping[str, object], *, inherit_idembed: bool = False, repo: Path = REPO
) -> dict[str, str]:
    """The environment of a service child: this process's, minus its IDEMBED_* variables unless
    `inherit_idembed` (a developer's settings must not change a test), plus `settings` (IDEMBED_* names);
    `repo` is the checkout whose code it runs (another one for a before/after benchmark)."""
    env = {k: v for k, v in os.environ.items() if inherit_idembed or not k.startswith("IDEMBED_")}
    env.update({k: str(v) for k, v in settings.items()})
    # The checkout under test, not whatever idembed an environment happens to have installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH", "")) if p)
    return env


class ServerProcess:
    """An HTTP server in a child process on 127.0.0.1: by default `python -m service.cli` with its settings
    as IDEMBED_* variables (IDEMBED_HOST and IDEMBED_PORT are set here).

    `start()` returns once the readiness probe answers 200 (or raises `ServerStartError` with the server's
    log); `start_expecting_failure()` returns the exit code of a start-up that must fail. Output goes to a
    log file: a pipe nobody reads would fill up and block the server mid-run.
    """

    def __init__(
        self,
        env: Mapping[str, object],
        log_path: Path,
        *,
        argv: Sequence[str] = SERVICE_ARGV,
        cwd: Path = REPO,
        port: int | None = None,
        ready_path: str = "/readyz",
        inherit_idembed: bool = False,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.argv = list(argv)
        self.cwd = cwd
        self.ready_path = ready_path
        settings = {"IDEMBED_HOST": "127.0.0.1", "IDEMBED_PORT": self.port, **env}
        # The code of the checkout it runs in (`cwd`): this one unless a benchmark compares two.
        self.env = service_env(settings, inherit_idembed=inherit_idembed, repo=cwd)
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_s: float | None = None  # process start to the first 200 of the readiness probe

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def spawn(self) -> subprocess.Popen[bytes]:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        return self.proc

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout_s: float = 60.0) -> ServerProcess:
        proc = self.spawn()
        try:
            self.ready_s = wait_ready(proc, self.port, self.ready_path, timeout_s=timeout_s, log=self.log)
        except ServerStartError:
            self.kill()
            raise
        return self

    def start_expecting_failure(self, timeout_s: float = 60.0) -> tuple[int, float, str]:
        """(exit code, seconds until exit, log) of a start-up that must fail; raises if it serves instead."""
        started = time.monotonic()
        proc = self.spawn()
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"server still running after {timeout_s:.0f} s:\n{self.log()}") from None
        return code, time.monotonic() - started, self.log()

    def rss_mib(self) -> float:
        return rss_mib(self.pid)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (graceful shutdown), then SIGKILL if it hangs; the exit code (None if never started)."""
        return None if self.proc is None else stop_process(self.proc, sig=sig, timeout_s=timeout_s)

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks, no flushing; what a power cut or OOM kill does."""
        if self.proc is not None:
            stop_process(self.proc, sig=signal.SIGKILL)

    def __enter__(self) -> ServerProcess:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
