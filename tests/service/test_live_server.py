"""A real `idembed-serve` process on 127.0.0.1: the typed client end to end, batching under concurrency,
restarts (graceful and kill -9) keeping enrolled identities, graceful drain, JSON logs, no TensorFlow."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.client import AsyncIdembedClient, IdembedClient, IdembedError
from testkit.service_helpers import API_KEY, REPO, LiveServer, TinyBundle, start_server


def test_typed_client_covers_every_endpoint(live_server: LiveServer, tiny: TinyBundle) -> None:
    eights = tiny.of_digit(8, 4)
    with IdembedClient(live_server.url, api_key=API_KEY) as c:
        assert c.healthz().status == "ok" and c.readyz().model_id == "tiny-digits:1"
        emb = c.embed([tiny.png(i) for i in eights])
        np.testing.assert_allclose(emb.embeddings, tiny.reference(eights), atol=1e-5)
        enrolled = c.enroll("eight-live", images=[tiny.png(i) for i in eights[:3]], metadata={"k": "v"})
        assert enrolled.image_count == 3
        result = c.identify(images=[tiny.png(eights[3])], top_k=20).results[0]
        assert ("eight-live", "enrolled") in [(m.identity, m.source) for m in result.matches]
        same = c.verify(tiny.png(eights[0]), emb.embeddings[0])
        assert same.similarity == pytest.approx(1.0, abs=1e-5) and same.same
        assert c.get_identity("eight-live").metadata == {"k": "v"}
        assert "eight-live" in [i.name for i in c.list_identities(limit=1000).items]
        assert c.model().gallery.centers == 8
        assert "idembed_requests_total" in c.metrics()
        c.delete_identity("eight-live")
        with pytest.raises(IdembedError) as info:
            c.get_identity("eight-live")
        assert info.value.status == 404 and info.value.code == "identity_not_found" and info.value.request_id


def test_concurrent_distinct_requests_are_batched_and_never_mixed(
    live_server: LiveServer, tiny: TinyBundle
) -> None:
    n = 96
    before = _batch_count(live_server)

    async def run() -> list[list[list[float]]]:
        async with AsyncIdembedClient(live_server.url) as c:
            responses = await asyncio.gather(*(c.embed([tiny.png(i)]) for i in range(n)))
        return [r.embeddings for r in responses]

    results = asyncio.run(run())
    reference = tiny.reference(list(range(n)))
    for i, embeddings in enumerate(results):
        np.testing.assert_allclose(
            embeddings[0], reference[i], atol=1e-5, err_msg=f"request {i} got another's result"
        )
    batches = _batch_count(live_server) - before
    assert batches < n, f"{n} concurrent requests ran as {batches} batches: no batching happened"


def _batch_count(server: LiveServer) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith("idembed_batch_size_count"):
            return float(line.split()[1])
    return 0.0


def test_json_logs_carry_the_request_id_returned_in_the_header(live_server: LiveServer) -> None:
    r = httpx.get(f"{live_server.url}/healthz", headers={"X-Request-ID": "trace-me-42"})
    assert r.headers["x-request-id"] == "trace-me-42"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        entries = [json.loads(line) for line in live_server.log().splitlines() if line.startswith("{")]
        hits = [e for e in entries if e.get("request_id") == "trace-me-42"]
        if hits:
            assert hits[0]["path"] == "/healthz" and hits[0]["status"] == 200 and "duration_ms" in hits[0]
            return
        time.sleep(0.05)
    pytest.fail("no JSON access log line with the request id")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["graceful", "kill-9"])
def test_enrolled_identities_survive_a_restart(
    server_env: dict[str, str], tmp_path: Path, tiny: TinyBundle, sig: int
) -> None:
    server = start_server(server_env, tmp_path / "a.log")
    try:
        with IdembedClient(server.url, api_key=API_KEY) as c:
            for i in range(5):
                c.enroll(f"person-{i}", images=[tiny.png(i)])
    finally:
        server.stop(sig)
    again = start_server(server_env, tmp_path / "b.log")
    try:
        with IdembedClient(again.url) as c:
            names = [i.name for i in c.list_identities().items]
            assert names == [f"person-{i}" for i in range(5)]
            top = c.identify(images=[tiny.png(2)], top_k=20).results[0].matches
            assert ("person-2", "enrolled") in [(m.identity, m.source) for m in top]
    finally:
        again.stop()


@pytest.mark.slow
def test_sigterm_finishes_requests_already_queued(
    server_env: dict[str, str], tmp_path: Path, tiny: TinyBundle
) -> None:
    # A long batching window keeps requests waiting in the queue when SIGTERM arrives.
    server = start_server({**server_env, "IDEMBED_BATCH_WAIT_MS": "400"}, tmp_path / "s.log")

    async def run() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            body = {"images": [base64.b64encode(tiny.png(0)).decode()]}
            tasks = [asyncio.create_task(c.post("/v1/embed", json=body)) for _ in range(8)]
            await asyncio.sleep(0.15)
            server.process.send_signal(signal.SIGTERM)
            return [(await t).status_code for t in tasks]

    statuses = asyncio.run(run())
    assert statuses == [200] * 8
    # uvicorn re-raises the signal after its graceful shutdown, so the exit status names SIGTERM.
    assert server.process.wait(30) in (0, -signal.SIGTERM)
    assert "shutting down" in server.log()


def test_bad_bundle_stops_start_up_naming_the_file(tmp_path: Path, server_env: dict[str, str]) -> None:
    with pytest.raises(RuntimeError, match=r"manifest\.json"):
        start_server({**server_env, "IDEMBED_BUNDLE_PATH": str(tmp_path)}, tmp_path / "bad.log", timeout=30)


def test_service_import_pulls_in_no_tensorflow() -> None:
    code = (
        "import sys, service.app, service.cli, service.client, service.gallery.gallery; "
        "bad = [m for m in ('tensorflow', 'tf2onnx', 'keras', 'training') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
