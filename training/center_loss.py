"""Center loss: the loss value and the three center-update rules, as pure vectorised TensorFlow functions.

The rules are written on per-class *sufficient statistics* of a batch — `class_sums[j] = sum_{i: y_i=j} x_i`
and `class_counts[j] = n_j` — rather than on the raw batch. Every rule in Wen et al. (ECCV 2016) and in
facenet only needs these two tensors, and they add up across devices: under `tf.distribute.MirroredStrategy`
the trainer all-reduces them once per step and every replica then applies the same rule to the same numbers,
so N replicas give the centers one replica gives on the same global batch (see `batch_class_statistics`).

Reduction of the loss value (documented because implementations differ; the MXNet op divides by 2B):

    center_loss = 0.5 * mean_i ||x_i - c_{y_i}||^2     (mean over the GLOBAL batch of size B)

which equals the MXNet `sum / (2B)`. The training objective is `cross_entropy + lambda * center_loss`; the
gradient reaches the features only, because the trainer feeds `tf.stop_gradient(centers)` here.
"""

from __future__ import annotations

import tensorflow as tf

from training.center_rules import UPDATE_RULES

__all__ = ["UPDATE_RULES"]


def center_loss_per_example(features: tf.Tensor, labels: tf.Tensor, centers: tf.Tensor) -> tf.Tensor:
    """`0.5 * ||x_i - c_{y_i}||^2` for every example, shape `[B]`; average it over the batch for the loss."""
    diff = features - tf.gather(centers, labels)
    return 0.5 * tf.reduce_sum(tf.square(diff), axis=-1)


def center_loss(features: tf.Tensor, labels: tf.Tensor, centers: tf.Tensor) -> tf.Tensor:
    """The center-loss value `0.5 * mean_i ||x_i - c_{y_i}||^2` of one (single-device) batch."""
    return tf.reduce_mean(center_loss_per_example(features, labels, centers))


def batch_class_statistics(
    features: tf.Tensor, labels: tf.Tensor, num_classes: int
) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-class feature sums `[K, D]` and counts `[K]` of a batch (one segment-sum each, no class loop)."""
    labels = tf.cast(labels, tf.int32)
    sums = tf.math.unsorted_segment_sum(features, labels, num_classes)
    counts = tf.math.unsorted_segment_sum(tf.ones_like(labels, dtype=features.dtype), labels, num_classes)
    return sums, counts


def _keep_absent(centers: tf.Tensor, updated: tf.Tensor, class_counts: tf.Tensor) -> tf.Tensor:
    # A class with no example in the batch must keep its center bit-for-bit (not "plus zero" computed through
    # arithmetic that could turn an inf feature elsewhere into NaN), so select rather than add.
    present = tf.expand_dims(class_counts > 0, axis=-1)
    return tf.where(present, updated, centers)


def update_centers_paper(
    centers: tf.Tensor, class_sums: tf.Tensor, class_counts: tf.Tensor, alpha: float | tf.Tensor
) -> tf.Tensor:
    """Eq. 4 of the paper: `delta_j = sum_{i: y_i=j}(c_j - x_i) / (1 + n_j)`, `c_j <- c_j - alpha * delta_j`.

    `sum_i (c_j - x_i) = n_j * c_j - class_sums[j]`. The `1 +` in the denominator keeps it >= 1, so the update
    is finite even for a class absent from the batch; absent classes are left untouched all the same. With
    `alpha = 1` a class seen once moves half-way to its example, never past it, so it cannot oscillate.
    """
    counts = tf.expand_dims(class_counts, axis=-1)
    delta = (counts * centers - class_sums) / (1.0 + counts)
    return _keep_absent(centers, centers - alpha * delta, class_counts)


def update_centers_facenet(
    centers: tf.Tensor, class_sums: tf.Tensor, class_counts: tf.Tensor, alfa: float | tf.Tensor
) -> tf.Tensor:
    """facenet's rule: `diff = (1 - alfa) * (c_y - x)`; `scatter_sub(centers, y, diff)`.

    `scatter_sub` computes every `diff` from the OLD center and accumulates duplicates, with no count
    normalisation, so a class seen `n_j` times moves by `(1 - alfa) * (n_j * c_j - class_sums[j])`. `alfa` is
    facenet's `center_loss_alfa` (its default 0.95 moves a center 5 % towards each example).
    """
    counts = tf.expand_dims(class_counts, axis=-1)
    delta = (1.0 - alfa) * (counts * centers - class_sums)
    return _keep_absent(centers, centers - delta, class_counts)


def update_centers_gradient(
    centers: tf.Tensor,
    class_sums: tf.Tensor,
    class_counts: tf.Tensor,
    batch_size: float | tf.Tensor,
    learning_rate: float | tf.Tensor,
) -> tf.Tensor:
    """One SGD step on the centers with their own learning rate, minimising the center-loss value.

    d/dc_j of `0.5 * (1/B) * sum_i ||x_i - c_{y_i}||^2` is `(n_j * c_j - class_sums[j]) / B` (closed form,
    checked against `tf.GradientTape` in the tests). Unlike `paper`, the step shrinks with the global batch
    size B, which is why this rule has its own learning rate (`--center-lr`) rather than reusing alpha.
    """
    counts = tf.expand_dims(class_counts, axis=-1)
    grad = (counts * centers - class_sums) / tf.cast(batch_size, centers.dtype)
    return _keep_absent(centers, centers - learning_rate * grad, class_counts)


def update_centers(
    rule: str,
    centers: tf.Tensor,
    class_sums: tf.Tensor,
    class_counts: tf.Tensor,
    *,
    alpha: float,
    batch_size: float | tf.Tensor,
    center_lr: float,
) -> tf.Tensor:
    """Dispatch to the rule named `rule` (one of `UPDATE_RULES`); `none` returns the centers unchanged."""
    if rule == "paper":
        return update_centers_paper(centers, class_sums, class_counts, alpha)
    if rule == "facenet":
        return update_centers_facenet(centers, class_sums, class_counts, alpha)
    if rule == "gradient":
        return update_centers_gradient(centers, class_sums, class_counts, batch_size, center_lr)
    if rule == "none":
        return centers
    raise ValueError(f"unknown center update rule {rule!r}; choose one of {', '.join(UPDATE_RULES)}")
