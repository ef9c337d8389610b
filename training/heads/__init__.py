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


# Head-independent spellings used by the CLI (`--margin`, `--scale`) -> each head's own option name.
GENERIC_OPTIONS = {"margin": "m", "scale": "s"}


def make_head(name: str, num_classes: int, **params: Any) -> keras.layers.Layer:
    """Build the head registered under `name`; unknown names or options list the known ones.

    `margin` and `scale` are accepted for every head that has an `m` / `s` option, so one pair of CLI flags
    serves all heads.
    """
    try:
        cls = HEADS[name]
    except KeyError:
        raise ValueError(f"unknown head {name!r}; choose one of {', '.join(sorted(HEADS))}") from None
    accepted = head_options(name)
    for generic, specific in GENERIC_OPTIONS.items():
        if generic in params and specific in accepted:
            if specific in params:
                raise ValueError(f"head {name!r}: give {generic!r} or {specific!r}, not both")
            params[specific] = params.pop(generic)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"head {name!r} does not take option(s) {', '.join(unknown)}; "
            f"it takes {', '.join(accepted) or 'no options'}"
        )
    return cls(num_classes=num_classes, **params)


def parse_head_options(items: list[str] | None) -> dict[str, float]:
    """`["m=0.4", "easy_margin=true"]` -> `{"m": 0.4, "easy_margin": 1.0}` (run configs store numbers)."""
    options: dict[str, float] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip().lower()
        if not sep or not key or not text:
            raise ValueError(f"--head-option {item!r}: expected KEY=VALUE, e.g. m=0.4")
        if text in ("true", "false"):
            value = float(text == "true")
        else:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"--head-option {item!r}: {text!r} is not a number or true/false") from None
        if key in options:
            raise ValueError(f"--head-option {key!r} is given twice")
        options[key] = value
    return options


def check_head_options(name: str, params: dict[str, Any]) -> None:
    """Validate a head's name and options before any data is read (raises ValueError naming the option).

    Built with two classes, the loosest case; limits that depend on the number of classes are checked
    again when the real head is built.
    """
    make_head(name, 2, **params)


def head_options(name: str) -> dict[str, Any]:
    """The options of head `name` with their defaults (what `--head-option key=value` may set)."""
    signature = inspect.signature(HEADS[name].__init__)
    return {
        p.name: p.default
        for p in signature.parameters.values()
        if p.name not in ("self", "num_classes") and p.kind is p.POSITIONAL_OR_KEYWORD
    }
