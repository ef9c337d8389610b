"""Partial FC (An et al. 2022; insightface `partial_fc_v2.py`): margin logits on a sample of the classes.

Per training step the sampled set is every class of the (global) batch — the positives — plus a seeded
uniform sample of the others, `num_sample = max(int(rate * K), #positives)` classes in all, exactly as
insightface's `sample()`: every class gets a uniform score in [0, 1), the positives get 2.0, and the
`num_sample` highest scores are kept, sorted by class id. Labels are remapped to their position in that
sorted index (`searchsorted`). The margin (ArcFace / CosFace / combined) is applied to the `[B, S]` sampled
cosines, so the matmul, the softmax and the gradient are O(B * S * D) instead of O(B * K * D).

The class weights are a `[K, D]` variable (one row per class, as insightface) that the feature optimizer
never sees: `training.partial_fc.PartialFCModel` differentiates the loss with respect to the gathered
`[S, D]` rows and `RowOptimizer` updates only those rows and their optimizer slots (lazy Adam / SGD), so a
step touches S rows whatever K is. At `sample_rate=1.0` every row is in the sample every step, and the
head, its gradient and the update equal the dense head with Keras's optimizer (tested).

The sample is a pure function of (seed, step, batch labels): `tf.random.stateless_uniform` seeded with
`[seed, step]`, `step` being the optimizer's iteration count (saved in checkpoints, so a resumed run draws
the same samples as an uninterrupted one, and every replica draws the same sample).
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from training.heads.combined import CombinedMarginHead
from training.heads.cosine import check_num_classes, l2_normalize_tf
from training.heads.margins import combined_margin, replace_target, target_cosine

PARTIAL_FC_HEADS = ("arcface", "amsoftmax", "combined")
SLOTS = {"adam": ("momentum", "velocity"), "sgd": ("momentum",)}
INIT_BLOCK = 4096  # rows per seeded block of the initial weights
INIT_STDDEV = 0.01  # insightface: torch.normal(0, 0.01, (num_local, embedding_size))


def initial_rows(seed: int, start: int, size: int, dim: int) -> tf.Tensor:
    """Initial weights of classes `[start, start + size)`: N(0, 0.01) drawn per block of `INIT_BLOCK` rows
    from (seed, block), so a class's initial row is the same whether the head is whole or split by class
    range over workers (`training.sharded_fc`)."""
    if size <= 0:
        return tf.zeros([0, dim], tf.float32)
    first, last = start // INIT_BLOCK, (start + size - 1) // INIT_BLOCK
    blocks = [
        tf.random.stateless_normal([INIT_BLOCK, dim], seed=[int(seed), b], stddev=INIT_STDDEV)
        for b in range(first, last + 1)
    ]
    offset = start - first * INIT_BLOCK
    return tf.concat(blocks, axis=0)[offset : offset + size]


class SeededRows(keras.initializers.Initializer):
    """`initial_rows(seed, 0, K, D)` as a Keras initializer for the `[K, D]` weights."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def __call__(self, shape, dtype=None):
        return tf.cast(initial_rows(self.seed, 0, int(shape[0]), int(shape[1])), dtype or tf.float32)

    def get_config(self) -> dict[str, Any]:
        return {"seed": self.seed}


def check_sample_rate(rate: float) -> float:
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 < rate <= 1.0:
        raise ValueError(f"--sample-rate must be in (0, 1], got {rate!r}")
    return float(rate)


def num_sampled(num_classes: int, sample_rate: float) -> int:
    """insightface's `num_sample = int(sample_rate * num_local)`; at least one class."""
    return num_classes if sample_rate >= 1.0 else max(1, int(sample_rate * num_classes))


