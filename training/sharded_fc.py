"""Model-parallel Partial FC (`--shard-classes`): class weights, their optimizer slots and the centers split
by class range over the replicas, as insightface's arcface_torch `partial_fc_v2.py`.

Layout. Replica r of W owns classes `[start_r, start_r + size_r)` with insightface's partition
(`size_r = K // W + (r < K % W)`, `start_r = K // W * r + min(r, K % W)`). Each of the four `[K, D]` tables
(weights, the row optimizer's one or two slots, the centers) is a `ShardedRows`: a sync-on-read variable
whose component on replica r is a `[ceil(K / W), D]` block holding only r's rows. Under
MultiWorkerMirroredStrategy with one device per worker, a worker therefore stores K / W rows of each table.

A training step on replica r (`ShardedPartialFCModel.train_step`):

1. labels and features are all-gathered (`[B]`, `[B, D]`; the feature all-gather is differentiable: its
   gradient is the all-reduced sum, sliced back to each replica's examples);
2. the step's sample is the one of the unsharded head (`PartialFCHead.sample` on the global labels, the
   same seeded function on every replica); replica r keeps the part of it in its class range;
3. cosines and margin logits of ALL B examples against r's sampled rows, `[B, S_r]`;
4. a distributed softmax cross-entropy: the row max is all-gathered (TF collectives have no MAX
   reduction) and the sum of exponentials and the target logit are all-reduced, so every replica has the
   exact `[B]` loss; its custom gradient is `softmax - one_hot` on r's own columns, without any further
   communication (insightface's `DistCrossEntropyFunc`);
5. r's row gradients update r's rows and slots (`RowOptimizer`, nothing all-reduced: no other replica
   has these rows); the backbone's gradient flows back through the feature all-gather and Keras
   all-reduces it as for every model;
6. the center loss and center update of an example are computed by the replica that owns its class, from
   the gathered features: per-shard statistics, no all-reduce (the same `training.sparse_centers` rules).

Because the sample, the initial weights (`initial_rows`: seeded per block of rows, not per shard, the same
initialiser as the unsharded `PartialFCHead`) and every formula are independent of W, a run on 2 workers
equals a run on 1, and both equal the replicated `PartialFCModel` of the same config (tested).

Checkpoints and export gather the shards: `ShardedRows.gather` all-gathers a bounded block of rows at a
time (`GATHER_FLOATS`) and writes them into a memory-mapped `.npy` of the full `[K, D]` table, so no worker
holds more than its shard plus one block. A checkpoint is the Keras weights file plus a folder
`epoch-NNN.head/` of full tables, independent of W (a run may resume on another number of workers); the
final `centers.npy` is the same file an unsharded run writes, so `export` is unchanged.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from training.distributed import backbone_features, worker_logs
from training.heads.margins import combined_margin
from training.heads.partial_fc import SLOTS, PartialFCHead, initial_rows
from training.model import _unpack
from training.partial_fc import PartialFCModel
from training.sparse_centers import present_classes, present_statistics, updated_rows

GATHER_FLOATS = 1 << 24  # floats per all-gather block when shards are gathered (64 MB)
ASSIGN_FLOATS = 1 << 21  # floats per block when shards are initialised or loaded (8 MB)
HEAD_STATE_SUFFIX = ".head"


class ClassShards:
    """insightface's split of K classes over W shards: the first K % W shards get one class more."""

    def __init__(self, num_classes: int, num_shards: int) -> None:
        if num_shards < 1:
            raise ValueError(f"need at least one shard, got {num_shards}")
        if num_classes < num_shards:
            raise ValueError(
                f"--shard-classes: {num_classes} classes cannot be split over {num_shards} replicas "
                "(each needs at least one class)"
            )
        self.num_classes, self.num_shards = int(num_classes), int(num_shards)
        self.base, self.extra = divmod(self.num_classes, self.num_shards)
        self.rows = self.base + (1 if self.extra else 0)  # stored rows per shard (the last may be padding)

    def start(self, shard: int) -> int:
        return self.base * shard + min(shard, self.extra)

    def size(self, shard: int) -> int:
        return self.base + (1 if shard < self.extra else 0)

    def start_tensor(self, shard: tf.Tensor) -> tf.Tensor:
        shard = tf.cast(shard, tf.int32)
        return self.base * shard + tf.minimum(shard, self.extra)

    def size_tensor(self, shard: tf.Tensor) -> tf.Tensor:
        return self.base + tf.cast(tf.cast(shard, tf.int32) < self.extra, tf.int32)


