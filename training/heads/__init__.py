"""Classification heads: embedding features (+ labels while training) -> logits. Training-only, never exported.

Every head is a keras layer called as `head(features, labels, training=...)` returning `[B, num_classes]`
logits for softmax cross-entropy; margin heads use `labels` to alter the target logit during training only.
"""

from __future__ import annotations

from typing import Any

import keras

from training.heads.softmax import SoftmaxHead

HEADS: dict[str, type[keras.layers.Layer]] = {
    "softmax": SoftmaxHead,
}


def make_head(name: str, num_classes: int, **params: Any) -> keras.layers.Layer:
    """Build the head registered under `name`; unknown names list the known ones."""
    try:
        cls = HEADS[name]
    except KeyError:
        raise ValueError(f"unknown head {name!r}; choose one of {', '.join(sorted(HEADS))}") from None
    return cls(num_classes=num_classes, **params)
