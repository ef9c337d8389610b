"""Evidence that training learns (digits, 7-9 held out): validation accuracy on the training identities and
center loss tightening classes relative to their spacing (docs/training.md has the multi-seed figures)."""

import pytest

from training.config import RunConfig
from training.data import build_splits
from training.run import load_run
from training.separation import class_separation
from training.trainer import train

# The seeded recipe of docs/training.md ("Evidence"); only lambda differs between the two runs.
RECIPE = dict(heldout_classes=["7", "8", "9"], width=16, feature_dim=16, epochs=20, batch_size=64, seed=1)


@pytest.fixture(scope="module")
def twin_runs(tmp_path_factory):
    base = RunConfig(**RECIPE, center_lambda=0.0)
    splits = build_splits(base)
    runs = {}
    for lam in (0.0, 0.03):
        out = tmp_path_factory.mktemp(f"lambda{lam}")
        run = load_run(train(base.model_copy(update={"center_lambda": lam}), out, verbose=0, splits=splits))
        runs[lam] = {
            "val_accuracy": _val_accuracy(out),
            "heldout": class_separation(run.embedding.predict(splits.x_heldout, verbose=0), splits.y_heldout),
            "val": class_separation(run.embedding.predict(splits.x_val, verbose=0), splits.y_val),
        }
    return runs


def _val_accuracy(run_dir) -> float:
    import json

    return json.loads((run_dir / "summary.json").read_text())["final"]["val_accuracy"]


@pytest.mark.slow
def test_short_run_reaches_95_percent_validation_accuracy(twin_runs):
    for lam, result in twin_runs.items():
        assert result["val_accuracy"] >= 0.95, lam


@pytest.mark.slow
def test_center_loss_lowers_intra_over_inter_ratio_on_heldout_identities(twin_runs):
    assert twin_runs[0.03]["heldout"].ratio < twin_runs[0.0]["heldout"].ratio


@pytest.mark.slow
def test_center_loss_makes_training_identities_more_compact(twin_runs):
    assert twin_runs[0.03]["val"].ratio < 0.8 * twin_runs[0.0]["val"].ratio
