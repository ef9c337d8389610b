"""TF_CONFIG and --worker flags: valid clusters are accepted, inconsistent ones fail before training."""

from __future__ import annotations

import json

import pytest
import tensorflow as tf

from training.distributed import (
    DistributedConfigError,
    build_tf_config,
    is_chief,
    make_strategy,
    parse_tf_config,
    resolve_tf_config,
)


def _tf_config(workers, task_type="worker", index=0, **extra_jobs):
    return json.dumps(
        {"cluster": {"worker": workers, **extra_jobs}, "task": {"type": task_type, "index": index}}
    )


def test_valid_tf_config_is_parsed():
    config = parse_tf_config(_tf_config(["10.0.0.1:2222", "10.0.0.2:2222"], index=1))
    assert config.num_workers == 2
    assert not config.is_chief
    assert parse_tf_config(_tf_config(["a:1", "b:1"], index=0)).is_chief


def test_explicit_chief_is_the_chief_and_counts_as_a_worker():
    config = parse_tf_config(_tf_config(["b:1"], task_type="chief", index=0, chief=["a:1"]))
    assert config.is_chief
    assert config.num_workers == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (_tf_config(["a:1", "b:1"], index=2), "index 2 is out of range.*0..1"),
        (_tf_config(["a:1"], task_type="chief"), "task type 'chief' is not in the cluster"),
        (_tf_config(["a:1", "a:1"]), "listed twice"),
        (_tf_config(["a:1"], ps=["p:1"]), "parameter servers are not supported"),
        (_tf_config(["a:1"], task_type="evaluator", evaluator=["e:1"]), "does not train"),
        (_tf_config(["a"]), "host:port"),
        (_tf_config(["a:70000"]), "1..65535"),
        (_tf_config(["a:1"], index=-1), "task.index"),
        (json.dumps({"cluster": {"worker": ["a:1"]}}), "task"),
        (
            json.dumps({"cluster": {"evaluator": ["a:1"]}, "task": {"type": "evaluator", "index": 0}}),
            "no worker",
        ),
    ],
)
def test_inconsistent_tf_config_is_refused_with_the_reason(text, message):
    with pytest.raises(DistributedConfigError, match=message) as info:
        parse_tf_config(text)
    assert str(info.value).startswith("TF_CONFIG")


def test_worker_flags_build_the_same_config_as_tf_config():
    built = build_tf_config(["127.0.0.1:5000", "127.0.0.1:5001"], 1)
    parsed = parse_tf_config(built.to_json())
    assert built == parsed
    assert json.loads(built.to_json())["task"] == {"type": "worker", "index": 1}


def test_worker_flags_errors_name_the_flags():
    with pytest.raises(DistributedConfigError, match=r"--worker/--worker-index: .*out of range"):
        build_tf_config(["127.0.0.1:5000"], 3)
    with pytest.raises(DistributedConfigError, match="--worker-index is required"):
        resolve_tf_config(["127.0.0.1:5000"], None, environ={})
    with pytest.raises(DistributedConfigError, match="--worker-index needs --worker"):
        resolve_tf_config(None, 0, environ={})


def test_flags_and_tf_config_together_are_refused():
    env = {"TF_CONFIG": _tf_config(["a:1"])}
    with pytest.raises(DistributedConfigError, match="both TF_CONFIG and --worker"):
        resolve_tf_config(["a:1"], 0, environ=env)


def test_no_cluster_means_single_process():
    assert resolve_tf_config(None, None, environ={"TF_CONFIG": "  "}) is None
    assert resolve_tf_config(None, None, environ={"TF_CONFIG": _tf_config(["a:1"])}).num_workers == 1


def test_single_process_strategies_refuse_a_cluster_and_vice_versa():
    cluster = build_tf_config(["127.0.0.1:5000", "127.0.0.1:5001"], 0)
    with pytest.raises(DistributedConfigError, match="trains in one process"):
        make_strategy("mirrored", cluster)
    with pytest.raises(DistributedConfigError, match="needs a cluster"):
        make_strategy("multiworker", None)
    with pytest.raises(DistributedConfigError, match="choose one of"):
        make_strategy("horovod", None)


def test_default_strategy_process_is_chief():
    strategy = make_strategy("default", None)
    assert strategy is tf.distribute.get_strategy()
    assert is_chief(strategy)
