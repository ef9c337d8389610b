"""Partial FC under MirroredStrategy on 2 logical CPUs == one device on the same global batches.

Both replicas must draw the same sample (labels all-gathered), sum their `[S, D]` row gradients, and write
the same rows of the weights, the optimizer slots and the centers. Runs in a subprocess because the
logical-device split must happen before TensorFlow initialises.
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
    from training.partial_fc import build_partial_fc

    K = 60
    rng = np.random.default_rng(0)
    x = rng.random((75, 8, 8, 1), dtype=np.float32)  # 75: the last batch of 24 splits 2 + 1
    y = rng.integers(0, K, 75).astype(np.int32)

    def train(strategy, init, kind, rule):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = build_partial_fc(
                build_backbone("lenetpp", (8, 8, 1), 4, 4), K, head="arcface", head_params={"s": 8.0},
                sample_rate=0.2, seed=4, optimizer=kind,
                center_lambda=0.1, alpha=0.5, rule=rule, center_lr=0.5,
            )
            opt = keras.optimizers.Adam(0.01) if kind == "adam" else keras.optimizers.SGD(0.005, momentum=0.9)
            model.compile(optimizer=opt)
        if init is not None:
            model.set_weights(init)
        start = model.get_weights()
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(24)
        model.fit(ds, epochs=2, verbose=0, shuffle=False)
        return start, model, strategy.num_replicas_in_sync

    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    report = {}
    for kind, rule in (("adam", "paper"), ("sgd", "gradient")):
        init, one, r1 = train(tf.distribute.get_strategy(), None, kind, rule)
        _, two, r2 = train(mirrored, init, kind, rule)
        slots = [np.max(np.abs(a.numpy() - b.numpy())) for a, b in zip(one.head.slots, two.head.slots)]
        report[f"{kind}/{rule}"] = {
            "replicas": [r1, r2],
            "kernel_diff": float(np.max(np.abs(one.head.kernel.numpy() - two.head.kernel.numpy()))),
            "kernel_moved": float(np.max(np.abs(one.head.kernel.numpy() - init_kernel)))
            if (init_kernel := init[[w.path for w in one.weights].index(one.head.kernel.path)]) is not None
            else 0.0,
            "slot_diff": float(max(slots)),
            "center_diff": float(np.max(np.abs(one.centers.numpy() - two.centers.numpy()))),
            "center_scale": float(np.max(np.abs(one.centers.numpy()))),
            "weight_diff": max(
                float(np.max(np.abs(a - b)))
                for a, b in zip(one.backbone.get_weights(), two.backbone.get_weights())
            ),
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
@pytest.mark.parametrize("case", ["adam/paper", "sgd/gradient"])
def test_two_replicas_equal_one(replica_report, case):
    result = replica_report[case]
    assert result["replicas"] == [1, 2]
    assert result["center_scale"] > 1e-3 and result["kernel_moved"] > 1e-3  # not trivially 0 == 0
    assert result["kernel_diff"] < 1e-5
    assert result["slot_diff"] < 1e-5
    assert result["center_diff"] < 1e-5
    assert result["weight_diff"] < 1e-5
