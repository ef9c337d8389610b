"""Backbones: image -> raw embedding features, as standalone functional keras.Models that export to ONNX.

Only built-in Keras layers are used, so `embedding.keras` loads without custom objects and tf2onnx converts
the graph directly. The model's input is named `input` and its output layer `embedding` (the bundle's names).
"""

from __future__ import annotations

from collections.abc import Callable

import keras

INPUT_NAME = "input"
OUTPUT_NAME = "embedding"


def _prelu(name: str) -> keras.layers.Layer:
    # One slope per channel, shared over space: the PReLU of the paper's Caffe models.
    return keras.layers.PReLU(shared_axes=[1, 2], name=name)


def lenet_plus_plus(input_shape: tuple[int, int, int], feature_dim: int = 2, width: int = 32) -> keras.Model:
    """LeNet++ of the paper's toy experiment (Wen et al. 2016, Table 1).

    Three stages of two 5x5 convolutions (width, 2*width, 4*width filters: 32-32, 64-64, 128-128 by default)
    with PReLU, each followed by 2x2 max pooling, then a linear layer to `feature_dim` (2 for the paper's
    feature plots). 'same' padding keeps the stages valid on inputs as small as 8x8 (sklearn digits).
    """
    inputs = keras.Input(shape=input_shape, name=INPUT_NAME)
    x = inputs
    for stage, filters in enumerate((width, 2 * width, 4 * width), start=1):
        for conv in (1, 2):
            x = keras.layers.Conv2D(filters, 5, padding="same", name=f"conv{stage}_{conv}")(x)
            x = _prelu(f"prelu{stage}_{conv}")(x)
        x = keras.layers.MaxPooling2D(2, padding="same", name=f"pool{stage}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = keras.layers.Dense(feature_dim, name=OUTPUT_NAME)(x)
    return keras.Model(inputs, outputs, name="lenetpp")


def face_cnn(input_shape: tuple[int, int, int], feature_dim: int = 128, width: int = 32) -> keras.Model:
    """A compact CNN for small face crops (e.g. 96x96 or 112x112, gray or RGB), ~1 M parameters at width 32.

    A strided 3x3 stem, then four stages of [3x3 conv - BN - PReLU] x 2 + max pooling (width, 2w, 4w, 8w),
    global average pooling, and a linear embedding followed by BatchNorm (as in ArcFace's "BN-Dropout-FC-BN"
    output block, without dropout so training is deterministic). BatchNorm is synchronised across replicas
    so MirroredStrategy training normalises with the global batch, like single-device training.
    """
    inputs = keras.Input(shape=input_shape, name=INPUT_NAME)
    x = keras.layers.Conv2D(width, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = keras.layers.BatchNormalization(synchronized=True, name="stem_bn")(x)
    x = _prelu("stem_prelu")(x)
    for stage, filters in enumerate((width, 2 * width, 4 * width, 8 * width), start=1):
        for conv in (1, 2):
            x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{stage}_{conv}")(x)
            x = keras.layers.BatchNormalization(synchronized=True, name=f"bn{stage}_{conv}")(x)
            x = _prelu(f"prelu{stage}_{conv}")(x)
        x = keras.layers.MaxPooling2D(2, padding="same", name=f"pool{stage}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(feature_dim, use_bias=False, name="fc")(x)
    outputs = keras.layers.BatchNormalization(synchronized=True, name=OUTPUT_NAME)(x)
    return keras.Model(inputs, outputs, name="facecnn")


# PyTorch's BatchNorm default (Keras momentum 0.9), as the few-shot ConvNets were trained: with Keras' 0.99
# the moving statistics lagged the quickly changing weights of a short run so far that inference-mode
# features had cosine ~0.5 to the batch-statistics ones (Omniglot, 8 epochs: val accuracy 0.005 vs 0.74).
_CONV4_BN_MOMENTUM = 0.9


def conv4(input_shape: tuple[int, int, int], feature_dim: int = 64, width: int = 64) -> keras.Model:
    """The 4-block ConvNet of few-shot learning (Vinyals et al. 2016; Snell et al. 2017) for small glyphs.

    Four blocks of [3x3 conv (`width` filters) - BatchNorm - ReLU - 2x2 max pooling] (28x28 -> 1x1 x width),
    global average pooling, then a linear embedding with BatchNorm (the face CNN's output block), so the
    feature size is free of the input size. ~113 k parameters at width 64 and 64-d features.
    """
    inputs = keras.Input(shape=input_shape, name=INPUT_NAME)
    x = inputs
    for block in range(1, 5):
        x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{block}")(x)
        x = keras.layers.BatchNormalization(
            momentum=_CONV4_BN_MOMENTUM, synchronized=True, name=f"bn{block}"
        )(x)
        x = keras.layers.ReLU(name=f"relu{block}")(x)
        x = keras.layers.MaxPooling2D(2, padding="same", name=f"pool{block}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(feature_dim, use_bias=False, name="fc")(x)
    outputs = keras.layers.BatchNormalization(
        momentum=_CONV4_BN_MOMENTUM, synchronized=True, name=OUTPUT_NAME
    )(x)
    return keras.Model(inputs, outputs, name="conv4")


BACKBONES: dict[str, Callable[..., keras.Model]] = {
    "lenetpp": lenet_plus_plus,
    "facecnn": face_cnn,
    "conv4": conv4,
}


def build_backbone(
    name: str,
    input_shape: tuple[int, int, int],
    feature_dim: int,
    width: int = 32,
    precision: str = "fp32",
) -> keras.Model:
    """The embedding model registered under `name`, its layers under the `precision` dtype policy."""
    try:
        builder = BACKBONES[name]
    except KeyError:
        raise ValueError(
            f"--backbone: unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}"
        ) from None
    from training.precision import precision_policy

    with precision_policy(precision):
        return builder(input_shape, feature_dim=feature_dim, width=width)


# --- issue 13: arcface_torch face backbones (training/face_backbones.py) and mixed precision ---------------
from training.face_backbones import FACE_BACKBONES  # noqa: E402

BACKBONES.update(FACE_BACKBONES)
