"""Base layer of the margin heads: unit-norm class weights, cosine logits, margin only in training.

Subclasses say how the target logit changes (`_target_logit`) and how every logit is scaled (`_scale`); the
base layer does the shared work so the three margin heads differ only in their formula.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import tensorflow as tf

from bundle.files import NORM_EPS
from training.heads.margins import replace_target, target_cosine


def l2_norm_tf(x: tf.Tensor, axis: int) -> tf.Tensor:
    """||x|| along `axis` with the squared norm floored at `bundle.files.NORM_EPS`: never 0, so an all-zero
    feature vector (a ReLU feature layer at initialisation) gives 0, not 0/0, with bounded gradients."""
    return tf.sqrt(tf.maximum(tf.reduce_sum(x * x, axis=axis), NORM_EPS))


def l2_normalize_tf(x: tf.Tensor, axis: int) -> tf.Tensor:
    """`bundle.files.l2_normalize` in a TensorFlow graph (same epsilon; tests/training/test_heads_layers.py
    pins the two equal)."""
    return tf.nn.l2_normalize(x, axis=axis, epsilon=NORM_EPS)


def check_scale(s: float, option: str = "s") -> float:
    """A logit scale must be a finite number > 0; anything else makes softmax degenerate or undefined."""
    if not isinstance(s, int | float) or isinstance(s, bool) or not math.isfinite(s) or s <= 0:
        raise ValueError(f"head option {option!r} (scale) must be a finite number > 0, got {s!r}")
    return float(s)


def check_num_classes(num_classes: int) -> int:
    """Softmax over fewer than two classes has nothing to separate."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return num_classes


class CosineHead(keras.layers.Layer):
    """Logits from cos(theta_j) between the features and unit-norm class weights W_j (no bias).

    Called as `head(features, labels, training=...)`; the margin changes the target logit only when training
    and labels are given, so evaluation logits are plain (scaled) cosines and the other K-1 logits of a row
    are never touched.
    """

    def __init__(self, num_classes: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.num_classes = check_num_classes(num_classes)

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        self.kernel = self.add_weight(
            name="kernel",
            shape=(int(input_shape[-1]), self.num_classes),
            initializer="glorot_uniform",
            trainable=True,
        )
        super().build(input_shape)

    def cosine(self, features: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(cos [B, K], ||x|| [B]) in float32 whatever the compute dtype (margins need the precision)."""
        x = tf.cast(features, tf.float32)
        norm = l2_norm_tf(x, axis=1)
        w = l2_normalize_tf(tf.cast(self.kernel, tf.float32), axis=0)
        cos = tf.matmul(x / tf.expand_dims(norm, 1), w)
        return tf.clip_by_value(cos, -1.0, 1.0), norm

    def call(self, features: tf.Tensor, labels: tf.Tensor | None = None, training: bool | None = None):
        cos, norm = self.cosine(features)
        if training and labels is not None:
            labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
            target = self._target_logit(target_cosine(cos, labels))
            cos = replace_target(cos, target, labels)
        return self._scale(cos, norm)

    def _target_logit(self, cos_target: tf.Tensor) -> tf.Tensor:
        """The margin formula applied to the [B] target cosines (before scaling); no margin by default."""
        return cos_target

    def _scale(self, cos: tf.Tensor, norm: tf.Tensor) -> tf.Tensor:
        """Turn (margined) cosines into logits; the default is the identity."""
        return cos

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_classes": self.num_classes}
