"""Margin formulas on cosines: SphereFace psi, the combined ArcFace/CosFace margin, the lambda schedule.

Pure tensor functions (no state) so each one is tested with hand-computed numbers. Everything is written
in terms of cos(theta), never theta itself: `acos` has an infinite derivative at cos = +-1, which is exactly
where well-trained features sit, so going through the angle would produce NaN gradients.
"""

from __future__ import annotations

import math

import tensorflow as tf

# Chebyshev polynomials T_m with T_m(cos theta) = cos(m theta): SphereFace's own trick for cos(m theta)
# without acos. Coefficients are lowest power first.
_CHEBYSHEV: dict[int, tuple[float, ...]] = {
    1: (0.0, 1.0),
    2: (-1.0, 0.0, 2.0),
    3: (0.0, -3.0, 0.0, 4.0),
    4: (1.0, 0.0, -8.0, 0.0, 8.0),
}
ASOFTMAX_MARGINS: tuple[int, ...] = tuple(sorted(_CHEBYSHEV))

# Keeps sqrt(1 - cos^2) away from 0 where its derivative is infinite (theta near 0 or pi).
_SIN_EPS = 1e-7


def cos_m_theta(cos: tf.Tensor, m: int) -> tf.Tensor:
    """cos(m * theta) from cos(theta) via the Chebyshev polynomial T_m (finite gradient for all theta)."""
    coeffs = _CHEBYSHEV[m]
    # Horner's rule, highest power first.
    out = tf.fill(tf.shape(cos), tf.constant(coeffs[-1], cos.dtype))
    for c in reversed(coeffs[:-1]):
        out = out * cos + c
    return out


def sphereface_psi(cos: tf.Tensor, m: int) -> tf.Tensor:
    """SphereFace psi(theta) = (-1)^k cos(m theta) - 2k for theta in [k pi/m, (k+1) pi/m], k in 0..m-1.

    psi is continuous and monotonically decreasing on [0, pi], from 1 at theta = 0 to 1 - 2m at theta = pi.
    The interval index k counts the boundaries j*pi/m (j = 1..m-1) that theta has passed; comparing cosines
    instead of angles (theta >= j*pi/m  <=>  cos <= cos(j*pi/m)) keeps the function free of acos.
    """
    if m not in _CHEBYSHEV:
        raise ValueError(f"A-Softmax margin m must be one of {ASOFTMAX_MARGINS}, got {m!r}")
    cos = tf.clip_by_value(cos, -1.0, 1.0)
    k = tf.zeros_like(cos)
    for j in range(1, m):
        k += tf.cast(cos <= math.cos(j * math.pi / m), cos.dtype)
    sign = 1.0 - 2.0 * tf.math.floormod(k, 2.0)
    return sign * cos_m_theta(cos, m) - 2.0 * k


def combined_margin(cos: tf.Tensor, m2: float = 0.0, m3: float = 0.0, easy_margin: bool = False) -> tf.Tensor:
    """insightface's combined margin without the scale: cos(theta + m2) - m3 (ArcFace m2, CosFace m3).

    cos(theta + m2) only decreases with theta while theta + m2 <= pi. Past that point (cos <= cos(pi - m2))
    the standard ArcFace fix continues with the linear penalty cos - m2 * sin(m2), which keeps the target
    logit monotonic and below cos. `easy_margin` instead applies the angular margin only where cos > 0 and
    leaves the target logit unchanged elsewhere.
    """
    cos = tf.clip_by_value(cos, -1.0, 1.0)
    if m2 != 0.0:
        sin = tf.sqrt(tf.clip_by_value(1.0 - cos * cos, _SIN_EPS, 1.0))
        cos_plus = cos * math.cos(m2) - sin * math.sin(m2)
        if easy_margin:
            cos = tf.where(cos > 0.0, cos_plus, cos)
        else:
            threshold = math.cos(math.pi - m2)
            cos = tf.where(cos > threshold, cos_plus, cos - math.sin(math.pi - m2) * m2)
    return cos - m3


def sphereface_lambda(
    step: tf.Tensor, base: float, gamma: float, power: float, lambda_min: float
) -> tf.Tensor:
    """SphereFace's annealing weight: lambda = max(lambda_min, base * (1 + gamma * step) ** -power)."""
    step = tf.cast(step, tf.float32)
    return tf.maximum(lambda_min, base * tf.pow(1.0 + gamma * step, -power))


def target_cosine(cos: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """cos(theta_{y_i}) for each row: the [B] entries of the [B, K] matrix `cos` at the label columns."""
    return tf.gather(cos, labels, axis=1, batch_dims=1)


def replace_target(logits: tf.Tensor, target: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """Replace logits[i, y_i] by target[i]; every other logit (and its gradient) is left unchanged."""
    current = target_cosine(logits, labels)
    one_hot = tf.one_hot(labels, tf.shape(logits)[1], dtype=logits.dtype)
    return logits + one_hot * tf.expand_dims(target - current, 1)
