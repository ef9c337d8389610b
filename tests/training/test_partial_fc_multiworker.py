"""Partial FC with two worker processes on 127.0.0.1 (MultiWorkerMirroredStrategy) == one process.

The real CLI on both workers, as `test_multiworker.py`; here with ArcFace + `--sample-rate`: both workers
must draw the same class sample every step (labels all-gathered across workers), all-reduce the sampled
rows' gradients and the present classes' center statistics, and write the same rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_multiworker import _assert_same_model, _single_process, run_two_workers

from training.config import RunConfig
from training.trainer import train


@pytest.fixture(scope="module")
def many_identities(tmp_path_factory) -> Path:
    """40 identities x 3 random 8x8 images: identities 7, 8, 9 are held out by TRAIN_ARGS, 37 train."""
    root = tmp_path_factory.mktemp("identities")
    rng = np.random.default_rng(0)
    for identity in range(40):
        folder = root / str(identity)
        folder.mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.mark.slow
def test_two_workers_partial_fc_equal_one(many_identities: Path, tmp_path: Path) -> None:
    # 111 training images in batches of 24: 5 steps (few, so float reduction order cannot build up), at
    # most 24 positives of 37 classes, int(0.8 * 37) = 29 sampled: each step draws negatives and leaves 8
    # classes out. The last batch of 15 splits 8 + 7 across the workers.
    extra = [
        f"--dataset={many_identities}",
        "--image-size=8",
        "--batch-size=24",
        "--head=arcface",
        "--margin=0.3",
        "--scale=16",
        "--sample-rate=0.8",
        "--epochs=1",
    ]
    out = tmp_path / "two"
    run_two_workers(out, extra)
    config = RunConfig.load(out / "config.json")
    assert config.sample_rate == 0.8 and config.head == "arcface"
    single = _single_process(config, tmp_path / "single", epochs=1)
    _assert_same_model(single, out)


@pytest.mark.slow
def test_two_sharded_workers_equal_one(many_identities: Path, tmp_path: Path) -> None:
    # --shard-classes: 37 classes split 19 + 18 over the two workers, each storing only its rows. 111
    # images in batches of 22: 6 steps, the last of ONE image, so worker 1's share of it is empty.
    extra = [
        f"--dataset={many_identities}",
        "--image-size=8",
        "--batch-size=22",
        "--head=arcface",
        "--margin=0.3",
        "--scale=16",
        "--sample-rate=0.8",
        "--shard-classes",
        "--epochs=1",
    ]
    out = tmp_path / "two"
    outputs = run_two_workers(out, extra)
    assert "replica 0: classes 0..18" in outputs[0] and "replica 1: classes 19..36" in outputs[1]
    assert all("19 of 37 rows stored per replica" in text for text in outputs)
    config = RunConfig.load(out / "config.json")
    assert config.shard_classes and config.sample_rate == 0.8
    summary = json.loads((out / "summary.json").read_text())
    # the chief stored 19 rows of the 4 tables (weights, 2 Adam slots, centers) of 2-d features
    assert summary["head_shards"] == {"shards": 2, "rows_per_shard": 19, "head_state_bytes": 19 * 2 * 4 * 4}
    # The same config without --shard-classes in one process (replicated rows, the same initial rows and
    # samples) ends with the same run folder contents, the files `export` reads (centers.npy, embedding).
    unsharded = config.model_copy(update={"shard_classes": False})
    single = _single_process(unsharded, tmp_path / "single", epochs=1)
    assert "head_shards" not in json.loads((single / "summary.json").read_text())
    _assert_same_model(single, out)
    _assert_same_history(single, out)
    # The checkpoint holds full tables: one process resumes the 2-worker run (1 shard) and ends where an
    # uninterrupted unsharded run of 2 epochs ends.
    head = out / "checkpoints" / "epoch-001.head"
    names = sorted(p.name for p in head.iterdir())
    assert names == ["centers.npy", "kernel.npy", "kernel_momentum.npy", "kernel_velocity.npy"]
    assert np.load(head / "centers.npy").shape == (37, 2)
    resumed = train(config.model_copy(update={"epochs": 2}), out, resume=True, verbose=0)
    assert json.loads((resumed / "summary.json").read_text())["head_shards"]["shards"] == 1
    uninterrupted = _single_process(unsharded, tmp_path / "single2", epochs=2)
    _assert_same_model(uninterrupted, resumed)
    _assert_same_history(uninterrupted, resumed)


def _assert_same_history(a: Path, b: Path) -> None:
    """The epoch logs (metrics reduced over all workers) of two runs: the same loss trajectory."""
    ha, hb = (np.genfromtxt(run / "history.csv", delimiter=",", names=True) for run in (a, b))
    assert ha.shape == hb.shape
    for name in ("loss", "softmax_loss", "center_loss", "accuracy", "center_norm"):
        np.testing.assert_allclose(hb[name], ha[name], rtol=1e-4, atol=1e-6, err_msg=name)
