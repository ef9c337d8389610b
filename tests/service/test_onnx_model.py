"""Bundle -> onnxruntime: the graph must agree with the manifest, else BundleError naming model.onnx."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bundle import write_bundle
from bundle.errors import BundleError
from bundle.manifest import InputSpec, Preprocessing
from bundle.preprocess import preprocess_image
from service.model import EmbeddingModel, RuntimeOptions
from testkit import tiny_bundle
from testkit.service_helpers import TinyBundle


def write_with_model(directory: Path, model_bytes: bytes, **manifest_overrides: object) -> Path:
    fields = tiny_bundle.manifest_fields()
    fields.update(manifest_overrides)
    centers = np.eye(len(tiny_bundle.TRAIN_CLASSES), fields["embedding"]["dim"], dtype=np.float32)
    write_bundle(
        directory, manifest=fields, model_bytes=model_bytes, centers=centers, labels=tiny_bundle.TRAIN_CLASSES
    )
    return directory


def test_tiny_bundle_embeds_like_the_reference_computation(tiny: TinyBundle) -> None:
    model = EmbeddingModel.load(tiny.path)
    fields = tiny_bundle.manifest_fields()
    pre, spec = Preprocessing(**fields["preprocessing"]), InputSpec(**fields["input"])
    x = np.stack([preprocess_image(tiny.images[i], pre, spec) for i in range(3)])
    np.testing.assert_allclose(model.run(x), tiny.reference([0, 1, 2]), atol=1e-5)
    assert model.model_id == "tiny-digits:1"


def test_output_dim_disagreeing_with_manifest_is_refused(tmp_path: Path) -> None:
    w = np.zeros((64, 8), np.float32)
    path = write_with_model(tmp_path / "b", tiny_bundle.onnx_model(w, np.zeros(8, np.float32)))
    with pytest.raises(BundleError, match=r"model\.onnx.*\[N, 16\]"):
        EmbeddingModel.load(path)


def test_missing_output_name_is_refused(tmp_path: Path) -> None:
    w, b = np.zeros((64, 16), np.float32), np.zeros(16, np.float32)
    path = write_with_model(tmp_path / "b", tiny_bundle.onnx_model(w, b, output_name="features"))
    with pytest.raises(BundleError, match="no output 'embedding'"):
        EmbeddingModel.load(path)


def test_input_shape_disagreeing_with_layout_is_refused(tmp_path: Path) -> None:
    w, b = np.zeros((64, 16), np.float32), np.zeros(16, np.float32)
    fields = tiny_bundle.manifest_fields()
    path = write_with_model(
        tmp_path / "b", tiny_bundle.onnx_model(w, b), input={**fields["input"], "layout": "NCHW"}
    )
    with pytest.raises(BundleError, match="NCHW"):
        EmbeddingModel.load(path)


def test_fixed_batch_axis_is_refused(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"]),
            helper.make_node("MatMul", ["flat", "W"], ["embedding"]),
        ],
        "fixed",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 8, 8, 1])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 16])],
        [numpy_helper.from_array(np.zeros((64, 16), np.float32), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = write_with_model(tmp_path / "b", model.SerializeToString())
    with pytest.raises(BundleError, match="dynamic batch"):
        EmbeddingModel.load(path)


def test_garbage_model_bytes_are_refused_naming_model_onnx(tmp_path: Path) -> None:
    path = write_with_model(tmp_path / "b", b"definitely not onnx")
    with pytest.raises(BundleError, match=r"model\.onnx"):
        EmbeddingModel.load(path)


def test_tampered_model_file_fails_the_checksum(tiny: TinyBundle, tmp_path: Path) -> None:
    copy = tmp_path / "b"
    shutil.copytree(tiny.path, copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.onnx: sha256 mismatch"):
        EmbeddingModel.load(copy)


def test_warm_up_runs_the_largest_batch_so_memory_is_sized_before_requests(
    tiny: TinyBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    real_run = ort.InferenceSession.run

    def recording_run(self: ort.InferenceSession, outputs: object, feeds: dict, *a: object) -> object:
        seen.extend(len(v) for v in feeds.values())
        return real_run(self, outputs, feeds, *a)

    monkeypatch.setattr(ort.InferenceSession, "run", recording_run)
    EmbeddingModel.load(tiny.path, RuntimeOptions(warmup_batch_size=48))
    assert seen == [1, 48]
    seen.clear()
    EmbeddingModel.load(tiny.path)  # default: still two batch sizes, proving the batch axis is dynamic
    assert seen == [1, 2]
    seen.clear()
    # Several inference workers each hold their own activations: the full batch runs once per worker.
    EmbeddingModel.load(tiny.path, RuntimeOptions(warmup_batch_size=8, warmup_concurrency=3))
    assert seen == [1, 8, 8, 8]
