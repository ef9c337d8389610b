"""Figures for the docs: 2-D feature scatter with class centers (the paper's Fig. 3) and ROC curves.

Matplotlib with the Agg backend (no display needed); figures are sized and saved at a modest DPI so the PNGs
committed under docs/images stay small.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: CI and servers have no display

import matplotlib.pyplot as plt
import numpy as np

DPI = 90


@dataclass(frozen=True)
class FeaturePanel:
    """One side of the scatter figure: 2-D features of labelled samples and (optionally) class centers."""

    title: str
    features: np.ndarray  # [N, 2]
    labels: np.ndarray  # [N] int, index into class_names
    class_names: Sequence[str]
    centers: np.ndarray | None = None  # [K, 2], row k = class_names[k]
    unseen: np.ndarray | None = None  # [M, 2] features of identities not trained on, drawn in grey
    unseen_label: str = "unseen identities"


@dataclass(frozen=True)
class RocCurve:
    """A ROC curve of one embedder, labelled with its AUC and EER in the legend."""

    name: str
    fpr: np.ndarray
    tpr: np.ndarray
    auc: float
    eer: float


def _check_panel(panel: FeaturePanel) -> None:
    if panel.features.ndim != 2 or panel.features.shape[1] != 2:
        raise ValueError(f"panel {panel.title!r}: features must be [N, 2], got {panel.features.shape}")
    if len(panel.labels) != len(panel.features):
        raise ValueError(
            f"panel {panel.title!r}: {len(panel.labels)} labels for {len(panel.features)} points"
        )
    if panel.centers is not None and panel.centers.shape != (len(panel.class_names), 2):
        raise ValueError(
            f"panel {panel.title!r}: centers must be [{len(panel.class_names)}, 2], got {panel.centers.shape}"
        )


def plot_feature_panels(panels: Sequence[FeaturePanel], path: Path | str, *, point_size: float = 4.0) -> Path:
    """Side-by-side scatter plots of 2-D features coloured by class, centers marked with black crosses."""
    if not panels:
        raise ValueError("need at least one panel")
    for panel in panels:
        _check_panel(panel)
    cmap = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel.unseen is not None:
            ax.scatter(*panel.unseen.T, s=point_size, color="0.6", alpha=0.5, lw=0, label=panel.unseen_label)
        for k, name in enumerate(panel.class_names):
            pts = panel.features[panel.labels == k]
            ax.scatter(pts[:, 0], pts[:, 1], s=point_size, color=cmap(k % 10), label=name, alpha=0.7, lw=0)
        if panel.centers is not None:
            ax.scatter(
                panel.centers[:, 0], panel.centers[:, 1], marker="X", s=60, c="black", lw=0.8, label="centers"
            )
        ax.set_title(panel.title, fontsize=10)
        ax.tick_params(labelsize=7)
        ax.set_aspect("equal", adjustable="datalim")
    axes[0][-1].legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return _save(fig, path)


def plot_roc(
    curves: Sequence[RocCurve], path: Path | str, *, title: str = "ROC on unseen identities"
) -> Path:
    """ROC curves (TAR vs FAR, FAR on a log axis so the low-FAR region that matters is visible)."""
    if not curves:
        raise ValueError("need at least one ROC curve")
    fig, ax = plt.subplots(figsize=(5.0, 4.0))
    for curve in curves:
        # The log axis cannot show FAR = 0; the curve starts at the first non-zero FAR.
        keep = curve.fpr > 0
        ax.plot(
            curve.fpr[keep],
            curve.tpr[keep],
            lw=1.5,
            label=f"{curve.name} (AUC {curve.auc:.3f}, EER {curve.eer:.3f})",
        )
    ax.set_xscale("log")
    ax.set_xlim(left=max(1e-4, min(float(c.fpr[c.fpr > 0].min()) for c in curves if np.any(c.fpr > 0))))
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate (impostor pairs)")
    ax.set_ylabel("true accept rate (genuine pairs)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, metadata={"Software": None})  # no version stamp: same inputs, same bytes
    plt.close(fig)
    return path
