"""Distribution strategy for a training run: one device, several local devices, or several worker processes.

Multi-worker training uses `tf.distribute.MultiWorkerMirroredStrategy`, configured the standard way through
the `TF_CONFIG` environment variable (`{"cluster": {"worker": [...]}, "task": {"type": "worker", "index":
i}}`) or through `--worker host:port` (repeated, same order on every machine) + `--worker-index i`, which
build that same `TF_CONFIG`. The cluster description is validated here, before TensorFlow starts any
server, because a wrong index or a duplicated address otherwise shows up as a hang or a gRPC error minutes
later.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow as tf
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

STRATEGIES = ("auto", "default", "mirrored", "multiworker")

# Task types MultiWorkerMirroredStrategy understands. "ps" belongs to ParameterServerStrategy, which keeps
# variables on separate servers: the synchronous center all-reduce has no meaning there.
_WORKER_TYPES = ("chief", "worker")
_OTHER_TYPES = ("evaluator",)


class DistributedConfigError(ValueError):
    """TF_CONFIG or the --worker flags describe an impossible cluster; the message says what to fix."""


def parse_address(address: str) -> tuple[str, int]:
    """Split `host:port` (IPv6 as `[::1]:port`) and check the port; raise ValueError naming the address."""
    host, sep, port_text = address.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"worker address {address!r} must look like host:port")
    if host.startswith("[") and host.endswith("]"):
        ipaddress.IPv6Address(host[1:-1])
        host = host[1:-1]
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"worker address {address!r} has port {port_text!r}; need an integer in 1..65535")
    return host, int(port_text)


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    index: int = Field(ge=0)


class TFConfig(BaseModel):
    """The `TF_CONFIG` document: who is in the cluster and which member this process is."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    cluster: dict[str, list[str]]
    task: TaskSpec

    @field_validator("cluster")
    @classmethod
    def _valid_cluster(cls, cluster: dict[str, list[str]]) -> dict[str, list[str]]:
        unknown = sorted(set(cluster) - set(_WORKER_TYPES) - set(_OTHER_TYPES))
        if unknown:
            raise ValueError(
                f"cluster has task type(s) {', '.join(unknown)}; multi-worker training takes "
                f"{', '.join(_WORKER_TYPES + _OTHER_TYPES)} (parameter servers are not supported)"
            )
        if len(cluster.get("chief", [])) > 1:
            raise ValueError("cluster may have at most one chief")
        if not any(cluster.get(t) for t in _WORKER_TYPES):
            raise ValueError("cluster lists no worker (need at least one 'worker' or a 'chief' address)")
        seen: dict[tuple[str, int], str] = {}
        for task_type, addresses in cluster.items():
            for i, address in enumerate(addresses):
                key = parse_address(address)
                if key in seen:
                    raise ValueError(f"address {address} is listed twice ({seen[key]} and {task_type}[{i}])")
                seen[key] = f"{task_type}[{i}]"
        return cluster

    @model_validator(mode="after")
    def _task_in_cluster(self) -> TFConfig:
        if self.task.type not in _WORKER_TYPES:
            raise ValueError(
                f"task type {self.task.type!r} does not train; run training on the "
                f"{' or '.join(_WORKER_TYPES)} tasks"
            )
        members = self.cluster.get(self.task.type)
        if not members:
            raise ValueError(
                f"task type {self.task.type!r} is not in the cluster "
                f"(it has {', '.join(sorted(self.cluster))})"
            )
        if self.task.index >= len(members):
            raise ValueError(
                f"task index {self.task.index} is out of range: the cluster has {len(members)} "
                f"{self.task.type}(s), so the index must be 0..{len(members) - 1}"
            )
        return self

    @property
    def num_workers(self) -> int:
        """Processes that train (chief + workers); evaluators only read checkpoints."""
        return sum(len(self.cluster.get(t, [])) for t in _WORKER_TYPES)

    @property
    def is_chief(self) -> bool:
        """The chief writes the run folder: the 'chief' task, or worker 0 when there is no chief."""
        if "chief" in self.cluster:
            return self.task.type == "chief"
        return self.task.type == "worker" and self.task.index == 0

    def to_json(self) -> str:
        return json.dumps(self.model_dump(), sort_keys=True)


def _as_error(source: str, exc: ValidationError) -> DistributedConfigError:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return DistributedConfigError(f"{source}: {'; '.join(parts)}")


