"""Face-recognition backbones of insightface arcface_torch in Keras: IResNet-18/34/50/100 and MobileFaceNet.

Layer for layer as `recognition/arcface_torch/backbones/iresnet.py` and `mobilefacenet.py` (112x112 RGB in,
`feature_dim`-d embedding out, 512 by default), built from Keras's own layers only, so `embedding.keras`
loads without custom objects and tf2onnx converts the graph directly:

- PyTorch's symmetric `padding=1` of the 3x3 convolutions is an explicit `ZeroPadding2D(1)` + `valid`
  convolution (Keras `same` pads strided convolutions asymmetrically, a different function);
- BatchNorm uses PyTorch's epsilon 1e-5 and momentum 0.1 (Keras momentum 0.9), synchronised across
  replicas like the other backbones here; PReLU has one slope per channel starting at 0.25 as `nn.PReLU`;
- the embedding BatchNorm has no scale (gamma), because arcface_torch freezes that gamma at 1.0
  (`features.weight.requires_grad = False`): a constant, not a parameter.

Parameter counts are PyTorch's (`sum(p.numel() for p in model.parameters())`: weights, BN gamma/beta and PReLU
slopes, not BN running statistics) minus that frozen gamma; `parameter_count` computes ours and
`reference_parameter_count` the reference's analytically, and the tests compare them exactly.
IResNet-50 at 512-d: 43.6 M, IResNet-100: 65.2 M, MobileFaceNet (arcface_torch `mbf`, scale 2,
blocks 1-4-6-2): 2.0 M.

The output layer (`embedding`) always computes in float32, so under a mixed-precision policy the features
that reach the head and the center loss, and the exported model's output, are float32.
"""

from __future__ import annotations

import math

import keras

# The bundle's tensor names, as in training.backbones (not imported: that module registers these builders).
INPUT_NAME = "input"
OUTPUT_NAME = "embedding"

# depth -> blocks per stage (arcface_torch iresnet18 ... iresnet200)
IRESNET_LAYERS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}
IRESNET_WIDTHS = (64, 128, 256, 512)
MBF_BLOCKS = (1, 4, 6, 2)
MBF_SCALE = 2
FACE_INPUT_SIZE = 112

_BN_EPS = 1e-5
_BN_MOMENTUM = 0.9  # PyTorch momentum 0.1: running = 0.9 * running + 0.1 * batch


def _bn(name: str, scale: bool = True, dtype: str | None = None) -> keras.layers.Layer:
    return keras.layers.BatchNormalization(
        epsilon=_BN_EPS, momentum=_BN_MOMENTUM, synchronized=True, scale=scale, name=name, dtype=dtype
    )


def _prelu(name: str) -> keras.layers.Layer:
    return keras.layers.PReLU(
        shared_axes=[1, 2], alpha_initializer=keras.initializers.Constant(0.25), name=name
    )


def _conv(x, filters: int, kernel: int, stride: int, pad: int, name: str, init, groups: int = 1):
    if pad:
        x = keras.layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
    return keras.layers.Conv2D(
        filters,
        kernel,
        strides=stride,
        padding="valid",
        groups=groups,
        use_bias=False,
        kernel_initializer=init,
        name=name,
    )(x)


def _check_input(input_shape: tuple[int, int, int], name: str) -> None:
    height, width, _ = input_shape
    if height < 16 or width < 16 or height % 16 or width % 16:
        raise ValueError(
            f"--image-size: {name} needs a multiple of 16 (four stride-2 stages; 112 as arcface_torch), "
            f"got {height}x{width}"
        )


def _iresnet_block(x, in_planes: int, planes: int, stride: int, name: str, init):
    """IBasicBlock: BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, plus identity or 1x1 downsample."""
    out = _bn(f"{name}_bn1")(x)
    out = _conv(out, planes, 3, 1, 1, f"{name}_conv1", init)
    out = _bn(f"{name}_bn2")(out)
    out = _prelu(f"{name}_prelu")(out)
    out = _conv(out, planes, 3, stride, 1, f"{name}_conv2", init)
    out = _bn(f"{name}_bn3")(out)
    identity = x
    if stride != 1 or in_planes != planes:
        identity = _conv(x, planes, 1, stride, 0, f"{name}_down_conv", init)
        identity = _bn(f"{name}_down_bn")(identity)
    return keras.layers.Add(name=f"{name}_add")([out, identity])


