"""Under MirroredStrategy on 2 logical CPUs the centers (and weights) equal one-device training on the same
global batches: the per-class sums and counts are all-reduced once per step, losses use the global batch size.

TensorFlow's logical-device split must happen before it initialises, so the comparison runs in a fresh
subprocess and reports the differences as JSON.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np
    from training.backbones import build_backbone
    from training.data.sources import load_digits_set
    from training.heads import make_head
    from training.model import CenterLossModel

    digits = load_digits_set()
    keep = digits.labels < 5
    x = (digits.images[keep][:101, :, :, None] / 255.0).astype("float32")  # 101: the last batch splits 3 + 2
    y = digits.labels[keep][:101].astype("int32")

    def train(strategy, rule, backbone, init, n, epochs):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = CenterLossModel(
                build_backbone(backbone, (8, 8, 1), 4, 4), make_head("softmax", 5), 5,
                center_lambda=0.1, alpha=0.6, rule=rule, center_lr=0.5,
            )
            model.compile(optimizer=keras.optimizers.SGD(0.05))
        if init is not None:
            model.set_weights(init)
        start = model.get_weights()
        ds = tf.data.Dataset.from_tensor_slices((x[:n], y[:n])).batch(24)
        model.fit(ds, epochs=epochs, verbose=0, shuffle=False)
        return start, model.centers.numpy(), model.get_weights(), strategy.num_replicas_in_sync

    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    report = {}
    # facecnn: synchronised BatchNorm computes moments as E[x^2] - E[x]^2 from all-reduced sums, which rounds
    # differently from one device's moments; BN amplifies that over steps, so it is compared after 2 steps.
    cases = (("paper", "lenetpp", 101, 2), ("facenet", "lenetpp", 101, 2), ("gradient", "lenetpp", 101, 2),
             ("paper", "facecnn", 48, 1))
    for rule, backbone, n, epochs in cases:
        init, c1, w1, r1 = train(tf.distribute.get_strategy(), rule, backbone, None, n, epochs)
        _, c2, w2, r2 = train(mirrored, rule, backbone, init, n, epochs)
        report[f"{rule}/{backbone}"] = {
            "replicas": [r1, r2],
            "center_diff": float(np.max(np.abs(c1 - c2))),
            "center_scale": float(np.max(np.abs(c1))),
            "weight_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(w1, w2)),
        }
    print("REPORT" + json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def replica_report():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(s for s in proc.stdout.splitlines() if s.startswith("REPORT"))
    return json.loads(line.removeprefix("REPORT"))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["paper/lenetpp", "facenet/lenetpp", "gradient/lenetpp", "paper/facecnn"])
def test_two_replicas_give_the_centers_of_one_replica(replica_report, case):
    result = replica_report[case]
    assert result["replicas"] == [1, 2]
    assert result["center_scale"] > 1e-3  # the centers moved, so equality is not trivially 0 == 0
    assert result["center_diff"] < 1e-5
    assert result["weight_diff"] < 1e-5
