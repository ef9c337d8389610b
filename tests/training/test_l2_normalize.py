"""One L2 normalisation: `bundle.files.l2_normalize` (numpy, service and evaluation) and the TensorFlow one of
the heads (`training/heads/cosine.py`) give the same vectors, tiny and zero ones included."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from bundle.files import NORM_EPS, l2_normalize  # noqa: E402
from training.heads.cosine import l2_norm_tf, l2_normalize_tf  # noqa: E402


def _vectors() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 5)).astype(np.float32) * np.float32([1e3, 1, 1e-3, 1e-6, 1e-8, 0])[:, None]
    return x


@pytest.mark.parametrize("axis", [1, 0])
def test_tensorflow_and_numpy_normalise_alike(axis: int) -> None:
    x = _vectors()
    expected = np.moveaxis(l2_normalize(np.moveaxis(x, axis, -1)), -1, axis)
    got = l2_normalize_tf(tf.constant(x), axis=axis).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_the_norm_is_floored_alike_and_a_zero_vector_stays_zero() -> None:
    x = _vectors()
    norms = l2_norm_tf(tf.constant(x), axis=1).numpy()
    np.testing.assert_allclose(norms, np.maximum(np.linalg.norm(x, axis=1), np.sqrt(NORM_EPS)), rtol=1e-6)
    unit = l2_normalize(x)
    np.testing.assert_allclose(np.linalg.norm(unit[:4], axis=1), 1.0, rtol=1e-6)
    assert np.all(unit[5] == 0) and np.all(np.isfinite(unit))
    # Below the floor (norm 1e-8 < 1e-6) a vector is scaled by 1e6, not to unit length, in both.
    np.testing.assert_allclose(np.linalg.norm(unit[4]), np.linalg.norm(x[4]) / np.sqrt(NORM_EPS), rtol=1e-5)


def test_the_gradient_through_a_zero_vector_is_finite() -> None:
    x = tf.Variable(np.zeros((2, 4), np.float32))
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(l2_normalize_tf(x, axis=1)) + tf.reduce_sum(l2_norm_tf(x, axis=1))
    grad = tape.gradient(y, x).numpy()
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() <= 1.0 / np.sqrt(NORM_EPS) + 1


def test_numpy_keeps_the_asked_dtype() -> None:
    x = _vectors()
    assert l2_normalize(x).dtype == np.float32
    as64 = l2_normalize(x, dtype=np.float64)
    assert as64.dtype == np.float64
    np.testing.assert_allclose(as64, l2_normalize(x), rtol=1e-6, atol=1e-7)