def iresnet(
    input_shape: tuple[int, int, int],
    feature_dim: int = 512,
    depth: int = 50,
    dropout: float = 0.0,
) -> keras.Model:
    """IResNet-`depth` (18, 34, 50, 100 or 200) of arcface_torch; output `[B, feature_dim]` float32.

    Stem conv3x3-BN-PReLU at full resolution, four stages of IBasicBlocks (64, 128, 256, 512 filters; the
    first block of each stage has stride 2), then BN - flatten - dropout - FC - BN. The FC sees the
    flattened `(H/16) x (W/16) x 512` map (7 x 7 x 512 at 112x112), as the reference does; flattening is
    in NHWC order (a port of PyTorch weights must permute the FC rows).
    """
    if depth not in IRESNET_LAYERS:
        raise ValueError(f"IResNet depth must be one of {sorted(IRESNET_LAYERS)}, got {depth}")
    _check_input(input_shape, f"iresnet{depth}")
    init = keras.initializers.RandomNormal(stddev=0.1)  # arcface_torch: nn.init.normal_(conv.weight, 0, 0.1)
    inputs = keras.Input(shape=input_shape, name=INPUT_NAME)
    x = _conv(inputs, 64, 3, 1, 1, "conv1", init)
    x = _bn("bn1")(x)
    x = _prelu("prelu")(x)
    in_planes = 64
    for stage, (blocks, planes) in enumerate(zip(IRESNET_LAYERS[depth], IRESNET_WIDTHS, strict=True), 1):
        for block in range(blocks):
            stride = 2 if block == 0 else 1
            x = _iresnet_block(x, in_planes, planes, stride, f"layer{stage}_{block}", init)
            in_planes = planes
    x = _bn("bn2")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    x = keras.layers.Dense(feature_dim, name="fc")(x)
    outputs = _bn(OUTPUT_NAME, scale=False, dtype="float32")(x)
    return keras.Model(inputs, outputs, name=f"iresnet{depth}")


def _grouped_conv(x, filters: int, kernel: int, stride: int, pad: int, name: str, init, groups: int):
    """A grouped convolution without Keras's `Conv2D(groups=...)`, which the TF backend compiles with XLA
    (a function call tf2onnx cannot convert).

    Group g maps input channels g*k_in + i to output channels g*k_out + j, so
    `out[g*k_out + j] = sum_i conv(in[g*k_in + i], K[g, i, j])`. A depthwise convolution with depth
    multiplier k_out computes every term `d[(g*k_in + i)*k_out + j]` (the same k_in*k_out*k*k weights per
    group as the grouped kernel, so the parameter count is PyTorch's); the sum over i is an average pooling
    over that axis of a `[positions*groups, k_in, k_out]` view, times k_in.
    """
    channels = int(x.shape[-1])
    k_in, k_out = channels // groups, filters // groups
    if pad:
        x = keras.layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
    x = keras.layers.DepthwiseConv2D(
        kernel,
        strides=stride,
        padding="valid",
        depth_multiplier=k_out,
        use_bias=False,
        depthwise_initializer=init,
        name=name,
    )(x)
    height, width = int(x.shape[1]), int(x.shape[2])
    x = keras.layers.Reshape((height * width * groups, k_in, k_out), name=f"{name}_terms")(x)
    x = keras.layers.AveragePooling2D((1, k_in), name=f"{name}_sum")(x)
    x = keras.layers.Rescaling(float(k_in), name=f"{name}_sum_scale")(x)
    return keras.layers.Reshape((height, width, filters), name=f"{name}_groups")(x)


