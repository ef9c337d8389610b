"""The center-update rules by name, their default rates and when they overshoot (no TensorFlow here, so option
validation and the CLI can use it before TensorFlow is imported; the rules themselves are in center_loss.py).
"""

from __future__ import annotations

import math
from typing import get_args

from bundle.manifest import CenterUpdateRule

# The update rules selectable with `--rule` (named once, in the manifest contract); "none" keeps the centers
# at their initial value (zero) and is only valid with lambda = 0 (plain softmax, nothing to pull towards).
UPDATE_RULES: tuple[str, ...] = get_args(CenterUpdateRule)
# What each rule is, for `--rule`'s help.
RULE_HELP = {
    "paper": "Eq. 4",
    "facenet": "scatter_sub",
    "gradient": "SGD, --center-lr",
    "none": "centers stay 0; needs --lambda 0",
}
# Each rule's rate as its source uses it: the paper's experiments use alpha = 0.5; facenet's
# `center_loss_alfa` defaults to 0.95 (a center moves 5 % towards each example). `gradient` ignores alpha.
DEFAULT_ALPHA = {"paper": 0.5, "facenet": 0.95, "gradient": 0.5, "none": 0.5}


def step_factor(rule: str, count: float, *, alpha: float, center_lr: float, batch_size: float) -> float:
    """How far one update moves a center seen `count` times, as a fraction of its distance to the class's
    batch mean m: every rule gives `c' - m = (1 - f) (c - m)`.

    f <= 1 never passes the mean; 1 < f < 2 overshoots but still converges (oscillating); f >= 2 moves the
    center further from m than it was, so repeated steps diverge. paper: `alpha n / (1 + n)` < 1 always;
    facenet: `(1 - alfa) n` (duplicates accumulate); gradient: `lr n / B`.
    """
    if rule == "paper":
        return alpha * count / (1.0 + count)
    if rule == "facenet":
        return (1.0 - alpha) * count
    if rule == "gradient":
        return center_lr * count / batch_size
    return 0.0


def check_update_rule(
    rule: str,
    class_frequencies: list[float] | tuple[float, ...],
    *,
    alpha: float,
    center_lr: float,
    batch_size: int,
) -> str | None:
    """Refuse a rule/rate that diverges for the batch composition of this data; warn when it overshoots.

    `class_frequencies` are the training classes' shares of the examples. The expected count of class c in a
    batch is `B p_c`; a batch holds up to about `B p_c + 3 sqrt(B p_c (1 - p_c))` of it (binomial 3 sigma).
    Raises ValueError when an expected count gives a step factor >= 2 (the centers diverge, see
    `step_factor`); returns a warning when the 3-sigma count does, or an expected count overshoots (f > 1).
    """
    if rule in ("paper", "none") or not class_frequencies:
        return None
    worst = max(class_frequencies)
    expected = batch_size * worst
    high = expected + 3.0 * math.sqrt(expected * (1.0 - worst))
    f_expected = step_factor(rule, expected, alpha=alpha, center_lr=center_lr, batch_size=batch_size)
    f_high = step_factor(rule, min(high, batch_size), alpha=alpha, center_lr=center_lr, batch_size=batch_size)
    rate = f"--alpha {alpha:g}" if rule == "facenet" else f"--center-lr {center_lr:g}"
    if rule == "facenet":
        safe = f"--alpha >= {1.0 - 1.0 / expected:.3g} keeps f <= 1"
    else:
        safe = f"--center-lr <= {batch_size / expected:.3g} keeps f <= 1"
    why = (
        f"--rule {rule} with {rate} and --batch-size {batch_size}: a class seen {expected:.1f} times in a "
        f"batch (its expected count) moves {f_expected:.2f} times its distance to its batch mean"
    )
    if f_expected >= 2.0:
        raise ValueError(f"{why}, so the centers diverge (factor >= 2); {safe}, or use --rule paper")
    if f_expected > 1.0 or f_high >= 2.0:
        return f"{why} (up to {f_high:.2f} in a crowded batch); it overshoots and may diverge; {safe}"
    return None
