"""CenterLossModel inside fit(): loss parts, callbacks, checkpointed centers, exact resume, NaN guard."""

import csv
import importlib.util
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from training.backbones import build_backbone
from training.config import ConfigError, RunConfig
from training.data import build_splits
from training.heads import make_head
from training.model import CenterLossModel
from training.run import RunError, RunPaths, latest_checkpoint, load_run
from training.trainer import CenterDivergenceGuard, DivergenceError, build_model, train


def tiny(**overrides) -> RunConfig:
    options = dict(heldout_classes=["7", "8", "9"], width=4, feature_dim=4, epochs=2, batch_size=64, seed=3)
    return RunConfig(**{**options, **overrides})


@pytest.fixture(scope="module")
def splits():
    return build_splits(tiny())


def test_train_step_reports_each_loss_part_and_accuracy(splits):
    model = build_model(tiny(center_lambda=0.5), splits)
    # centers start at zero, so the first center loss is 0.5 * mean ||x||^2 of the features before the step
    features = model.backbone(splits.x_train[:32]).numpy()
    logs = model.train_on_batch(splits.x_train[:32], splits.y_train[:32], return_dict=True)
    assert set(logs) == {"loss", "softmax_loss", "center_loss", "accuracy", "center_norm", "feature_norm"}
    assert logs["center_loss"] == pytest.approx(0.5 * np.mean(np.sum(features**2, axis=1)), rel=1e-4)
    assert logs["loss"] == pytest.approx(logs["softmax_loss"] + 0.5 * logs["center_loss"], rel=1e-5)


def test_centers_are_non_trainable_and_move_only_by_the_rule(splits):
    model = build_model(tiny(), splits)
    assert all(v is not model.centers for v in model.trainable_variables)
    before = model.centers.numpy().copy()
    model.train_on_batch(splits.x_train[:64], splits.y_train[:64])
    moved = np.abs(model.centers.numpy() - before).max(axis=1)
    present = np.isin(np.arange(7), splits.y_train[:64])
    assert np.all(moved[present] > 0) and np.all(moved[~present] == 0)


def test_lambda_zero_trains_softmax_only_but_still_tracks_centers(splits):
    model = build_model(tiny(center_lambda=0.0), splits)
    logs = model.train_on_batch(splits.x_train[:64], splits.y_train[:64], return_dict=True)
    assert logs["loss"] == pytest.approx(logs["softmax_loss"], rel=1e-6)
    assert np.abs(model.centers.numpy()).max() > 0


@pytest.mark.slow
def test_two_classes_with_alpha_one_never_produce_nan():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 1)).astype(np.float32) * 50
    y = (rng.random(64) < 0.1).astype(np.int32)  # class 1 rare: often absent from a batch
    for rule in ("paper", "facenet", "gradient"):
        keras.utils.set_random_seed(0)
        model = CenterLossModel(
            build_backbone("lenetpp", (8, 8, 1), 2, 4),
            make_head("softmax", 2),
            2,
            alpha=1.0,
            rule=rule,
            center_lambda=1.0,
        )
        # Eager: the property is numeric, tf.function is covered elsewhere, and tracing 3 models is the cost.
        model.compile(optimizer=keras.optimizers.Adam(1e-2), run_eagerly=True)
        history = model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
        assert np.all(np.isfinite(model.centers.numpy())), rule
        assert np.all(np.isfinite(history.history["loss"])), rule


@pytest.mark.slow
def test_train_writes_a_run_folder_that_load_run_reads_back(splits, tmp_path):
    config = tiny()
    run_dir = train(config, tmp_path / "run", verbose=0, splits=splits)
    paths = RunPaths(run_dir)
    assert RunConfig.load(paths.config) == config
    assert latest_checkpoint(paths)[0] == 2
    if importlib.util.find_spec("tensorboard") is not None:  # optional dependency: no package, no event files
        assert any(paths.logs.rglob("events.out.tfevents.*"))
    with paths.history.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert {"loss", "softmax_loss", "center_loss", "accuracy", "val_accuracy"} <= set(rows[0])

    run = load_run(run_dir)
    assert run.centers.shape == (7, 4) and run.centers.dtype == np.float32
    assert run.class_names == [str(i) for i in range(7)] and run.heldout_class_names == ["7", "8", "9"]
    rebuilt = run.splits()
    np.testing.assert_array_equal(rebuilt.x_heldout, splits.x_heldout)
    np.testing.assert_array_equal(rebuilt.y_val, splits.y_val)
    features = run.embedding.predict(rebuilt.x_val[:5], verbose=0)
    assert features.shape == (5, 4)
    summary = json.loads(paths.summary.read_text())
    assert summary["num_heldout"] == len(splits.x_heldout)


