"""Exact ONNX graph rewrites that make an embedding model cheaper to run, in fp32 and in int8 (no TensorFlow).

**PReLU.** tf2onnx writes Keras' `PReLU` as five element-wise nodes, `Relu(x) + c * Relu(Neg(x))` with
`c = -slope`, and insightface's models carry ONNX's own `PRelu`. On onnxruntime's CPU provider both are slow
(`PRelu` with a per-channel slope is slower still than the five nodes), and onnxruntime's static quantizer
mis-handles the first: the `Relu(x)` is folded into the producing convolution's output range, so the `Neg`
branch only ever sees `x >= 0` and the int8 model computes a plain ReLU (cosine 0.16-0.6 to the fp32 model
on the face backbones). Each PReLU is rewritten here, exactly, in one of two forms:

    fp32:  y = s * x + Relu((1 - s) * x)                 (every slope s <= 1)
           y = s * x + sign(1 - s) * Relu(|1 - s| * x)   (some slope above 1)
    int8:  y = x + Relu((s - 1) * x)                     (every slope s <= 1)
           y = x + sign(1 - s) * Relu(-|1 - s| * x)      (some slope above 1)
    both:  y = Relu(x)                                   (every slope 0)

each equal to `PReLU(x) = x if x >= 0 else s * x` channel by channel (fp32, s <= 1: for x >= 0,
s*x + (1-s)*x = x; for x < 0, s*x + 0. int8, s <= 1: for x >= 0, (s-1)*x <= 0 and y = x; for x < 0,
y = x + (s-1)*x = s*x. A slope above 1 subtracts the ReLU branch on its channels). The per-channel products
are 1x1 depthwise `Conv`s when `x` is an NCHW tensor with a known channel count (onnxruntime runs those,
and their int8 `QLinearConv`s, far faster than a broadcast `Mul`), else broadcast `Mul`s; every `Relu` has
one consumer, which the quantizer handles correctly (it folds it into the product's output range).

Two forms because each runtime is fastest on its own: fp32 onnxruntime fuses the `Add` into the slope
product's convolution (its NCHWc `Conv` takes a summand), while int8 has no such fusion and pays per
`QLinearConv`, so its form has one product instead of two (facecnn 112x112, batch 32, 1 thread: int8
1,007 -> 1,129 img/s with it; the int8 form in fp32 is 6-12% slower than the fp32 form). `quantize_int8`
converts an fp32-form graph (what `export` and `import` write) to the int8 form: `_find` reads all four
spellings, tf2onnx's, ONNX's `PRelu` and both of ours.

Measured with the fp32 form on bench/face_bundle.py's 112x112 facecnn with slopes in [0.05, 0.6] (batch 32,
2 threads): fp32 649 -> 876 img/s, static int8 1084 -> 1901 img/s, and the int8 model's worst cosine to
fp32 0.68 -> 0.9998 (docs/performance.md#int8-models).
"""

from __future__ import annotations

import tempfile
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper


@dataclass(frozen=True)
class RewriteReport:
    grouped_conv: int = 0  # tf2onnx's depthwise + AveragePool grouped convolutions, now one grouped Conv
    prelu_depthwise: int = 0  # PReLUs now written with 1x1 depthwise convolutions
    prelu_mul: int = 0  # ... with broadcast multiplications (x not a known NCHW tensor)
    prelu_relu: int = 0  # ... as a plain Relu (every slope 0)
    form: str = "fp32"  # which of the module docstring's forms they were written in
    folded: bool = False  # onnxruntime's basic optimizations were saved into the graph first (`fold`)

    @property
    def total(self) -> int:
        """PReLUs rewritten (grouped convolutions are counted apart)."""
        return self.prelu_depthwise + self.prelu_mul + self.prelu_relu

    def describe(self) -> str:
        grouped = f"{self.grouped_conv} grouped convolution(s) made one Conv; " if self.grouped_conv else ""
        folded = ", after onnxruntime's basic graph optimizations" if self.folded else ""
        return grouped + self._describe_prelu() + folded

    def _describe_prelu(self) -> str:
        parts = [
            f"{n} as {what}"
            for n, what in (
                (self.prelu_depthwise, "1x1 depthwise Conv + Relu"),
                (self.prelu_mul, "Mul + Relu"),
                (self.prelu_relu, "Relu (slope 0)"),
            )
            if n
        ]
        if not parts:
            return "no PReLU rewritten"
        form = ", int8 form" if self.form == "int8" else ""
        return f"{self.total} PReLU rewritten exactly ({', '.join(parts)}{form})"


