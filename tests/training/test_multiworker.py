"""Two worker processes on 127.0.0.1 (MultiWorkerMirroredStrategy) == one process on the same global batches.

Each worker is the real CLI (`idembed-train train --worker ...`); worker 0 gets the cluster from the flags,
worker 1 from TF_CONFIG, so both ways of describing a cluster are exercised. The reference is `train()` in
this process with the chief's saved config and the default strategy.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training.config import RunConfig
from training.run import load_run
from training.trainer import train

WORKER_TIMEOUT_S = 300
# A-Softmax: its step counter is a replicated variable too, and it has to stay in sync across workers.
TRAIN_ARGS = [
    "--dataset=digits",
    "--heldout-classes=7,8,9",
    "--val-fraction=0",
    "--width=4",
    "--feature-dim=2",
    "--head=asoftmax",
    "--margin=2",
    "--lambda=0.1",
    "--batch-size=256",
    "--seed=5",
    "--quiet",
]
_CLI = "from training.cli import app; app()"


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run_two_workers(out: Path, extra: list[str]) -> list[str]:
    """Run both workers of a 2-process cluster to completion; fail with their output if either fails.
    Returns their outputs."""
    addresses = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    base_env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    tf_config = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": 1}}
    commands = [
        (
            [sys.executable, "-c", _CLI, "train", *TRAIN_ARGS, *extra, f"--out={out}"]
            + [f"--worker={a}" for a in addresses]
            + ["--worker-index=0"],
            base_env,
        ),
        (
            [sys.executable, "-c", _CLI, "train", *TRAIN_ARGS, *extra, f"--out={out}"],
            {**base_env, "TF_CONFIG": json.dumps(tf_config)},
        ),
    ]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for cmd, env in commands
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=WORKER_TIMEOUT_S)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for i, (proc, text) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"worker {i} exited {proc.returncode}:\n{text[-4000:]}"
    assert "done; the chief writes" in outputs[1]
    return outputs


@pytest.fixture(scope="module")
def two_worker_run(tmp_path_factory) -> Path:
    """Two workers train epoch 1 into one run folder (written by the chief only)."""
    out = tmp_path_factory.mktemp("multiworker") / "run"
    run_two_workers(out, ["--epochs=1"])
    return out


def _single_process(config: RunConfig, out: Path, epochs: int) -> Path:
    return train(config.model_copy(update={"epochs": epochs}), out, verbose=0)


def _assert_same_model(a: Path, b: Path) -> None:
    run_a, run_b = load_run(a), load_run(b)
    assert np.abs(run_a.centers).max() > 1e-3
    np.testing.assert_allclose(run_b.centers, run_a.centers, atol=1e-5)
    for wa, wb in zip(run_a.embedding.get_weights(), run_b.embedding.get_weights(), strict=True):
        np.testing.assert_allclose(wb, wa, atol=1e-5)


@pytest.mark.slow
def test_two_workers_end_with_the_centers_of_one_worker(two_worker_run, tmp_path):
    config = RunConfig.load(two_worker_run / "config.json")
    assert config.head == "asoftmax" and config.epochs == 1
    single = _single_process(config, tmp_path / "single", epochs=1)
    _assert_same_model(single, two_worker_run)


@pytest.mark.slow
def test_two_workers_resumed_equal_one_uninterrupted_worker(two_worker_run, tmp_path):
    config = RunConfig.load(two_worker_run / "config.json")
    run_two_workers(two_worker_run, ["--resume", "--epochs=2"])
    summary = json.loads((two_worker_run / "summary.json").read_text())
    assert summary["resumed_from_epoch"] == 1
    single = _single_process(config, tmp_path / "single", epochs=2)
    _assert_same_model(single, two_worker_run)