def _local_replica_ids(strategy: tf.distribute.Strategy) -> list[int]:
    ids = strategy.experimental_distribute_values_from_function(lambda ctx: ctx.replica_id_in_sync_group)
    return [int(i) for i in strategy.experimental_local_results(ids)]


class ShardedRows:
    """A `[K, D]` float32 table split by class range: replica r's component holds rows `start_r..`.

    Create inside the strategy's scope. In replica context `local()` is this replica's `[rows, D]` block;
    outside it, `components()`, `assign_from()` and `gather()` work on every local replica's block.
    """

    def __init__(self, name: str, shards: ClassShards, dim: int) -> None:
        self.name, self.shards, self.dim = name, shards, int(dim)
        self.strategy = tf.distribute.get_strategy()
        # ONLY_FIRST_REPLICA: a cross-replica read (never done here) would not all-reduce different shards.
        self.variable = tf.Variable(
            tf.zeros([shards.rows, self.dim], tf.float32),
            trainable=False,
            name=name,
            synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )

    @property
    def shape(self) -> tuple[int, int]:
        """The full table's shape `(K, D)`."""
        return (self.shards.num_classes, self.dim)

    def local(self) -> tf.Variable:
        """This replica's block (replica context); the variable itself without distribution.

        A sync-on-read variable refuses `scatter_update` ("doesn't support scatter_update", TF 2.21), so
        the rows are written on the component itself, which `DistributedVariable._get_on_device_or_primary`
        returns for the current replica (a private TF API; kept behind this one method)."""
        get = getattr(self.variable, "_get_on_device_or_primary", None)
        return get() if get is not None else self.variable

    def components(self) -> list[tuple[int, tf.Variable]]:
        """(replica id, block) of every replica of this process."""
        blocks = self.strategy.experimental_local_results(self.variable)
        return list(zip(_local_replica_ids(self.strategy), blocks, strict=True))

    def assign_rows(self, rows: Callable[[int, int], Any]) -> None:
        """Set each local block's rows to `rows(first, n)` (`[n, D]` of classes `first..first + n - 1`),
        `ASSIGN_FLOATS` at a time (the temporaries stay small next to the shard); padding rows keep their
        value."""
        step = max(1, ASSIGN_FLOATS // self.dim)
        for replica, block in self.components():
            start, size = self.shards.start(replica), self.shards.size(replica)
            for first in range(0, size, step):
                n = min(step, size - first)
                block[first : first + n].assign(np.asarray(rows(start + first, n), dtype=np.float32))

    def assign_from(self, table: np.ndarray) -> None:
        """Load each local block from a full `[K, D]` table (e.g. a memory-mapped `.npy`)."""
        if tuple(table.shape) != self.shape:
            raise ValueError(f"{self.name}: table of shape {tuple(table.shape)}, expected {self.shape}")
        self.assign_rows(lambda first, n: table[first : first + n])

    def gather(self, out: Path | None = None) -> np.ndarray | None:
        """All-gather the shards block by block; every replica must call it (collective ops).

        With `out`, the full `[K, D]` table is written there as a `.npy` (memory-mapped, so this process
        never holds more than one block of every shard) and returned memory-mapped read-only.
        """
        strategy, shards = self.strategy, self.shards
        block = max(1, GATHER_FLOATS // (shards.num_shards * self.dim))
        table = (
            np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=self.shape)
            if out is not None
            else None
        )
        local = dict(self.components())
        for first in range(0, shards.rows, block):
            n = min(block, shards.rows - first)
            part = strategy.experimental_distribute_values_from_function(
                lambda ctx, first=first, n=n: local[int(ctx.replica_id_in_sync_group)][first : first + n]
            )
            rows = strategy.gather(part, axis=0).numpy()  # [W * n, D], in replica order
            if table is None:
                continue
            for shard in range(shards.num_shards):
                valid = min(n, max(0, shards.size(shard) - first))
                if valid:
                    at = shards.start(shard) + first
                    table[at : at + valid] = rows[shard * n : shard * n + valid]
        if table is None:
            return None
        table.flush()
        del table
        return np.load(out, mmap_mode="r")


def _all_gather(ctx: tf.distribute.ReplicaContext, value: tf.Tensor) -> tf.Tensor:
    return ctx.all_gather(value, axis=0) if ctx.num_replicas_in_sync > 1 else value


def _all_sum(ctx: tf.distribute.ReplicaContext, value: tf.Tensor) -> tf.Tensor:
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, value) if ctx.num_replicas_in_sync > 1 else value


