"""Margin head layers: hand-computed logits, margin on the target only in training, finite gradients."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from training.heads import HEADS, make_head, parse_head_options
from training.heads.asoftmax import ASoftmaxHead
from training.heads.combined import AMSoftmaxHead, ArcFaceHead

# Three unit class weights in 2-D at angles 0, pi/2 and pi: the angle between a feature at angle `a` and
# class j is known by hand.
_KERNEL = np.array([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]], np.float32)
_CLASS_ANGLES = (0.0, math.pi / 2, math.pi)


def _with_kernel(head: keras.layers.Layer) -> keras.layers.Layer:
    head.build((None, 2))
    # Scale the kernel to show the head normalises its weights itself.
    head.kernel.assign(3.0 * _KERNEL)
    return head


def _feature(angle: float, radius: float = 2.0) -> tf.Tensor:
    return tf.constant([[radius * math.cos(angle), radius * math.sin(angle)]], tf.float32)


def _plain_cosines(angle: float) -> np.ndarray:
    return np.array([math.cos(angle - c) for c in _CLASS_ANGLES])


def test_asoftmax_m2_target_logit_is_norm_times_psi_and_others_unchanged():
    head = _with_kernel(ASoftmaxHead(3, m=2, lambda_base=0.0, lambda_min=0.0))
    x, label = _feature(math.pi / 3, radius=2.0), tf.constant([0])
    train = head(x, label, training=True).numpy()[0]
    infer = head(x, label, training=False).numpy()[0]
    # theta = pi/3 < pi/2 (k = 0): psi = cos(2pi/3) = -0.5, times ||x|| = 2.
    assert train[0] == pytest.approx(-1.0, abs=1e-5)
    np.testing.assert_allclose(train[1:], 2.0 * _plain_cosines(math.pi / 3)[1:], atol=1e-5)
    np.testing.assert_allclose(infer, 2.0 * _plain_cosines(math.pi / 3), atol=1e-5)


def test_asoftmax_mixes_cos_and_psi_with_lambda():
    head = _with_kernel(ASoftmaxHead(3, m=2, lambda_base=1.0, lambda_gamma=0.0, lambda_min=0.0))
    # lambda = 1: target = ||x|| (cos + psi) / 2 with theta = 2pi/3 (k = 1, psi = -cos(4pi/3) - 2 = -1.5).
    got = head(_feature(2 * math.pi / 3, radius=1.0), tf.constant([0]), training=True).numpy()[0]
    assert got[0] == pytest.approx((-0.5 - 1.5) / 2, abs=1e-5)


def test_asoftmax_lambda_decays_per_training_step_only():
    head = _with_kernel(ASoftmaxHead(3, m=4))
    x, label = _feature(0.3), tf.constant([0])
    assert float(head.current_lambda()) == pytest.approx(1000.0)
    head(x, label, training=False)
    assert float(head.step.numpy()) == 0.0
    head(x, label, training=True)
    head(x, label, training=True)
    assert float(head.step.numpy()) == 2.0
    assert float(head.current_lambda()) == pytest.approx(1000.0 / 1.24, rel=1e-6)


def test_amsoftmax_subtracts_margin_from_target_cosine_then_scales():
    head = _with_kernel(AMSoftmaxHead(3, s=10.0, m=0.35))
    got = head(_feature(0.4, radius=5.0), tf.constant([1]), training=True).numpy()[0]
    expected = 10.0 * _plain_cosines(0.4)
    expected[1] -= 10.0 * 0.35
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_arcface_adds_angle_to_target_then_scales():
    head = _with_kernel(ArcFaceHead(3, s=10.0, m=0.5))
    got = head(_feature(0.4), tf.constant([0]), training=True).numpy()[0]
    expected = 10.0 * _plain_cosines(0.4)
    expected[0] = 10.0 * math.cos(0.4 + 0.5)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_arcface_falls_back_to_linear_penalty_when_theta_plus_m_exceeds_pi():
    head = _with_kernel(ArcFaceHead(3, s=1.0, m=0.5))
    # Feature at angle 3.0 rad from class 0: theta + m = 3.5 > pi.
    got = head(_feature(3.0), tf.constant([0]), training=True).numpy()[0]
    assert got[0] == pytest.approx(math.cos(3.0) - 0.5 * math.sin(0.5), abs=1e-5)


def test_labels_as_column_vector_are_accepted():
    head = _with_kernel(AMSoftmaxHead(3, s=1.0, m=0.2))
    flat = head(_feature(0.4), tf.constant([2]), training=True)
    column = head(_feature(0.4), tf.constant([[2]]), training=True)
    np.testing.assert_allclose(flat.numpy(), column.numpy())


def test_no_labels_means_no_margin_even_in_training():
    head = _with_kernel(ArcFaceHead(3, s=1.0, m=0.5))
    np.testing.assert_allclose(
        head(_feature(0.4), None, training=True).numpy()[0], _plain_cosines(0.4), atol=1e-5
    )


_MARGIN_HEADS = {
    "asoftmax": {"m": 4, "lambda_base": 0.0, "lambda_min": 0.0},
    "amsoftmax": {"s": 30.0, "m": 0.35},
    "arcface": {"s": 64.0, "m": 0.5},
    "arcface_easy": {"s": 64.0, "m": 0.5, "easy_margin": True},
}


@pytest.mark.parametrize("variant", sorted(_MARGIN_HEADS))
@pytest.mark.parametrize("angle", [0.0, 1e-4, math.pi - 1e-4, math.pi])
def test_gradients_are_finite_at_theta_near_zero_and_pi(variant, angle):
    name = variant.removesuffix("_easy")
    head = _with_kernel(make_head(name, 3, **_MARGIN_HEADS[variant]))
    x = tf.Variable(_feature(angle))
    with tf.GradientTape() as tape:
        logits = head(x, tf.constant([0]), training=True)
        loss = tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.constant([0]), logits=logits)
        )
    grads = tape.gradient(loss, [x, head.kernel])
    assert np.all(np.isfinite(logits.numpy()))
    for g in grads:
        assert np.all(np.isfinite(g.numpy()))


@pytest.mark.parametrize("name", sorted(HEADS))
def test_head_runs_with_any_batch_size_in_one_traced_graph(name):
    head = make_head(name, 4)
    # Variables are created outside the function: a first call that creates them is traced twice by design.
    head.build((None, 3))

    @tf.function(
        input_signature=[tf.TensorSpec([None, 3], tf.float32), tf.TensorSpec([None], tf.int32)],
        reduce_retracing=True,
    )
    def step(x, y):
        return head(x, y, training=True)

    rng = np.random.default_rng(0)
    for batch in (1, 5, 8):
        out = step(rng.normal(size=(batch, 3)).astype(np.float32), rng.integers(0, 4, batch).astype(np.int32))
        assert out.shape == (batch, 4)
    assert step.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("name", sorted(HEADS))
def test_head_config_round_trips(name):
    head = make_head(name, 5)
    clone = type(head).from_config(head.get_config())
    assert clone.get_config() == head.get_config()


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("asoftmax", {"m": 5}, "'m' must be one of"),
        ("asoftmax", {"m": 2.5}, "'m' must be one of"),
        ("asoftmax", {"lambda_min": -1.0}, "'lambda_min'"),
        ("amsoftmax", {"s": 0.0}, "'s'"),
        ("arcface", {"s": -1.0}, "'s'"),
        ("arcface", {"s": float("nan")}, "'s'"),
        ("arcface", {"m": 1.6}, "'m' must be in"),
        ("arcface", {"m": -0.1}, "'m' must be in"),
        ("amsoftmax", {"m": 1.5}, "K/\\(K-1\\)"),
        ("combined", {"m2": 0.2, "m3": -0.1}, "'m3'"),
        ("arcface", {"easy_margin": "yes"}, "easy_margin"),
        ("arcface", {"margins": 0.5}, "does not take option"),
        ("nosuchhead", {}, "unknown head"),
    ],
)
def test_invalid_head_options_raise_clear_errors(name, params, message):
    with pytest.raises(ValueError, match=message):
        make_head(name, 5, **params)


def test_generic_margin_and_scale_options_map_to_each_heads_own():
    arc = make_head("arcface", 5, margin=0.3, scale=16.0)
    assert (arc.m2, arc.s) == (0.3, 16.0)
    sphere = make_head("asoftmax", 5, margin=2.0)
    assert sphere.m == 2
    with pytest.raises(ValueError, match="does not take option"):
        make_head("asoftmax", 5, scale=10.0)
    with pytest.raises(ValueError, match="not both"):
        make_head("arcface", 5, margin=0.3, m=0.4)


def test_easy_margin_stored_as_number_in_a_run_config_is_accepted():
    assert make_head("arcface", 5, easy_margin=1.0).easy_margin is True


def test_single_class_is_rejected():
    with pytest.raises(ValueError, match="num_classes"):
        make_head("arcface", 1)


def test_head_options_parse_numbers_and_booleans():
    assert parse_head_options(["m=0.4", "easy_margin=True", " s = 16 "]) == {
        "m": 0.4,
        "easy_margin": 1.0,
        "s": 16.0,
    }
    assert parse_head_options(None) == {}


@pytest.mark.parametrize(
    ("items", "message"),
    [(["m"], "KEY=VALUE"), (["=1"], "KEY=VALUE"), (["m=big"], "not a number"), (["m=1", "m=2"], "twice")],
)
def test_malformed_head_options_are_refused(items, message):
    with pytest.raises(ValueError, match=message):
        parse_head_options(items)
