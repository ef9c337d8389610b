"""Small ONNX embedding models built with onnx.helper (no TensorFlow), for import/quantize tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> bytes:
    graph = helper.make_graph(nodes, "embedder", inputs, outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="test")
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def conv_nchw(
    size: int = 16,
    channels: int = 3,
    dim: int = 24,
    seed: int = 0,
    batch: int | str = "N",
    prelu: bool = False,
) -> bytes:
    """[N, C, H, W] -> Conv 3x3 (16 filters) -> Relu -> Conv 3x3 stride 2 -> Relu -> GlobalAveragePool
    -> Flatten -> MatMul -> [N, dim]. `prelu`: ONNX `PRelu` with one slope per channel (shape [C, 1, 1], in
    [0.05, 0.6]) instead of each Relu, as insightface's models have."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (16, channels, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 0.2, (32, 16, 3, 3)).astype(np.float32)
    proj = rng.normal(0, 0.3, (32, dim)).astype(np.float32)
    slopes = [rng.uniform(0.05, 0.6, (c, 1, 1)).astype(np.float32) for c in (16, 32)]

    def act(src: str, out: str, k: int):
        return (
            helper.make_node("PRelu", [src, f"slope{k}"], [out])
            if prelu
            else helper.make_node("Relu", [src], [out])
        )

    nodes = [
        helper.make_node("Conv", ["data", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        act("c1", "r1", 0),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        act("c2", "r2", 1),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("MatMul", ["f", "proj"], ["fc1"]),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (proj, "proj"))]
    if prelu:
        inits += [numpy_helper.from_array(a, f"slope{k}") for k, a in enumerate(slopes)]
    x = helper.make_tensor_value_info("data", TensorProto.FLOAT, [batch, channels, size, size])
    y = helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [batch, dim])
    return _model(nodes, [x], [y], inits)


def dense_nhwc(size: int = 8, channels: int = 1, dim: int = 16, seed: int = 0) -> bytes:
    """[N, H, W, C] -> Flatten -> MatMul -> [N, dim] (a random projection of the pixels)."""
    rng = np.random.default_rng(seed)
    proj = rng.normal(0, 1.0, (size * size * channels, dim)).astype(np.float32)
    nodes = [
        helper.make_node("Flatten", ["pixels"], ["flat"]),
        helper.make_node("MatMul", ["flat", "proj"], ["features"]),
    ]
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", size, size, channels])
    y = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", dim])
    return _model(nodes, [x], [y], [numpy_helper.from_array(proj, "proj")])
