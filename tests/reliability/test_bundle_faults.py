"""Bundle faults: a bad bundle stops start-up fast, naming file and problem; a bad hot reload is refused.

Start-up is the real `python -m service.cli` process: the test checks its exit status, how long it took to
give up, and that its log names the file and the problem, which is what an operator sees in `docker logs`.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from testkit import fault_bundles
from testkit.reliability import API_KEY, ServerProcess

pytestmark = pytest.mark.slow

# Loading a broken bundle must not wait on anything; generous for two shared cores, far below a hang.
FAIL_FAST_S = 30.0

FAULTS: dict[str, tuple[Callable[[Path, Path], Path], list[str]]] = {
    "tampered": (lambda d, _s: fault_bundles.write_tampered(d), ["model.onnx", "sha256 mismatch"]),
    "truncated": (lambda d, _s: fault_bundles.write_truncated(d), ["model.onnx", "truncated"]),
    "mismatched": (fault_bundles.write_mismatched, ["centers.npy", "shape"]),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_faulty_bundle_fails_start_up_fast_naming_file_and_problem(tmp_path: Path, fault: str) -> None:
    write, expected = FAULTS[fault]
    bundle = write(tmp_path / fault, tmp_path)

    code, elapsed, log = ServerProcess(tmp_path, bundle).start_expecting_failure(timeout_s=FAIL_FAST_S * 2)

    assert code != 0, log
    assert elapsed < FAIL_FAST_S, f"took {elapsed:.1f} s to give up"
    for words in expected:
        assert words in log, f"{words!r} not in the start-up log:\n{log}"


def test_missing_bundle_folder_fails_start_up_with_a_hint(tmp_path: Path) -> None:
    code, _, log = ServerProcess(tmp_path, tmp_path / "no-such-bundle").start_expecting_failure()

    assert code != 0
    assert "no-such-bundle" in log
    assert "manifest.json" in log


@pytest.fixture(scope="module")
def reload_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    models = tmp_path_factory.mktemp("models")
    scratch = tmp_path_factory.mktemp("scratch")
    fault_bundles.write_good(models / "current", version="1", seed=0)
    fault_bundles.write_good(models / "next", version="2", seed=7)
    fault_bundles.write_good(models / "eight-dim", version="3", dim=fault_bundles.DIM // 2)
    for name, (write, _) in FAULTS.items():
        write(models / name, scratch)
    server = ServerProcess(tmp_path_factory.mktemp("reload"), models / "current").start()
    yield server, models
    server.stop()


def _embed(client: httpx.Client) -> tuple[str, np.ndarray]:
    """(model id, embedding) of one fixed image, to tell which model is serving."""
    buf = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(buf, format="PNG")
    response = client.post("/v1/embed", json={"images": [base64.b64encode(buf.getvalue()).decode()]})
    assert response.status_code == 200, response.text
    body = response.json()
    return body["model_id"], np.asarray(body["embeddings"][0])


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        ("tampered", "sha256 mismatch"),
        ("truncated", "truncated"),
        ("mismatched", "shape"),
        ("eight-dim", "8-d"),
        ("does-not-exist", "does not exist"),
        ("../outside", "outside"),
    ],
)
def test_reload_to_bad_bundle_is_refused_and_old_model_keeps_serving(
    reload_server: tuple[ServerProcess, Path], target: str, problem: str
) -> None:
    server, _ = reload_server
    with httpx.Client(base_url=server.url, timeout=30, headers={"X-API-Key": API_KEY}) as client:
        before_id, before = _embed(client)

        response = client.post("/v1/admin/reload", json={"bundle": target})

        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] in {"invalid_bundle", "invalid_input"}
        assert problem in error["message"], error
        after_id, after = _embed(client)
        assert after_id == before_id
        np.testing.assert_allclose(after, before, atol=1e-6)
        assert client.get("/readyz").status_code == 200


def test_reload_to_good_bundle_switches_model(reload_server: tuple[ServerProcess, Path]) -> None:
    server, _ = reload_server
    with httpx.Client(base_url=server.url, timeout=30, headers={"X-API-Key": API_KEY}) as client:
        before_id, before = _embed(client)

        response = client.post("/v1/admin/reload", json={"bundle": "next"})

        assert response.status_code == 200, response.text
        assert response.json()["previous_model_id"] == before_id
        after_id, after = _embed(client)
        assert after_id == "reliability:2" != before_id
        assert not np.allclose(after, before, atol=1e-3), "a different model must give different embeddings"
        # Back to the first model, so the order of the tests in this module does not matter.
        assert client.post("/v1/admin/reload", json={"bundle": "current"}).status_code == 200
