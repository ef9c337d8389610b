"""Stop after epoch 1 and resume == one uninterrupted run, for every head (margin state included)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from training.config import RunConfig
from training.data import build_splits
from training.heads import make_head
from training.run import load_run
from training.trainer import train

# A fast-decaying SphereFace lambda makes the A-Softmax step counter matter: a resume that restarted it at 0
# would train with a very different softmax/psi mix and end with different weights.
HEAD_PARAMS = {
    "softmax": {},
    "asoftmax": {"m": 2, "lambda_base": 10.0, "lambda_gamma": 0.5, "lambda_min": 0.0},
    "amsoftmax": {"s": 10.0, "m": 0.2},
    "arcface": {"s": 10.0, "m": 0.3},
}


def tiny_config(head: str, epochs: int) -> RunConfig:
    return RunConfig(
        dataset="digits",
        heldout_classes=["7", "8", "9"],
        val_fraction=0.0,
        backbone="lenetpp",
        feature_dim=2,
        width=4,
        head=head,
        head_params=HEAD_PARAMS[head],
        center_lambda=0.1,
        epochs=epochs,
        batch_size=256,
        seed=3,
    )


@pytest.fixture(scope="module")
def digits_splits():
    # Splits depend only on the data options, identical for every head here: prepare them once.
    return build_splits(tiny_config("softmax", 2))


def _final_state(run_dir: Path) -> tuple[np.ndarray, list[np.ndarray]]:
    run = load_run(run_dir)
    return run.centers, [np.asarray(w) for w in run.embedding.get_weights()]


@pytest.mark.slow
@pytest.mark.parametrize("head", sorted(HEAD_PARAMS))
def test_resume_after_epoch_one_equals_uninterrupted_run(head, digits_splits, tmp_path):
    straight = train(tiny_config(head, 2), tmp_path / "straight", splits=digits_splits, verbose=0)
    partial = train(tiny_config(head, 1), tmp_path / "resumed", splits=digits_splits, verbose=0)
    resumed = train(tiny_config(head, 2), partial, resume=True, splits=digits_splits, verbose=0)

    centers_a, weights_a = _final_state(straight)
    centers_b, weights_b = _final_state(resumed)
    # The first epoch already moved the centers, so the comparison is not between two zero matrices.
    assert np.abs(centers_a).max() > 1e-3
    np.testing.assert_allclose(centers_b, centers_a, atol=1e-5)
    for a, b in zip(weights_a, weights_b, strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5)


def test_asoftmax_step_counter_is_saved_with_the_weights(tmp_path):
    head = make_head("asoftmax", 3, **HEAD_PARAMS["asoftmax"])
    features = keras.Input((2,))
    labels = keras.Input((), dtype="int32")
    model = keras.Model([features, labels], head(features, labels, training=True))
    for _ in range(3):
        model([np.ones((4, 2), np.float32), np.zeros(4, np.int32)], training=True)
    model.save_weights(tmp_path / "head.weights.h5")

    fresh_head = make_head("asoftmax", 3, **HEAD_PARAMS["asoftmax"])
    fresh = keras.Model([features, labels], fresh_head(features, labels, training=True))
    fresh.load_weights(tmp_path / "head.weights.h5")
    assert float(fresh_head.step.numpy()) == float(head.step.numpy()) == 3.0
    assert float(fresh_head.current_lambda()) == pytest.approx(10.0 / 2.5)


# Runs in a fresh interpreter: logical CPU devices must be configured before TensorFlow initialises, which
# the test process has long done. Prints, per head, the largest difference between an uninterrupted and a
# resumed MirroredStrategy run over 2 replicas, and between the uninterrupted run and one device.
_MIRRORED_SCRIPT = """
import json, sys, tempfile
from pathlib import Path
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from tests.training.test_resume_heads import tiny_config
from training.data import build_splits
from training.run import load_run
from training.trainer import train

def state(path):
    run = load_run(path)
    return [run.centers, *run.embedding.get_weights()]

def max_diff(a, b):
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(a, b, strict=True))

mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
splits = build_splits(tiny_config("softmax", 2))
report = {}
with tempfile.TemporaryDirectory() as tmp:
    for head in sys.argv[1:]:
        root = Path(tmp) / head
        straight = train(tiny_config(head, 2), root / "straight", splits=splits, strategy=mirrored, verbose=0)
        train(tiny_config(head, 1), root / "resumed", splits=splits, strategy=mirrored, verbose=0)
        resumed = train(tiny_config(head, 2), root / "resumed", resume=True, splits=splits,
                        strategy=mirrored, verbose=0)
        one = train(tiny_config(head, 2), root / "one", splits=splits, verbose=0)
        report[head] = {
            "replicas": mirrored.num_replicas_in_sync,
            "resumed_vs_straight": max_diff(state(straight), state(resumed)),
            "mirrored_vs_one_device": max_diff(state(straight), state(one)),
            "centers_scale": float(np.abs(state(straight)[0]).max()),
        }
print("REPORT " + json.dumps(report))
"""


@pytest.mark.slow
def test_resume_under_mirrored_strategy_equals_uninterrupted_run_and_one_device():
    repo = Path(__file__).resolve().parents[2]
    # A-Softmax is the head with extra state (its step counter, written once per step from the first
    # replica); the stateless heads resume through the same weights file, checked on one device above.
    heads = ["asoftmax"]
    proc = subprocess.run(
        [sys.executable, "-c", _MIRRORED_SCRIPT, *heads],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=400,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(lines[-1].removeprefix("REPORT "))
    for head in heads:
        assert report[head]["replicas"] == 2
        assert report[head]["centers_scale"] > 1e-3
        assert report[head]["resumed_vs_straight"] < 1e-5, (head, report[head])
        # Resuming is exact; two replicas are not one device: they sum half-batch gradients in another order,
        # and A-Softmax's margin (m=4) amplifies that rounding over two epochs. Measured 3.0e-4 once the
        # empty-share guard (training.distributed.backbone_features) is in the two-replica graph.
        assert report[head]["mirrored_vs_one_device"] < 1e-3, (head, report[head])
