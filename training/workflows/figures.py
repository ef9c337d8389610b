"""The paper's Figure 3 on our data: 2-D features of the training identities, lambda = 0 beside lambda > 0."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.config import ConfigError, RunConfig
from training.data import build_splits
from training.plots import FeaturePanel, plot_feature_panels
from training.run import load_run
from training.workflows.runs import embed, ensure_run


def feature_figure(config: RunConfig, work_dir: Path, out_png: Path, *, verbose: int | str = 2) -> Path:
    """Train two LeNet++-style runs with 2-D features (the config otherwise unchanged), reusing finished runs
    in `work_dir`, and plot each run's training-identity features coloured by class with its centers, and the
    held-out identities in grey (where unseen identities land is what open-set evaluation measures).
    """
    if config.center_lambda <= 0:
        raise ConfigError("--lambda must be > 0: the right-hand panel shows the center-loss run")
    base = config.model_copy(update={"feature_dim": 2})
    splits = build_splits(base)
    x = np.concatenate([splits.x_train, splits.x_val])
    y = np.concatenate([splits.y_train, splits.y_val])
    panels = []
    for lam in (0.0, config.center_lambda):
        run_dir = work_dir / f"features2d-lambda{lam:g}"
        ensure_run(base.model_copy(update={"center_lambda": lam}), run_dir, verbose=verbose, splits=splits)
        run = load_run(run_dir)
        title = "softmax only (λ = 0)" if lam == 0 else f"softmax + center loss (λ = {lam:g})"
        panels.append(
            FeaturePanel(
                title,
                embed(run.embedding, x),
                y,
                run.class_names,
                run.centers,
                unseen=embed(run.embedding, splits.x_heldout),
                unseen_label=f"unseen ({', '.join(splits.heldout_class_names)})",
            )
        )
    return plot_feature_panels(panels, out_png)