def _conv_block(x, filters: int, kernel: int, stride: int, pad: int, name: str, groups: int = 1, act=True):
    """ConvBlock (conv - BN - PReLU) or, with `act=False`, LinearBlock (conv - BN)."""
    init = keras.initializers.HeNormal()  # kaiming_normal_(mode='fan_out') differs only in fan; see docs
    channels = int(x.shape[-1])
    if groups == channels and groups > 1 and filters == channels:
        if pad:
            x = keras.layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
        x = keras.layers.DepthwiseConv2D(
            kernel, strides=stride, padding="valid", use_bias=False, depthwise_initializer=init, name=name
        )(x)
    elif groups > 1:
        x = _grouped_conv(x, filters, kernel, stride, pad, name, init, groups)
    else:
        x = _conv(x, filters, kernel, stride, pad, name, init)
    x = _bn(f"{name}_bn")(x)
    return _prelu(f"{name}_prelu")(x) if act else x


def _depthwise(x, out_c: int, groups: int, stride: int, residual: bool, name: str):
    """arcface_torch DepthWise: 1x1 ConvBlock to `groups`, 3x3 depthwise ConvBlock, 1x1 LinearBlock."""
    shortcut = x
    x = _conv_block(x, groups, 1, 1, 0, f"{name}_expand")
    x = _conv_block(x, groups, 3, stride, 1, f"{name}_dw", groups=groups)
    x = _conv_block(x, out_c, 1, 1, 0, f"{name}_project", act=False)
    return keras.layers.Add(name=f"{name}_add")([shortcut, x]) if residual else x


def mobilefacenet(
    input_shape: tuple[int, int, int],
    feature_dim: int = 512,
    blocks: tuple[int, int, int, int] = MBF_BLOCKS,
    scale: int = MBF_SCALE,
) -> keras.Model:
    """MobileFaceNet as arcface_torch's `mbf` (`get_mbf`: blocks 1-4-6-2, scale 2); `get_mbf_large` is
    blocks 2-8-12-4, scale 4. The GDC output block is a 7x7 depthwise LinearBlock over the final
    `(H/16) x (W/16)` map (so the input must be 112x112 for the reference's 7x7 kernel; other multiples of
    16 use a kernel of the map's size), a linear layer without bias and a BN."""
    _check_input(input_shape, "mobilefacenet")
    inputs = keras.Input(shape=input_shape, name=INPUT_NAME)
    c1, c2 = 64 * scale, 128 * scale
    x = _conv_block(inputs, c1, 3, 2, 1, "conv1")
    if blocks[0] == 1:
        x = _conv_block(x, c1, 3, 1, 1, "conv2", groups=64)
    else:
        for i in range(blocks[0]):
            x = _depthwise(x, c1, 128, 1, True, f"res1_{i}")
    stages = ((c1, 128, c1, blocks[1]), (c2, 256, c2, blocks[2]), (c2, 512, c2, blocks[3]))
    for stage, (out_c, down_groups, res_c, n) in enumerate(stages, start=2):
        x = _depthwise(x, out_c, down_groups, 2, False, f"dw{stage}")
        for i in range(n):
            x = _depthwise(x, res_c, 256 if stage > 2 else 128, 1, True, f"res{stage}_{i}")
    x = _conv_block(x, 512, 1, 1, 0, "conv_sep")
    x = _conv_block(x, 512, int(x.shape[1]), 1, 0, "gdc", groups=512, act=False)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(
        feature_dim, use_bias=False, kernel_initializer=keras.initializers.HeNormal(), name="fc"
    )(x)
    outputs = _bn(OUTPUT_NAME, dtype="float32")(x)
    return keras.Model(inputs, outputs, name="mobilefacenet")


def parameter_count(model: keras.Model) -> int:
    """Parameters as PyTorch counts them: every weight except BatchNorm's moving mean and variance."""
    return sum(
        math.prod(w.shape)
        for w in model.weights
        if not any(part in w.path for part in ("moving_mean", "moving_variance"))
    )


