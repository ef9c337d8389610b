"""arcface_torch backbones in Keras: parameter counts equal the reference's, ONNX parity, float32 output."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from bundle.manifest import InputSpec  # noqa: E402
from training import backbones  # noqa: E402
from training.backbones import BACKBONES, build_backbone  # noqa: E402
from training.export import check_parity, keras_to_onnx  # noqa: E402
from training.face_backbones import (  # noqa: E402
    _grouped_conv,
    calibrate_batchnorm,
    parameter_count,
    reference_parameter_count,
)
from training.precision import float32_copy, is_mixed  # noqa: E402

FACE = (112, 112, 3)


@pytest.mark.parametrize(
    ("name", "published_m"),
    [("iresnet18", 24.0), ("iresnet34", 34.1), ("iresnet50", 43.6), ("mobilefacenet", 2.1)],
)
def test_parameter_counts_match_the_reference(name: str, published_m: float) -> None:
    model = build_backbone(name, FACE, 512)
    ours = parameter_count(model)
    reference = reference_parameter_count(name, 512)
    # IResNet's embedding-BN gamma is frozen at 1 in arcface_torch: a constant here, one parameter per dim.
    frozen = 512 if name.startswith("iresnet") else 0
    assert ours == reference - frozen
    assert round(reference / 1e6, 1) == published_m
    assert model.output.shape == (None, 512)
    assert model.input.name == backbones.INPUT_NAME
    assert model.layers[-1].name == backbones.OUTPUT_NAME


@pytest.mark.slow
def test_iresnet100_parameter_count() -> None:
    model = build_backbone("iresnet100", FACE, 512)
    assert parameter_count(model) == reference_parameter_count("iresnet100") - 512
    assert round(reference_parameter_count("iresnet100") / 1e6, 1) == 65.2


def test_registered_and_input_checked() -> None:
    for name in ("iresnet18", "iresnet34", "iresnet50", "iresnet100", "mobilefacenet"):
        assert name in BACKBONES
    with pytest.raises(ValueError, match="--image-size: iresnet18 needs a multiple of 16"):
        build_backbone("iresnet18", (100, 100, 3), 512)


def test_grouped_conv_equals_a_grouped_convolution() -> None:
    """The XLA-free grouped conv (depthwise + pooled sum) computes tf.nn.conv2d with a grouped kernel."""
    tf = pytest.importorskip("tensorflow")
    inputs = keras.Input((10, 10, 8))
    model = keras.Model(inputs, _grouped_conv(inputs, 12, 3, 2, 1, "g", "glorot_uniform", groups=4))
    x = np.random.default_rng(0).random((2, 10, 10, 8), dtype=np.float32)
    k = model.get_layer("g").kernel.numpy()  # [3, 3, 8, 3]: input channel g*2+i, multiplier j
    grouped = np.zeros((3, 3, 2, 12), np.float32)  # [.., k_in, out]: group g owns outputs g*3 .. g*3+2
    for g in range(4):
        for i in range(2):
            for j in range(3):
                grouped[:, :, i, g * 3 + j] = k[:, :, g * 2 + i, j]
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    expected = tf.nn.conv2d(padded, grouped, 2, "VALID").numpy()
    assert np.abs(model(x).numpy() - expected).max() < 1e-5


@pytest.mark.parametrize(("channels", "filters", "groups", "stride"), [(8, 12, 4, 2), (16, 16, 8, 1)])
def test_exported_grouped_conv_becomes_one_onnx_conv(channels, filters, groups, stride) -> None:
    """training.graph_rewrite.rewrite_grouped_conv turns tf2onnx's depthwise + AveragePool chain back into
    one grouped Conv (+ the NHWC Transpose), with the Keras model's outputs."""
    import onnx

    from training.graph_rewrite import rewrite_grouped_conv

    model = _grouped_model(channels, filters, groups, stride, keras.layers.GlobalAveragePooling2D())
    converted = keras_to_onnx(model, InputSpec(height=10, width=10, channels=3), optimize_graph=False)
    rewritten, count = rewrite_grouped_conv(converted)
    assert count == 1
    nodes = onnx.load_from_string(rewritten).graph.node
    assert "AveragePool" not in [n.op_type for n in nodes]
    convs = [n for n in nodes if n.op_type == "Conv"]
    assert len(convs) == 2 and next(a.i for a in convs[1].attribute if a.name == "group") == groups
    batch = np.random.default_rng(0).random((3, 10, 10, 3), dtype=np.float32)
    assert check_parity(model, rewritten, batch) < 1e-5