@dataclass(frozen=True)
class _PRelu:
    x: str  # the PReLU's input
    out: str  # its output
    slope: np.ndarray  # as stored (its broadcast shape kept)
    replaced: tuple[int, ...]  # indices of the nodes it replaces
    name: str
    spelling: str  # "tf2onnx", "PRelu", or this module's "fp32" / "int8" form
    mul_products: bool = False  # this module's form with broadcast Muls (x was not a known NCHW tensor)


def _constant(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    found = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            found[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return found


def _find(graph: onnx.GraphProto) -> list[_PRelu]:
    consts = _constant(graph)
    producer = {out: k for k, node in enumerate(graph.node) for out in node.output}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    graph_outputs = {o.name for o in graph.output}

    def private(k: int) -> bool:  # an intermediate that only the pattern reads
        out = graph.node[k].output[0]
        return uses.get(out, 0) == 1 and out not in graph_outputs

    def made_by(name: str, op: str) -> int | None:
        k = producer.get(name)
        return k if k is not None and graph.node[k].op_type == op else None

    found: list[_PRelu] = []
    taken: set[int] = set()
    for k, node in enumerate(graph.node):
        if node.op_type == "PRelu" and len(node.input) == 2 and node.input[1] in consts:
            slope = consts[node.input[1]]
            found.append(_PRelu(node.input[0], node.output[0], slope, (k,), node.name, "PRelu"))
            continue
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        for relu_in, mul_in in (node.input, node.input[::-1]):
            relu, mul = made_by(relu_in, "Relu"), made_by(mul_in, "Mul")
            if relu is None or mul is None:
                continue
            factors = list(graph.node[mul].input)
            c = [f for f in factors if f in consts]
            inner = [made_by(f, "Relu") for f in factors if f not in consts]
            if len(c) != 1 or len(inner) != 1 or inner[0] is None:
                continue
            neg = made_by(graph.node[inner[0]].input[0], "Neg")
            x = graph.node[relu].input[0]
            if neg is None or graph.node[neg].input[0] != x:
                continue
            chain = (relu, neg, inner[0], mul)
            if not all(private(j) for j in chain) or taken.intersection(chain):
                continue
            taken.update(chain)
            slope = -consts[c[0]].astype(np.float32)
            name = node.name or node.output[0]
            found.append(_PRelu(x, node.output[0], slope, (*chain, k), name, "tf2onnx"))
            break
        else:
            ours = _find_ours(graph, k, consts, made_by, private, taken)
            if ours is not None:
                taken.update(ours.replaced)
                found.append(ours)
    return found


def _product(graph: onnx.GraphProto, k: int | None, consts: dict[str, np.ndarray]):
    """(source, per-channel factor) when node k is one of this module's products: a 1x1 depthwise Conv
    without bias, padding, stride or dilation, or a Mul by a constant; else None."""
    if k is None:
        return None
    node = graph.node[k]
    if node.op_type == "Mul" and len(node.input) == 2:
        c = [f for f in node.input if f in consts]
        if len(c) == 1:
            return next(f for f in node.input if f not in consts), consts[c[0]].astype(np.float32)
        return None
    if node.op_type != "Conv" or len(node.input) != 2 or node.input[1] not in consts:
        return None
    w, attrs = consts[node.input[1]], _attrs(node)
    plain = (
        not any(attrs.get("pads", [0]))
        and all(v == 1 for v in attrs.get("strides", [1]))
        and all(v == 1 for v in attrs.get("dilations", [1]))
        and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
    )
    if w.ndim != 4 or w.shape[1:] != (1, 1, 1) or int(attrs.get("group", 1)) != w.shape[0] or not plain:
        return None
    return node.input[0], w.reshape(1, -1, 1, 1).astype(np.float32)


def _find_ours(graph, k_add, consts, made_by, private, taken) -> _PRelu | None:
    """A PReLU in either of this module's forms whose last node is the Add k_add, as its slope; else None.
    Only what is exactly a PReLU matches: the int8 form's factor is <= 0 and the fp32 form's >= 0, with
    sign * factor = 1 - slope."""
    add = graph.node[k_add]
    if add.op_type != "Add" or len(add.input) != 2:
        return None

    def product(name: str):
        k = made_by(name, "Conv")
        k = made_by(name, "Mul") if k is None else k
        found = _product(graph, k, consts)
        return None if found is None else (k, *found)

    for first, second in (add.input, add.input[::-1]):
        chain: tuple[int, ...] = ()
        signs: np.ndarray = np.float32(1.0)
        relu = made_by(second, "Relu")
        if relu is None:  # a slope above 1: sign * Relu(...)
            sign = product(second)
            if sign is None or not set(np.unique(sign[2]).tolist()) <= {-1.0, 1.0}:
                continue
            relu, chain, signs = made_by(sign[1], "Relu"), (sign[0],), sign[2]
            if relu is None:
                continue
        inner = product(graph.node[relu].input[0])
        if inner is None:
            continue
        k_inner, x, factor = inner
        chain = (k_inner, relu, *chain)
        if first == x:  # int8: x + sign * Relu(-|1-s| * x)
            if np.any(factor > 0):
                continue
            slope, spelling = 1.0 + signs * factor, "int8"
        else:  # fp32: s * x + sign * Relu(|1-s| * x)
            lin = product(first)
            if lin is None or lin[1] != x or np.any(factor < 0):
                continue
            slope, spelling = lin[2], "fp32"
            if not np.allclose(1.0 - slope, signs * factor, rtol=1e-5, atol=1e-6):
                continue
            chain = (lin[0], *chain)
        if not all(private(j) for j in chain) or taken.intersection(chain):
            continue
        name = add.name or add.output[0]
        if name.startswith("idembed_prelu/"):
            name = name[len("idembed_prelu/") :].rsplit("/Add", 1)[0]
        muls = any(graph.node[j].op_type == "Mul" for j in chain)
        return _PRelu(x, add.output[0], np.asarray(slope, np.float32), (*chain, k_add), name, spelling, muls)
    return None


def _channels(proto: onnx.ModelProto) -> dict[str, tuple[int, int | None]]:
    """rank and dim 1 (when known) of every tensor shape inference can name."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # an exotic graph shape inference cannot follow: every PReLU takes the Mul form
        return {}
    out: dict[str, tuple[int, int | None]] = {}
    g = inferred.graph
    for value in [*g.value_info, *g.input, *g.output]:
        t = value.type.tensor_type
        if not t.HasField("shape"):
            continue
        dims = t.shape.dim
        out[value.name] = (
            len(dims),
            dims[1].dim_value if len(dims) > 1 and dims[1].HasField("dim_value") else None,
        )
    return out


def _nchw_channels(slope: np.ndarray, shape: tuple[int, int | None] | None) -> int | None:
    """C when `x` is [N, C, H, W] with C known and the slope varies at most along C, else None."""
    if shape is None or shape[0] != 4 or not shape[1]:
        return None
    c = shape[1]
    dims = slope.shape
    if slope.size == 1:
        return c
    if len(dims) > 4 or slope.size != c:
        return None
    padded = (1,) * (4 - len(dims)) + tuple(dims)
    return c if padded == (1, c, 1, 1) else None


FORMS = ("fp32", "int8")


def rewrite_prelu(model_bytes: bytes, form: str = "fp32") -> tuple[bytes, RewriteReport]:
    """`model_bytes` with every PReLU (tf2onnx's five-node form, ONNX `PRelu` with a constant slope, or
    this module's other form) rewritten exactly in `form`, as this module's docstring says; the bytes
    unchanged when there is none (or every one is in `form` already)."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    proto = onnx.load_from_string(model_bytes)
    graph = proto.graph
    found = _find(graph)
    shapes = _channels(proto) if found else {}

    def done(p: _PRelu) -> bool:  # in `form` already, with depthwise products wherever they can be
        return p.spelling == form and not (p.mul_products and _nchw_channels(p.slope, shapes.get(p.x)))

    found = [p for p in found if not done(p)]
    if not found:
        return model_bytes, RewriteReport(form=form)
    names = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    counts = {"prelu_depthwise": 0, "prelu_mul": 0, "prelu_relu": 0}

    def fresh(base: str) -> str:
        name, k = base, 0
        while name in names:
            k += 1
            name = f"{base}_{k}"
        names.add(name)
        return name

    def const(base: str, value: np.ndarray) -> str:
        name = fresh(base)
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value, np.float32), name))
        return name

    replacement: dict[int, list[onnx.NodeProto]] = {}
    dropped: set[int] = set()
    for p in found:
        base = f"idembed_prelu/{p.name}"
        s = p.slope.astype(np.float32)
        nodes: list[onnx.NodeProto] = []
        if not np.any(s):
            nodes.append(helper.make_node("Relu", [p.x], [p.out], name=fresh(f"{base}/Relu")))
            counts["prelu_relu"] += 1
        else:
            c = _nchw_channels(s, shapes.get(p.x))
            per_channel = s if c is None else np.broadcast_to(s.reshape(-1), (c,)).astype(np.float32)
            counts["prelu_mul" if c is None else "prelu_depthwise"] += 1

            def scale(src: str, value: np.ndarray, tag: str, base=base, c=c, nodes=nodes) -> str:
                """`value * src` per channel: a 1x1 depthwise Conv on NCHW with C known, else a Mul."""
                out = fresh(f"{base}/{tag}")
                if c is None:
                    factor = const(f"{base}/{tag}_c", value)
                    nodes.append(helper.make_node("Mul", [src, factor], [out], name=out))
                else:
                    weight = const(f"{base}/{tag}_w", value.reshape(c, 1, 1, 1))
                    nodes.append(
                        helper.make_node("Conv", [src, weight], [out], name=out, group=c, kernel_shape=[1, 1])
                    )
                return out

            rest = 1.0 - per_channel
            if form == "fp32":  # s * x + sign * Relu(|1-s| * x)
                linear, branch = scale(p.x, per_channel, "slope"), scale(p.x, np.abs(rest), "rest")
            else:  # x + sign * Relu(-|1-s| * x)
                linear, branch = p.x, scale(p.x, -np.abs(rest), "rest")
            relu = fresh(f"{base}/Relu")
            nodes.append(helper.make_node("Relu", [branch], [relu], name=relu))
            if np.any(rest < 0):  # a slope above 1: the ReLU branch is subtracted on those channels
                relu = scale(relu, np.where(rest < 0, -1.0, 1.0).astype(np.float32), "sign")
            nodes.append(helper.make_node("Add", [linear, relu], [p.out], name=fresh(f"{base}/Add")))
        replacement[p.replaced[-1]] = nodes
        dropped.update(p.replaced[:-1])
    return _splice(proto, replacement, dropped), RewriteReport(**counts, form=form)


