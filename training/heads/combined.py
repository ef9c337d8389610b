"""Additive-margin heads: s * (cos(theta + m2) - m3) on the target logit (ArcFace m2, AM-Softmax/CosFace m3).

One formula for the family, as in insightface's CombinedMarginLoss; `ArcFaceHead` and `AMSoftmaxHead` are that
head with one margin fixed at zero and the papers' default scales and margins. Features and weights are both
L2-normalised, so every logit is s * cos(theta_j) and only the target one carries the margin. SphereFace's
multiplicative margin is not expressed here: its exact piecewise psi lives in `training.heads.asoftmax`.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import tensorflow as tf

from training.heads.cosine import CosineHead, check_num_classes, check_scale
from training.heads.margins import combined_margin


def _check_range(value: float, option: str, high: float, high_open: bool, why: str) -> float:
    ok_type = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    inside = ok_type and value >= 0 and (value < high if high_open else value <= high)
    if not inside:
        bracket = ")" if high_open else "]"
        raise ValueError(f"head option {option!r} must be in [0, {high:.4g}{bracket}, got {value!r}: {why}")
    return float(value)


def check_warmup(value: float) -> float:
    """Epochs over which the margin is phased in; 0 = the full margin from the first step."""
    ok = (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    )
    if not ok:
        raise ValueError(f"head option 'warmup_epochs' must be a finite number >= 0, got {value!r}")
    return float(value)


def check_angular_margin(value: float, option: str = "m2") -> float:
    """ArcFace's additive angle must lie in [0, pi/2)."""
    return _check_range(
        value,
        option,
        math.pi / 2,
        True,
        "at an angular margin >= pi/2 even a feature aligned with its class weight gets cos(m) <= 0, "
        "so the target logit no longer rewards alignment",
    )


def check_cosine_margin(value: float, num_classes: int, option: str = "m3") -> float:
    """CosFace's cosine margin must lie in [0, K/(K-1)].

    CosFace (Wang et al. 2018, Sec. 3.4): with K classes no arrangement of features can satisfy a larger
    cosine margin, so the loss could never be driven down.
    """
    return _check_range(
        value,
        option,
        num_classes / (num_classes - 1),
        False,
        f"a cosine margin above K/(K-1) cannot be met by any arrangement of K={num_classes} classes",
    )


@keras.saving.register_keras_serializable(package="idembed")
class CombinedMarginHead(CosineHead):
    """Target logit s * (cos(theta + m2) - m3), others s * cos(theta_j); see `margins.combined_margin`."""

    def __init__(
        self,
        num_classes: int,
        s: float = 64.0,
        m2: float = 0.5,
        m3: float = 0.0,
        easy_margin: bool = False,
        warmup_epochs: float = 0.0,
        **kwargs: Any,
    ):
        super().__init__(num_classes, **kwargs)
        self.s = check_scale(s)
        self.m2 = check_angular_margin(m2)
        self.m3 = check_cosine_margin(m3, self.num_classes)
        # 0/1 are accepted because run configs store head options as numbers.
        if easy_margin not in (True, False):
            raise ValueError(f"head option 'easy_margin' must be true or false, got {easy_margin!r}")
        self.easy_margin = bool(easy_margin)
        self.warmup_epochs = check_warmup(warmup_epochs)

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        super().build(input_shape)
        # The share r of the margin in force: target = (1 - r) cos + r * margined. `MarginWarmup` raises it
        # from 0 to 1 over `warmup_epochs` (SphereFace anneals its margin the same way, with lambda); 1 = the
        # plain margin formula, exactly.
        self.margin_ramp = self.add_weight(
            name="margin_ramp",
            shape=(),
            initializer=keras.initializers.Constant(0.0 if self.warmup_epochs > 0 else 1.0),
            trainable=False,
        )

    def _target_logit(self, cos_target: tf.Tensor) -> tf.Tensor:
        margined = combined_margin(cos_target, m2=self.m2, m3=self.m3, easy_margin=self.easy_margin)
        if self.warmup_epochs == 0:
            return margined
        r = tf.cast(self.margin_ramp, cos_target.dtype)
        return (1.0 - r) * cos_target + r * margined

    def _scale(self, cos: tf.Tensor, norm: tf.Tensor) -> tf.Tensor:
        return self.s * cos

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "s": self.s,
            "m2": self.m2,
            "m3": self.m3,
            "easy_margin": self.easy_margin,
            "warmup_epochs": self.warmup_epochs,
        }


@keras.saving.register_keras_serializable(package="idembed")
class ArcFaceHead(CombinedMarginHead):
    """ArcFace (Deng et al. 2019): s * cos(theta + m); defaults s=64, m=0.5 as in the paper."""

    def __init__(
        self,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.5,
        easy_margin: bool = False,
        warmup_epochs: float = 0.0,
        **kwargs: Any,
    ):
        check_angular_margin(m, "m")
        super().__init__(
            num_classes, s=s, m2=m, m3=0.0, easy_margin=easy_margin, warmup_epochs=warmup_epochs, **kwargs
        )

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["m"] = config.pop("m2")
        config.pop("m3")
        return config


@keras.saving.register_keras_serializable(package="idembed")
class AMSoftmaxHead(CombinedMarginHead):
    """AM-Softmax / CosFace (Wang et al. 2018): s * (cos theta - m); AM-Softmax's defaults s=30, m=0.35."""

    def __init__(
        self, num_classes: int, s: float = 30.0, m: float = 0.35, warmup_epochs: float = 0.0, **kwargs: Any
    ):
        check_cosine_margin(m, check_num_classes(num_classes), "m")
        super().__init__(num_classes, s=s, m2=0.0, m3=m, warmup_epochs=warmup_epochs, **kwargs)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["m"] = config.pop("m3")
        config.pop("m2")
        config.pop("easy_margin")
        return config
