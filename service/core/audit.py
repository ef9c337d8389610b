"""The audit log of writes: one JSON line per enroll, delete, reload or snapshot, allowed or refused.

Each line holds the time (UTC), the key id (a truncated SHA-256, never the key), the action, the identity's
name where there is one, the outcome (`ok`, `denied`, or the error code, e.g. `identity_not_found`), the HTTP
status, the request id, and for a reload the bundle and model. Never a vector, an image or metadata. The
service only ever appends (O_APPEND, fsync per line, so an acknowledged write's audit line survives a
crash); it never rewrites or truncates the file. `idembed-serve audit` prints it, filtered by identity or
action.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd: int | None = None

    def open(self) -> None:
        """Create the folder and file (mode 0600) if missing; raises OSError naming the path if it cannot."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def record(
        self,
        action: str,
        *,
        key_id: str | None,
        identity: str | None,
        outcome: str,
        status: int,
        request_id: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        entry = {
            "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "key_id": key_id,
            "action": action,
            "identity": identity,
            "outcome": outcome,
            "status": status,
            "request_id": request_id,
        }
        if detail:
            entry["detail"] = detail
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode()
        with self._lock:
            if self._fd is None:
                self.open()
            assert self._fd is not None
            os.write(self._fd, line)  # one write() of one line with O_APPEND: lines never interleave
            os.fsync(self._fd)
        return entry

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def read_audit(path: Path) -> Iterator[dict[str, Any]]:
    """The entries of an audit log file, oldest first (a torn last line from a crash is skipped)."""
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue
