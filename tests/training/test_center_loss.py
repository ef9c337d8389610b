"""Center-loss value and update rules, checked against numbers computed by hand (written out below)."""

import numpy as np
import pytest
import tensorflow as tf

from training.center_loss import (
    batch_class_statistics,
    center_loss,
    update_centers,
    update_centers_facenet,
    update_centers_gradient,
    update_centers_paper,
)

# Toy batch: 3 classes in 2-D; class 0 appears twice, class 1 once, class 2 not at all.
CENTERS = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, -2.0]], dtype=np.float32)
FEATURES = np.array([[1.0, 0.0], [3.0, 0.0], [1.0, 3.0]], dtype=np.float32)
LABELS = np.array([0, 0, 1], dtype=np.int32)


def _stats(features=FEATURES, labels=LABELS, k=3):
    return batch_class_statistics(tf.constant(features), tf.constant(labels), k)


def test_center_loss_value_is_half_mean_squared_distance():
    # 0.5*|(1,0)-(0,0)|^2 = 0.5, 0.5*|(3,0)-(0,0)|^2 = 4.5, 0.5*|(1,3)-(1,1)|^2 = 2.0 -> mean 7/3
    value = center_loss(tf.constant(FEATURES), tf.constant(LABELS), tf.constant(CENTERS))
    assert float(value) == pytest.approx(7.0 / 3.0, abs=1e-6)


def test_class_statistics_are_per_class_sums_and_counts():
    sums, counts = _stats()
    np.testing.assert_allclose(sums.numpy(), [[4.0, 0.0], [1.0, 3.0], [0.0, 0.0]])
    np.testing.assert_allclose(counts.numpy(), [2.0, 1.0, 0.0])


def test_paper_rule_matches_hand_computed_centers():
    # class 0: sum(c - x) = (-4, 0), n = 2 -> delta = (-4/3, 0); c = 0 - 0.5 * delta = (2/3, 0)
    # class 1: sum(c - x) = (0, -2), n = 1 -> delta = (0, -1);   c = (1, 1) - 0.5 * delta = (1, 1.5)
    # class 2: absent -> unchanged (2, -2)
    sums, counts = _stats()
    new = update_centers_paper(tf.constant(CENTERS), sums, counts, 0.5).numpy()
    np.testing.assert_allclose(new, [[2.0 / 3.0, 0.0], [1.0, 1.5], [2.0, -2.0]], atol=1e-6)


def test_facenet_rule_accumulates_duplicates_like_scatter_sub():
    # (1 - alfa) = 0.5. class 0 diffs from the OLD center: 0.5*(0-1, 0) = (-0.5, 0), 0.5*(0-3, 0) = (-1.5, 0),
    # both subtracted: c0 = (2, 0). class 1: 0.5*((1,1)-(1,3)) = (0, -1) -> c1 = (1, 2). class 2 unchanged.
    sums, counts = _stats()
    new = update_centers_facenet(tf.constant(CENTERS), sums, counts, 0.5).numpy()
    np.testing.assert_allclose(new, [[2.0, 0.0], [1.0, 2.0], [2.0, -2.0]], atol=1e-6)


def test_facenet_rule_equals_tensor_scatter_sub_on_random_batch_with_duplicates():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 4)).astype(np.float32)
    x = rng.normal(size=(32, 4)).astype(np.float32)
    y = rng.integers(0, 4, size=32).astype(np.int32)  # class 4 never appears; the others repeat
    alfa = 0.9
    diff = (1 - alfa) * (tf.gather(centers, y) - x)
    expected = tf.tensor_scatter_nd_sub(centers, y[:, None], diff).numpy()
    sums, counts = _stats(x, y, 5)
    got = update_centers_facenet(tf.constant(centers), sums, counts, alfa).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_array_equal(got[4], centers[4])


