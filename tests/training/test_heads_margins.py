"""Margin formulas against hand-computed values: SphereFace psi, combined ArcFace/CosFace margin, lambda."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from training.heads.margins import (
    combined_margin,
    cos_m_theta,
    replace_target,
    sphereface_lambda,
    sphereface_psi,
)


def _cos(*thetas: float) -> tf.Tensor:
    return tf.constant([math.cos(t) for t in thetas], tf.float32)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_chebyshev_gives_cos_m_theta(m):
    thetas = np.linspace(0.0, math.pi, 13)
    got = cos_m_theta(_cos(*thetas), m).numpy()
    np.testing.assert_allclose(got, np.cos(m * thetas), atol=1e-5)


@pytest.mark.parametrize(
    ("m", "theta", "expected"),
    [
        # k = 0: psi = cos(2 theta)
        (2, 0.0, 1.0),
        (2, math.pi / 4, 0.0),
        (2, math.pi / 3, -0.5),
        # k = 1: psi = -cos(2 theta) - 2
        (2, 2 * math.pi / 3, 0.5 - 2.0),
        (2, math.pi, -3.0),
        # m = 3, theta = pi/2 lies in [pi/3, 2pi/3]: k = 1, psi = -cos(3pi/2) - 2 = -2
        (3, math.pi / 2, -2.0),
        # m = 3, theta = 5pi/6 in [2pi/3, pi]: k = 2, psi = cos(5pi/2) - 4 = -4
        (3, 5 * math.pi / 6, -4.0),
        # m = 4, theta = pi: k = 3, psi = -cos(4pi) - 6 = -7 = 1 - 2m
        (4, math.pi, -7.0),
        # m = 1 is plain cos
        (1, 1.0, math.cos(1.0)),
    ],
)
def test_sphereface_psi_matches_hand_computed_values(m, theta, expected):
    assert sphereface_psi(_cos(theta), m).numpy()[0] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_sphereface_psi_is_continuous_and_decreasing_in_theta(m):
    thetas = np.linspace(0.0, math.pi, 2001)
    psi = sphereface_psi(_cos(*thetas), m).numpy()
    assert np.all(np.diff(psi) <= 1e-5)
    # No jump at the interval boundaries k*pi/m: neighbouring samples stay close.
    assert np.max(np.abs(np.diff(psi))) < 0.05
    assert psi[0] == pytest.approx(1.0, abs=1e-5)
    assert psi[-1] == pytest.approx(1.0 - 2.0 * m, abs=1e-4)


def test_sphereface_psi_rejects_margin_outside_allowed_set():
    with pytest.raises(ValueError, match="must be one of"):
        sphereface_psi(_cos(0.5), 5)


def test_arcface_margin_adds_angle_where_theta_plus_m_stays_below_pi():
    got = combined_margin(_cos(math.pi / 3), m2=0.5).numpy()[0]
    assert got == pytest.approx(math.cos(math.pi / 3 + 0.5), abs=1e-6)


def test_arcface_margin_uses_linear_penalty_past_pi():
    # theta + m = 3.5 > pi: cos(theta + m) would start increasing again; the fix gives cos - m sin(m).
    got = combined_margin(_cos(3.0), m2=0.5).numpy()[0]
    assert got == pytest.approx(math.cos(3.0) - 0.5 * math.sin(0.5), abs=1e-6)
    assert got < math.cos(3.0)


def test_arcface_easy_margin_leaves_obtuse_angles_unchanged():
    got = combined_margin(_cos(2.0, 1.0), m2=0.5, easy_margin=True).numpy()
    assert got[0] == pytest.approx(math.cos(2.0), abs=1e-6)
    assert got[1] == pytest.approx(math.cos(1.5), abs=1e-6)


def test_cosface_margin_subtracts_from_cosine():
    got = combined_margin(_cos(0.7), m3=0.35).numpy()[0]
    assert got == pytest.approx(math.cos(0.7) - 0.35, abs=1e-6)


def test_combined_margin_is_decreasing_over_the_whole_angle_range():
    thetas = np.linspace(0.0, math.pi, 1001)
    got = combined_margin(_cos(*thetas), m2=0.5, m3=0.2).numpy()
    assert np.all(np.diff(got) <= 1e-6)


def test_sphereface_lambda_follows_the_caffe_schedule():
    steps = tf.constant([0.0, 1.0, 100.0, 1e6])
    got = sphereface_lambda(steps, base=1000.0, gamma=0.12, power=1.0, lambda_min=5.0).numpy()
    expected = [1000.0, 1000.0 / 1.12, 1000.0 / 13.0, 5.0]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_replace_target_changes_only_the_label_column():
    logits = tf.constant([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    got = replace_target(logits, tf.constant([-1.0, -2.0]), tf.constant([2, 0])).numpy()
    np.testing.assert_allclose(got, [[1.0, 2.0, -1.0], [-2.0, 5.0, 6.0]])
