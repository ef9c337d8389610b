"""training/graph_rewrite.py: each rewrite gives the graph's outputs (float rounding only), on graphs built
with onnx.helper (no TensorFlow), and int8 keeps the PReLU's negative side."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from training.graph_rewrite import fold, grouped_as_depthwise, optimize, rewrite_grouped_conv, rewrite_prelu

RNG = np.random.default_rng(0)
C = 6


def _run(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _model(nodes, inits, in_shape, out_shape) -> bytes:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _conv_then(tail_nodes, tail_inits, slope_name="slope") -> bytes:
    """x [N, 3, 8, 8] -> 3x3 Conv to C channels -> `tail` (reads "h", writes "p") -> 1x1 Conv -> y."""
    inits = {"w": RNG.normal(size=(C, 3, 3, 3)), "w2": RNG.normal(size=(4, C, 1, 1)), **tail_inits}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1, 1, 1]),
        *tail_nodes,
        helper.make_node("Conv", ["p", "w2"], ["y"]),
    ]
    return _model(nodes, inits, ["N", 3, 8, 8], ["N", 4, 8, 8])


def _native(slope: np.ndarray) -> bytes:
    return _conv_then([helper.make_node("PRelu", ["h", "slope"], ["p"])], {"slope": slope})


def _keras_nodes() -> list[onnx.NodeProto]:
    """tf2onnx's spelling of keras.layers.PReLU, h -> p: Relu(h) + c * Relu(Neg(h)) with c = -slope."""
    return [
        helper.make_node("Relu", ["h"], ["pos"]),
        helper.make_node("Neg", ["h"], ["neg"]),
        helper.make_node("Relu", ["neg"], ["rneg"]),
        helper.make_node("Mul", ["rneg", "c"], ["scaled"]),
        helper.make_node("Add", ["pos", "scaled"], ["p"]),
    ]


def _keras_form(slope: np.ndarray) -> bytes:
    return _conv_then(_keras_nodes(), {"c": -slope})


def _ops(model_bytes: bytes) -> list[str]:
    return [n.op_type for n in onnx.load_from_string(model_bytes).graph.node]


X = RNG.normal(size=(3, 3, 8, 8)).astype(np.float32)
# Negative, zero, between 0 and 1, exactly 1 and above 1: every branch of the rewrite.
MIXED = np.array([-0.3, 0.0, 0.25, 0.9, 1.0, 1.7], np.float32).reshape(C, 1, 1)