def _all_max(ctx: tf.distribute.ReplicaContext, value: tf.Tensor) -> tf.Tensor:
    """Element-wise max over replicas of a `[B]` tensor (ReduceOp has only SUM and MEAN)."""
    if ctx.num_replicas_in_sync == 1:
        return value
    return tf.reduce_max(ctx.all_gather(value[None], axis=0), axis=0)


def distributed_cross_entropy(
    logits: tf.Tensor, one_hot: tf.Tensor, ctx: tf.distribute.ReplicaContext
) -> tf.Tensor:
    """Softmax cross-entropy `[B]` over columns split across replicas (each holds `[B, S_r]` logits and
    the one-hot of the targets in its columns, zero rows for targets elsewhere). Every replica returns
    the same full loss; the gradient is `softmax - one_hot` on this replica's columns only."""

    @tf.custom_gradient
    def cross_entropy(z: tf.Tensor) -> tuple[tf.Tensor, Callable[[tf.Tensor], tf.Tensor]]:
        row_max = tf.stop_gradient(_all_max(ctx, tf.reduce_max(z, axis=1)))  # lowest float if S_r == 0
        exp = tf.exp(z - row_max[:, None])
        total = _all_sum(ctx, tf.reduce_sum(exp, axis=1))
        target = _all_sum(ctx, tf.reduce_sum(z * one_hot, axis=1))
        loss = tf.math.log(total) + row_max - target

        def grad(upstream: tf.Tensor) -> tf.Tensor:
            return upstream[:, None] * (exp / total[:, None] - one_hot)

        return loss, grad

    return cross_entropy(logits)


def _accuracy_logits(logits: tf.Tensor, one_hot: tf.Tensor, ctx: tf.distribute.ReplicaContext) -> tf.Tensor:
    """`[B, 2]` = (target logit, max logit over all replicas' columns): its argmax is 0 exactly when the
    target is the (first) maximum, so `SparseCategoricalAccuracy` on label 0 is the sharded accuracy."""
    target = _all_sum(ctx, tf.reduce_sum(logits * one_hot, axis=1))
    best = _all_max(ctx, tf.reduce_max(logits, axis=1))
    return tf.stack([target, best], axis=1)


class ShardedPartialFCHead(PartialFCHead):
    """`PartialFCHead` without its `[K, D]` weights: the sharded model holds them (`ShardedRows`)."""

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        self._build_margin_ramp()
        keras.layers.Layer.build(self, input_shape)

    def call(self, features: tf.Tensor, labels: tf.Tensor | None = None, training: bool | None = None):
        raise TypeError("a sharded head has no full logits; ShardedPartialFCModel evaluates it")

    def shard_margin_logits(self, cos: tf.Tensor, one_hot: tf.Tensor) -> tf.Tensor:
        """`margin_logits` with the targets as a (possibly all-zero) one-hot row: the margin only where
        this shard holds the example's class."""
        plain = tf.reduce_sum(cos * one_hot, axis=1)
        target = combined_margin(plain, m2=self.m2, m3=self.m3, easy_margin=self.easy_margin)
        if self.warmup_epochs > 0:
            r = tf.convert_to_tensor(self.margin_ramp)
            target = (1.0 - r) * plain + r * target
        return self.s * (cos + one_hot * (target - plain)[:, None])