# What training.face_backbones._grouped_conv becomes in tf2onnx's NCHW graph, after the depthwise Conv
# (depth multiplier k_out): the NHWC view [N, H*W*groups, k_in, k_out], an average over k_in, times k_in,
# and the NHWC view [N, H, W, filters]. Shape/Gather/Cast/Slice/Concat nodes that compute the reshapes'
# shapes hang off this chain and die with it.
_GROUPED_TAIL = ("Transpose", "Reshape", "Transpose", "AveragePool", "Mul", "Transpose", "Reshape")
_SHAPE_OPS = {"Shape", "Gather", "Cast", "Slice", "Concat", "Unsqueeze", "Squeeze"}


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _reshape_target(graph: onnx.GraphProto, consts: dict[str, np.ndarray], name: str) -> list[int | None]:
    """The shape a Reshape's shape input spells, constant parts known and the rest None: a constant, or a
    (Cast of a) Concat of constants and one-element runtime slices, as tf2onnx writes a dynamic batch."""
    if name in consts:
        return [int(v) for v in consts[name].reshape(-1)]
    producer = {out: node for node in graph.node for out in node.output}
    node = producer.get(name)
    while node is not None and node.op_type == "Cast":
        node = producer.get(node.input[0])
    if node is None or node.op_type != "Concat":
        return []
    dims: list[int | None] = []
    for part in node.input:
        dims += [int(v) for v in consts[part].reshape(-1)] if part in consts else [None]
    return dims