@pytest.mark.parametrize("build", [_native, _keras_form], ids=["PRelu", "keras"])
@pytest.mark.parametrize(
    "slope",
    [MIXED, np.full((1, C, 1, 1), 0.25, np.float32), np.array([0.1], np.float32)],
    ids=["mixed", "nchw-4d", "scalar"],
)
def test_prelu_rewrite_is_exact_as_depthwise(build, slope) -> None:
    model = build(slope)
    new, report = rewrite_prelu(model)
    assert report.prelu_depthwise == 1 and report.total == 1, report
    assert not {"PRelu", "Neg"} & set(_ops(new))
    np.testing.assert_allclose(_run(new, X), _run(model, X), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", [_native, _keras_form], ids=["PRelu", "keras"])
@pytest.mark.parametrize("slope", [MIXED, np.full((C, 1, 1), 0.25, np.float32)], ids=["mixed", "below-1"])
def test_int8_form_is_exact_with_one_product(build, slope) -> None:
    """x + Relu((s-1) * x): one depthwise product (two with a slope above 1, the sign); the Add reads x."""
    model = build(slope)
    new, report = rewrite_prelu(model, "int8")
    assert report.prelu_depthwise == 1 and report.form == "int8", report
    products = 2 if np.any(slope > 1) else 1
    assert _ops(new).count("Conv") == 2 + products, _ops(new)
    np.testing.assert_allclose(_run(new, X), _run(model, X), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("slope", [MIXED, np.full((C, 1, 1), 0.25, np.float32)], ids=["mixed", "below-1"])
def test_our_forms_are_read_back_and_converted(slope) -> None:
    """An exported (fp32-form) graph is converted to the int8 form by quantize_int8 and back; a graph in
    the asked form already comes back byte for byte."""
    fp32, _ = rewrite_prelu(_keras_form(slope), "fp32")
    int8, report = rewrite_prelu(fp32, "int8")
    assert report.total == 1 and _ops(int8).count("Conv") < _ops(fp32).count("Conv")
    back, again = rewrite_prelu(int8, "fp32")
    assert again.total == 1 and _ops(back) == _ops(fp32)
    for graph, form in ((fp32, "fp32"), (int8, "int8")):
        assert rewrite_prelu(graph, form) == (graph, rewrite_prelu(graph, form)[1])
        assert rewrite_prelu(graph, form)[1].total == 0
    for graph in (int8, back):
        np.testing.assert_allclose(_run(graph, X), _run(fp32, X), rtol=1e-5, atol=1e-5)


def test_a_lookalike_that_is_not_a_prelu_is_left_alone() -> None:
    """x + Relu(w * x) with some w > 0 (y = (1+w) * x for x > 0) and s * x + Relu(r * x) with r != 1 - s
    have our forms' shape but are no PReLU: neither is rewritten."""
    w = np.full((C, 1, 1, 1), 0.5, np.float32)
    w[0] = -0.5
    not_int8 = [
        helper.make_node("Conv", ["h", "w_rest"], ["r"], group=C, kernel_shape=[1, 1]),
        helper.make_node("Relu", ["r"], ["rr"]),
        helper.make_node("Add", ["h", "rr"], ["p"]),
    ]
    not_fp32 = [
        helper.make_node("Conv", ["h", "w_lin"], ["l"], group=C, kernel_shape=[1, 1]),
        helper.make_node("Conv", ["h", "w_rest"], ["r"], group=C, kernel_shape=[1, 1]),
        helper.make_node("Relu", ["r"], ["rr"]),
        helper.make_node("Add", ["l", "rr"], ["p"]),
    ]
    cases = ((not_int8, {"w_rest": w}), (not_fp32, {"w_rest": np.abs(w), "w_lin": np.abs(w) - 0.2}))
    for nodes, inits in cases:
        model = _conv_then(nodes, inits)
        for form in ("fp32", "int8"):
            new, report = rewrite_prelu(model, form)
            assert report.total == 0 and new == model, (form, report)


def test_fold_joins_batchnorm_and_pad_into_the_conv_and_keeps_outputs() -> None:
    """fold = onnxruntime's basic optimizations, saved: a Pad + Conv + per-channel Mul + Add (tf2onnx's
    ZeroPadding2D + Conv + BatchNorm) become one Conv."""
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["padded"]),
        helper.make_node("Conv", ["padded", "w"], ["c"]),
        helper.make_node("Mul", ["c", "gamma"], ["m"]),
        helper.make_node("Add", ["m", "beta"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", C, 8, 8])],
        [
            numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
            numpy_helper.from_array(RNG.normal(size=(C, 3, 3, 3)).astype(np.float32), "w"),
            numpy_helper.from_array(RNG.uniform(0.5, 2, (C, 1, 1)).astype(np.float32), "gamma"),
            numpy_helper.from_array(RNG.normal(size=(C, 1, 1)).astype(np.float32), "beta"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    folded = fold(model)
    assert _ops(folded) == ["Conv"], _ops(folded)
    np.testing.assert_allclose(_run(folded, X), _run(model, X), rtol=1e-5, atol=1e-5)


def test_prelu_of_zero_slope_is_a_relu() -> None:
    model = _keras_form(np.zeros((C, 1, 1), np.float32))
    new, report = rewrite_prelu(model)
    assert report.prelu_relu == 1 and _ops(new) == ["Conv", "Relu", "Conv"]
    np.testing.assert_allclose(_run(new, X), _run(model, X), rtol=1e-6, atol=1e-6)


def test_prelu_on_a_channels_last_tensor_uses_mul() -> None:
    # x [N, 5, C]: the slope varies along the last axis, so a depthwise Conv (channel axis 1) cannot hold it.
    slope = MIXED.reshape(C)
    nodes = [helper.make_node("PRelu", ["x", "slope"], ["y"])]
    model = _model(nodes, {"slope": slope}, ["N", 5, C], ["N", 5, C])
    new, report = rewrite_prelu(model)
    assert report.prelu_mul == 1 and "Conv" not in _ops(new)
    x = RNG.normal(size=(2, 5, C)).astype(np.float32)
    expected = np.where(x >= 0, x, slope * x)
    np.testing.assert_allclose(_run(new, x), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_run(model, x), expected, rtol=1e-5, atol=1e-6)


def test_pattern_with_a_shared_intermediate_is_left_alone() -> None:
    # Relu(x) is also an output of its own: removing it would change the graph, so nothing is rewritten.
    slope = np.full((C, 1, 1), 0.25, np.float32)
    inits = {"w": RNG.normal(size=(C, 3, 3, 3)), "c": -slope}
    graph_nodes = [helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1, 1, 1]), *_keras_nodes()]
    graph_nodes.append(helper.make_node("Add", ["p", "pos"], ["y"]))
    model = _model(graph_nodes, inits, ["N", 3, 8, 8], ["N", C, 8, 8])
    new, report = rewrite_prelu(model)
    assert report.total == 0 and new == model


def test_a_graph_without_prelu_comes_back_unchanged() -> None:
    model = _conv_then([helper.make_node("Relu", ["h"], ["p"])], {})
    new, report = optimize(model)
    assert new == model and report.total == 0 and report.grouped_conv == 0


@pytest.mark.parametrize(
    ("c_in", "c_out", "groups", "stride", "bias"),
    [(8, 8, 4, 1, True), (6, 2, 2, 1, False), (4, 8, 2, 2, True), (128, 128, 64, 1, False)],
    ids=["2in-2out", "3in-1out", "2in-4out-stride2", "mobilefacenet-conv2"],
)
def test_grouped_conv_as_depthwise_is_exact(c_in, c_out, groups, stride, bias) -> None:
    inits = {"w": RNG.normal(size=(c_out, c_in // groups, 3, 3))}
    inputs = ["x", "w"]
    if bias:
        inits["b"] = RNG.normal(size=(c_out,))
        inputs.append("b")
    size = 8 // stride
    node = helper.make_node("Conv", inputs, ["y"], group=groups, pads=[1, 1, 1, 1], strides=[stride, stride])
    model = _model([node], inits, ["N", c_in, 8, 8], ["N", c_out, size, size])
    new, count = grouped_as_depthwise(model)
    assert count == 1
    convs = [n for n in onnx.load_from_string(new).graph.node if n.op_type == "Conv"]
    assert len(convs) == c_in // groups and all(
        next(a.i for a in n.attribute if a.name == "group") == c_out for n in convs
    )
    x = RNG.normal(size=(2, c_in, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(new, x), _run(model, x), rtol=1e-4, atol=1e-4)


def test_depthwise_and_plain_convs_are_not_split() -> None:
    plain = helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1, 1, 1])
    depthwise = helper.make_node("Conv", ["h", "dw"], ["y"], group=4, pads=[1, 1, 1, 1])
    inits = {"w": RNG.normal(size=(4, 3, 3, 3)), "dw": RNG.normal(size=(4, 1, 3, 3))}
    model = _model([plain, depthwise], inits, ["N", 3, 8, 8], ["N", 4, 8, 8])
    assert grouped_as_depthwise(model) == (model, 0)
    assert rewrite_grouped_conv(model) == (model, 0)


def test_int8_keeps_the_negative_side_of_prelu() -> None:
    """onnxruntime's static quantizer folds tf2onnx's `Relu(x)` into the convolution's output range, so the
    int8 graph of the five-node form computes a ReLU (worst cosine to fp32 ~0.2-0.6 here); after the
    rewrite it keeps the slope."""
    from training.quantize import quantize_int8

    # Slopes large enough that the negative side carries much of the signal.
    model = _keras_form(np.full((C, 1, 1), 0.6, np.float32))
    calibration = RNG.normal(size=(64, 3, 8, 8)).astype(np.float32)
    int8 = quantize_int8(model, method="static", calibration=calibration, input_name="x")
    x = RNG.normal(size=(32, 3, 8, 8)).astype(np.float32)
    ref, got = _run(model, x).reshape(32, -1), _run(int8, x).reshape(32, -1)
    cosine = np.sum(ref * got, 1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cosine.min() > 0.99, cosine.min()
    # The int8 form: the two model convolutions and one depthwise product for the PReLU (the fp32 form, two).
    ops = _ops(int8)
    assert ops.count("QLinearConv") == 3 and ops.count("QLinearAdd") == 1, ops


@pytest.mark.parametrize("method", ["static", "dynamic"])
def test_int8_weights_take_7_bits_so_no_cpu_saturates(method: str) -> None:
    """On CPUs without VNNI onnxruntime adds pairs of uint8 x int8 products in int16 (VPMADDUBSW): 8-bit
    weights saturate there (255 x 127 x 2 > 32767) and the graph computes another function than the gate
    measured on a VNNI machine. 7-bit weights cannot (255 x 64 x 2 = 32640); training/quantize.py."""
    from training.quantize import WEIGHT_BITS, quantize_int8

    model = _keras_form(np.full((C, 1, 1), 0.6, np.float32))
    calibration = RNG.normal(size=(64, 3, 8, 8)).astype(np.float32)
    int8 = onnx.load_from_string(quantize_int8(model, method=method, calibration=calibration, input_name="x"))
    weights = {i.name: numpy_helper.to_array(i) for i in int8.graph.initializer}
    slot = {"QLinearConv": 3, "ConvInteger": 1}
    used = [weights[n.input[slot[n.op_type]]] for n in int8.graph.node if n.op_type in slot]
    assert WEIGHT_BITS == 7 and len(used) == 3, [n.op_type for n in int8.graph.node]
    for w in used:
        assert w.dtype == np.int8 and int(np.abs(w.astype(np.int32)).max()) <= 64
        assert 255 * int(np.abs(w.astype(np.int32)).max()) * 2 <= 32767
    # The range is used (7 bits, not fewer): the largest weight of each convolution maps near +-64.
    assert min(int(np.abs(w.astype(np.int32)).max()) for w in used) >= 60


def test_int8_runs_a_grouped_conv_as_depthwise_ones() -> None:
    """quantize_int8 splits a grouped Conv (2 input channels per group) into depthwise QLinearConvs, which
    onnxruntime has fast int8 kernels for, and keeps its outputs."""
    from training.quantize import quantize_int8

    weight = RNG.normal(size=(8, 2, 3, 3))
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=4, pads=[1, 1, 1, 1])
    model = _model([node], {"w": weight}, ["N", 8, 8, 8], ["N", 8, 8, 8])
    calibration = RNG.normal(size=(32, 8, 8, 8)).astype(np.float32)
    int8 = quantize_int8(model, method="static", calibration=calibration, input_name="x")
    convs = [n for n in onnx.load_from_string(int8).graph.node if n.op_type == "QLinearConv"]
    assert len(convs) == 2 and all(next(a.i for a in n.attribute if a.name == "group") == 8 for n in convs)
    x = RNG.normal(size=(4, 8, 8, 8)).astype(np.float32)
    ref, got = _run(model, x).reshape(4, -1), _run(int8, x).reshape(4, -1)
    cosine = np.sum(ref * got, 1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cosine.min() > 0.99, cosine.min()