class ShardedPartialFCModel(PartialFCModel):
    """`PartialFCModel` whose weights, slots and centers are split over the replicas (module docstring)."""

    def __init__(
        self,
        backbone: keras.Model,
        head: ShardedPartialFCHead,
        num_classes: int,
        *,
        num_shards: int | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(head, ShardedPartialFCHead):
            raise TypeError("ShardedPartialFCModel needs a ShardedPartialFCHead")
        shards = ClassShards(num_classes, num_shards or tf.distribute.get_strategy().num_replicas_in_sync)
        object.__setattr__(self, "shards", shards)  # plain attributes: not Keras weights (see checkpoints)
        super().__init__(backbone, head, num_classes, **kwargs)
        object.__setattr__(self, "kernel", ShardedRows("partial_fc_kernel", shards, self.feature_dim))
        slots = [
            ShardedRows(f"partial_fc_kernel_{s}", shards, self.feature_dim)
            for s in SLOTS[head.optimizer_name]
        ]
        object.__setattr__(self, "slots", slots)
        seed, dim = head.seed, self.feature_dim
        self.kernel.assign_rows(lambda first, n: initial_rows(seed, first, n, dim).numpy())

    def _make_centers(self) -> ShardedRows:
        return ShardedRows("centers", self.shards, self.feature_dim)

    @property
    def tables(self) -> dict[str, ShardedRows]:
        """The sharded state by file name: weights, optimizer slots, centers."""
        names = ["kernel", *(f"kernel_{s}" for s in SLOTS[self.head.optimizer_name]), "centers"]
        return dict(zip(names, [self.kernel, *self.slots, self.centers], strict=True))

    def _shard_view(self, ctx: tf.distribute.ReplicaContext, y: tf.Tensor):
        """(global labels, global batch, this replica's example offset, its class range start and size)."""
        if ctx.num_replicas_in_sync != self.shards.num_shards:
            raise ValueError(
                f"the model was built for {self.shards.num_shards} shards but runs on "
                f"{ctx.num_replicas_in_sync} replicas; build it inside the training strategy's scope"
            )
        replica = tf.cast(ctx.replica_id_in_sync_group, tf.int32)
        labels = _all_gather(ctx, y)
        sizes = _all_gather(ctx, tf.reshape(tf.shape(y)[0], [1]))
        offset = tf.reduce_sum(sizes[:replica])
        return labels, offset, self.shards.start_tensor(replica), self.shards.size_tensor(replica)

    def _owned_centers(self, labels: tf.Tensor, owner: tf.Tensor, start: tf.Tensor) -> tf.Tensor:
        """`[B, D]` centers of the examples whose class this shard owns (row 0 of the shard elsewhere)."""
        return tf.gather(self.centers.local(), tf.where(owner, labels - start, 0))

    def _center_loss(self, features, labels, owner, start) -> tf.Tensor:
        """Per-example center loss `[B]` of the examples this shard owns, 0 for the others."""
        rows = tf.stop_gradient(self._owned_centers(labels, owner, start))
        cl = 0.5 * tf.reduce_sum(tf.square(features - rows), axis=-1)
        return tf.where(owner, cl, tf.zeros_like(cl))

    def train_step(self, data):
        x, y = _unpack(data)
        y = tf.cast(tf.reshape(y, [-1]), tf.int32)
        ctx = tf.distribute.get_replica_context()
        labels, offset, start, size = self._shard_view(ctx, y)
        batch = tf.shape(labels)[0]
        global_batch = tf.cast(batch, tf.float32)
        owner = (labels >= start) & (labels < start + size)
        index = self.head.sample(labels, self.optimizer.iterations)  # the unsharded sample, sorted
        bounds = tf.searchsorted(index, tf.stack([start, start + size]))
        low, high = bounds[0], bounds[1]
        local_index = index[low:high] - start  # this shard's sampled rows
        column = tf.where(owner, tf.searchsorted(index, labels) - low, -1)
        one_hot = tf.one_hot(column, tf.shape(local_index)[0])
        kernel = self.kernel.local()
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            rows = tf.gather(kernel, local_index)
            tape.watch(rows)
            features = tf.cast(
                backbone_features(self.backbone, self.model_input(x), training=True), tf.float32
            )
            gathered = _all_gather(ctx, features)
            cos = self.head.sampled_cosines(gathered, rows)
            logits = self.head.shard_margin_logits(cos, one_hot)
            ce = distributed_cross_entropy(logits, one_hot, ctx)
            cl_owned = self._center_loss(gathered, labels, owner, start)
            loss = (tf.reduce_sum(ce) + self.center_lambda * tf.reduce_sum(cl_owned)) / global_batch
            if self.losses:
                loss += tf.add_n(self.losses) / ctx.num_replicas_in_sync
            scaled = self.optimizer.scale_loss(loss)
        *grads, row_grad = tape.gradient(scaled, [*variables, rows])
        self._apply_rows(local_index, row_grad, kernel, [s.local() for s in self.slots])
        self.optimizer.apply(grads, variables)
        if self.rule != "none":
            self._update_center_shard(tf.stop_gradient(gathered), labels, owner, start, global_batch)
        mine = tf.range(offset, offset + tf.shape(y)[0])
        return self._shard_metrics(
            ctx, mine, ce, cl_owned, labels, owner, start, features,
            plain=_accuracy_logits(self.head.s * cos, one_hot, ctx),
            margin=_accuracy_logits(logits, one_hot, ctx),
        )  # fmt: skip

    def _rows_finite(self, grad: tf.Tensor) -> tf.Tensor:
        """mixed_float16: skip every shard's row step when ANY shard's gradient is not finite (as the
        feature optimizer skips its step), so the shards never disagree on which steps happened."""
        bad = tf.reduce_sum(tf.cast(~tf.math.is_finite(grad), tf.float32))
        return tf.equal(_all_sum(tf.distribute.get_replica_context(), bad), 0.0)

    def _update_center_shard(self, features, labels, owner, start, global_batch) -> None:
        """The rule on this shard's present classes, from the gathered features (no all-reduce)."""
        mine = tf.boolean_mask(labels - start, owner)
        classes = present_classes(mine)
        sums, counts = present_statistics(tf.boolean_mask(features, owner), mine, classes)
        centers = self.centers.local()
        rows = updated_rows(
            self.rule,
            centers,
            classes,
            sums,
            counts,
            alpha=self.alpha,
            batch_size=global_batch,
            center_lr=self.center_lr,
        )
        centers.scatter_update(tf.IndexedSlices(rows, classes))

    def _shard_metrics(self, ctx, mine, ce, cl_owned, labels, owner, start, features, *, plain, margin):
        """Metrics of this replica's own examples (`mine`: their rows in the global batch); the center
        norms are read after the update, as `CenterLossModel` does."""
        norms = tf.norm(self._owned_centers(labels, owner, start), axis=-1)
        norm_owned = tf.where(owner, norms, tf.zeros_like(norms))
        cl = tf.gather(_all_sum(ctx, cl_owned), mine)
        center_norm = tf.gather(_all_sum(ctx, norm_owned), mine)
        ce = tf.gather(ce, mine)
        zeros = tf.zeros_like(mine)
        self.loss_tracker.update_state(ce + self.center_lambda * cl)
        self.softmax_tracker.update_state(ce)
        self.center_tracker.update_state(cl)
        self.accuracy_tracker.update_state(zeros, tf.gather(plain, mine))
        if self.margin_accuracy_tracker is not None:
            self.margin_accuracy_tracker.update_state(zeros, tf.gather(margin, mine))
        self.center_norm_tracker.update_state(center_norm)
        self.feature_norm_tracker.update_state(tf.norm(features, axis=-1))
        return worker_logs({m.name: m.result() for m in self.metrics})

    def test_step(self, data):
        x, y = _unpack(data)
        y = tf.cast(tf.reshape(y, [-1]), tf.int32)
        ctx = tf.distribute.get_replica_context()
        labels, offset, start, size = self._shard_view(ctx, y)
        owner = (labels >= start) & (labels < start + size)
        features = tf.cast(backbone_features(self.backbone, self.model_input(x), training=False), tf.float32)
        gathered = _all_gather(ctx, features)
        rows = tf.gather(self.kernel.local(), tf.range(size))  # every class of the shard, no margin
        logits = self.head.s * self.head.sampled_cosines(gathered, rows)
        one_hot = tf.one_hot(tf.where(owner, labels - start, -1), size)
        ce = distributed_cross_entropy(logits, one_hot, ctx)
        accuracy = _accuracy_logits(logits, one_hot, ctx)
        mine = tf.range(offset, offset + tf.shape(y)[0])
        cl_owned = self._center_loss(gathered, labels, owner, start)
        return self._shard_metrics(
            ctx, mine, ce, cl_owned, labels, owner, start, features, plain=accuracy, margin=accuracy
        )

    # --- the sharded state on disk (every replica calls these: gathering is collective)

    def save_head_state(self, folder: Path, write: bool = True) -> None:
        """Write the full `[K, D]` tables into `folder/<name>.npy` (written next to it, then renamed).
        `write=False` (workers other than the chief) joins the gathers and writes nothing."""
        if not write:
            for table in self.tables.values():
                table.gather(None)
            return
        folder = Path(folder)
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for name, table in self.tables.items():
            table.gather(partial / f"{name}.npy")
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)

    def load_head_state(self, folder: Path) -> None:
        """Load each local shard from the full tables of `save_head_state` (any number of shards)."""
        for name, table in self.tables.items():
            path = Path(folder) / f"{name}.npy"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing (the sharded head state of this checkpoint)")
            table.assign_from(np.load(path, mmap_mode="r"))

    def gather_centers(self, out: Path | None) -> np.ndarray | None:
        """The full centers, written to `out` (`.npy`) and returned memory-mapped; None without `out`
        (a worker that only joins the gather)."""
        return self.centers.gather(None if out is None else Path(out))

    def describe(self) -> str:
        """One line: which rows this process stores and how much head state that is."""
        ranges = ", ".join(
            f"replica {r}: classes {self.shards.start(r)}..{self.shards.start(r) + self.shards.size(r) - 1}"
            for r, _ in self.kernel.components()
        )
        return (
            f"Partial FC sharded over {self.shards.num_shards} replica(s) ({ranges}); "
            f"{self.shards.rows} of {self.shards.num_classes} rows stored per replica, head state "
            f"{self.shard_bytes() / 2**20:.1f} MiB in this process"
        )

    def shard_bytes(self) -> int:
        """Bytes of head state this process stores (every table's local blocks)."""
        return sum(
            int(np.prod(block.shape)) * block.dtype.size
            for table in self.tables.values()
            for _, block in table.components()
        )