def test_grouped_conv_whose_reshape_tf2onnx_merged_is_left_alone() -> None:
    # tf2onnx merges `_groups`' Reshape with a Flatten's: the chain no longer ends in [N, H, W, filters], so
    # it is not rewritten (a grouped Conv + NHWC Transpose would give the wrong shape).
    from training.graph_rewrite import rewrite_grouped_conv

    model = _grouped_model(8, 12, 4, 2, keras.layers.Flatten())
    converted = keras_to_onnx(model, InputSpec(height=10, width=10, channels=3), optimize_graph=False)
    assert rewrite_grouped_conv(converted) == (converted, 0)
    batch = np.random.default_rng(0).random((3, 10, 10, 3), dtype=np.float32)
    assert check_parity(model, keras_to_onnx(model, InputSpec(height=10, width=10, channels=3)), batch) < 1e-5


def _grouped_model(channels: int, filters: int, groups: int, stride: int, tail) -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((10, 10, 3))
    x = keras.layers.Conv2D(channels, 1, name="widen")(inputs)  # an image input has 1 or 3 channels
    x = _grouped_conv(x, filters, 3, stride, 1, "g", "glorot_uniform", groups=groups)
    return keras.Model(inputs, tail(x))


def test_mixed_precision_output_is_float32_and_exports_as_float32() -> None:
    keras.utils.set_random_seed(0)
    model = build_backbone("mobilefacenet", (32, 32, 3), 64, precision="mixed_bfloat16")
    assert model.get_layer("conv1").compute_dtype == "bfloat16"
    assert model.get_layer("conv1").kernel.dtype == "float32"
    assert model.output.dtype == "float32"
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored
    batch = np.random.default_rng(0).random((8, 32, 32, 3), dtype=np.float32)
    calibrate_batchnorm(model, batch)
    copy = float32_copy(model)
    assert not is_mixed(copy) and all(layer.compute_dtype == "float32" for layer in copy.layers)
    for a, b in zip(model.get_weights(), copy.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    mixed, exact = model.predict(batch, verbose=0), copy.predict(batch, verbose=0)
    # Same function, bfloat16 rounding (8-bit mantissa) in the mixed one only: same embedding directions.
    cosine = np.sum(mixed * exact, axis=1) / np.linalg.norm(mixed, axis=1) / np.linalg.norm(exact, axis=1)
    assert cosine.min() > 0.98, cosine
    assert float32_copy(copy) is copy  # already float32: unchanged


def _parity(name: str, shape: tuple[int, int, int], dim: int) -> float:
    keras.utils.set_random_seed(0)
    model = build_backbone(name, shape, dim)
    rng = np.random.default_rng(0)
    calibrate_batchnorm(model, rng.random((16, *shape), dtype=np.float32))
    batch = rng.random((4, *shape), dtype=np.float32)
    assert 0.1 < np.abs(model.predict(batch, verbose=0)).max() < 100  # a realistic output scale
    spec = InputSpec(height=shape[0], width=shape[1], channels=shape[2])
    return check_parity(model, keras_to_onnx(model, spec), batch)


@pytest.mark.slow
def test_mobilefacenet_onnx_parity_at_112() -> None:
    # keras_to_onnx's graph rewrites included: conv2 one grouped Conv, every PReLU a depthwise Conv + Relu.
    assert _parity("mobilefacenet", FACE, 512) <= 1e-4


@pytest.mark.slow
def test_iresnet18_onnx_parity_small_input() -> None:
    # Same graph as at 112x112 (every block, the flatten-FC output block) on a 32x32 input: the FC is smaller
    # and the export takes seconds instead of ~25 s; the full size runs with -m heavy.
    assert _parity("iresnet18", (32, 32, 3), 64) <= 1e-4


@pytest.mark.heavy
@pytest.mark.parametrize("name", ["iresnet18", "iresnet50"])
def test_iresnet_onnx_parity_at_112(name: str) -> None:
    assert _parity(name, FACE, 512) <= 1e-4
