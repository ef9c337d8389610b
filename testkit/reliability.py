"""The reliability suite's server: the real service as a child process on 127.0.0.1 (start, probe, kill -9).

Tests talk to it over HTTP like any client, so they exercise uvicorn, middleware, limits and the durable
store exactly as deployed. Process handling is `testkit.server.ServerProcess`'s.
"""

from __future__ import annotations

from pathlib import Path

from testkit import server
from testkit.server import REPO

__all__ = ["API_KEY", "LIVE_LIMITS", "REPO", "ServerProcess"]

API_KEY = "reliability-key-0123"

# Small limits make the over-limit cases cheap to send while still exercising the real checks.
LIVE_LIMITS = {
    "max_payload_bytes": 1024 * 1024,
    "max_images_per_request": 8,
    "max_queue_depth": 64,
    "max_top_k": 20,
}


class ServerProcess(server.ServerProcess):
    """`python -m service.cli` on `bundle` and a SQLite store in `workdir`, extra settings as keywords
    (`max_queue_depth=64` becomes IDEMBED_MAX_QUEUE_DEPTH=64)."""

    def __init__(self, workdir: Path, bundle: Path, store: Path | None = None, **settings: object) -> None:
        store = store or workdir / "identities.sqlite3"
        env = {
            "IDEMBED_BUNDLE_PATH": bundle,
            "IDEMBED_STORE_URL": f"sqlite:///{store}",
            "IDEMBED_API_KEYS": API_KEY,
            "IDEMBED_LOG_FORMAT": "text",
            "IDEMBED_LOG_LEVEL": "WARNING",
            # Two cores shared by the whole suite: one onnxruntime thread keeps runs comparable.
            "IDEMBED_ORT_INTRA_OP_THREADS": "1",
            **{f"IDEMBED_{k.upper()}": v for k, v in settings.items()},
        }
        port = server.free_port()
        # cwd is a scratch folder so a developer's .env in the repository cannot change the settings.
        super().__init__(env, workdir / f"server-{port}.log", cwd=workdir, port=port, inherit_idembed=True)
        self.workdir = workdir
