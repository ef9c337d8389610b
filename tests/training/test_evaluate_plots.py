"""Figures: the feature scatter and ROC plots are written as small, valid PNGs and reject malformed input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from training.plots import FeaturePanel, RocCurve, plot_feature_panels, plot_roc


def _panel(title: str, with_centers: bool = True) -> FeaturePanel:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    centers = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    return FeaturePanel(
        title=title,
        features=centers[labels] + rng.normal(0, 0.1, (60, 2)),
        labels=labels,
        class_names=["a", "b", "c"],
        centers=centers if with_centers else None,
    )


def test_feature_panels_are_written_side_by_side_as_a_small_png(tmp_path):
    unseen = np.random.default_rng(1).normal(0, 0.3, (30, 2))
    with_unseen = dataclasses.replace(_panel("lambda=0.1"), unseen=unseen, unseen_label="unseen (x)")
    path = plot_feature_panels([_panel("lambda=0", False), with_unseen], tmp_path / "f.png")
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.width > img.height  # two panels side by side
    assert path.stat().st_size < 200_000


def test_feature_panel_with_wrong_feature_dim_is_refused(tmp_path):
    bad = FeaturePanel("3-D", np.zeros((4, 3)), np.zeros(4, int), ["a"])
    with pytest.raises(ValueError, match=r"features must be \[N, 2\]"):
        plot_feature_panels([bad], tmp_path / "f.png")


def test_roc_plot_is_written_for_several_curves(tmp_path):
    fpr = np.array([0.0, 0.001, 0.01, 0.1, 1.0])
    curves = [
        RocCurve("center", fpr, np.array([0.0, 0.5, 0.8, 0.95, 1.0]), 0.97, 0.05),
        RocCurve("pca", fpr, np.array([0.0, 0.1, 0.3, 0.6, 1.0]), 0.8, 0.25),
    ]
    path = plot_roc(curves, tmp_path / "roc.png")
    with Image.open(path) as img:
        assert img.format == "PNG"
    assert path.stat().st_size < 200_000