def sample_classes(
    labels: tf.Tensor, num_classes: int, num_sample: int, seed: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """(sorted class ids `[S]`, labels remapped into them `[B]`); S = max(num_sample, #unique labels).

    `seed` is a shape-[2] int tensor (`tf.random.stateless_uniform`). With `num_sample >= num_classes`
    the index is every class and labels are unchanged.
    """
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    if num_sample >= num_classes:
        return tf.range(num_classes, dtype=tf.int32), labels
    positives = tf.unique(labels).y
    score = tf.random.stateless_uniform([num_classes], seed=seed)  # [0, 1)
    score = tf.tensor_scatter_nd_update(
        score, positives[:, None], tf.fill(tf.shape(positives), tf.constant(2.0))
    )
    k = tf.maximum(num_sample, tf.shape(positives)[0])
    index = tf.sort(tf.math.top_k(score, k, sorted=False).indices)
    return index, tf.searchsorted(index, labels)


@keras.saving.register_keras_serializable(package="idembed")
class PartialFCHead(keras.layers.Layer):
    """Class weights `[K, D]` + a combined-margin formula, evaluated on a per-step sample of the classes.

    `margin_head` names the margin (`arcface`, `amsoftmax` or `combined`) and `margin_params` its options,
    validated by that head (`make_head`), whose s, m2, m3 and easy_margin are used; `optimizer` (`adam` or
    `sgd`) decides which per-row optimizer slots are created next to the weights (saved in checkpoints).
    Called as `head(features)` (no sample, no margin) it returns full `[B, K]` scaled cosines, for
    evaluation; training goes through `sample` + `sampled_logits` (see `PartialFCModel.train_step`).
    """

    def __init__(
        self,
        num_classes: int,
        margin_head: str = "arcface",
        margin_params: dict[str, float] | None = None,
        sample_rate: float = 0.1,
        seed: int = 0,
        optimizer: str = "adam",
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        from training.heads import make_head

        self.num_classes = check_num_classes(num_classes)
        if margin_head not in PARTIAL_FC_HEADS:
            raise ValueError(
                f"Partial FC needs a margin head on normalised weights ({', '.join(PARTIAL_FC_HEADS)}), "
                f"got {margin_head!r}"
            )
        if optimizer not in SLOTS:
            raise ValueError(f"Partial FC row optimizer must be one of {', '.join(SLOTS)}, got {optimizer!r}")
        self.margin_head = margin_head
        self.margin_params = dict(margin_params or {})
        # Options validated by the head itself; only its numbers are kept (no [D, K] kernel is built).
        formula = make_head(margin_head, self.num_classes, **self.margin_params)
        assert isinstance(formula, CombinedMarginHead)
        self.s, self.m2, self.m3, self.easy_margin = formula.s, formula.m2, formula.m3, formula.easy_margin
        # The margin warm-up of the margin heads (`warmup_epochs`, driven by the trainer's MarginWarmup).
        self.warmup_epochs = float(getattr(formula, "warmup_epochs", 0.0))
        self.sample_rate = check_sample_rate(sample_rate)
        self.num_sample = num_sampled(self.num_classes, self.sample_rate)
        self.seed = int(seed)
        self.optimizer_name = optimizer

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        dim = int(input_shape[-1])
        # insightface: torch.normal(0, 0.01, (num_local, embedding_size)), seeded per block of rows
        self.kernel = self.add_weight(
            name="kernel",
            shape=(self.num_classes, dim),
            initializer=SeededRows(self.seed),
            trainable=False,
            aggregation="only_first_replica",
        )
        self.slots = [
            self.add_weight(
                name=f"kernel_{slot}",
                shape=(self.num_classes, dim),
                initializer="zeros",
                trainable=False,
                aggregation="only_first_replica",
            )
            for slot in SLOTS[self.optimizer_name]
        ]
        self._build_margin_ramp()
        super().build(input_shape)

    def _build_margin_ramp(self) -> None:
        self.margin_ramp = self.add_weight(
            name="margin_ramp",
            shape=(),
            initializer=keras.initializers.Constant(0.0 if self.warmup_epochs > 0 else 1.0),
            trainable=False,
        )

    def sample(self, global_labels: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
        """The sorted class ids `[S]` of this step (positives of the global batch + seeded negatives)."""
        seed = tf.stack([tf.constant(self.seed, tf.int64), tf.cast(step, tf.int64)])
        index, _ = sample_classes(global_labels, self.num_classes, self.num_sample, seed)
        return index

    def sampled_cosines(self, features: tf.Tensor, rows: tf.Tensor) -> tf.Tensor:
        """`[B, S]` cosines of features against weight rows `[S, D]`, in float32 whatever the inputs."""
        x = tf.cast(features, tf.float32)
        x = l2_normalize_tf(x, axis=1)
        w = l2_normalize_tf(tf.cast(rows, tf.float32), axis=1)
        return tf.clip_by_value(tf.matmul(x, w, transpose_b=True), -1.0, 1.0)

    def margin_logits(self, cos: tf.Tensor, labels: tf.Tensor | None = None) -> tf.Tensor:
        """Scaled logits from `[B, S]` cosines; the margin on `labels` (indices into the rows) when given."""
        if labels is not None:
            labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
            plain = target_cosine(cos, labels)
            target = combined_margin(plain, m2=self.m2, m3=self.m3, easy_margin=self.easy_margin)
            if self.warmup_epochs > 0:
                r = tf.convert_to_tensor(self.margin_ramp)
                target = (1.0 - r) * plain + r * target
            cos = replace_target(cos, target, labels)
        return self.s * cos

    def sampled_logits(
        self, features: tf.Tensor, rows: tf.Tensor, labels: tf.Tensor | None = None
    ) -> tf.Tensor:
        """`[B, S]` logits of features against weight rows `[S, D]`; margin on `labels` when given."""
        return self.margin_logits(self.sampled_cosines(features, rows), labels)

    def call(self, features: tf.Tensor, labels: tf.Tensor | None = None, training: bool | None = None):
        # Full logits over all K classes without margin (evaluation); training uses the sampled path.
        return self.sampled_logits(features, tf.convert_to_tensor(self.kernel))

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "margin_head": self.margin_head,
            "margin_params": self.margin_params,
            "sample_rate": self.sample_rate,
            "seed": self.seed,
            "optimizer": self.optimizer_name,
        }