def reference_parameter_count(name: str, feature_dim: int = 512) -> int:
    """`sum(p.numel() for p in model.parameters())` of the arcface_torch model, computed from its code.

    Written from the PyTorch modules (conv weights, BN weight+bias, PReLU per channel, Linear weight+bias)
    independently of the Keras graph, at 112x112 input. For IResNet it includes the frozen embedding-BN
    gamma (`feature_dim` ones) that the Keras model holds as a constant.
    """
    if name.startswith("iresnet"):
        depth = int(name.removeprefix("iresnet"))
        total = 3 * 64 * 9 + 2 * 64 + 64  # conv1, bn1, prelu
        inplanes = 64
        for blocks, planes in zip(IRESNET_LAYERS[depth], IRESNET_WIDTHS, strict=True):
            for block in range(blocks):
                total += 2 * inplanes + inplanes * planes * 9 + 2 * planes + planes  # bn1 conv1 bn2 prelu
                total += planes * planes * 9 + 2 * planes  # conv2 bn3
                if block == 0:  # stride 2: downsample conv1x1 + BN
                    total += inplanes * planes + 2 * planes
                inplanes = planes
        total += 2 * 512 + 512 * 49 * feature_dim + feature_dim + 2 * feature_dim  # bn2, fc, features
        return total
    if name == "mobilefacenet":

        def conv_block(cin: int, cout: int, k: int, groups: int = 1, act: bool = True) -> int:
            return cin // groups * cout * k * k + 2 * cout + (cout if act else 0)

        def depthwise(cin: int, cout: int, groups: int) -> int:
            return (
                conv_block(cin, groups, 1)
                + conv_block(groups, groups, 3, groups)
                + conv_block(groups, cout, 1, act=False)
            )

        s = MBF_SCALE
        total = conv_block(3, 64 * s, 3) + conv_block(64 * s, 64 * s, 3, groups=64)
        total += depthwise(64 * s, 64 * s, 128) + 4 * depthwise(64 * s, 64 * s, 128)
        total += depthwise(64 * s, 128 * s, 256) + 6 * depthwise(128 * s, 128 * s, 256)
        total += depthwise(128 * s, 128 * s, 512) + 2 * depthwise(128 * s, 128 * s, 256)
        total += conv_block(128 * s, 512, 1)  # conv_sep
        total += conv_block(512, 512, 7, groups=512, act=False)  # GDC depthwise LinearBlock
        total += 512 * feature_dim + 2 * feature_dim  # Linear (no bias), BatchNorm1d
        return total
    raise ValueError(f"no reference count for {name!r}")


def _iresnet_builder(depth: int):
    def build(input_shape: tuple[int, int, int], feature_dim: int = 512, width: int = 32) -> keras.Model:
        # `width` is the generic --width of the small backbones; IResNet's widths are fixed (64..512).
        return iresnet(input_shape, feature_dim=feature_dim, depth=depth)

    build.__name__ = f"iresnet{depth}"
    return build


def _mobilefacenet_builder(
    input_shape: tuple[int, int, int], feature_dim: int = 512, width: int = 32
) -> keras.Model:
    return mobilefacenet(input_shape, feature_dim=feature_dim)


FACE_BACKBONES = {
    "iresnet18": _iresnet_builder(18),
    "iresnet34": _iresnet_builder(34),
    "iresnet50": _iresnet_builder(50),
    "iresnet100": _iresnet_builder(100),
    "mobilefacenet": _mobilefacenet_builder,
}


def calibrate_batchnorm(model: keras.Model, images) -> None:
    """Set every BatchNorm's moving statistics to those of its input on `images` (one forward pass in
    training mode with momentum 0), as training would have.

    At Keras' initial statistics (mean 0, variance 1) a deep residual network amplifies its input block after
    block: an untrained IResNet-50 outputs values near 1e22, where the export's absolute Keras/onnxruntime
    parity check cannot pass. Calibrated, every BatchNorm normalises its input as a trained one does, so no
    activation overflows; the graph, and so the inference cost, is unchanged.
    """
    layers = [
        layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)
    ]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    model(images, training=True)
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum
