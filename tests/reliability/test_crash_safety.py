"""Crash safety: kill -9 the server while enrollments are in flight; every acknowledged one survives, whole.

Writers enroll identities whose content is a pure function of their name (two seeded embeddings, metadata
with a digest of them), so after the restart every identity found can be checked byte for byte: an
acknowledged (201) name must be present, and any name present, acknowledged or cut off mid-request, must be
complete (right image count, right metadata, template equal to the mean of its two embeddings).
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pytest

from testkit import fault_bundles
from testkit.reliability import API_KEY, ServerProcess

DIM = fault_bundles.DIM


def identity_content(name: str) -> tuple[list[list[float]], dict[str, str]]:
    """The two embeddings and the metadata that `name` is always enrolled with."""
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    vectors = np.random.default_rng(seed).normal(size=(2, DIM)).astype(np.float32)
    digest = hashlib.sha256(vectors.tobytes()).hexdigest()
    return vectors.tolist(), {"digest": digest, "writer": name.split("-")[0]}


def expected_template(name: str) -> np.ndarray:
    vectors = np.asarray(identity_content(name)[0], dtype=np.float64)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    mean = unit.mean(axis=0)
    return mean / np.linalg.norm(mean)


@dataclass
class EnrollmentLog:
    acknowledged: set[str] = field(default_factory=set)
    attempted: set[str] = field(default_factory=set)
    unexpected: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _writer(url: str, writer: str, log: EnrollmentLog, stop: threading.Event) -> None:
    with httpx.Client(base_url=url, timeout=30, headers={"X-API-Key": API_KEY}) as client:
        i = 0
        while not stop.is_set():
            name = f"{writer}-{i}"
            embeddings, metadata = identity_content(name)
            with log.lock:
                log.attempted.add(name)
            try:
                response = client.post(
                    "/v1/identities", json={"name": name, "embeddings": embeddings, "metadata": metadata}
                )
            except httpx.TransportError:
                return  # the server is gone: this request's outcome is unknown, which the check allows
            with log.lock:
                if response.status_code == 201:
                    log.acknowledged.add(name)
                else:
                    log.unexpected.append(f"{name}: {response.status_code} {response.text[:200]}")
            i += 1


def _all_identities(client: httpx.Client) -> dict[str, dict]:
    found: dict[str, dict] = {}
    offset = 0
    while True:
        page = client.get("/v1/identities", params={"offset": offset, "limit": 1000}).json()
        found.update({item["name"]: item for item in page["items"]})
        offset += len(page["items"])
        if not page["items"] or offset >= page["total"]:
            return found


def crash_cycle(server: ServerProcess, store: Path, *, writers: int, min_acks: int) -> dict[str, int]:
    """Enroll with `writers` threads, kill -9 after `min_acks` acknowledgements, restart, check everything."""
    server.start()
    log, stop = EnrollmentLog(), threading.Event()
    threads = [
        threading.Thread(target=_writer, args=(server.url, f"w{server.port}x{k}", log, stop), daemon=True)
        for k in range(writers)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while len(log.acknowledged) < min_acks and time.monotonic() < deadline:
        time.sleep(0.01)
    server.kill()  # while the writers still have requests in flight
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert not log.unexpected, log.unexpected[:5]
    assert len(log.acknowledged) >= min_acks, "too few enrollments before the deadline to test anything"

    # The file itself must be a consistent database before the service touches it again.
    with sqlite3.connect(store) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    server.start()
    with httpx.Client(base_url=server.url, timeout=60, headers={"X-API-Key": API_KEY}) as client:
        found = _all_identities(client)
        ours = {n: v for n, v in found.items() if n.startswith(f"w{server.port}x")}
        lost = sorted(log.acknowledged - set(ours))
        assert not lost, f"{len(lost)} acknowledged enrollments lost after kill -9, e.g. {lost[:5]}"
        assert set(ours) <= log.attempted
        for name, item in ours.items():
            _, metadata = identity_content(name)
            assert item["image_count"] == 2, item
            assert item["metadata"] == metadata, item
        # Templates: identify each survivor by the template it must have; it must come back as itself.
        names = sorted(ours)
        for start in range(0, len(names), 8):
            chunk = names[start : start + 8]
            response = client.post(
                "/v1/identify",
                json={"embeddings": [expected_template(n).tolist() for n in chunk], "top_k": 1},
            )
            assert response.status_code == 200, response.text
            for name, result in zip(chunk, response.json()["results"], strict=True):
                assert result["matches"][0]["identity"] == name
                assert result["matches"][0]["similarity"] == pytest.approx(1.0, abs=1e-4)
        # Restarted service is fully usable: one more write after recovery.
        extra = f"w{server.port}x-after-restart"
        embeddings, metadata = identity_content(extra)
        body = {"name": extra, "embeddings": embeddings, "metadata": metadata}
        again = client.post("/v1/identities", json=body)
        assert again.status_code == 201, again.text
        assert client.delete(f"/v1/identities/{quote(extra)}").status_code == 204
    server.stop()
    return {
        "acknowledged": len(log.acknowledged),
        "attempted": len(log.attempted),
        "present_after_restart": len(ours),
        "in_flight_at_kill_committed": len(set(ours) - log.acknowledged),
        "lost": len(lost),
    }


@pytest.mark.slow
def test_acknowledged_enrollments_survive_kill_9(tmp_path: Path, good_bundle: Path) -> None:
    store = tmp_path / "identities.sqlite3"
    server = ServerProcess(tmp_path, good_bundle, store=store)
    try:
        figures = crash_cycle(server, store, writers=8, min_acks=100)
    finally:
        server.kill()
    assert figures["lost"] == 0


@pytest.mark.heavy
def test_acknowledged_enrollments_survive_repeated_kill_9(tmp_path: Path, good_bundle: Path) -> None:
    store = tmp_path / "identities.sqlite3"
    totals = {"acknowledged": 0, "lost": 0, "present_after_restart": 0, "in_flight_at_kill_committed": 0}
    for cycle in range(5):
        # A fresh port each cycle: a killed server's socket may linger in TIME_WAIT.
        server = ServerProcess(tmp_path, good_bundle, store=store)
        try:
            figures = crash_cycle(server, store, writers=16, min_acks=300)
        finally:
            server.kill()
        print(f"cycle {cycle}: {figures}")
        for key in totals:
            totals[key] += figures[key]
    print(f"crash safety, 5 x kill -9: {totals}")
    assert totals["lost"] == 0