def parse_tf_config(text: str, source: str = "TF_CONFIG") -> TFConfig:
    """Validate a TF_CONFIG JSON document; errors start with `source` and say what is inconsistent."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DistributedConfigError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(data, Mapping):
        raise DistributedConfigError(f"{source} must be a JSON object with 'cluster' and 'task'")
    try:
        return TFConfig.model_validate(data)
    except ValidationError as exc:
        raise _as_error(source, exc) from None


def build_tf_config(workers: Sequence[str], worker_index: int) -> TFConfig:
    """TF_CONFIG for `--worker` addresses (the same list, in the same order, on every machine)."""
    if not workers:
        raise DistributedConfigError("--worker: give the address of every worker (host:port), at least one")
    try:
        return TFConfig.model_validate(
            {"cluster": {"worker": list(workers)}, "task": {"type": "worker", "index": worker_index}}
        )
    except ValidationError as exc:
        raise _as_error("--worker/--worker-index", exc) from None


def resolve_tf_config(
    workers: Sequence[str] | None = None,
    worker_index: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> TFConfig | None:
    """The cluster this process belongs to: from the flags, else from `TF_CONFIG`, else None (one process).

    Flags and a TF_CONFIG in the environment together are refused: silently preferring one would let the
    machines of one job disagree about the cluster.
    """
    environ = os.environ if environ is None else environ
    env_text = environ.get("TF_CONFIG", "").strip()
    if workers:
        if worker_index is None:
            raise DistributedConfigError("--worker-index is required with --worker (this machine's position)")
        if env_text:
            raise DistributedConfigError(
                "both TF_CONFIG and --worker are set; use one (unset TF_CONFIG or drop --worker)"
            )
        return build_tf_config(workers, worker_index)
    if worker_index is not None:
        raise DistributedConfigError("--worker-index needs --worker (the address list of all workers)")
    if env_text:
        return parse_tf_config(env_text)
    return None


def make_strategy(name: str = "auto", tf_config: TFConfig | None = None) -> tf.distribute.Strategy:
    """Build the strategy. Call before any other TensorFlow op: multi-worker needs to start its server first.

    - `default`: one device, no distribution.
    - `mirrored`: all local GPUs of this process (one CPU replica on a machine without GPUs).
    - `multiworker`: MultiWorkerMirroredStrategy over the processes in `tf_config`.
    - `auto`: multiworker when a cluster is given, mirrored when there are several local GPUs, else default.
    """
    if name not in STRATEGIES:
        raise DistributedConfigError(f"--strategy {name!r}: choose one of {', '.join(STRATEGIES)}")
    if name == "auto":
        if tf_config is not None:
            name = "multiworker"
        elif len(tf.config.list_logical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "default"
    if name == "multiworker":
        if tf_config is None:
            raise DistributedConfigError(
                "--strategy multiworker needs a cluster: set TF_CONFIG or pass --worker/--worker-index"
            )
        # The strategy reads the cluster from the environment; write the validated form so flags and
        # TF_CONFIG take the same path.
        os.environ["TF_CONFIG"] = tf_config.to_json()
        return tf.distribute.MultiWorkerMirroredStrategy()
    if tf_config is not None:
        raise DistributedConfigError(
            f"--strategy {name} trains in one process, but a cluster is configured (TF_CONFIG or --worker); "
            "use --strategy multiworker or auto"
        )
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process should write the run folder (always true outside multi-worker training)."""
    if not _multi_worker(strategy):
        return True
    resolver = strategy.cluster_resolver
    if "chief" in resolver.cluster_spec().as_dict():
        return resolver.task_type == "chief"
    return resolver.task_type == "worker" and resolver.task_id == 0


def _multi_worker(strategy: tf.distribute.Strategy) -> bool:
    """True when `strategy` spans several worker processes (what triggers Keras' multi-worker code paths)."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    spec = strategy.cluster_resolver.cluster_spec().as_dict()
    return sum(len(spec.get(t, [])) for t in _WORKER_TYPES) > 1


class MultiWorkerFit:
    """Mixin for a keras.Model subclass: makes `fit()`/`evaluate()` work under MultiWorkerMirroredStrategy.

    Keras 3 (checked on 3.15) has two bugs that only show with several worker processes:
    - `fit()` first reduces a distributed input batch with `strategy.reduce(MEAN)` to build the model
      symbolically; MultiWorkerMirroredStrategy cannot reduce a tuple, so fit fails before the first step.
      This mixin builds from the local replica's batch instead (the model only needs shapes).
    - the logs a step returns are reduced with `strategy.reduce(MEAN, v, axis=0)`, which fails for the
      scalar values every train_step returns; `worker_logs` gives them a length-1 axis in that case only.
    Neither changes what is computed: gradients and the center statistics are all-reduced by the step.
    """

    def _maybe_symbolic_build(self, iterator: Any = None, data_batch: Any = None) -> Any:
        strategy = self.distribute_strategy
        if iterator is not None and _multi_worker(strategy):
            for _, _, batches in iterator:
                batch = next(batches)
                data_batch = tf.nest.map_structure(lambda v: strategy.experimental_local_results(v)[0], batch)
                break
            iterator = None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)


def worker_logs(logs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """A step's scalar logs, shaped so Keras can reduce them across workers (unchanged otherwise)."""
    if not _multi_worker(tf.distribute.get_strategy()):
        return logs
    return {name: tf.reshape(value, [-1]) for name, value in logs.items()}


def backbone_features(backbone: Any, x: tf.Tensor, training: bool) -> tf.Tensor:
    """`backbone(x)` that also works on an empty batch: a replica's share of the last, short batch of an
    epoch is empty when that batch has fewer examples than replicas.

    TensorFlow's oneDNN Conv2D on CPU returns a tensor of the INPUT's shape for a batch of 0 (TF 2.21;
    `TF_ENABLE_ONEDNN_OPTS=0` avoids it), so the next layer fails with "Incompatible shapes" and the whole
    multi-worker step with it. An empty batch is replaced by one zero image whose features are then
    dropped, so nothing of it reaches a loss, a gradient or the center statistics. (A BatchNorm backbone
    in training mode would take that one image's moments into its moving statistics on that replica for
    that step, where an empty batch would have given NaN moments.)
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and ctx.num_replicas_in_sync == 1:
        # One replica: its batch is never empty, and the graph stays exactly the plain call (measured:
        # with the cond below, a one-device A-Softmax run ended 3e-4 away from the same run without it).
        return backbone(x, training=training)
    n = tf.shape(x)[0]
    padded = tf.cond(n > 0, lambda: x, lambda: tf.zeros(tf.concat([[1], tf.shape(x)[1:]], 0), x.dtype))
    return backbone(padded, training=training)[:n]
