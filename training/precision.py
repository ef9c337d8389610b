"""Mixed precision: `--precision fp32 | mixed_bfloat16 | mixed_float16` for the backbone only.

Only the backbone is built under the Keras mixed policy (bfloat16 or float16 compute, float32 variables). Its
output layer computes in float32 (see `training.face_backbones`), and the head, the centers, the center
update and every loss are built outside the policy, so they stay float32: the margins and the center
statistics need the precision, and the centers are saved as they are trained. mixed_float16 needs loss
scaling (float16 gradients underflow), so its optimizer is a `LossScaleOptimizer`; bfloat16 has float32's
exponent range and needs none. mixed_bfloat16 is the CPU choice (oneDNN bf16 kernels), mixed_float16 the GPU
one.

The exported model is always float32: `float32_copy` rebuilds the trained backbone with a float32 policy and
copies the (float32) weights, so ONNX parity and the service are unaffected by the training precision.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import keras

from training.config import PRECISIONS

_POLICIES = {"fp32": "float32", "mixed_bfloat16": "mixed_bfloat16", "mixed_float16": "mixed_float16"}


def check_precision(precision: str) -> str:
    if precision not in _POLICIES:
        choices = ", ".join(PRECISIONS)
        raise ValueError(f"--precision: unknown precision {precision!r}; choose one of {choices}")
    return precision


@contextmanager
def precision_policy(precision: str) -> Iterator[None]:
    """Build layers under the Keras dtype policy of `precision`; the previous global policy is restored."""
    policy = _POLICIES[check_precision(precision)]
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def wrap_optimizer(optimizer: keras.optimizers.Optimizer, precision: str) -> keras.optimizers.Optimizer:
    """The optimizer for `precision`: loss-scaled for mixed_float16, unchanged otherwise."""
    if check_precision(precision) == "mixed_float16":
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def _float32_policies(value: Any) -> Any:
    if isinstance(value, dict):
        if value.get("class_name") == "DTypePolicy" and isinstance(value.get("config"), dict):
            return {**value, "config": {**value["config"], "name": "float32"}}
        return {k: _float32_policies(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_float32_policies(v) for v in value]
    if isinstance(value, str) and value in ("mixed_bfloat16", "mixed_float16"):
        return "float32"
    return value


def is_mixed(model: keras.Model) -> bool:
    return any(layer.dtype_policy.name != "float32" for layer in model.layers)


def float32_copy(model: keras.Model) -> keras.Model:
    """The same functional model with every layer in float32 and the same weights (a no-op if fp32)."""
    if not is_mixed(model):
        return model
    config = _float32_policies(model.get_config())
    with precision_policy("fp32"):
        copy = model.__class__.from_config(config)
    copy.set_weights(model.get_weights())
    return copy
