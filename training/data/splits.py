"""Identity-disjoint splits: held-out identities never trained on, plus a per-identity validation split."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from training.data.sources import DataError


@dataclass(frozen=True)
class SplitIndices:
    """Indices into an `ImageSet` and the class names of each side; `train` and `val` share classes."""

    train_classes: list[str]  # training label k is train_classes[k]
    heldout_classes: list[str]  # held-out label k is heldout_classes[k]
    train: np.ndarray
    val: np.ndarray
    heldout: np.ndarray


def choose_heldout(
    class_names: Sequence[str],
    *,
    names: Sequence[str] | None,
    count: int | None,
    fraction: float,
    seed: int,
) -> list[str]:
    """Held-out identities: the given names, else `count` (else `round(fraction * C)`) drawn with `seed`."""
    known = list(class_names)
    known_set = set(known)  # set lookups: 85 k identities (MS1M) would make list lookups quadratic
    if names is not None:
        unknown = [n for n in names if n not in known_set]
        if unknown:
            shown = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "")
            raise DataError(f"--heldout-classes: unknown class(es) {', '.join(unknown)}; dataset has {shown}")
        chosen = list(names)
    else:
        k = count if count is not None else round(fraction * len(known))
        rng = np.random.default_rng(seed)
        chosen = [known[i] for i in rng.choice(len(known), size=min(k, len(known)), replace=False)]
    if len(known) - len(chosen) < 2:
        raise DataError(
            f"holding out {len(chosen)} of {len(known)} classes leaves fewer than 2 to train on "
            "(--heldout-classes/--heldout-count/--heldout-fraction)"
        )
    # Report them in dataset order so the same choice always prints (and saves) the same way.
    chosen_set = set(chosen)
    return [n for n in known if n in chosen_set]


def choose_heldout_groups(
    class_names: Sequence[str],
    groups: Sequence[str] | None,
    *,
    names: Sequence[str] | None,
    count: int | None,
    seed: int,
    source: str = "dataset",
) -> list[str]:
    """Held-out identities: every class of the named groups, else of `count` groups drawn with `seed`.

    Whole groups (e.g. Omniglot alphabets) go out, so held-out identities are new members of groups the
    model never saw (new characters of unseen scripts), not new members of groups it trained on.
    """
    if groups is None:
        raise DataError(
            f"--heldout-groups/--heldout-group-count: {source} has no group level "
            "(needs <group>/<identity>/<image> folders or zip members)"
        )
    known = sorted(set(groups))
    if names is not None:
        unknown = [n for n in names if n not in known]
        if unknown:
            raise DataError(
                f"--heldout-groups: unknown group(s) {', '.join(unknown)}; {source} has {', '.join(known)}"
            )
        chosen = set(names)
    else:
        k = 0 if count is None else count
        if k >= len(known):
            raise DataError(
                f"--heldout-group-count {k}: {source} has only {len(known)} groups; at least one must train"
            )
        rng = np.random.default_rng(seed)
        chosen = {known[i] for i in rng.choice(len(known), size=k, replace=False)}
    if chosen == set(known):
        raise DataError(f"--heldout-groups: holding out all {len(known)} groups leaves none to train on")
    held = [c for c, g in zip(class_names, groups, strict=True) if g in chosen]
    if len(class_names) - len(held) < 2:
        raise DataError(
            f"--heldout-groups: holding out {len(held)} of {len(class_names)} classes leaves fewer than 2 "
            "to train on"
        )
    return held


def split_identities(
    labels: np.ndarray,
    class_names: Sequence[str],
    heldout_classes: Sequence[str],
    *,
    val_fraction: float,
    seed: int,
) -> SplitIndices:
    """Held-out identities go wholly to `heldout`; each training identity gives `round(val_fraction * n)`
    images (at most n - 1, so it keeps one to train on) to `val`, chosen with `seed`."""
    labels = np.asarray(labels)
    names = list(class_names)
    held = set(heldout_classes)
    train_classes = [n for n in names if n not in held]
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for k, name in enumerate(names):
        if name in held:
            continue
        members = np.flatnonzero(labels == k)
        members = members[rng.permutation(len(members))]
        n_val = min(round(val_fraction * len(members)), len(members) - 1)
        val_idx.append(members[:n_val])
        train_idx.append(members[n_val:])
    heldout_idx = np.flatnonzero(np.isin(labels, [names.index(n) for n in heldout_classes]))
    return SplitIndices(
        train_classes=train_classes,
        heldout_classes=[n for n in names if n in held],
        train=np.sort(np.concatenate(train_idx)),
        val=np.sort(np.concatenate(val_idx)),
        heldout=heldout_idx,
    )
