"""Class separation of embeddings: mean intra-class distance / mean inter-center distance (lower = better).

Used as the quick learning check on identities held out of training (the full open-set evaluation with
ROC/EER lives in training/evaluate). Computed on L2-normalised embeddings by default, the space the service
compares in, which also makes the number independent of the feature scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.distance import pdist

from bundle.files import l2_normalize


@dataclass(frozen=True)
class Separation:
    intra: float  # mean distance of an embedding to its class mean
    inter: float  # mean distance between two class means
    ratio: float  # intra / inter


def class_separation(features: np.ndarray, labels: np.ndarray, *, normalize: bool = True) -> Separation:
    """Intra-class spread relative to the spacing of class means, for `features` `[N, D]` with int labels."""
    x = np.asarray(features, dtype=np.float64)
    if normalize:
        x = l2_normalize(x, dtype=np.float64)
    classes, y = np.unique(np.asarray(labels), return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"class separation needs at least 2 classes, got {len(classes)}")
    counts = np.bincount(y)
    means = np.zeros((len(classes), x.shape[1]))
    np.add.at(means, y, x)
    means /= counts[:, None]
    intra = float(np.mean(np.linalg.norm(x - means[y], axis=1)))
    inter = float(np.mean(pdist(means)))
    return Separation(intra=intra, inter=inter, ratio=intra / inter)
