"""insightface .bin pair files: round trip, insightface's 10-fold accuracy, the training callback and
`evaluate --pairs`."""

import io
import json
import pickle

import numpy as np
import pytest
from PIL import Image
from sklearn.model_selection import KFold
from typer.testing import CliRunner

from training.cli import app
from training.data.sources import DataError
from training.verification_bin import kfold_accuracy, load_bin, write_bin

runner = CliRunner()


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _insightface_calculate_roc(embeddings1, embeddings2, actual_issame, nrof_folds=10):
    """insightface's verification.py `calculate_roc` (pca=0) with its `calculate_accuracy`, loop for loop."""
    thresholds = np.arange(0, 4, 0.01)
    nrof_pairs = min(len(actual_issame), embeddings1.shape[0])
    nrof_thresholds = len(thresholds)
    k_fold = KFold(n_splits=nrof_folds, shuffle=False)
    accuracy = np.zeros(nrof_folds)
    indices = np.arange(nrof_pairs)
    diff = np.subtract(embeddings1, embeddings2)
    dist = np.sum(np.square(diff), 1)

    def calculate_accuracy(threshold, dist, actual_issame):
        predict_issame = np.less(dist, threshold)
        tp = np.sum(np.logical_and(predict_issame, actual_issame))
        tn = np.sum(np.logical_and(np.logical_not(predict_issame), np.logical_not(actual_issame)))
        return float(tp + tn) / dist.size

    for fold_idx, (train_set, test_set) in enumerate(k_fold.split(indices)):
        acc_train = np.zeros(nrof_thresholds)
        for threshold_idx, threshold in enumerate(thresholds):
            acc_train[threshold_idx] = calculate_accuracy(
                threshold, dist[train_set], actual_issame[train_set]
            )
        best_threshold_index = np.argmax(acc_train)
        accuracy[fold_idx] = calculate_accuracy(
            thresholds[best_threshold_index], dist[test_set], actual_issame[test_set]
        )
    return accuracy


@pytest.mark.parametrize("pairs", [60, 137])
def test_kfold_accuracy_equals_insightface_calculate_roc(pairs):
    rng = np.random.default_rng(pairs)
    issame = rng.random(pairs) < 0.5
    e1 = rng.normal(size=(pairs, 8))
    e2 = np.where(issame[:, None], e1 + rng.normal(scale=0.8, size=(pairs, 8)), rng.normal(size=(pairs, 8)))
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 /= np.linalg.norm(e2, axis=1, keepdims=True)
    ours, thresholds = kfold_accuracy(e1, e2, issame)
    reference = _insightface_calculate_roc(e1, e2, issame)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-12)
    assert 0.6 < ours.mean() < 1.0  # informative embeddings, neither chance nor trivially perfect
    assert np.all((thresholds >= 0) & (thresholds < 4))


def test_bin_round_trip_and_insightface_pickle_layout(tmp_path):
    images = [_png(np.full((8, 8, 3), i * 20, np.uint8)) for i in range(6)]
    path = write_bin(tmp_path / "lfw.bin", images, [True, False, True])
    with path.open("rb") as fh:
        bins, issame = pickle.load(fh, encoding="bytes")
    assert bins == images and issame == [True, False, True]
    pairs = load_bin(path)
    assert pairs.name == "lfw" and pairs.num_pairs == 3 and pairs.images == images
    assert pairs.issame.tolist() == [True, False, True]


def test_bad_pair_files_are_named(tmp_path):
    odd = tmp_path / "odd.bin"
    with odd.open("wb") as fh:
        pickle.dump(([b"a", b"b", b"c"], [True, False]), fh)
    with pytest.raises(DataError, match=r"odd\.bin: 3 images for 2 pairs"):
        load_bin(odd)
    (tmp_path / "junk.bin").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=r"junk\.bin: not an insightface pair file"):
        load_bin(tmp_path / "junk.bin")


class _Boom:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pair_files_cannot_run_code(tmp_path, capsys):
    evil = tmp_path / "evil.bin"
    with evil.open("wb") as fh:
        pickle.dump(([_Boom(), b"x"], [True]), fh)
    with pytest.raises(DataError, match=r"refusing to load builtins\.print"):
        load_bin(evil)
    assert "pwned" not in capsys.readouterr().out


def _pair_file_from_digits(path, pairs: int = 40, seed: int = 0):
    """Pairs of bundled digit images (upscaled PNGs), half genuine, as a pair file of encoded images."""
    from training.data.sources import load_digits_set

    digits = load_digits_set()
    rng = np.random.default_rng(seed)
    images, issame = [], []
    for i in range(pairs):
        same = i % 2 == 0
        a = int(rng.integers(len(digits.labels)))
        pool = np.flatnonzero(
            (digits.labels == digits.labels[a]) if same else (digits.labels != digits.labels[a])
        )
        b = int(rng.choice(pool[pool != a]))
        images += [_png(digits.images[a]), _png(digits.images[b])]
        issame.append(same)
    return write_bin(path, images, issame)


@pytest.mark.slow
def test_training_verifies_every_n_steps_and_evaluate_pairs_reports_it(tmp_path):
    pair_file = _pair_file_from_digits(tmp_path / "digits_pairs.bin")
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--epochs", "2", "--width", "4", "--feature-dim", "8"]
    args += ["--heldout-classes", "7,8,9", "--batch-size", "128", "--quiet"]
    args += ["--verify-pairs", str(pair_file), "--verify-every", "5"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    ver = summary["verification"]["digits_pairs"]
    steps_per_epoch = -(-int(summary["num_train"]) // 128)
    assert [h["step"] for h in ver["history"]] == list(range(5, 2 * steps_per_epoch + 1, 5))
    assert all(0.0 <= h["accuracy"] <= 1.0 for h in ver["history"])
    assert ver["pairs"] == 40
    events = list((out / "logs" / "verification").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file for verification"

    result = runner.invoke(app, ["evaluate", str(out), "--pairs", str(pair_file)])
    assert result.exit_code == 0, result.output
    assert "| digits_pairs | 40 |" in result.output
    report = json.loads((out / "verification.json").read_text())["results"][0]
    assert report["name"] == "digits_pairs" and report["pairs"] == 40 and len(report["fold_thresholds"]) == 10
    # The trained digits model separates digit identities better than chance on these pairs.
    assert report["accuracy"] > 0.6


def test_evaluate_pairs_names_a_missing_file(tmp_path):
    result = runner.invoke(app, ["evaluate", str(tmp_path), "--pairs", str(tmp_path / "lfw.bin")])
    assert result.exit_code == 2 and "lfw.bin" in result.output


def test_verify_pairs_option_is_checked_before_training(tmp_path):
    result = runner.invoke(
        app, ["train", "--out", str(tmp_path / "r"), "--verify-pairs", str(tmp_path / "x.bin")]
    )
    assert result.exit_code == 2 and "--verify-pairs" in result.output
    assert not (tmp_path / "r").exists()


def test_unreadable_pair_file_stops_training_before_the_run_folder(tmp_path):
    junk = tmp_path / "lfw.bin"
    junk.write_bytes(b"not a pickle")
    out = tmp_path / "r"
    result = runner.invoke(app, ["train", "--out", str(out), "--epochs", "1", "--verify-pairs", str(junk)])
    assert result.exit_code == 2 and "lfw.bin: not an insightface pair file" in result.output
    assert not out.exists()
