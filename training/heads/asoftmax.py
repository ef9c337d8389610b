"""A-Softmax (SphereFace, Liu et al. 2017): target logit ||x|| * psi(theta) with an annealed softmax mix.

Target logit during training: ||x|| * (lambda * cos(theta) + psi(theta)) / (1 + lambda), other logits
||x|| * cos(theta_j), weights of unit norm and no bias. lambda starts large (nearly plain softmax, which lets
the features separate first) and decays per training step as in the SphereFace Caffe layer:
lambda = max(lambda_min, base * (1 + gamma * step) ** -power). The step count is a layer variable, so it is
saved in checkpoints and a resumed run continues the schedule where it stopped; it is a scalar, so nothing in
the graph depends on the batch size.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import tensorflow as tf

from training.heads.cosine import CosineHead
from training.heads.margins import ASOFTMAX_MARGINS, sphereface_lambda, sphereface_psi


def _check_non_negative(value: float, option: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"A-Softmax option {option!r} must be a finite number >= 0, got {value!r}")
    return float(value)


@keras.saving.register_keras_serializable(package="idembed")
class ASoftmaxHead(CosineHead):
    """SphereFace head. `m` in {1, 2, 3, 4} (1 = normalised-weight softmax); defaults are SphereFace's."""

    def __init__(
        self,
        num_classes: int,
        m: int = 4,
        lambda_base: float = 1000.0,
        lambda_gamma: float = 0.12,
        lambda_power: float = 1.0,
        lambda_min: float = 5.0,
        **kwargs: Any,
    ):
        super().__init__(num_classes, **kwargs)
        if isinstance(m, bool) or m not in ASOFTMAX_MARGINS:
            raise ValueError(f"A-Softmax option 'm' must be one of {list(ASOFTMAX_MARGINS)}, got {m!r}")
        self.m = int(m)
        self.lambda_base = _check_non_negative(lambda_base, "lambda_base")
        self.lambda_gamma = _check_non_negative(lambda_gamma, "lambda_gamma")
        self.lambda_power = _check_non_negative(lambda_power, "lambda_power")
        self.lambda_min = _check_non_negative(lambda_min, "lambda_min")

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        super().build(input_shape)
        # float32 counts steps exactly up to 2**24 (16.7M), far beyond where lambda has reached lambda_min.
        # Under tf.distribute every replica runs the same step, so only the first replica's increment counts.
        self.step = self.add_weight(
            name="step",
            shape=(),
            initializer="zeros",
            dtype="float32",
            trainable=False,
            aggregation="only_first_replica",
        )

    def current_lambda(self) -> tf.Tensor:
        """The annealing weight the next training step will use."""
        return sphereface_lambda(
            self.step, self.lambda_base, self.lambda_gamma, self.lambda_power, self.lambda_min
        )

    def _target_logit(self, cos_target: tf.Tensor) -> tf.Tensor:
        lam = self.current_lambda()
        self.step.assign_add(1.0)
        return (lam * cos_target + sphereface_psi(cos_target, self.m)) / (1.0 + lam)

    def _scale(self, cos: tf.Tensor, norm: tf.Tensor) -> tf.Tensor:
        return cos * tf.expand_dims(norm, 1)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "m": self.m,
            "lambda_base": self.lambda_base,
            "lambda_gamma": self.lambda_gamma,
            "lambda_power": self.lambda_power,
            "lambda_min": self.lambda_min,
        }
