"""Classification heads: features (+ labels while training) -> logits. Training-only, never exported.

Every head is a keras layer called as `head(features, labels, training=...)` returning `[B, num_classes]`
logits for softmax cross-entropy; margin heads use `labels` to alter the target logit during training only.
"""

from __future__ import annotations

import inspect
from typing import Any

import keras

from training.heads.asoftmax import ASoftmaxHead
from training.heads.combined import AMSoftmaxHead, ArcFaceHead, CombinedMarginHead
from training.heads.softmax import SoftmaxHead

HEADS: dict[str, type[keras.layers.Layer]] = {
    "softmax": SoftmaxHead,
    "asoftmax": ASoftmaxHead,
    "amsoftmax": AMSoftmaxHead,
    "arcface": ArcFaceHead,
    "combined": CombinedMarginHead,
}


def make_head(name: str, num_classes: int, **params: Any) -> keras.layers.Layer:
    """Build the head registered under `name`; unknown names list the known ones."""
    try:
        cls = HEADS[name]
    except KeyError:
        raise ValueError(f"unknown head {name!r}; choose one of {', '.join(sorted(HEADS))}") from None
    accepted = head_options(name)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"head {name!r} does not take option(s) {', '.join(unknown)}; "
            f"it takes {', '.join(accepted) or 'no options'}"
        )
    return cls(num_classes=num_classes, **params)


def head_options(name: str) -> dict[str, Any]:
    """The options of head `name` with their defaults (what `--head-option key=value` may set)."""
    signature = inspect.signature(HEADS[name].__init__)
    return {
        p.name: p.default
        for p in signature.parameters.values()
        if p.name not in ("self", "num_classes") and p.kind is p.POSITIONAL_OR_KEYWORD
    }
