"""Center updates that touch only the classes present in the batch: O(B * D) per step, whatever K is.

`training.center_loss` writes every rule on dense per-class statistics `[K, D]`, which is right for a few
thousand classes but allocates (and all-reduces) K x D floats per step: 2 GB at 1 M classes of 512-d. Here
the same rules run on the U <= B classes of the (global) batch: their statistics `[U, D]`, their old
centers gathered from the variable, the rule from `training.center_loss.update_centers` unchanged (every
row of U is present, so `_keep_absent` keeps none of them), and the new rows scattered back. Rows of absent
classes are never read or written, which is exactly the dense rule's "absent centers keep their value
bit-for-bit"; the tests compare both on small K.

Across replicas the classes present are those of the GLOBAL batch: each replica all-gathers the labels,
takes the sorted unique ids (the same on every replica), sums its own features into those U rows, and the
`[U, D]` sums and `[U]` counts are all-reduced (B x D numbers instead of K x D).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from training.center_loss import update_centers


def tf_variable(variable):
    """The tf.Variable behind a Keras variable (or the argument itself): `tf.gather` on it is a
    ResourceGather of the rows asked for and `scatter_update` writes rows in place, while
    `tf.convert_to_tensor(keras_variable)` reads all K x D values (and makes the next write copy them)."""
    return variable.value if isinstance(variable, keras.Variable) else variable


def present_classes(global_labels: tf.Tensor) -> tf.Tensor:
    """Sorted unique class ids of a batch, `[U]` int32."""
    return tf.sort(tf.unique(tf.cast(tf.reshape(global_labels, [-1]), tf.int32)).y)


def present_statistics(
    features: tf.Tensor, labels: tf.Tensor, classes: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-class sums `[U, D]` and counts `[U]` of `features` over the sorted ids `classes` (which must
    contain every label): the rows of `batch_class_statistics` for those classes."""
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    slots = tf.searchsorted(classes, labels)
    u = tf.shape(classes)[0]
    sums = tf.math.unsorted_segment_sum(features, slots, u)
    counts = tf.math.unsorted_segment_sum(tf.ones_like(slots, dtype=features.dtype), slots, u)
    return sums, counts


def updated_rows(
    rule: str,
    centers,
    classes: tf.Tensor,
    sums: tf.Tensor,
    counts: tf.Tensor,
    *,
    alpha: float,
    batch_size: float | tf.Tensor,
    center_lr: float,
) -> tf.Tensor:
    """The new centers of rows `classes` (`[U, D]`) under `rule`, from the old rows and their statistics."""
    old = tf.gather(tf_variable(centers), classes)
    return update_centers(rule, old, sums, counts, alpha=alpha, batch_size=batch_size, center_lr=center_lr)


def sparse_update_centers(
    rule: str,
    centers,
    features: tf.Tensor,
    labels: tf.Tensor,
    *,
    alpha: float,
    batch_size: float | tf.Tensor | None = None,
    center_lr: float = 0.5,
    ctx: tf.distribute.ReplicaContext | None = None,
) -> tf.Tensor:
    """Apply `rule` to the centers variable for the classes of the batch only; returns their ids `[U]`.

    In replica context (`ctx`), labels are all-gathered and the statistics all-reduced, so every replica
    writes the same rows with the same values (the variable's aggregation is ONLY_FIRST_REPLICA, as the
    dense update's). `batch_size` defaults to the global batch size.
    """
    if rule == "none":
        return tf.zeros([0], tf.int32)
    ctx = ctx or tf.distribute.get_replica_context()
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    global_labels = ctx.all_gather(labels, axis=0) if ctx.num_replicas_in_sync > 1 else labels
    classes = present_classes(global_labels)
    sums, counts = present_statistics(features, labels, classes)
    if ctx.num_replicas_in_sync > 1:
        sums, counts = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [sums, counts])
    if batch_size is None:
        batch_size = tf.cast(tf.shape(global_labels)[0], features.dtype)
    rows = updated_rows(
        rule,
        centers,
        classes,
        sums,
        counts,
        alpha=alpha,
        batch_size=batch_size,
        center_lr=center_lr,
    )
    tf_variable(centers).scatter_update(tf.IndexedSlices(rows, classes))
    return classes
