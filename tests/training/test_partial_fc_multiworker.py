"""Partial FC with two worker processes on 127.0.0.1 (MultiWorkerMirroredStrategy) == one process.

The real CLI on both workers, as `test_multiworker.py`; here with ArcFace + `--sample-rate`: both workers
must draw the same class sample every step (labels all-gathered across workers), all-reduce the sampled
rows' gradients and the present classes' center statistics, and write the same rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_multiworker import _assert_same_model, _single_process, run_two_workers

from training.config import RunConfig


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