def head_state_folder(checkpoint: Path) -> Path:
    """`epoch-NNN.head/` next to the Keras checkpoint `epoch-NNN.weights.h5`."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name.removesuffix(".weights.h5") + HEAD_STATE_SUFFIX)


class HeadStateCheckpoint(keras.callbacks.Callback):
    """Saves the sharded head state with each epoch's checkpoint and keeps the newest `keep`."""

    def __init__(
        self, model: ShardedPartialFCModel, checkpoints: Path, keep: int, write: bool = True
    ) -> None:
        super().__init__()
        self.sharded, self.checkpoints, self.keep, self.write = model, Path(checkpoints), keep, write

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        folder = self.checkpoints / f"epoch-{epoch + 1:03d}{HEAD_STATE_SUFFIX}"
        self.sharded.save_head_state(folder, write=self.write)
        if not self.write:
            return
        found = []
        for f in self.checkpoints.glob(f"epoch-*{HEAD_STATE_SUFFIX}"):
            number = f.name.removeprefix("epoch-").removesuffix(HEAD_STATE_SUFFIX)
            if number.isdigit():
                found.append((int(number), f))
        for _, old in sorted(found)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def build_sharded_partial_fc(
    backbone: keras.Model,
    num_classes: int,
    *,
    head: str,
    head_params: dict[str, float],
    sample_rate: float,
    seed: int,
    optimizer: str,
    num_shards: int | None = None,
    **center_options,
) -> ShardedPartialFCModel:
    """The class-sharded Partial FC model of a run (not compiled); build it inside the strategy's scope,
    which decides the number of shards (its replicas) unless `num_shards` is given."""
    pfc = ShardedPartialFCHead(
        num_classes,
        margin_head=head,
        margin_params=head_params,
        sample_rate=sample_rate,
        seed=seed,
        optimizer=optimizer,
        name="partial_fc",
    )
    return ShardedPartialFCModel(backbone, pfc, num_classes, num_shards=num_shards, **center_options)
