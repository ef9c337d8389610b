"""Open Inference Protocol (KServe v2) against a live server, driven by the real `tritonclient.http`."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from bundle.files import load_bundle
from service.preprocess import ImagePreprocessor
from testkit.service_helpers import API_KEY, LiveServer, TinyBundle, start_server

httpclient = pytest.importorskip("tritonclient.http", reason="needs tritonclient[http] (the dev extra)")
from tritonclient.utils import InferenceServerException  # noqa: E402

AUTH = {"X-API-Key": API_KEY}


def auth() -> dict[str, str]:
    """A fresh header dict per call: tritonclient adds its own headers to the dict it is given."""
    return dict(AUTH)


MODEL = "tiny-digits"


@pytest.fixture(scope="module")
def server(tiny: TinyBundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("v2")
    env = {
        "IDEMBED_BUNDLE_PATH": str(tiny.path),
        "IDEMBED_STORE_URL": f"sqlite:///{tmp / 'v2.sqlite3'}",
        "IDEMBED_API_KEYS": API_KEY,  # reads need a key: the service's default
        "IDEMBED_MAX_IMAGES_PER_REQUEST": "16",
    }
    live = start_server(env, tmp / "server.log")
    yield live
    live.stop()


@pytest.fixture
def triton(server: LiveServer) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=30)
    yield client
    client.close()


def preprocessed(tiny: TinyBundle, idx: list[int]) -> np.ndarray:
    manifest = load_bundle(tiny.path).manifest
    pre = ImagePreprocessor(manifest.preprocessing, manifest.input, max_pixels=10**6)
    return pre([tiny.png(i) for i in idx])


def v1_embeddings(server: LiveServer, tiny: TinyBundle, idx: list[int]) -> np.ndarray:
    images = [base64.b64encode(tiny.png(i)).decode() for i in idx]
    r = httpx.post(f"{server.url}/v1/embed", json={"images": images}, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return np.asarray(r.json()["embeddings"], dtype=np.float32)


def test_health_and_metadata(triton: httpclient.InferenceServerClient) -> None:
    assert triton.is_server_live() and triton.is_server_ready()  # probes are open, like /readyz
    meta = triton.get_server_metadata(headers=auth())
    assert meta["name"] == "idembed" and "binary_tensor_data" in meta["extensions"]
    model = triton.get_model_metadata(MODEL, headers=auth())
    assert model["name"] == MODEL and model["versions"] == ["1"]
    assert {(i["name"], i["datatype"]) for i in model["inputs"]} == {("images", "BYTES"), ("input", "FP32")}
    assert model["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 16]}]
    assert triton.is_model_ready(MODEL, headers=auth())
    assert triton.is_model_ready(MODEL, model_version="1", headers=auth())
    assert not triton.is_model_ready(MODEL, model_version="2", headers=auth())
    assert not triton.is_model_ready("other", headers=auth())


@pytest.mark.parametrize("binary", [True, False], ids=["binary-output", "json-output"])
def test_infer_encoded_images_matches_v1_embed(
    triton: httpclient.InferenceServerClient, server: LiveServer, tiny: TinyBundle, binary: bool
) -> None:
    idx = [0, 5, 9]
    images = np.array([tiny.png(i) for i in idx], dtype=np.object_)
    inp = httpclient.InferInput("images", [len(idx)], "BYTES")
    inp.set_data_from_numpy(images, binary_data=True)  # raw PNG bytes need the binary extension
    out = httpclient.InferRequestedOutput("embedding", binary_data=binary)
    result = triton.infer(MODEL, [inp], outputs=[out], headers=auth(), request_id="req-7")
    got = result.as_numpy("embedding")
    assert got.dtype == np.float32 and got.shape == (3, 16)
    np.testing.assert_allclose(got, v1_embeddings(server, tiny, idx), atol=1e-6)
    np.testing.assert_allclose(got, tiny.reference(idx), atol=1e-5)
    response = result.get_response()
    assert response["model_name"] == MODEL and response["id"] == "req-7"


@pytest.mark.parametrize("binary", [True, False], ids=["binary-input", "json-input"])
def test_infer_preprocessed_fp32_tensor(
    triton: httpclient.InferenceServerClient, server: LiveServer, tiny: TinyBundle, binary: bool
) -> None:
    idx = [1, 2]
    tensor = preprocessed(tiny, idx)
    inp = httpclient.InferInput("input", list(tensor.shape), "FP32")
    inp.set_data_from_numpy(tensor, binary_data=binary)
    result = triton.infer(MODEL, [inp], headers=auth(), model_version="1")
    np.testing.assert_allclose(result.as_numpy("embedding"), v1_embeddings(server, tiny, idx), atol=1e-6)


def test_errors_use_the_protocol_error_shape(
    triton: httpclient.InferenceServerClient, server: LiveServer, tiny: TinyBundle
) -> None:
    tensor = preprocessed(tiny, [0])
    inp = httpclient.InferInput("input", list(tensor.shape), "FP32")
    inp.set_data_from_numpy(tensor)
    with pytest.raises(InferenceServerException, match="missing X-API-Key"):
        triton.infer(MODEL, [inp])
    with pytest.raises(InferenceServerException, match="no model 'nope'"):
        triton.infer("nope", [inp], headers=auth())
    wrong = httpclient.InferInput("input", [1, 4, 4, 1], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 4, 4, 1), np.float32))
    with pytest.raises(InferenceServerException, match=r"must have shape \[N, 8, 8, 1\]"):
        triton.infer(MODEL, [wrong], headers=auth())
    bad_image = httpclient.InferInput("images", [1], "BYTES")
    bad_image.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="images"):
        triton.infer(MODEL, [bad_image], headers=auth())

    url = f"{server.url}/v2/models/{MODEL}/infer"
    cases = [
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, 400, "unknown input"),
        (
            {"inputs": [{"name": "input", "shape": [1], "datatype": "INT8", "data": [1]}]},
            400,
            "datatype FP32",
        ),
        (
            {"inputs": [{"name": "input", "shape": [2, 8, 8, 1], "datatype": "FP32", "data": [0.0] * 64}]},
            400,
            "128 elements",
        ),
        ({"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": ["@@"]}]}, 400, "base64"),
        ({"inputs": []}, 400, "'inputs'"),
        (
            {"inputs": [{"name": "images", "shape": [17], "datatype": "BYTES", "data": ["AA=="] * 17}]},
            413,
            "limit",
        ),
    ]
    for body, status, text in cases:
        r = httpx.post(url, json=body, headers=AUTH, timeout=30)
        assert r.status_code == status, (body, r.text)
        assert set(r.json()) == {"error"} and text in r.json()["error"], r.text
    r = httpx.post(url, content=b"{not json", headers=AUTH, timeout=30)
    assert r.status_code == 400 and set(r.json()) == {"error"}
    r = httpx.get(f"{server.url}/v2/nothing-here", headers=AUTH, timeout=30)
    assert r.status_code == 404 and set(r.json()) == {"error"}
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200


def test_v2_requests_are_batched_by_the_same_engine(server: LiveServer, tiny: TinyBundle) -> None:
    before = httpx.get(f"{server.url}/metrics", timeout=10).text
    tensor = preprocessed(tiny, [3])
    body = {
        "inputs": [
            {
                "name": "input",
                "shape": list(tensor.shape),
                "datatype": "FP32",
                "data": tensor.ravel().tolist(),
            }
        ]
    }
    r = httpx.post(f"{server.url}/v2/models/{MODEL}/versions/1/infer", json=body, headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [1, 16]
    after = httpx.get(f"{server.url}/metrics", timeout=10).text

    def batches(text: str) -> float:
        return sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("idembed_batch_size_count")
        )

    assert batches(after) == batches(before) + 1