def _splice(
    proto: onnx.ModelProto, replaced: dict[int, list[onnx.NodeProto]], dropped: Collection[int] = ()
) -> bytes:
    """The model with node k replaced by `replaced[k]` and the `dropped` ones gone (then whatever nothing
    reads any more), checked."""
    graph = proto.graph
    kept = [new for k, node in enumerate(graph.node) if k not in dropped for new in replaced.get(k, [node])]
    del graph.node[:]
    graph.node.extend(kept)
    _prune(graph)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes and initializers nothing reads (after a rewrite left them behind)."""
    while True:
        needed = {o.name for o in graph.output} | {name for node in graph.node for name in node.input}
        live = [n for n in graph.node if any(o in needed for o in n.output)]
        if len(live) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(live)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def rewrite_grouped_conv(model_bytes: bytes) -> tuple[bytes, int]:
    """Each grouped convolution written as training.face_backbones writes it for tf2onnx (a depthwise
    Conv with depth multiplier k_out, then a sum over k_in input channels by AveragePool) -> one ONNX
    `Conv` with `group=groups` and the same weights, followed by the NHWC Transpose the chain ended in.
    On MobileFaceNet the chain took about half of onnxruntime's time (its one grouped layer, conv2).
    Returns the bytes unchanged and 0 when there is no such chain."""
    proto = onnx.load_from_string(model_bytes)
    graph = proto.graph
    consts = _constant(graph)
    readers: dict[str, list[int]] = {}
    for k, node in enumerate(graph.node):
        for name in node.input:
            readers.setdefault(name, []).append(k)

    def next_main(out: str) -> int | None:
        main = [k for k in readers.get(out, []) if graph.node[k].op_type not in _SHAPE_OPS]
        return main[0] if len(main) == 1 else None

    replaced: dict[int, list[onnx.NodeProto]] = {}
    for conv in graph.node:
        if conv.op_type != "Conv" or len(conv.input) != 2 or conv.input[1] not in consts:
            continue
        weight, attrs = consts[conv.input[1]], _attrs(conv)
        channels = int(attrs.get("group", 1))
        if weight.ndim != 4 or weight.shape[1] != 1 or channels < 2 or weight.shape[0] % channels:
            continue
        k_out = weight.shape[0] // channels
        chain, out = [], conv.output[0]
        for op in _GROUPED_TAIL:
            j = next_main(out)
            if j is None or graph.node[j].op_type != op:
                break
            chain.append(j)
            out = graph.node[j].output[0]
        if len(chain) != len(_GROUPED_TAIL):
            continue
        t1, _, t2, pool, mul, t3, last = (graph.node[j] for j in chain)
        pool_attrs = _attrs(pool)
        kernel = list(pool_attrs.get("kernel_shape", []))
        if (
            list(_attrs(t1).get("perm", [])) != [0, 2, 3, 1]
            or list(_attrs(t2).get("perm", [])) != [0, 3, 1, 2]
            or list(_attrs(t3).get("perm", [])) != [0, 2, 3, 1]
            or len(kernel) != 2
            or kernel[0] != 1
            or list(pool_attrs.get("strides", kernel)) != kernel
            or any(pool_attrs.get("pads", [0]))
        ):
            continue
        k_in = int(kernel[1])
        factor = [consts.get(name) for name in mul.input]
        scale = [f for f in factor if f is not None]
        if k_in < 1 or channels % k_in or len(scale) != 1 or scale[0].size != 1 or float(scale[0]) != k_in:
            continue
        groups = channels // k_in
        target = _reshape_target(graph, consts, last.input[1])
        if len(target) != 4 or target[-1] != groups * k_out:  # not [N, H, W, filters] (e.g. a Flatten too)
            continue
        kh, kw = weight.shape[2:]
        # depthwise row (g*k_in + i)*k_out + j  ->  grouped kernel [g*k_out + j, i]
        grouped = weight.reshape(groups, k_in, k_out, kh, kw).transpose(0, 2, 1, 3, 4)
        grouped = grouped.reshape(groups * k_out, k_in, kh, kw)
        name = f"idembed_grouped/{conv.name or conv.output[0]}"
        w_name = f"{name}/W"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(grouped, weight.dtype), w_name))
        conv_attrs = {key: v for key, v in attrs.items() if key != "group"}
        replaced[chain[-1]] = [
            helper.make_node(
                "Conv", [conv.input[0], w_name], [f"{name}:0"], name=name, group=groups, **conv_attrs
            ),
            helper.make_node("Transpose", [f"{name}:0"], [out], name=f"{name}/nhwc", perm=[0, 2, 3, 1]),
        ]
    if not replaced:
        return model_bytes, 0
    return _splice(proto, replaced), len(replaced)


def grouped_as_depthwise(model_bytes: bytes) -> tuple[bytes, int]:
    """Each grouped Conv with several input channels per group (1 < group, k_in > 1) -> a sum of k_in
    depthwise Convs over channel-gathered copies of its input: output channel o = g*k_out + j reads input
    channel g*k_in + (j + d) % k_in in term d with kernel W[o, (j + d) % k_in]. When k_in == k_out the
    d = 0 term reads the input as it is. onnxruntime's int8 QLinearConv has no fast kernel for small groups
    (MobileFaceNet's conv2, 64 groups of 2 channels: 57% of the int8 model's time, against 12% of fp32's)
    but a fast depthwise one."""
    proto = onnx.load_from_string(model_bytes)
    graph = proto.graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    names = set(consts) | {o for n in graph.node for o in n.output}
    replaced: dict[int, list[onnx.NodeProto]] = {}
    for k, conv in enumerate(graph.node):
        if conv.op_type != "Conv" or len(conv.input) < 2 or conv.input[1] not in consts:
            continue
        attrs = _attrs(conv)
        groups, weight = int(attrs.get("group", 1)), consts[conv.input[1]]
        if groups < 2 or weight.ndim != 4 or weight.shape[1] < 2 or weight.shape[0] % groups:
            continue
        c_out, k_in = weight.shape[:2]
        k_out = c_out // groups
        o = np.arange(c_out)
        g, j = o // k_out, o % k_out
        base = f"idembed_depthwise/{conv.name or conv.output[0]}"
        assert not any(n.startswith(base) for n in names), base
        rest = {key: v for key, v in attrs.items() if key != "group"}
        nodes: list[onnx.NodeProto] = []
        terms: list[str] = []
        for d in range(k_in):
            i = (j + d) % k_in
            src = conv.input[0]
            index = g * k_in + i
            if not (index.size == int(groups * k_in) and np.array_equal(index, np.arange(index.size))):
                idx_name = f"{base}/index{d}"
                graph.initializer.append(numpy_helper.from_array(index.astype(np.int64), idx_name))
                src = f"{base}/gather{d}:0"
                nodes.append(
                    helper.make_node("Gather", [conv.input[0], idx_name], [src], name=src[:-2], axis=1)
                )
            w_name = f"{base}/W{d}"
            graph.initializer.append(
                numpy_helper.from_array(np.ascontiguousarray(weight[o, i][:, None], weight.dtype), w_name)
            )
            inputs = [src, w_name] + (
                [conv.input[2]] if d == 0 and len(conv.input) > 2 and conv.input[2] else []
            )
            out = f"{base}/term{d}:0"
            nodes.append(helper.make_node("Conv", inputs, [out], name=out[:-2], group=c_out, **rest))
            terms.append(out)
        total = terms[0]
        for d, term in enumerate(terms[1:], start=1):
            last = d == len(terms) - 1
            out = conv.output[0] if last else f"{base}/sum{d}:0"
            nodes.append(helper.make_node("Add", [total, term], [out], name=f"{base}/sum{d}"))
            total = out
        replaced[k] = nodes
    if not replaced:
        return model_bytes, 0
    return _splice(proto, replaced), len(replaced)


def fold(model_bytes: bytes) -> bytes:
    """onnxruntime's basic graph optimizations, saved: the semantics-preserving, standard-ONNX ones
    (constant folding, BatchNorm / Mul / Add into the Conv before them, Pad into Conv, Transposes pushed
    through element-wise nodes and cancelled). onnxruntime would apply them at load anyway; done here they
    let the rewrites after them see what onnxruntime will run. MobileFaceNet's grouped conv2 is followed by
    an NHWC Transpose, its BatchNorm and its PReLU: folded, the BatchNorm joins the grouped Conv and the
    PReLU becomes an NCHW one with depthwise products (fp32 +4%; int8 +15-20%, where the BatchNorm cannot
    join the grouped Conv once that is split into depthwise ones)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="idembed-fold-") as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "folded.onnx")
        ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        folded = Path(options.optimized_model_filepath).read_bytes()
    proto = onnx.load_from_string(folded)
    onnx.checker.check_model(proto)
    return folded


def optimize(model_bytes: bytes, form: str = "fp32") -> tuple[bytes, RewriteReport]:
    """Every rewrite here: grouped convolutions first (a PReLU after one then sees an NHWC tensor), then
    `fold` when there is something to rewrite, then PReLUs in `form` ("int8" for a graph about to be
    quantized). The bytes come back unchanged when nothing is rewritten."""
    model_bytes, grouped = rewrite_grouped_conv(model_bytes)
    proto = onnx.load_from_string(model_bytes)
    if grouped or _find(proto.graph):
        folded, report = rewrite_prelu(fold(model_bytes), form)
        if grouped or report.total:
            model_bytes, report = folded, replace(report, folded=True)
    else:
        report = RewriteReport(form=form)
    return model_bytes, replace(report, grouped_conv=grouped)
