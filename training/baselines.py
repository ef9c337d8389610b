"""Non-learned baseline embedder for the open-set comparison: PCA on raw (preprocessed) pixels.

The softmax-only baseline is a trained model (center lambda = 0) and lives in the pipeline; this module holds
the baseline that needs no training at all, so every table shows how much the learned embeddings add.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# One PCA size for every command and doc (the baseline's only knob).
DEFAULT_PCA_COMPONENTS = 32


class PixelPCAEmbedder:
    """Flatten preprocessed images and project them on the principal components of the training identities.

    Fitted on training-class images only, so held-out identities are as unseen as they are for the network.
    `whiten=True` divides each component by its standard deviation, which makes cosine similarity weigh all
    kept directions equally (often better for verification than raw PCA, so both are worth a try).
    """

    def __init__(
        self, n_components: int = DEFAULT_PCA_COMPONENTS, *, whiten: bool = False, seed: int = 0
    ) -> None:
        if n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {n_components}")
        self.n_components = int(n_components)
        self.whiten = whiten
        self.seed = seed
        self._pca: Any = None  # sklearn PCA once fitted

    @staticmethod
    def _flatten(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, dtype=np.float32)
        if images.ndim < 2:
            raise ValueError(f"images must be a batch [N, ...], got shape {images.shape}")
        return images.reshape(len(images), -1)

    def fit(self, images: np.ndarray) -> PixelPCAEmbedder:
        x = self._flatten(images)
        k = min(self.n_components, x.shape[0], x.shape[1])
        from sklearn.decomposition import PCA  # lazily: the CLI imports this module for its default

        self._pca = PCA(n_components=k, whiten=self.whiten, random_state=self.seed).fit(x)
        return self

    @property
    def dim(self) -> int:
        if self._pca is None:
            raise RuntimeError("PixelPCAEmbedder.fit must be called before use")
        return int(self._pca.n_components_)

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Images [N, ...] -> float32 embeddings [N, dim] (not normalised; evaluation uses cosine)."""
        if self._pca is None:
            raise RuntimeError("PixelPCAEmbedder.fit must be called before embed")
        x = self._flatten(images)
        if x.shape[1] != self._pca.n_features_in_:
            raise ValueError(
                f"images have {x.shape[1]} pixels, the PCA was fitted on {self._pca.n_features_in_}"
            )
        return self._pca.transform(x).astype(np.float32)
