"""Partial FC: the sample (positives always in, seeded), sparse center updates == dense ones, sample rate 1.0
== the full margin head (logits, gradient, training steps), and a sampled step touches only sampled rows."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from training.backbones import build_backbone  # noqa: E402
from training.center_loss import batch_class_statistics, update_centers  # noqa: E402
from training.heads import make_head  # noqa: E402
from training.heads.partial_fc import PartialFCHead, num_sampled, sample_classes  # noqa: E402
from training.model import CenterLossModel  # noqa: E402
from training.partial_fc import PartialFCModel, RowOptimizer, build_partial_fc  # noqa: E402
from training.sparse_centers import sparse_update_centers  # noqa: E402

K, D, B = 10, 4, 12


def _seed(step: int) -> tf.Tensor:
    return tf.constant([7, step], tf.int64)


def test_sample_keeps_positives_and_is_seeded() -> None:
    labels = tf.constant([3, 3, 97, 40, 3, 511, 0], tf.int32)
    index, remapped = sample_classes(labels, 1000, 100, _seed(0))
    index = index.numpy()
    assert len(index) == 100 and np.all(np.diff(index) > 0)  # sorted, no repeats
    assert set(labels.numpy()) <= set(index)
    np.testing.assert_array_equal(index[remapped.numpy()], labels.numpy())
    again, _ = sample_classes(labels, 1000, 100, _seed(0))
    np.testing.assert_array_equal(again.numpy(), index)
    other, _ = sample_classes(labels, 1000, 100, _seed(1))
    assert not np.array_equal(other.numpy(), index)  # a new step draws new negatives
    # More positives than num_sample: the sample is exactly the positives.
    only, remapped = sample_classes(labels, 1000, 2, _seed(0))
    np.testing.assert_array_equal(only.numpy(), np.unique(labels.numpy()))
    np.testing.assert_array_equal(only.numpy()[remapped.numpy()], labels.numpy())
    # Rate 1.0: every class, labels unchanged.
    every, same = sample_classes(labels, 1000, num_sampled(1000, 1.0), _seed(0))
    np.testing.assert_array_equal(every.numpy(), np.arange(1000))
    np.testing.assert_array_equal(same.numpy(), labels.numpy())
    assert num_sampled(100_000, 0.1) == 10_000


def test_negatives_are_uniform() -> None:
    """Every non-positive class is drawn with the same frequency (insightface: uniform scores, top-k)."""
    labels = tf.constant([0, 1], tf.int32)
    counts = np.zeros(50)
    for step in range(400):
        counts[sample_classes(labels, 50, 10, _seed(step))[0].numpy()] += 1
    assert counts[0] == counts[1] == 400
    negatives = counts[2:] / 400  # expected 8/48 each
    assert abs(negatives.mean() - 8 / 48) < 1e-9
    assert negatives.min() > 0.1 and negatives.max() < 0.24


@pytest.mark.parametrize("rule", ["paper", "facenet", "gradient"])
def test_sparse_center_update_equals_dense(rule: str) -> None:
    rng = np.random.default_rng(1)
    centers0 = rng.normal(size=(K, D)).astype(np.float32)
    features = tf.constant(rng.normal(size=(B, D)).astype(np.float32))
    labels = tf.constant([1, 1, 1, 4, 4, 9, 0, 1, 4, 9, 9, 2], tf.int32)  # classes 3, 5-8 absent
    sums, counts = batch_class_statistics(features, labels, K)
    options = dict(alpha=0.6, batch_size=float(B), center_lr=0.3)
    dense = update_centers(rule, tf.constant(centers0), sums, counts, **options).numpy()
    variable = keras.Variable(centers0)
    present = sparse_update_centers(rule, variable, features, labels, **options).numpy()
    np.testing.assert_array_equal(present, [0, 1, 2, 4, 9])
    np.testing.assert_allclose(variable.numpy(), dense, rtol=1e-6, atol=1e-6)
    absent = [3, 5, 6, 7, 8]
    np.testing.assert_array_equal(variable.numpy()[absent], centers0[absent])  # bit for bit


def _heads(name: str = "arcface", **params):
    full = make_head(name, K, **params)
    full.build((None, D))
    pfc = PartialFCHead(K, margin_head=name, margin_params=params, sample_rate=1.0)
    pfc.build((None, D))
    pfc.kernel.assign(tf.transpose(full.kernel))
    return full, pfc


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("arcface", {"s": 16.0, "m": 0.5}),
        ("amsoftmax", {}),
        ("combined", {"m3": 0.1}),
        ("arcface", {"warmup_epochs": 2.0}),  # margin phased in: compared half-way (ramp 0.5)
    ],
)
def test_rate_one_logits_loss_and_gradient_equal_the_full_head(name: str, params: dict) -> None:
    full, pfc = _heads(name, **params)
    if params.get("warmup_epochs"):
        assert pfc.margin_ramp.numpy() == 0.0
        full.margin_ramp.assign(0.5)
        pfc.margin_ramp.assign(0.5)
    rng = np.random.default_rng(0)
    features = tf.constant(rng.normal(size=(B, D)).astype(np.float32))
    labels = tf.constant(rng.integers(0, K, B), tf.int32)
    index = pfc.sample(labels, tf.constant(0))
    np.testing.assert_array_equal(index.numpy(), np.arange(K))
    with tf.GradientTape(persistent=True) as tape:
        rows = tf.gather(pfc.kernel, index)
        tape.watch(rows)
        ours = pfc.sampled_logits(features, rows, labels)
        theirs = full(features, labels, training=True)
        xent = keras.losses.sparse_categorical_crossentropy
        loss_ours = tf.reduce_mean(xent(labels, ours, from_logits=True))
        loss_theirs = tf.reduce_mean(xent(labels, theirs, from_logits=True))
    # Logits reach s = 64: float32 rounding of a cosine times s is ~1e-5 there, so the check is relative too.
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(loss_ours.numpy(), loss_theirs.numpy(), rtol=1e-6)
    grad_ours = tape.gradient(loss_ours, rows).numpy()
    grad_theirs = tape.gradient(loss_theirs, full.kernel).numpy()
    np.testing.assert_allclose(grad_ours, grad_theirs.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pfc(features).numpy(), full(features).numpy(), atol=1e-5)  # evaluation


def _data(n: int = 3 * B, classes: int = K, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 8, 8, 1), dtype=np.float32)
    y = rng.integers(0, classes, n).astype(np.int32)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(B)


def _optimizer(kind: str):
    return keras.optimizers.Adam(0.01) if kind == "adam" else keras.optimizers.SGD(0.01, momentum=0.9)


@pytest.mark.parametrize(("kind", "rule"), [("adam", "paper"), ("sgd", "facenet"), ("adam", "gradient")])
def test_rate_one_training_equals_the_full_head(kind: str, rule: str) -> None:
    """Three steps (Adam's moments and SGD's momentum carried over): weights, head and centers equal."""
    options = dict(center_lambda=0.1, alpha=0.9 if rule == "facenet" else 0.5, rule=rule, center_lr=0.5)
    keras.utils.set_random_seed(0)
    full = CenterLossModel(
        build_backbone("lenetpp", (8, 8, 1), D, 4), make_head("arcface", K, s=16.0, m=0.3), K, **options
    )
    full.compile(optimizer=_optimizer(kind))
    pfc = build_partial_fc(
        build_backbone("lenetpp", (8, 8, 1), D, 4),
        K,
        head="arcface",
        head_params={"s": 16.0, "m": 0.3},
        sample_rate=1.0,
        seed=0,
        optimizer=kind,
        **options,
    )
    pfc.compile(optimizer=_optimizer(kind))
    pfc.backbone.set_weights(full.backbone.get_weights())
    pfc.head.kernel.assign(tf.transpose(full.head.kernel))
    h_full = full.fit(_data(), epochs=1, verbose=0, shuffle=False).history
    h_pfc = pfc.fit(_data(), epochs=1, verbose=0, shuffle=False).history
    # Same arithmetic up to float32 summation order (matmul layout), amplified a little by three steps.
    close = dict(rtol=1e-4, atol=1e-5)
    for a, b in zip(full.backbone.get_weights(), pfc.backbone.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, **close)
    np.testing.assert_allclose(full.head.kernel.numpy().T, pfc.head.kernel.numpy(), **close)
    np.testing.assert_allclose(full.centers.numpy(), pfc.centers.numpy(), **close)
    assert np.abs(pfc.centers.numpy()).max() > 0  # the rule really moved them
    for key in ("loss", "softmax_loss", "center_loss", "accuracy"):
        assert h_full[key] == pytest.approx(h_pfc[key], rel=1e-4, abs=1e-6)


def test_sampled_step_touches_only_sampled_rows() -> None:
    classes = 400
    keras.utils.set_random_seed(0)
    model = build_partial_fc(
        build_backbone("lenetpp", (8, 8, 1), D, 4),
        classes,
        head="arcface",
        head_params={"s": 4.0},  # a small scale: every sampled negative gets a non-zero gradient
        sample_rate=0.1,
        seed=3,
        optimizer="adam",
        center_lambda=0.1,
        alpha=0.5,
        rule="paper",
        center_lr=0.5,
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    # Keras builds no [K, D] slots for the head: its weights are not trainable variables.
    assert all(v.path != model.head.kernel.path for v in model.trainable_variables)
    data = _data(B, classes, seed=2)
    _, y = next(iter(data))
    index = model.head.sample(y, tf.constant(0)).numpy()
    assert len(index) == 40 and set(y.numpy()) <= set(index)
    before = [model.head.kernel.numpy(), *(s.numpy() for s in model.head.slots)]
    model.fit(data, epochs=1, verbose=0, shuffle=False)
    after = [model.head.kernel.numpy(), *(s.numpy() for s in model.head.slots)]
    untouched = np.setdiff1d(np.arange(classes), index)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a[untouched], b[untouched])
        assert np.all(np.any(a[index] != b[index], axis=1))
    centers = model.centers.numpy()
    absent = np.setdiff1d(np.arange(classes), y.numpy())
    assert np.all(centers[absent] == 0) and np.all(np.any(centers[np.unique(y)] != 0, axis=1))


def test_row_optimizer_refuses_what_it_does_not_implement() -> None:
    with pytest.raises(ValueError, match="weight_decay"):
        RowOptimizer(keras.optimizers.Adam(0.01, weight_decay=0.1))
    with pytest.raises(ValueError, match="adam and sgd"):
        RowOptimizer(keras.optimizers.RMSprop(0.01))
    with pytest.raises(ValueError, match="margin head"):
        PartialFCHead(K, margin_head="softmax")
    with pytest.raises(TypeError):
        PartialFCModel(build_backbone("lenetpp", (8, 8, 1), D, 4), make_head("arcface", K), K)