def test_checkpoint_restores_centers_and_optimizer_state(splits, tmp_path):
    run_dir = train(tiny(epochs=1), tmp_path / "run", verbose=0, splits=splits)
    _, checkpoint = latest_checkpoint(RunPaths(run_dir))
    fresh = build_model(tiny(epochs=1), splits)
    fresh.load_weights(checkpoint)
    np.testing.assert_array_equal(fresh.centers.numpy(), load_run(run_dir).centers)
    assert int(fresh.optimizer.iterations.numpy()) == 17  # ceil(1075 / 64) steps were restored


@pytest.mark.slow
def test_resume_continues_exactly_where_the_uninterrupted_run_would_be(splits, tmp_path):
    straight = load_run(train(tiny(epochs=2), tmp_path / "a", verbose=0, splits=splits))
    train(tiny(epochs=1), tmp_path / "b", verbose=0, splits=splits)
    resumed = load_run(train(tiny(epochs=2), tmp_path / "b", resume=True, verbose=0, splits=splits))
    np.testing.assert_allclose(resumed.centers, straight.centers, atol=1e-6)
    for a, b in zip(straight.embedding.get_weights(), resumed.embedding.get_weights(), strict=True):
        np.testing.assert_allclose(b, a, atol=1e-6)
    with (tmp_path / "b" / "history.csv").open() as fh:
        assert [r["epoch"] for r in csv.DictReader(fh)] == ["0", "1"]


@pytest.mark.slow
def test_new_run_refuses_a_non_empty_folder_and_resume_refuses_other_options(splits, tmp_path):
    train(tiny(epochs=1), tmp_path / "run", verbose=0, splits=splits)
    with pytest.raises(RunError, match="--resume"):
        train(tiny(epochs=1), tmp_path / "run", verbose=0, splits=splits)
    with pytest.raises(RunError, match="center_lambda"):
        train(tiny(epochs=2, center_lambda=0.5), tmp_path / "run", resume=True, verbose=0, splits=splits)


def test_fit_under_tf_function_matches_eager_steps(splits):
    config = tiny(center_lambda=0.2)
    results = []
    for eager in (False, True):
        keras.utils.set_random_seed(0)
        model = build_model(config, splits)
        model.compile(optimizer=keras.optimizers.SGD(0.01), run_eagerly=eager)
        ds = tf.data.Dataset.from_tensor_slices((splits.x_train[:128], splits.y_train[:128])).batch(32)
        model.fit(ds, epochs=1, verbose=0, shuffle=False)
        results.append(model.centers.numpy())
    np.testing.assert_allclose(results[0], results[1], atol=1e-5)


