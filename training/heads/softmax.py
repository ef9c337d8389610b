"""Plain softmax head: an affine layer from features to class logits (the paper's baseline)."""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="idembed")
class SoftmaxHead(keras.layers.Layer):
    def __init__(self, num_classes: int, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.dense = keras.layers.Dense(self.num_classes, name="logits")

    def build(self, input_shape):
        self.dense.build(input_shape)
        super().build(input_shape)

    def call(self, features, labels=None, training=False):
        return self.dense(features)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}
