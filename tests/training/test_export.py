"""Export of a tiny Keras embedding model: ONNX parity, dynamic batch, the parity gate, the written bundle."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

keras = pytest.importorskip("keras")

from bundle import load_bundle  # noqa: E402
from bundle.manifest import InputSpec, OperatingPoint, Preprocessing, Thresholds  # noqa: E402
from training.export import (  # noqa: E402
    ExportError,
    ExportParityError,
    check_parity,
    export_bundle,
    keras_to_onnx,
    onnx_embed,
)

SPEC = InputSpec(height=8, width=8, channels=1)
PRE = Preprocessing(color_mode="L")


def _tiny_model(seed: int, dim: int = 3, output_layer: str = "features") -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1), name="input")
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = keras.layers.PReLU(shared_axes=[1, 2])(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(dim, name=output_layer)(x)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def tiny() -> keras.Model:
    return _tiny_model(0)


@pytest.fixture(scope="module")
def tiny_onnx(tiny) -> bytes:
    return keras_to_onnx(tiny, SPEC, output_name="embedding")


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    return np.random.default_rng(0).random((16, 8, 8, 1), dtype=np.float32)


def _thresholds() -> Thresholds:
    point = OperatingPoint(threshold=0.5, far=0.001, tar=0.9)
    return Thresholds(
        default=0.5,
        target_far=1e-3,
        at_target_far=point,
        eer=point,
        num_genuine_pairs=10,
        num_impostor_pairs=10,
    )


RECIPE = {
    "backbone": "tiny",
    "center_update": "paper",
    "center_lambda": 0.1,
    "center_alpha": 0.5,
    "epochs": 1,
    "batch_size": 8,
    "seed": 0,
    "dataset": "synthetic",
    "train_classes": ["a", "b"],
    "heldout_classes": ["c"],
    "val_fraction": 0.0,
}


def test_onnx_output_equals_keras_output_within_tolerance(tiny, tiny_onnx, batch):
    diff = check_parity(tiny, tiny_onnx, batch)
    assert diff <= 1e-4


def test_onnx_graph_has_manifest_names_dynamic_batch_and_opset_17(tiny_onnx):
    proto = onnx.load_from_string(tiny_onnx)
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["embedding"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17


def test_onnx_model_accepts_any_batch_size(tiny, tiny_onnx, batch):
    for n in (1, 5, 16):
        out = onnx_embed(tiny_onnx, batch[:n])
        assert out.shape == (n, 3)
        np.testing.assert_allclose(out, tiny.predict(batch[:n], verbose=0), atol=1e-4)


def test_parity_check_fails_the_export_when_graphs_disagree(batch):
    other = keras_to_onnx(_tiny_model(1), SPEC)
    with pytest.raises(ExportParityError, match="parity check failed") as info:
        check_parity(_tiny_model(0), other, batch)
    assert info.value.max_abs_diff > 1e-4


def test_export_refuses_old_opset_and_wrong_input_shape(tiny):
    with pytest.raises(ExportError, match="opset"):
        keras_to_onnx(tiny, SPEC, opset=13)
    with pytest.raises(ExportError, match="does not match the manifest input"):
        keras_to_onnx(tiny, InputSpec(height=28, width=28, channels=1))


def test_exported_bundle_loads_validates_and_reproduces_keras_embeddings(tmp_path, tiny, batch):
    centers = np.array([[1.0, 2.0, 2.0], [0.0, -3.0, 4.0]], dtype=np.float32)
    manifest = export_bundle(
        tmp_path / "b",
        model=tiny,
        centers=centers,
        labels=["a", "b"],
        parity_batch=batch,
        input_spec=SPEC,
        preprocessing=PRE,
        thresholds=_thresholds(),
        recipe=RECIPE,
        evaluation={"eer": 0.1},
        name="tiny",
    )
    assert manifest.embedding.dim == 3
    assert manifest.evaluation["export_parity_max_abs_diff"] <= 1e-4
    assert {"tensorflow", "tf2onnx", "onnxruntime", "onnx_opset"} <= manifest.tool_versions.keys()

    loaded = load_bundle(tmp_path / "b")
    np.testing.assert_allclose(loaded.centers, [[1 / 3, 2 / 3, 2 / 3], [0.0, -0.6, 0.8]], atol=1e-6)
    assert loaded.labels == ["a", "b"]
    out = onnx_embed(loaded.model_bytes, batch, loaded.manifest.input.name)
    np.testing.assert_allclose(out, tiny.predict(batch, verbose=0), atol=1e-4)
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["training"]["center_lambda"] == 0.1


def test_export_refuses_centers_of_the_wrong_dimension(tmp_path, tiny, batch):
    with pytest.raises(ExportError, match="centers have shape"):
        export_bundle(
            tmp_path / "b",
            model=tiny,
            centers=np.ones((2, 5), np.float32),
            labels=["a", "b"],
            parity_batch=batch,
            input_spec=SPEC,
            preprocessing=PRE,
            thresholds=_thresholds(),
            recipe=RECIPE,
        )
    assert not (tmp_path / "b").exists()