@pytest.mark.slow
def test_face_cnn_trains_on_an_rgb_identity_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(4):
        (tmp_path / "faces" / f"person{k}").mkdir(parents=True)
        for i in range(6):
            pixels = np.clip(rng.normal(60 * k, 20, (24, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "RGB").save(tmp_path / "faces" / f"person{k}" / f"{i}.jpg")
    config = RunConfig(
        dataset=str(tmp_path / "faces"),
        backbone="facecnn",
        color_mode="RGB",
        image_size=16,
        width=4,
        feature_dim=8,
        heldout_count=1,
        val_fraction=0.2,
        epochs=1,
        batch_size=8,
    )
    run = load_run(train(config, tmp_path / "run", verbose=0))
    assert run.input_spec.channels == 3 and run.input_spec.height == 16
    assert run.centers.shape == (3, 8) and len(run.heldout_class_names) == 1
    assert run.embedding.predict(run.splits().x_heldout, verbose=0).shape == (6, 8)


def test_facenet_rule_defaults_to_its_own_alfa_and_refuses_a_diverging_one(tmp_path):
    # facenet moves a center (1 - alfa) n times its distance to the batch mean: with alfa 0.5 and ~9 examples
    # of each of 7 digits in a batch of 64 that is 4.6 (>= 2 diverges; the issue saw center loss 3e12 -> inf).
    assert tiny(rule="facenet").alpha == 0.95
    assert tiny(rule="paper").alpha == 0.5
    with pytest.raises(ConfigError, match=r"--rule facenet with --alpha 0.5 .* diverge .* --alpha >= 0\.89"):
        train(tiny(rule="facenet", alpha=0.5, center_lambda=0.1), tmp_path / "run", verbose=0)
    assert not (tmp_path / "run").exists()


def test_the_guard_stops_a_diverging_run_naming_the_cause_and_does_not_save_it(tmp_path, monkeypatch):
    # Skip the up-front refusal to watch the run itself diverge: the guard must stop it mid-epoch, and the
    # folder must not look finished (the old code saved centers of 1e19 as a finished run).
    monkeypatch.setattr("training.trainer.check_update_rule", lambda *a, **k: None)
    with pytest.raises(DivergenceError, match=r"diverged at epoch 1, step \d+: .*--rule facenet"):
        train(tiny(rule="facenet", alpha=0.0001, center_lambda=0.1, epochs=3), tmp_path / "run", verbose=0)
    assert not RunPaths(tmp_path / "run").embedding.exists()


@pytest.mark.parametrize(
    ("logs", "message"),
    [
        ({"loss": float("inf"), "center_norm": 1.0, "feature_norm": 1.0}, "loss not finite"),
        ({"loss": 1.0, "center_norm": 21.0, "feature_norm": 0.1}, "center norm 21 is over 10x .* norm 2"),
    ],
)
def test_guard_trips_on_non_finite_losses_and_runaway_centers(logs, message):
    guard = CenterDivergenceGuard("the cause", num_classes=7)
    guard.on_train_batch_end(0, {"loss": 1.0, "center_norm": 1.0, "feature_norm": 2.0})  # largest so far: 2
    guard.on_train_batch_end(
        1, {"loss": 1.0, "center_norm": 19.0, "feature_norm": 0.01}
    )  # features shrank: ok
    with pytest.raises(DivergenceError, match=message):
        guard.on_train_batch_end(2, logs)


def test_guard_stops_a_run_that_stays_at_chance_and_names_the_collapse():
    guard = CenterDivergenceGuard("the cause", num_classes=100)
    chance = float(np.log(100))
    for epoch in (0, 1):  # the first epochs at chance are allowed
        guard.on_epoch_end(epoch, {"accuracy": 0.01, "softmax_loss": chance, "feature_norm": 0.01})
    # A margin head's loss sits far above ln K while it learns: accuracy decides, not the loss.
    guard.on_epoch_end(2, {"accuracy": 0.2, "softmax_loss": 3 * chance, "feature_norm": 1.0})
    with pytest.raises(
        DivergenceError, match=r"not learning: after 4 epochs .*accuracy is 0.0100.*BatchNorm"
    ):
        guard.on_epoch_end(3, {"accuracy": 0.01, "softmax_loss": chance, "feature_norm": 0.008})


def test_margin_head_accuracy_is_measured_on_plain_logits(splits):
    # ArcFace subtracts a margin from the target logit while training, so accuracy on those logits reads ~0
    # while the model learns; `accuracy` must be the plain classifier's, `margin_accuracy` the penalised one.
    model = build_model(tiny(head="arcface", head_params={"m": 0.5, "s": 30.0}), splits)
    x, y = splits.x_train[:256], splits.y_train[:256]
    features = model.backbone(x, training=True)
    plain = (model.head(features, None, training=True).numpy().argmax(1) == y).mean()
    margin = (model.head(features, y, training=True).numpy().argmax(1) == y).mean()
    logs = model.train_on_batch(x, y, return_dict=True)
    assert logs["accuracy"] == pytest.approx(plain)
    assert logs["margin_accuracy"] == pytest.approx(margin)
    assert margin < plain
    assert "margin_accuracy" not in model_metric_names(build_model(tiny(), splits))


def model_metric_names(model) -> set[str]:
    return {m.name for m in model.metrics}
