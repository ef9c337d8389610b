"""PartialFCModel: center-loss training with a Partial FC head, for 100k+ classes in bounded time and memory.

Per step, on top of `CenterLossModel`:

- the head's weights are gathered for the step's sampled classes (`PartialFCHead.sample`, positives of the
  GLOBAL batch + seeded negatives), the loss is differentiated with respect to those `[S, D]` rows, and
  `RowOptimizer` applies the feature optimizer's own rule (Adam or SGD, same hyperparameters and learning
  rate, same step count) to those rows and their slots only. Rows not sampled keep their weights and
  slots ("lazy" Adam / momentum, as sparse optimizers do); at sample rate 1.0 every row is updated every
  step and the result equals dense Keras Adam/SGD on the full head (tested).
- the centers are updated with `training.sparse_centers`: only the classes of the global batch, with the
  same rules as the dense update; the center loss gathers only the batch's rows.

Nothing in a step is O(K * D) except what Partial FC itself needs per class (a uniform score and a top-k
over K numbers, as insightface); the feature optimizer never sees the `[K, D]` weights (they are not
trainable variables), so Keras builds no `[K, D]` slots for them.

Under MirroredStrategy / MultiWorkerMirroredStrategy the weights and centers are replicated (each replica
holds all K rows): labels are all-gathered so every replica samples the same classes, the `[S, D]` row
gradients and the `[U, D]` center statistics are all-reduced, and every replica writes the same rows.
Sharding the rows across workers (model parallelism, as insightface's Partial FC) is
`training.sharded_fc.ShardedPartialFCModel` (`--shard-classes`).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from training.distributed import backbone_features
from training.heads.partial_fc import PartialFCHead
from training.model import CenterLossModel, _unpack
from training.sparse_centers import sparse_update_centers, tf_variable


class RowOptimizer:
    """Keras Adam / SGD update rules applied to selected rows of a `[K, D]` variable and its slots.

    The formulas are Keras 3's `Adam.update_step` and `SGD.update_step` written on gathered rows and written
    back with `scatter_update`; bias correction uses the feature optimizer's step, so both halves of the
    model follow one schedule. Options the dense optimizer would apply to every variable (weight decay,
    clipping, EMA, gradient accumulation) are refused rather than silently skipped.
    """

    def __init__(self, optimizer: keras.optimizers.Optimizer) -> None:
        self.outer = optimizer
        inner = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer (mixed_float16)
        if isinstance(inner, keras.optimizers.Adam) and not inner.amsgrad:
            self.kind = "adam"
        elif isinstance(inner, keras.optimizers.SGD):
            self.kind = "sgd"
        else:
            raise ValueError(f"Partial FC supports the adam and sgd optimizers, got {type(inner).__name__}")
        unsupported = {
            "weight_decay": inner.weight_decay,
            "clipnorm": inner.clipnorm,
            "clipvalue": inner.clipvalue,
            "global_clipnorm": inner.global_clipnorm,
            "use_ema": inner.use_ema or None,
            "gradient_accumulation_steps": inner.gradient_accumulation_steps,
        }
        given = [name for name, value in unsupported.items() if value]
        if given:
            raise ValueError(f"Partial FC's row optimizer does not implement {', '.join(given)}")
        self.inner = inner

    def apply(self, variable, slots, index: tf.Tensor, grad: tf.Tensor) -> None:
        """Update rows `index` of `variable` (and of its slots) with the gradient rows `grad` `[S, D]`."""
        inner = self.inner
        lr = tf.cast(inner.learning_rate, tf.float32)
        var = tf_variable(variable)
        rows = tf.gather(var, index)
        if self.kind == "adam":
            m_var, v_var = (tf_variable(s) for s in slots)
            step = tf.cast(inner.iterations + 1, tf.float32)
            alpha = lr * tf.sqrt(1.0 - tf.pow(inner.beta_2, step)) / (1.0 - tf.pow(inner.beta_1, step))
            m = tf.gather(m_var, index)
            v = tf.gather(v_var, index)
            m = m + (grad - m) * (1.0 - inner.beta_1)
            v = v + (tf.square(grad) - v) * (1.0 - inner.beta_2)
            rows = rows - (m * alpha) / (tf.sqrt(v) + inner.epsilon)
            m_var.scatter_update(tf.IndexedSlices(m, index))
            v_var.scatter_update(tf.IndexedSlices(v, index))
        elif inner.momentum != 0:
            m_var = tf_variable(slots[0])
            m = tf.gather(m_var, index) * inner.momentum - grad * lr
            m_var.scatter_update(tf.IndexedSlices(m, index))
            rows = rows + (m * inner.momentum - grad * lr if inner.nesterov else m)
        else:
            rows = rows - grad * lr
        var.scatter_update(tf.IndexedSlices(rows, index))


class PartialFCModel(CenterLossModel):
    """`CenterLossModel` with a `PartialFCHead`; see the module docstring for what each step touches."""

    def __init__(self, backbone: keras.Model, head: PartialFCHead, num_classes: int, **kwargs) -> None:
        if not isinstance(head, PartialFCHead):
            raise TypeError("PartialFCModel needs a PartialFCHead")
        super().__init__(backbone, head, num_classes, **kwargs)
        self._rows: RowOptimizer | None = None

    def compile(self, optimizer="adam", **kwargs) -> None:
        super().compile(optimizer=optimizer, **kwargs)
        self._rows = RowOptimizer(self.optimizer)
        if self._rows.kind != self.head.optimizer_name:
            raise ValueError(
                f"the Partial FC head has {self.head.optimizer_name} slots but the optimizer is "
                f"{self._rows.kind}; build the head with optimizer={self._rows.kind!r}"
            )

    def _objective(self, features, logits, labels, center_rows):
        ce = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        cl = 0.5 * tf.reduce_sum(tf.square(features - tf.stop_gradient(center_rows)), axis=-1)
        return ce, cl, ce + self.center_lambda * cl

    def _center_rows(self, labels: tf.Tensor) -> tf.Tensor:
        return tf.gather(tf_variable(self.centers), labels)

    def train_step(self, data):
        x, y = _unpack(data)
        y = tf.cast(tf.reshape(y, [-1]), tf.int32)
        ctx = tf.distribute.get_replica_context()
        replicas = ctx.num_replicas_in_sync
        global_labels = ctx.all_gather(y, axis=0) if replicas > 1 else y
        global_batch = tf.cast(tf.shape(global_labels)[0], tf.float32)
        index = self.head.sample(global_labels, self.optimizer.iterations)
        local = tf.searchsorted(index, y)
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            rows = tf.gather(tf_variable(self.head.kernel), index)
            tape.watch(rows)
            features = tf.cast(
                backbone_features(self.backbone, self.model_input(x), training=True), tf.float32
            )
            cos = self.head.sampled_cosines(features, rows)
            logits = self.head.margin_logits(cos, local)
            ce, cl, total = self._objective(features, logits, local, self._center_rows(y))
            loss = tf.reduce_sum(total) / global_batch
            if self.losses:
                loss += tf.add_n(self.losses) / replicas
            scaled = self.optimizer.scale_loss(loss)
        plain = self.head.margin_logits(cos)  # no margin: the accuracy of the classifier (same cosines)
        *grads, row_grad = tape.gradient(scaled, [*variables, rows])
        if replicas > 1:
            # Same index on every replica: summing the [S, D] rows is the all-reduce of the full gradient.
            row_grad = ctx.all_reduce(tf.distribute.ReduceOp.SUM, row_grad)
        self._apply_rows(index, row_grad)
        self.optimizer.apply(grads, variables)
        if self.rule != "none":
            sparse_update_centers(
                self.rule,
                self.centers,
                tf.stop_gradient(features),
                y,
                alpha=self.alpha,
                batch_size=global_batch,
                center_lr=self.center_lr,
                ctx=ctx,
            )
        return self._update_metrics(
            ce, cl, total, local, plain, features, margin_logits=logits, center_labels=y
        )

    def _apply_rows(self, index: tf.Tensor, grad: tf.Tensor, kernel=None, slots=None) -> None:
        # `kernel`/`slots`: the rows to update (default: the head's; the sharded model passes its shard).
        kernel = self.head.kernel if kernel is None else kernel
        slots = self.head.slots if slots is None else slots
        if not isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            self._rows.apply(kernel, slots, index, grad)
            return
        # mixed_float16: unscale, and skip the rows' step when the feature optimizer skips its own.
        if not self.optimizer.built:  # its dynamic scale is created on build (as `apply` would do)
            self.optimizer.build(self.trainable_variables)
        grad = grad / tf.cast(self.optimizer.dynamic_scale, grad.dtype)

        def update():
            self._rows.apply(kernel, slots, index, grad)
            return tf.constant(True)

        tf.cond(self._rows_finite(grad), update, lambda: tf.constant(False))

    def _rows_finite(self, grad: tf.Tensor) -> tf.Tensor:
        # Replicated rows: every replica has the same all-reduced gradient, hence the same answer.
        return tf.reduce_all(tf.math.is_finite(grad))

    def test_step(self, data):
        x, y = _unpack(data)
        y = tf.cast(tf.reshape(y, [-1]), tf.int32)
        features = tf.cast(backbone_features(self.backbone, self.model_input(x), training=False), tf.float32)
        logits = self.head(features)
        ce, cl, total = self._objective(features, logits, y, self._center_rows(y))
        return self._update_metrics(ce, cl, total, y, logits, features)


def build_partial_fc(
    backbone: keras.Model,
    num_classes: int,
    *,
    head: str,
    head_params: dict[str, float],
    sample_rate: float,
    seed: int,
    optimizer: str,
    **center_options,
) -> PartialFCModel:
    """The Partial FC model of a run (not compiled); `center_options` as `CenterLossModel`'s."""
    pfc = PartialFCHead(
        num_classes,
        margin_head=head,
        margin_params=head_params,
        sample_rate=sample_rate,
        seed=seed,
        optimizer=optimizer,
        name="partial_fc",
    )
    return PartialFCModel(backbone, pfc, num_classes, **center_options)
