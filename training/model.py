"""CenterLossModel: a keras.Model whose train_step optimises softmax (or a margin head) + lambda * center.

`fit()` drives it (so ModelCheckpoint, TensorBoard, CSVLogger and every other callback keep working); only the
step is custom. The centers are a non-trainable variable of the model, so they are saved and restored with
its weights. They start at zero (the paper's Caffe layer does the same; zero-mean features make this a
neutral start) and move only through the chosen update rule, never through the feature optimizer.

Distributed correctness: each replica computes per-class feature sums and counts of its share of the batch;
these are all-reduced (SUM) once per step and every replica applies the same rule to the global statistics,
so the centers equal those of one device on the whole batch. Losses are summed per replica and divided by
the GLOBAL batch size (also all-reduced), so the optimizer's gradient all-reduce (a sum in Keras) yields the
single-device gradient even when the last batch splits unevenly.

Input: a batch is either float32 model inputs (the in-memory arrays, already normalised by
`bundle.preprocess`) or uint8 pixels (the streamed input, which only decodes and resizes on the host); the
pixels are normalised here, inside the graph, by `PixelNormalization`: the manifest's normalisation
(`bundle.preprocess.normalization`), the same definition the service applies and the exported bundle records.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from bundle.manifest import InputSpec, Preprocessing
from bundle.preprocess import normalization
from training.center_loss import UPDATE_RULES, batch_class_statistics, center_loss_per_example, update_centers
from training.distributed import MultiWorkerFit, backbone_features, worker_logs
from training.heads.softmax import SoftmaxHead


def _unpack(data: Any) -> tuple[tf.Tensor, tf.Tensor]:
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    if y is None or sample_weight is not None:
        # Per-example weights would also have to weight the center statistics; nothing here needs them.
        raise ValueError("CenterLossModel trains on (images, labels) pairs without sample weights")
    return x, y


class PixelNormalization:
    """uint8 pixels `[N, H, W, C]` (or one `[H, W, C]`) -> the model's float32 input, with TF ops.

    `bundle.preprocess.normalize_pixels` step for step (float32, channel order, `* scale`, `- mean`, `/ std`,
    layout), from the same constants, so a streamed batch reaches the backbone as the numpy path would give
    it. It holds no weights and is deliberately not a Keras layer: the model's checkpoints keep their layout,
    so runs saved before it existed still load.
    """

    def __init__(self, preprocessing: Preprocessing, input_spec: InputSpec) -> None:
        self.norm = normalization(preprocessing, input_spec)

    def __call__(self, pixels: tf.Tensor) -> tf.Tensor:
        n = self.norm
        # float32 whatever the precision policy: normalised pixels are the backbone's input, cast by it.
        x = tf.cast(pixels, tf.float32)
        if n.reverse_channels:
            x = tf.reverse(x, axis=[-1])
        x = x * tf.constant(n.scale)
        x = x - tf.constant(n.mean)
        x = x / tf.constant(n.std)
        if n.channels_first:
            rank = len(x.shape)  # one image [H, W, C] or a batch
            x = tf.transpose(x, [*range(rank - 3), rank - 1, rank - 3, rank - 2])
        return x


class CenterLossModel(MultiWorkerFit, keras.Model):
    """Backbone (image -> features) + head (features -> logits) + centers `[num_classes, feature_dim]`."""

    def __init__(
        self,
        backbone: keras.Model,
        head: keras.layers.Layer,
        num_classes: int,
        *,
        center_lambda: float = 0.01,
        alpha: float = 0.5,
        rule: str = "paper",
        center_lr: float = 0.5,
        pixel_input: PixelNormalization | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # How uint8 pixel batches become model inputs (see `model_input`); None: float32 batches only.
        self.pixel_input = pixel_input
        if rule not in UPDATE_RULES:
            raise ValueError(f"--rule: unknown center update rule {rule!r}; choose one of {UPDATE_RULES}")
        self.backbone = backbone
        self.head = head
        self.num_classes = int(num_classes)
        self.feature_dim = int(backbone.output.shape[-1])
        self.center_lambda = float(center_lambda)
        self.alpha = float(alpha)
        self.rule = rule
        self.center_lr = float(center_lr)
        self.head.build((None, self.feature_dim))
        # ONLY_FIRST_REPLICA: every replica assigns the same value computed from all-reduced statistics, so
        # taking the first replica's write is exact and lets the assignment happen in replica context.
        self.centers = self._make_centers()
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.softmax_tracker = keras.metrics.Mean(name="softmax_loss")
        self.center_tracker = keras.metrics.Mean(name="center_loss")
        # Accuracy of the plain (un-penalised) logits, the classifier the model really is; a margin head's
        # training logits subtract the margin from the target, which reads ~0 while the model learns.
        self.accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self.has_margin = not isinstance(head, SoftmaxHead)
        self.margin_accuracy_tracker = (
            keras.metrics.SparseCategoricalAccuracy(name="margin_accuracy") if self.has_margin else None
        )
        # Mean ||c_{y_i}|| and ||x_i|| over the batch: centers follow features, so a center norm far above the
        # feature norm means the update rule is diverging (`CenterDivergenceGuard` stops the run on it).
        self.center_norm_tracker = keras.metrics.Mean(name="center_norm")
        self.feature_norm_tracker = keras.metrics.Mean(name="feature_norm")
        # Backbone and head are built above, so weights can be saved/loaded before the first step.
        self.built = True

    def _make_centers(self) -> keras.Variable:
        # issue 13: the class-sharded Partial FC model (training/sharded_fc.py) keeps its centers in shards.
        return self.add_weight(
            shape=(self.num_classes, self.feature_dim),
            initializer="zeros",
            trainable=False,
            name="centers",
            aggregation="only_first_replica",
        )

    @property
    def metrics(self) -> list[keras.metrics.Metric]:
        extra = [self.margin_accuracy_tracker] if self.margin_accuracy_tracker is not None else []
        return [
            self.loss_tracker,
            self.softmax_tracker,
            self.center_tracker,
            self.accuracy_tracker,
            *extra,
            self.center_norm_tracker,
            self.feature_norm_tracker,
        ]

    def model_input(self, x: tf.Tensor) -> tf.Tensor:
        """A batch as the backbone takes it: uint8 pixels are normalised here (`PixelNormalization`), float32
        batches are already normalised. Decided when the step is traced, from the batch's dtype."""
        if x.dtype != tf.uint8:
            return x
        if self.pixel_input is None:
            raise ValueError("uint8 pixel batches need CenterLossModel(pixel_input=PixelNormalization(...))")
        return self.pixel_input(x)

    def call(self, inputs: tf.Tensor, training: bool = False) -> tf.Tensor:
        """Embedding features of a batch of images (the exported part of the model)."""
        return self.backbone(self.model_input(inputs), training=training)

    def _objective(
        self, features: tf.Tensor, logits: tf.Tensor, labels: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        ce = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        # stop_gradient: the center term pulls features towards centers; centers follow the update rule.
        cl = center_loss_per_example(features, labels, tf.stop_gradient(tf.convert_to_tensor(self.centers)))
        return ce, cl, ce + self.center_lambda * cl

    def _center_rows(self, labels: tf.Tensor) -> tf.Tensor:
        # issue 13: PartialFCModel overrides this with a row gather that never reads all K centers.
        return tf.gather(tf.convert_to_tensor(self.centers), labels)

    def _update_metrics(
        self,
        ce: tf.Tensor,
        cl: tf.Tensor,
        total: tf.Tensor,
        labels: tf.Tensor,
        logits: tf.Tensor,
        features: tf.Tensor,
        margin_logits: tf.Tensor | None = None,
        center_labels: tf.Tensor | None = None,
    ) -> dict:
        # Per-example values: the Mean metrics then average over the global batch across replicas exactly.
        self.loss_tracker.update_state(total)
        self.softmax_tracker.update_state(ce)
        self.center_tracker.update_state(cl)
        self.accuracy_tracker.update_state(labels, logits)
        if self.margin_accuracy_tracker is not None:
            self.margin_accuracy_tracker.update_state(
                labels, logits if margin_logits is None else margin_logits
            )
        # issue 13: Partial FC's logits index the step's sampled classes; its centers the true ones.
        centers = self._center_rows(labels if center_labels is None else center_labels)
        self.center_norm_tracker.update_state(tf.norm(centers, axis=-1))
        self.feature_norm_tracker.update_state(tf.norm(tf.cast(features, tf.float32), axis=-1))
        return worker_logs({m.name: m.result() for m in self.metrics})

    def train_step(self, data: tuple[tf.Tensor, tf.Tensor]) -> dict[str, tf.Tensor]:
        x, y = _unpack(data)
        y = tf.cast(tf.reshape(y, [-1]), tf.int32)
        ctx = tf.distribute.get_replica_context()
        global_batch = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(tf.shape(y)[0], tf.float32))
        with tf.GradientTape() as tape:
            features = backbone_features(
                self.backbone, self.model_input(x), training=True
            )  # an empty share too
            logits = self.head(features, y, training=True)
            ce, cl, total = self._objective(features, logits, y)
            loss = tf.reduce_sum(total) / global_batch
            if self.losses:
                # Layer regularisers are per-model, not per-example: split them evenly over the replicas.
                loss += tf.add_n(self.losses) / ctx.num_replicas_in_sync
            loss = self.optimizer.scale_loss(loss)  # issue 13: loss scaling (mixed_float16), else identity
        # The plain logits of the same forward pass (before the step moves the head), outside the tape.
        plain = self.head(features, None, training=True) if self.has_margin else logits
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(grads, self.trainable_variables)
        self._update_centers(tf.stop_gradient(features), y, global_batch, ctx)
        return self._update_metrics(ce, cl, total, y, plain, features, margin_logits=logits)

    def _update_centers(
        self,
        features: tf.Tensor,
        labels: tf.Tensor,
        global_batch: tf.Tensor,
        ctx: tf.distribute.ReplicaContext,
    ) -> None:
        if self.rule == "none":
            return
        sums, counts = batch_class_statistics(features, labels, self.num_classes)
        sums, counts = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [sums, counts])
        new_centers = update_centers(
            self.rule,
            tf.convert_to_tensor(self.centers),
            sums,
            counts,
            alpha=self.alpha,
            batch_size=global_batch,
            center_lr=self.center_lr,
        )
        self.centers.assign(new_centers)

    def test_step(self, data: tuple[tf.Tensor, tf.Tensor]) -> dict[str, tf.Tensor]:
        x, y = _unpack(data)
        y = tf.cast(tf.reshape(y, [-1]), tf.int32)
        features = backbone_features(self.backbone, self.model_input(x), training=False)
        logits = self.head(features, y, training=False)
        ce, cl, total = self._objective(features, logits, y)
        return self._update_metrics(ce, cl, total, y, logits, features)