def test_paper_rule_equals_per_class_loop_on_random_batch():
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(6, 3)).astype(np.float32)
    x = rng.normal(size=(40, 3)).astype(np.float32)
    y = rng.integers(0, 5, size=40).astype(np.int32)
    expected = centers.copy()
    for j in range(6):  # Eq. 4 literally, one class at a time (the reference, not the implementation)
        members = x[y == j]
        if len(members):
            expected[j] -= 0.3 * np.sum(centers[j] - members, axis=0) / (1 + len(members))
    sums, counts = _stats(x, y, 6)
    got = update_centers_paper(tf.constant(centers), sums, counts, 0.3).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_gradient_rule_is_an_sgd_step_on_the_center_loss():
    # hand: grad c0 = (2*(0,0) - (4,0)) / 3 = (-4/3, 0) -> c0 = 0 - 0.3*grad = (0.4, 0)
    #       grad c1 = ((1,1) - (1,3)) / 3 = (0, -2/3)  -> c1 = (1, 1 + 0.2) = (1, 1.2)
    sums, counts = _stats()
    new = update_centers_gradient(tf.constant(CENTERS), sums, counts, 3.0, 0.3).numpy()
    np.testing.assert_allclose(new, [[0.4, 0.0], [1.0, 1.2], [2.0, -2.0]], atol=1e-6)
    var = tf.Variable(CENTERS)
    with tf.GradientTape() as tape:
        loss = center_loss(tf.constant(FEATURES), tf.constant(LABELS), var)
    grad = tf.convert_to_tensor(tape.gradient(loss, var))  # gather gives IndexedSlices
    np.testing.assert_allclose(new, (var - 0.3 * grad).numpy(), atol=1e-6)


@pytest.mark.parametrize("rule", ["paper", "facenet", "gradient"])
def test_zero_count_classes_keep_their_centers_exactly(rule):
    centers = tf.constant([[1.5, -0.25], [7.0, 3.0], [-2.0, 9.0]])
    x = tf.constant([[0.0, 1.0], [2.0, 2.0]])
    sums, counts = batch_class_statistics(x, tf.constant([1, 1]), 3)
    new = update_centers(rule, centers, sums, counts, alpha=0.5, batch_size=2.0, center_lr=0.5).numpy()
    np.testing.assert_array_equal(new[[0, 2]], centers.numpy()[[0, 2]])
    assert not np.allclose(new[1], centers.numpy()[1])


def test_paper_rule_with_two_classes_and_alpha_one_stays_finite_and_bounded():
    # Many steps, alpha = 1, one class absent half of the time: no 0/0, no overshoot (a center ends up
    # between its old value and the batch mean, since n / (1 + n) < 1).
    rng = np.random.default_rng(2)
    centers = tf.zeros((2, 2))
    for step in range(200):
        label = (
            np.full(8, step % 2, dtype=np.int32) if step % 3 == 0 else rng.integers(0, 2, 8).astype(np.int32)
        )
        x = (rng.normal(size=(8, 2)) * 1e3 + 5e3).astype(np.float32)
        sums, counts = batch_class_statistics(tf.constant(x), tf.constant(label), 2)
        old = centers.numpy()
        centers = update_centers_paper(centers, sums, counts, 1.0)
        assert np.all(np.isfinite(centers.numpy()))
        mean = sums.numpy() / np.maximum(counts.numpy()[:, None], 1)
        present = counts.numpy() > 0
        lo, hi = np.minimum(old, mean), np.maximum(old, mean)
        assert np.all(
            (centers.numpy()[present] >= lo[present] - 1e-2)
            & (centers.numpy()[present] <= hi[present] + 1e-2)
        )


def test_none_rule_returns_centers_unchanged():
    sums, counts = _stats()
    new = update_centers("none", tf.constant(CENTERS), sums, counts, alpha=0.5, batch_size=3.0, center_lr=1.0)
    np.testing.assert_array_equal(new.numpy(), CENTERS)


def test_unknown_rule_is_rejected_by_name():
    sums, counts = _stats()
    with pytest.raises(ValueError, match="unknown center update rule 'mean'"):
        update_centers("mean", tf.constant(CENTERS), sums, counts, alpha=0.5, batch_size=3.0, center_lr=1.0)


def test_rules_work_inside_tf_function():
    @tf.function
    def step(c, x, y):
        s, n = batch_class_statistics(x, y, 3)
        return update_centers_paper(c, s, n, 0.5)

    got = step(tf.constant(CENTERS), tf.constant(FEATURES), tf.constant(LABELS)).numpy()
    np.testing.assert_allclose(got, [[2.0 / 3.0, 0.0], [1.0, 1.5], [2.0, -2.0]], atol=1e-6)
