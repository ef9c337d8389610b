"""Face backbones, --precision and --sample-rate through RunConfig, train() and the CLI."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from training.cli import app  # noqa: E402
from training.config import ConfigError, RunConfig  # noqa: E402
from training.data import build_splits  # noqa: E402
from training.partial_fc import PartialFCModel  # noqa: E402
from training.run import load_run  # noqa: E402
from training.trainer import build_model, train  # noqa: E402


def face(**overrides) -> RunConfig:
    # digits resized to 16x16 RGB: the smallest input the four stride-2 stages take; tiny 16-d embedding.
    options = dict(
        backbone="mobilefacenet",
        image_size=16,
        color_mode="RGB",
        feature_dim=16,
        heldout_classes=["7", "8", "9"],
        val_fraction=0.0,
        head="arcface",
        head_params={"s": 16.0},
        epochs=1,
        batch_size=128,
        seed=1,
    )
    return RunConfig(**{**options, **overrides})


@pytest.fixture(scope="module")
def splits():
    return build_splits(face())


@pytest.mark.slow
def test_mixed_bfloat16_step_keeps_centers_and_head_float32(splits) -> None:
    # The full head; Partial FC under mixed_bfloat16 is trained end to end in the run test below.
    model = build_model(face(precision="mixed_bfloat16"), splits)
    assert model.backbone.get_layer("conv1").compute_dtype == "bfloat16"
    assert not isinstance(model, PartialFCModel)
    logs = model.train_on_batch(splits.x_train[:64], splits.y_train[:64], return_dict=True)
    assert np.isfinite(logs["loss"]) and logs["center_loss"] > 0
    assert model.centers.dtype == "float32" and model.head.kernel.dtype == "float32"
    assert np.abs(model.centers.numpy()).max() > 0
    assert keras.config.dtype_policy().name == "float32"


@pytest.mark.slow
def test_mixed_float16_uses_loss_scaling(splits) -> None:
    model = build_model(face(precision="mixed_float16", sample_rate=0.5), splits)
    assert isinstance(model, PartialFCModel)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    logs = model.train_on_batch(splits.x_train[:64], splits.y_train[:64], return_dict=True)
    assert np.isfinite(logs["softmax_loss"]) and model.centers.dtype == "float32"


@pytest.mark.slow
def test_partial_fc_mixed_run_saves_a_float32_embedding(tmp_path, splits) -> None:
    out = train(face(precision="mixed_bfloat16", sample_rate=0.5), tmp_path / "run", verbose=0, splits=splits)
    run = load_run(out)
    assert all(layer.dtype_policy.name == "float32" for layer in run.embedding.layers)
    assert run.centers.dtype == np.float32 and run.centers.shape == (7, 16)
    x = splits.x_train[:8]
    assert run.embedding.predict(x, verbose=0).dtype == np.float32


def test_config_refuses_bad_combinations() -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        face(image_size=100)
    with pytest.raises(ValueError, match="--precision mixed_bfloat16 needs one of"):
        face(backbone="facecnn", precision="mixed_bfloat16", image_size=32)
    with pytest.raises(ValueError, match="--sample-rate"):
        face(head="softmax", sample_rate=0.1)
    with pytest.raises(ValueError, match="sample_rate"):
        face(sample_rate=0.0)
    with pytest.raises(ConfigError, match="multiple of 16"):
        # digits' own 8x8 when --image-size is not given: refused when the backbone is built
        native = face(image_size=None, color_mode="L")
        build_model(native, build_splits(native))


def test_cli_names_the_bad_option(tmp_path) -> None:
    from typer.testing import CliRunner

    result = CliRunner().invoke(
        app,
        ["train", "--backbone", "iresnet18", "--precision", "fp8", "--out", str(tmp_path / "r")],
    )
    assert result.exit_code == 2
    assert "--precision" in result.output
    result = CliRunner().invoke(
        app, ["train", "--head", "softmax", "--sample-rate", "0.1", "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2 and "--sample-rate" in result.output


@pytest.mark.slow
def test_partial_fc_resume_equals_an_uninterrupted_run(tmp_path) -> None:
    """Rows, their Adam slots, the centers and the sample (seeded by the optimizer step) are restored from a
    weights checkpoint, as the trainer's resume does (fit 2 epochs == fit 1, save, load, fit 1 more)."""
    import tensorflow as tf

    from training.backbones import build_backbone
    from training.partial_fc import build_partial_fc

    rng = np.random.default_rng(0)
    x = rng.random((48, 8, 8, 1), dtype=np.float32)
    y = rng.integers(0, 40, 48).astype(np.int32)  # 40 classes, batches of 16, 20 sampled: classes left out
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)

    def model():
        keras.utils.set_random_seed(0)
        m = build_partial_fc(
            build_backbone("lenetpp", (8, 8, 1), 4, 4),
            40,
            head="arcface",
            head_params={"s": 8.0},
            sample_rate=0.5,
            seed=2,
            optimizer="adam",
            center_lambda=0.1,
            alpha=0.5,
            rule="paper",
            center_lr=0.5,
        )
        m.compile(optimizer=keras.optimizers.Adam(0.01))
        m.optimizer.build(m.trainable_variables)
        return m

    straight = model()
    straight.fit(data, epochs=2, verbose=0, shuffle=False)
    first = model()
    first.fit(data, epochs=1, verbose=0, shuffle=False)
    first.save_weights(tmp_path / "epoch1.weights.h5")
    resumed = model()
    resumed.load_weights(tmp_path / "epoch1.weights.h5")
    assert int(resumed.optimizer.iterations.numpy()) == 3  # the sample seed continues from step 3
    resumed.fit(data, epochs=2, initial_epoch=1, verbose=0, shuffle=False)
    assert np.abs(straight.centers.numpy()).max() > 1e-3
    for a, b in zip(straight.get_weights(), resumed.get_weights(), strict=True):  # rows, slots, centers...
        np.testing.assert_allclose(b, a, atol=1e-6)
    unresumed = model()  # a fresh model trained one epoch from scratch differs: the check can fail
    unresumed.fit(data, epochs=1, verbose=0, shuffle=False)
    assert not np.allclose(unresumed.head.kernel.numpy(), straight.head.kernel.numpy(), atol=1e-6)
