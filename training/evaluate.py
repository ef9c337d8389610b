"""Open-set evaluation on identities unseen in training: verification, identification, threshold calibration.

Pure numpy + scikit-learn (no TensorFlow), so the math is tested with hand-computed numbers and the same code
scores any embedder (trained model, softmax-only baseline, PCA on pixels).

Conventions used throughout:
- A score is the cosine similarity of two L2-normalised embeddings; a pair is accepted ("same identity") when
  `score >= threshold`, which is exactly how the service applies `Thresholds.default`.
- FAR = accepted impostor pairs / impostor pairs; TAR = accepted genuine pairs / genuine pairs.
- A false-accept rate is only *resolvable* when the impostor count can express it:
  `num_impostors * far >= min_errors`. Below that, TAR@FAR is reported as missing with the reason, never
  extrapolated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import StratifiedKFold

from bundle.files import l2_normalize
from bundle.manifest import CheckedPoint, Interval, OperatingPoint, OutOfSampleCheck, Thresholds

# The protocol's knobs are a config model (training/config.py, beside RunConfig), imported here for callers.
from training.config import DEFAULT_FARS, DEFAULT_TARGET_FAR, EvaluationSettings


class EvaluationError(ValueError):
    """The held-out data cannot support the protocol (too few identities, samples or pairs, non-finite
    embeddings): the user's split or model, not a bug; the message says what is missing."""


CONFIDENCE = 0.95


# --------------------------------------------------------------------------------------------- embeddings


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Embeddings `[N, D]` checked (2-D, finite) and L2-normalised in float64 (stable metrics), by the one
    `bundle.files.l2_normalize`; zero rows stay zero rather than NaN."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array [N, D], got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise EvaluationError("embeddings contain NaN or infinite values")
    return l2_normalize(x, dtype=np.float64)


def pair_scores(embeddings: np.ndarray, idx_a: np.ndarray, idx_b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each pair (idx_a[i], idx_b[i]) of rows of `embeddings`."""
    e = unit_rows(embeddings)
    # Clip: rounding can push a self-similar pair a hair above 1, outside the manifest's threshold range.
    return np.clip(np.einsum("ij,ij->i", e[idx_a], e[idx_b]), -1.0, 1.0)


# ------------------------------------------------------------------------------------------------- pairs


@dataclass(frozen=True)
class Pairs:
    """Index pairs into one set of samples; `same[i]` says whether pair i is genuine."""

    idx_a: np.ndarray
    idx_b: np.ndarray
    same: np.ndarray

    @property
    def num_genuine(self) -> int:
        return int(self.same.sum())

    @property
    def num_impostor(self) -> int:
        return int((~self.same).sum())


def _all_genuine(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a_parts, b_parts = [], []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        ia, ib = np.triu_indices(len(members), k=1)
        a_parts.append(members[ia])
        b_parts.append(members[ib])
    return np.concatenate(a_parts), np.concatenate(b_parts)


def _count_pairs(labels: np.ndarray) -> tuple[int, int]:
    n = len(labels)
    counts = np.unique(labels, return_counts=True)[1].astype(np.int64)
    genuine = int((counts * (counts - 1) // 2).sum())
    return genuine, n * (n - 1) // 2 - genuine


def _sample_genuine(
    labels: np.ndarray, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    # Uniform over all genuine pairs without listing them: pick a class with probability proportional to its
    # pair count, then two distinct members; duplicates are dropped and the draw repeated until `count`.
    classes, counts = np.unique(labels, return_counts=True)
    weights = (counts * (counts - 1) / 2).astype(np.float64)
    weights /= weights.sum()
    members = [np.flatnonzero(labels == c) for c in classes]
    return _draw_unique(
        count,
        rng,
        lambda n: _draw_within(members, rng.choice(len(classes), size=n, p=weights), rng),
    )


def _draw_within(
    members: list[np.ndarray], which: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    a = np.empty(len(which), dtype=np.int64)
    b = np.empty(len(which), dtype=np.int64)
    for k in np.unique(which):
        rows = np.flatnonzero(which == k)
        m = members[k]
        first = rng.integers(0, len(m), size=len(rows))
        # Second member drawn from the other len(m)-1 so a pair never repeats an image.
        second = (first + rng.integers(1, len(m), size=len(rows))) % len(m)
        a[rows], b[rows] = m[first], m[second]
    return a, b


def _sample_impostor(
    labels: np.ndarray, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    n = len(labels)

    def draw(k: int) -> tuple[np.ndarray, np.ndarray]:
        a = rng.integers(0, n, size=k)
        b = rng.integers(0, n, size=k)
        keep = labels[a] != labels[b]
        return a[keep], b[keep]

    return _draw_unique(count, rng, draw)


def _draw_unique(
    count: int,
    rng: np.random.Generator,
    draw: Callable[[int], tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` distinct unordered pairs, in the order `draw` produced them.

    `draw` yields i.i.d. pairs uniform over the pairs of one kind, so its first `count` distinct pairs are a
    uniform random sample without replacement. Order matters: an earlier version kept the `count` smallest
    keys after `np.unique` (which sorts), i.e. the lowest-index pairs, so a few identities filled the sample.
    """
    kept_a: list[np.ndarray] = []
    kept_b: list[np.ndarray] = []
    have = 0
    # Keys encode an unordered pair (lo, hi) as one int64, so repeats across draws are found with np.isin.
    key_set: np.ndarray = np.empty(0, dtype=np.int64)
    while have < count:
        a, b = draw(max(1024, 2 * (count - have)))
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        keys = lo.astype(np.int64) * (1 << 31) + hi
        _, first = np.unique(keys, return_index=True)
        first = np.sort(first)  # back to draw order: the first occurrence of each key, as drawn
        fresh = first[~np.isin(keys[first], key_set)]
        fresh = fresh[: count - have]
        key_set = np.concatenate([key_set, keys[fresh]])
        kept_a.append(lo[fresh])
        kept_b.append(hi[fresh])
        have += len(fresh)
    a = np.concatenate(kept_a)
    b = np.concatenate(kept_b)
    order = rng.permutation(len(a))
    return a[order], b[order]


def make_pairs(
    labels: Sequence[int] | np.ndarray,
    *,
    max_genuine: int | None = None,
    max_impostor: int | None = None,
    seed: int = 0,
) -> Pairs:
    """Genuine and impostor pairs among samples of (unseen) identities.

    Every unordered pair of distinct samples is used when a kind has at most `max_*` pairs (or `max_*` is
    None); otherwise a seeded uniform sample of `max_*` distinct pairs of that kind is drawn.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) < 2:
        raise EvaluationError("labels must be a 1-D sequence of at least 2 samples")
    for name, value in (("max_genuine", max_genuine), ("max_impostor", max_impostor)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1 (or None for all pairs), got {value}")
    n_gen, n_imp = _count_pairs(labels)
    if n_gen == 0:
        raise EvaluationError("no genuine pairs: every identity has a single sample")
    if n_imp == 0:
        raise EvaluationError("no impostor pairs: all samples share one identity")
    rng = np.random.default_rng(seed)

    if max_genuine is None or n_gen <= max_genuine:
        ga, gb = _all_genuine(labels)
    else:
        ga, gb = _sample_genuine(labels, max_genuine, rng)
    if max_impostor is None or n_imp <= max_impostor:
        ia, ib = np.triu_indices(len(labels), k=1)
        keep = labels[ia] != labels[ib]
        ia, ib = ia[keep], ib[keep]
    else:
        ia, ib = _sample_impostor(labels, max_impostor, rng)
    same = np.concatenate([np.ones(len(ga), dtype=bool), np.zeros(len(ia), dtype=bool)])
    return Pairs(
        idx_a=np.concatenate([ga, ia]).astype(np.int64),
        idx_b=np.concatenate([gb, ib]).astype(np.int64),
        same=same,
    )


# ----------------------------------------------------------------------------------------- verification


def _check_scores(scores: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    same = np.asarray(same, dtype=bool).reshape(-1)
    if len(scores) != len(same):
        raise ValueError(f"{len(scores)} scores for {len(same)} labels")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or infinite values")
    if same.all() or not same.any():
        raise EvaluationError("need both genuine and impostor pairs")
    return scores, same


def _roc(scores: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # drop_intermediate=False keeps every distinct score as a threshold, so each operating point is exact.
    fpr, tpr, thr = roc_curve(same, scores, drop_intermediate=False)
    return fpr, tpr, thr


def measure_at(scores: np.ndarray, same: np.ndarray, threshold: float) -> OperatingPoint:
    """FAR and TAR measured when accepting `score >= threshold`."""
    scores, same = _check_scores(scores, same)
    accept = scores >= threshold
    return OperatingPoint(
        threshold=float(np.clip(threshold, -1.0, 1.0)),
        far=float(accept[~same].mean()),
        tar=float(accept[same].mean()),
    )


def _threshold_after(thr: np.ndarray, i: int, scores: np.ndarray) -> float:
    """A threshold that accepts exactly the scores >= thr[i] (sklearn's ROC thresholds, descending).

    Placed halfway to the next lower score rather than on thr[i] itself: the rates measured here are the same,
    but a new genuine pair scoring a hair below the lowest accepted one is not rejected (a max-margin choice,
    like an SVM's). sklearn's first threshold is +inf ("accept nothing"); for cosine scores that becomes just
    above the highest score, capped at 1.0 so it stays a valid similarity.
    """
    if not math.isfinite(thr[i]):
        return float(min(1.0, np.nextafter(scores.max(), np.inf)))
    if i + 1 < len(thr):
        return float((thr[i] + thr[i + 1]) / 2.0)
    return float(thr[i])


def equal_error_rate(scores: np.ndarray, same: np.ndarray) -> tuple[float, OperatingPoint]:
    """EER (where FAR == FRR, linearly interpolated between ROC points) and the measured point nearest it.

    The returned operating point is a real threshold at the ROC point nearest the crossing, so its FAR/TAR are
    what that threshold actually gives, not interpolated values.
    """
    scores, same = _check_scores(scores, same)
    fpr, tpr, thr = _roc(scores, same)
    fnr = 1.0 - tpr
    diff = fnr - fpr  # decreasing from 1 (threshold=inf) to -1 (lowest threshold)
    i = int(np.flatnonzero(diff <= 0)[0])
    if i == 0 or diff[i] == 0:
        eer = float(fpr[i])
    else:
        # Segment (i-1, i) crosses fnr == fpr; interpolate both rates along it.
        t = diff[i - 1] / (diff[i - 1] - diff[i])
        eer = float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))
    j = i if i == 0 or abs(diff[i]) <= abs(diff[i - 1]) else i - 1
    point = measure_at(scores, same, _threshold_after(thr, j, scores))
    return eer, point


def threshold_at_far(scores: np.ndarray, same: np.ndarray, target_far: float) -> OperatingPoint:
    """The lowest threshold whose measured FAR is <= `target_far` (the highest TAR that keeps the FAR)."""
    if not 0.0 < target_far < 1.0:
        raise ValueError(f"target FAR must be in (0, 1), got {target_far}")
    scores, same = _check_scores(scores, same)
    fpr, _, thr = _roc(scores, same)
    i = int(np.flatnonzero(fpr <= target_far)[-1])
    return measure_at(scores, same, _threshold_after(thr, i, scores))


def far_is_resolvable(num_impostor: int, far: float, min_errors: int = 1) -> bool:
    """Whether `num_impostor` pairs can measure `far` with at least `min_errors` false accepts."""
    return num_impostor * far >= min_errors - 1e-9


def kfold_accuracy(
    scores: np.ndarray, same: np.ndarray, *, folds: int = 10, seed: int = 0, balance: bool = True
) -> tuple[float, float]:
    """LFW-protocol verification accuracy: threshold chosen on k-1 folds, accuracy on the held-out fold.

    Returns (mean, std) over folds. LFW's folds hold equal numbers of genuine and impostor pairs; with
    `balance=True` the larger kind is subsampled (seeded) to the size of the smaller one so that accuracy
    is not dominated by the (usually far more numerous) impostor pairs.
    """
    scores, same = _check_scores(scores, same)
    rng = np.random.default_rng(seed)
    if balance:
        gen, imp = np.flatnonzero(same), np.flatnonzero(~same)
        n = min(len(gen), len(imp))
        keep = np.concatenate([rng.choice(gen, n, replace=False), rng.choice(imp, n, replace=False)])
        scores, same = scores[keep], same[keep]
    if min(same.sum(), (~same).sum()) < folds:
        raise EvaluationError(f"{folds}-fold accuracy needs at least {folds} pairs of each kind")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    accs = []
    for train, test in splitter.split(scores, same):
        fpr, tpr, thr = _roc(scores[train], same[train])
        pos, neg = same[train].sum(), (~same[train]).sum()
        acc = (tpr * pos + (1.0 - fpr) * neg) / (pos + neg)
        k = int(np.argmax(acc))
        best = thr[k] if k == 0 else _threshold_after(thr, k, scores[train])
        accs.append(float(((scores[test] >= best) == same[test]).mean()))
    return float(np.mean(accs)), float(np.std(accs))


@dataclass(frozen=True)
class VerificationReport:
    """Verification metrics of one embedder on one set of pairs."""

    num_genuine: int
    num_impostor: int
    auc: float
    eer: float
    eer_point: OperatingPoint
    tar_at_far: dict[str, float]  # key "1e-02" -> TAR, only resolvable FARs
    unresolved_fars: dict[str, str]  # key -> reason it is not reported
    kfold_mean: float
    kfold_std: float
    roc_fpr: np.ndarray = field(repr=False)
    roc_tpr: np.ndarray = field(repr=False)

    def summary(self) -> dict[str, float | int | str]:
        """Flat numbers for tables, JSON and the manifest's `evaluation` section."""
        out: dict[str, float | int | str] = {
            "num_genuine_pairs": self.num_genuine,
            "num_impostor_pairs": self.num_impostor,
            "roc_auc": round(self.auc, 6),
            "eer": round(self.eer, 6),
            "eer_threshold": round(self.eer_point.threshold, 6),
            "kfold_accuracy_mean": round(self.kfold_mean, 6),
            "kfold_accuracy_std": round(self.kfold_std, 6),
        }
        for key, tar in self.tar_at_far.items():
            out[f"tar_at_far_{key}"] = round(tar, 6)
        for key, why in self.unresolved_fars.items():
            out[f"tar_at_far_{key}"] = why
        return out


def far_key(far: float) -> str:
    return f"{far:.0e}"


def verification_report(
    scores: np.ndarray,
    same: np.ndarray,
    *,
    fars: Sequence[float] = DEFAULT_FARS,
    folds: int = 10,
    min_errors: int = 1,
    seed: int = 0,
) -> VerificationReport:
    """ROC AUC, EER, TAR at each resolvable FAR and k-fold accuracy for one set of scored pairs."""
    scores, same = _check_scores(scores, same)
    n_imp = int((~same).sum())
    tar: dict[str, float] = {}
    unresolved: dict[str, str] = {}
    for far in fars:
        if far_is_resolvable(n_imp, far, min_errors):
            tar[far_key(far)] = threshold_at_far(scores, same, far).tar
        else:
            unresolved[far_key(far)] = (
                f"not measured: {n_imp} impostor pairs cannot resolve FAR {far:g} "
                f"(need >= {math.ceil(min_errors / far)})"
            )
    eer, eer_point = equal_error_rate(scores, same)
    mean, std = kfold_accuracy(scores, same, folds=folds, seed=seed)
    fpr, tpr, _ = roc_curve(same, scores)
    return VerificationReport(
        num_genuine=int(same.sum()),
        num_impostor=n_imp,
        auc=float(roc_auc_score(same, scores)),
        eer=eer,
        eer_point=eer_point,
        tar_at_far=tar,
        unresolved_fars=unresolved,
        kfold_mean=mean,
        kfold_std=std,
        roc_fpr=fpr,
        roc_tpr=tpr,
    )


# ------------------------------------------------------------------------------------------- calibration


def calibrate_threshold(
    scores: np.ndarray,
    same: np.ndarray,
    *,
    target_far: float = DEFAULT_TARGET_FAR,
    min_errors: int = 1,
) -> Thresholds:
    """Decision thresholds for the manifest, calibrated on pairs of identities unseen in training.

    `default` is the lowest threshold whose measured FAR is <= the target FAR. When the impostor count cannot
    resolve `target_far`, the lowest resolvable FAR (`min_errors / num_impostor`) is used instead and recorded
    as `target_far`. The EER operating point is recorded beside it.
    """
    scores, same = _check_scores(scores, same)
    if not 0.0 < target_far < 1.0:
        raise ValueError(f"target FAR must be in (0, 1), got {target_far}")
    n_imp = int((~same).sum())
    achievable = min_errors / n_imp
    if achievable >= 1.0:
        raise EvaluationError(f"{n_imp} impostor pairs are too few to calibrate any FAR below 1")
    target = max(target_far, achievable)
    at_far = threshold_at_far(scores, same, target)
    _, eer_point = equal_error_rate(scores, same)
    return Thresholds(
        default=at_far.threshold,
        target_far=target,
        at_target_far=at_far,
        eer=eer_point,
        num_genuine_pairs=int(same.sum()),
        num_impostor_pairs=n_imp,
    )


def rate_interval(successes: int, trials: int, confidence: float = CONFIDENCE) -> Interval:
    """Clopper-Pearson (exact binomial) interval of `successes / trials`."""
    from scipy.stats import beta

    if trials < 1:
        raise ValueError("a rate needs at least one trial")
    tail = (1.0 - confidence) / 2.0
    low = 0.0 if successes == 0 else float(beta.ppf(tail, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1.0 - tail, successes + 1, trials - successes))
    return Interval(low=low, high=high)


BOOTSTRAP_REPS = 2000


def identity_bootstrap(
    accept: np.ndarray,
    same: np.ndarray,
    ids_a: np.ndarray,
    ids_b: np.ndarray,
    *,
    confidence: float = CONFIDENCE,
    reps: int = BOOTSTRAP_REPS,
    seed: int = 0,
) -> tuple[Interval, Interval]:
    """Percentile intervals of FAR and TAR when the IDENTITIES are resampled (with replacement).

    Pairs that share an identity are not independent: one identity that resembles another makes many
    high-scoring impostor pairs at once, so a binomial interval on pair counts is far too narrow (measured:
    the test FAR of one model moved from 4e-5 to 3e-3 between random halves of 30 held-out identities, while
    each half's binomial interval was +-20 %). The bootstrap draws K identities out of the K with replacement
    and recomputes both rates over the pairs among the drawn identities (an identity drawn w times counts w
    times; pairs between two copies of one identity are not impostor pairs and are left out).
    """
    ids, inverse = np.unique(np.concatenate([ids_a, ids_b]), return_inverse=True)
    ia, ib = inverse[: len(ids_a)], inverse[len(ids_a) :]
    k = len(ids)
    imp = ~same
    n_imp = np.zeros((k, k))
    fa = np.zeros((k, k))
    np.add.at(n_imp, (ia[imp], ib[imp]), 1.0)
    np.add.at(fa, (ia[imp], ib[imp]), accept[imp].astype(np.float64))
    n_imp, fa = n_imp + n_imp.T, fa + fa.T
    n_gen = np.bincount(ia[same], minlength=k).astype(np.float64)
    ta = np.bincount(ia[same], weights=accept[same].astype(np.float64), minlength=k)
    rng = np.random.default_rng([seed, 0xB007])
    w = rng.multinomial(k, np.full(k, 1.0 / k), size=reps).astype(np.float64)  # [reps, K] multiplicities
    # w^T M w per draw as one BLAS matmul ([reps, K] @ [K, K]) and a row-wise dot: a plain three-operand
    # einsum loops over reps x K x K in C (~8e9 steps at K = 2000 identities).
    imp_den = np.sum((w @ n_imp) * w, axis=1)
    far = np.sum((w @ fa) * w, axis=1)
    gen_den = w @ n_gen
    tar = w @ ta
    ok_far, ok_tar = imp_den > 0, gen_den > 0
    tail = 100.0 * (1.0 - confidence) / 2.0

    def interval(num: np.ndarray, den: np.ndarray, ok: np.ndarray) -> Interval:
        rates = num[ok] / den[ok]
        low, high = np.percentile(rates, [tail, 100.0 - tail])
        return Interval(low=float(np.clip(low, 0, 1)), high=float(np.clip(high, 0, 1)))

    return interval(far, imp_den, ok_far), interval(tar, gen_den, ok_tar)


def check_point(
    scores: np.ndarray,
    same: np.ndarray,
    threshold: float,
    confidence: float = CONFIDENCE,
    *,
    ids: tuple[np.ndarray, np.ndarray] | None = None,
    seed: int = 0,
) -> CheckedPoint:
    """A threshold chosen elsewhere, measured on these pairs, with intervals of both rates: resampling the
    identities when `ids` (each pair's two identities) is given, else exact binomial (Clopper-Pearson)."""
    scores, same = _check_scores(scores, same)
    accept = scores >= threshold
    false_accepts, true_accepts = int(accept[~same].sum()), int(accept[same].sum())
    n_imp, n_gen = int((~same).sum()), int(same.sum())
    if ids is not None:
        far_interval, tar_interval = identity_bootstrap(
            accept, same, np.asarray(ids[0]), np.asarray(ids[1]), confidence=confidence, seed=seed
        )
    else:
        far_interval = rate_interval(false_accepts, n_imp, confidence)
        tar_interval = rate_interval(true_accepts, n_gen, confidence)
    return CheckedPoint(
        threshold=float(np.clip(threshold, -1.0, 1.0)),
        far=false_accepts / n_imp,
        tar=true_accepts / n_gen,
        far_interval=far_interval,
        tar_interval=tar_interval,
    )


def check_out_of_sample(
    thresholds: Thresholds,
    scores: np.ndarray,
    same: np.ndarray,
    num_identities: int,
    confidence: float = CONFIDENCE,
    *,
    ids: tuple[np.ndarray, np.ndarray] | None = None,
    seed: int = 0,
) -> OutOfSampleCheck:
    """What calibrated thresholds measure on pairs of identities that took no part in choosing them
    (intervals by resampling identities when `ids` gives each pair's identities)."""
    scores, same = _check_scores(scores, same)
    return OutOfSampleCheck(
        num_identities=num_identities,
        num_genuine_pairs=int(same.sum()),
        num_impostor_pairs=int((~same).sum()),
        confidence=confidence,
        interval_method="identity-bootstrap" if ids is not None else "clopper-pearson",
        at_default=check_point(scores, same, thresholds.default, confidence, ids=ids, seed=seed),
        at_eer=check_point(scores, same, thresholds.eer.threshold, confidence, ids=ids, seed=seed),
    )


@dataclass(frozen=True)
class IdentitySplit:
    """Held-out identities divided into calibration identities (choose thresholds) and test identities
    (measure everything); `calibration` is empty when there are too few identities to divide."""

    calibration: np.ndarray  # sample indices
    test: np.ndarray  # sample indices
    calibration_classes: np.ndarray
    test_classes: np.ndarray
    note: str | None = None  # why there is no calibration side

    @property
    def has_calibration(self) -> bool:
        return len(self.calibration) > 0


def split_calibration(labels: np.ndarray, fraction: float, seed: int) -> IdentitySplit:
    """Seeded identity-disjoint split of held-out samples: `fraction` of the identities calibrate.

    Each side needs at least 2 identities (an impostor pair needs two). With fewer identities, or
    `fraction == 0`, every sample is a test sample and the split says why nothing calibrates.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    everything = np.arange(len(labels))
    if fraction == 0:
        return IdentitySplit(everything[:0], everything, classes[:0], classes, "calibration disabled")
    n_cal = round(fraction * len(classes))
    if n_cal < 2 or len(classes) - n_cal < 2:
        return IdentitySplit(
            everything[:0],
            everything,
            classes[:0],
            classes,
            f"{len(classes)} held-out identities with --calibration-fraction {fraction:g} leave "
            f"{n_cal} to calibrate and {len(classes) - n_cal} to test; each side needs at least 2",
        )
    rng = np.random.default_rng([seed, 0xCA1])
    cal_classes = np.sort(rng.choice(classes, n_cal, replace=False))
    on_cal = np.isin(labels, cal_classes)
    return IdentitySplit(
        everything[on_cal], everything[~on_cal], cal_classes, np.setdiff1d(classes, cal_classes)
    )


@dataclass(frozen=True)
class CalibrationReport:
    """Thresholds chosen on the calibration identities at each FAR, measured on the test identities."""

    num_calibration_identities: int
    num_test_identities: int
    points: dict[str, CheckedPoint]  # far key -> threshold chosen at that FAR, measured on test pairs
    unresolved_fars: dict[str, str]
    # far key -> (test FARs, test TARs) over other seeded calibration/test splits of the same identities
    # (the first is this split): how much the result depends on which identities happen to calibrate.
    repeats: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)

    def summary(self) -> dict[str, float | int | str]:
        out: dict[str, float | int | str] = {
            "calibration_identities": self.num_calibration_identities,
            "test_identities": self.num_test_identities,
        }
        for key, p in self.points.items():
            out[f"calibrated_threshold_{key}"] = round(p.threshold, 6)
            out[f"test_far_at_calibrated_{key}"] = round(p.far, 6)
            out[f"test_far_interval_{key}"] = f"{p.far_interval.low:.3g}..{p.far_interval.high:.3g}"
            out[f"test_tar_at_calibrated_{key}"] = round(p.tar, 6)
            out[f"test_tar_interval_{key}"] = f"{p.tar_interval.low:.3g}..{p.tar_interval.high:.3g}"
        for key, (fars, tars) in self.repeats.items():
            out[f"splits_test_far_{key}"] = _spread(fars)
            out[f"splits_test_tar_{key}"] = _spread(tars)
        for key, why in self.unresolved_fars.items():
            out[f"test_far_at_calibrated_{key}"] = why
        return out


def _spread(values: list[float]) -> str:
    return f"mean {np.mean(values):.3g}, {min(values):.3g}..{max(values):.3g} over {len(values)} splits"


def calibration_report(
    cal_scores: np.ndarray,
    cal_same: np.ndarray,
    test_scores: np.ndarray,
    test_same: np.ndarray,
    split: IdentitySplit,
    *,
    fars: Sequence[float],
    min_errors: int,
    test_ids: tuple[np.ndarray, np.ndarray] | None = None,
    seed: int = 0,
) -> CalibrationReport:
    points: dict[str, CheckedPoint] = {}
    unresolved: dict[str, str] = {}
    n_cal_imp, n_test_imp = int((~cal_same).sum()), int((~test_same).sum())
    for far in fars:
        key = far_key(far)
        if not far_is_resolvable(min(n_cal_imp, n_test_imp), far, min_errors):
            unresolved[key] = (
                f"not measured: {n_cal_imp} calibration / {n_test_imp} test impostor pairs cannot resolve "
                f"FAR {far:g}"
            )
            continue
        chosen = threshold_at_far(cal_scores, cal_same, far).threshold
        points[key] = check_point(test_scores, test_same, chosen, ids=test_ids, seed=seed)
    return CalibrationReport(len(split.calibration_classes), len(split.test_classes), points, unresolved)


# ---------------------------------------------------------------------------------------- identification


@dataclass(frozen=True)
class IdentificationReport:
    """Open-set identification averaged over seeded trials (different gallery images/unknown identities)."""

    trials: int
    gallery_size: int
    num_known_probes: int
    num_unknown_probes: int
    rank1: float
    dir_at_far: dict[str, float]
    unresolved_fars: dict[str, str]

    def summary(self) -> dict[str, float | int | str]:
        out: dict[str, float | int | str] = {
            "ident_trials": self.trials,
            "ident_gallery_size": self.gallery_size,
            "ident_known_probes": self.num_known_probes,
            "ident_unknown_probes": self.num_unknown_probes,
            "rank1": round(self.rank1, 6),
        }
        for key, v in self.dir_at_far.items():
            out[f"dir_at_far_{key}"] = round(v, 6)
        for key, why in self.unresolved_fars.items():
            out[f"dir_at_far_{key}"] = why
        return out


def open_set_scores(
    embeddings: np.ndarray, labels: np.ndarray, gallery_idx: np.ndarray, probe_idx: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each probe: best gallery similarity, whether that best match has the probe's identity, and
    whether the probe's identity is in the gallery at all."""
    e = unit_rows(embeddings)
    sims = e[probe_idx] @ e[gallery_idx].T
    best = np.argmax(sims, axis=1)
    top_score = sims[np.arange(len(probe_idx)), best]
    correct = labels[gallery_idx][best] == labels[probe_idx]
    known = np.isin(labels[probe_idx], labels[gallery_idx])
    return top_score, correct, known


def dir_at_far(top_score: np.ndarray, correct: np.ndarray, known: np.ndarray, far: float) -> float:
    """Detection-and-identification rate at a false-alarm rate (FRVT open-set protocol).

    The threshold is the lowest one at which at most `far` of the unknown probes' best scores reach it; DIR is
    the fraction of known probes whose best match is correct AND reaches the threshold.
    """
    unknown_scores = np.sort(top_score[~known])[::-1]
    allowed = math.floor(far * len(unknown_scores) + 1e-9)  # false alarms permitted
    # Accept score >= t; with `allowed` alarms permitted, t must sit just above the (allowed+1)-th highest.
    threshold = -np.inf if allowed >= len(unknown_scores) else np.nextafter(unknown_scores[allowed], np.inf)
    hits = correct[known] & (top_score[known] >= threshold)
    return float(hits.mean())


def identification_report(
    embeddings: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    *,
    unknown_fraction: float = 0.3,
    fars: Sequence[float] = (1e-2, 1e-1),
    trials: int = 10,
    min_errors: int = 1,
    seed: int = 0,
) -> IdentificationReport:
    """Open-set identification on unseen identities.

    Per trial (seeded): `unknown_fraction` of the identities (at least one) are kept out of the gallery and
    all their samples become unknown probes; every other identity enrols ONE random sample as its gallery
    entry and its remaining samples are known probes. Rank-1 is closed-set accuracy of known probes; DIR@FAR
    is the detection-and-identification rate at a false-alarm rate measured on the unknown probes.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if len(classes) < 2:
        raise EvaluationError("open-set identification needs at least 2 identities (1 known + 1 unknown)")
    if not 0.0 < unknown_fraction < 1.0:
        raise ValueError(f"unknown_fraction must be in (0, 1), got {unknown_fraction}")
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    n_unknown_ids = min(len(classes) - 1, max(1, round(unknown_fraction * len(classes))))
    rng = np.random.default_rng(seed)
    rank1s: list[float] = []
    dirs: dict[str, list[float]] = {far_key(f): [] for f in fars}
    unresolved: dict[str, str] = {}
    sizes = (0, 0, 0)
    for _ in range(trials):
        unknown_ids = rng.choice(classes, n_unknown_ids, replace=False)
        gallery, known_probes = [], []
        for cls in classes:
            if cls in unknown_ids:
                continue
            members = rng.permutation(np.flatnonzero(labels == cls))
            gallery.append(members[0])
            known_probes.extend(members[1:])
        unknown_probes = np.flatnonzero(np.isin(labels, unknown_ids))
        probes = np.concatenate([np.asarray(known_probes, dtype=np.int64), unknown_probes])
        top, correct, known = open_set_scores(embeddings, labels, np.asarray(gallery), probes)
        if not known.any():
            raise EvaluationError("no known probes: every gallery identity has a single sample")
        rank1s.append(float(correct[known].mean()))
        for far in fars:
            key = far_key(far)
            if far_is_resolvable(len(unknown_probes), far, min_errors):
                dirs[key].append(dir_at_far(top, correct, known, far))
            else:
                unresolved[key] = (
                    f"not measured: {len(unknown_probes)} unknown probes cannot resolve FAR {far:g}"
                )
        sizes = (len(gallery), int(known.sum()), len(unknown_probes))
    return IdentificationReport(
        trials=trials,
        gallery_size=sizes[0],
        num_known_probes=sizes[1],
        num_unknown_probes=sizes[2],
        rank1=float(np.mean(rank1s)),
        dir_at_far={k: float(np.mean(v)) for k, v in dirs.items() if v},
        unresolved_fars=unresolved,
    )


# ---------------------------------------------------------------------------------------------- episodes


@dataclass(frozen=True)
class EpisodeReport:
    """N-way K-shot classification of held-out identities (the one-shot protocol of Lake et al.)."""

    ways: int
    shots: int
    queries: int
    episodes: int
    within_group: bool
    accuracy: float
    interval: float  # half-width of the 95 % interval of the mean accuracy over episodes

    @property
    def key(self) -> str:
        return f"{self.ways}way_{self.shots}shot{'_within_group' if self.within_group else ''}"

    def summary(self) -> dict[str, float | int | str]:
        return {
            f"episodes_{self.key}_accuracy": round(self.accuracy, 6),
            f"episodes_{self.key}_ci95": round(self.interval, 6),
            "episodes": self.episodes,
        }


def episode_report(
    embeddings: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    *,
    ways: int = 20,
    shots: int = 1,
    queries: int = 1,
    episodes: int = 400,
    groups: Sequence[str] | None = None,
    within_group: bool = False,
    seed: int = 0,
) -> EpisodeReport:
    """Seeded N-way K-shot episodes among the identities of `labels`.

    Each episode draws `ways` identities (all from one group when `within_group`: the standard Omniglot
    within-alphabet protocol; the group is drawn in proportion to how many episodes it can host), then for
    each identity `shots` support and `queries` query samples, all distinct. A query is classified to the
    identity whose prototype (the normalised mean of its normalised support embeddings) is most similar.
    `groups[c]` is the group of identity c (label value c).
    """
    labels = np.asarray(labels)
    if ways < 2 or shots < 1 or queries < 1 or episodes < 1:
        raise ValueError(
            f"episodes need ways >= 2, shots >= 1, queries >= 1, episodes >= 1 (got {ways}, "
            f"{shots}, {queries}, {episodes})"
        )
    e = unit_rows(embeddings)
    classes, counts = np.unique(labels, return_counts=True)
    eligible = classes[counts >= shots + queries]
    members = {c: np.flatnonzero(labels == c) for c in eligible}
    if within_group:
        if groups is None:
            raise EvaluationError("within-group episodes need the group of every identity")
        pools = {}
        for c in eligible:
            pools.setdefault(groups[int(c)], []).append(c)
        pools = {g: np.asarray(cs) for g, cs in pools.items() if len(cs) >= ways}
        if not pools:
            raise EvaluationError(
                f"no group has {ways} identities with {shots + queries} samples for {ways}-way episodes"
            )
    else:
        if len(eligible) < ways:
            raise EvaluationError(
                f"{ways}-way episodes need {ways} identities with >= {shots + queries} samples; "
                f"there are {len(eligible)}"
            )
        pools = {"": eligible}
    names = sorted(pools)
    weights = np.array([len(pools[g]) for g in names], dtype=np.float64)
    rng = np.random.default_rng([seed, 0xE915])
    accs = np.empty(episodes)
    for t in range(episodes):
        pool = pools[names[rng.choice(len(names), p=weights / weights.sum())]]
        chosen = rng.choice(pool, ways, replace=False)
        protos, query_rows = [], []
        for c in chosen:
            pick = rng.choice(members[c], shots + queries, replace=False)
            protos.append(e[pick[:shots]].mean(axis=0))
            query_rows.append(pick[shots:])
        protos_arr = unit_rows(np.stack(protos))
        q = e[np.concatenate(query_rows)]
        truth = np.repeat(np.arange(ways), queries)
        accs[t] = float((np.argmax(q @ protos_arr.T, axis=1) == truth).mean())
    half = 1.96 * float(accs.std(ddof=1)) / math.sqrt(episodes) if episodes > 1 else float("nan")
    return EpisodeReport(ways, shots, queries, episodes, within_group, float(accs.mean()), half)


# ------------------------------------------------------------------------------------------------ all-in-one


@dataclass(frozen=True)
class OpenSetEvaluation:
    """Everything measured for one embedder on one held-out split.

    Threshold-free figures (ROC, EER, TAR at a FAR read off the ROC, k-fold accuracy, identification,
    episodes) use every held-out identity. Deployable thresholds are chosen on the calibration identities
    only, and `calibration` says what they measured on the test identities, which took no part in choosing
    them.
    """

    name: str
    verification: VerificationReport
    identification: IdentificationReport
    pairs: Pairs = field(repr=False)
    scores: np.ndarray = field(repr=False)
    split: IdentitySplit = field(repr=False)
    calibration: CalibrationReport | None = None
    calibration_pairs: Pairs | None = field(default=None, repr=False)
    calibration_scores: np.ndarray | None = field(default=None, repr=False)
    test_pairs: Pairs | None = field(default=None, repr=False)
    test_scores: np.ndarray | None = field(default=None, repr=False)
    episodes: EpisodeReport | None = None
    episodes_note: str | None = None
    labels: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64), repr=False)
    seed: int = 0

    def summary(self) -> dict[str, float | int | str]:
        out = {**self.verification.summary(), **self.identification.summary()}
        if self.calibration is not None:
            out.update(self.calibration.summary())
        elif self.split.note:
            out["calibration"] = f"not calibrated out of sample: {self.split.note}"
        if self.episodes is not None:
            out.update(self.episodes.summary())
        elif self.episodes_note:
            out["episodes"] = f"not measured: {self.episodes_note}"
        return out

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, **self.summary()}


def _pairs_within(labels: np.ndarray, rows: np.ndarray, settings: EvaluationSettings, salt: int) -> Pairs:
    """Pairs among the samples `rows` (indices into `labels`), as indices into `labels`."""
    local = make_pairs(
        labels[rows],
        max_genuine=settings.max_genuine,
        max_impostor=settings.max_impostor,
        seed=settings.seed + salt,
    )
    return Pairs(rows[local.idx_a], rows[local.idx_b], local.same)


def evaluate_embeddings(
    name: str,
    embeddings: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    settings: EvaluationSettings,
    *,
    groups: Sequence[str] | None = None,
) -> OpenSetEvaluation:
    """Verification, open-set identification, episodes and out-of-sample calibration of one embedder's
    embeddings of the held-out samples (`groups[c]`: the group of held-out identity c, if the data has one).

    Pairs and splits depend only on `labels` and the seed, so several embedders of the same samples are
    scored on the same pairs (a like-for-like comparison).
    """
    labels = np.asarray(labels)
    embeddings = np.asarray(embeddings)
    if len(embeddings) != len(labels):
        raise ValueError(f"{len(embeddings)} embeddings for {len(labels)} labels")
    pairs = make_pairs(
        labels, max_genuine=settings.max_genuine, max_impostor=settings.max_impostor, seed=settings.seed
    )
    scores = pair_scores(embeddings, pairs.idx_a, pairs.idx_b)
    verification = verification_report(
        scores,
        pairs.same,
        fars=settings.fars,
        folds=settings.folds,
        min_errors=settings.min_errors,
        seed=settings.seed,
    )
    identification = identification_report(
        embeddings,
        labels,
        unknown_fraction=settings.unknown_fraction,
        fars=settings.ident_fars,
        trials=settings.ident_trials,
        min_errors=settings.min_errors,
        seed=settings.seed,
    )
    split = split_calibration(labels, settings.calibration_fraction, settings.seed)
    calibration = cal_pairs = cal_scores = test_pairs = test_scores = None
    if split.has_calibration:
        cal_pairs = _pairs_within(labels, split.calibration, settings, 1)
        test_pairs = _pairs_within(labels, split.test, settings, 2)
        cal_scores = pair_scores(embeddings, cal_pairs.idx_a, cal_pairs.idx_b)
        test_scores = pair_scores(embeddings, test_pairs.idx_a, test_pairs.idx_b)
        calibration = calibration_report(
            cal_scores,
            cal_pairs.same,
            test_scores,
            test_pairs.same,
            split,
            fars=settings.fars,
            min_errors=settings.min_errors,
            test_ids=(labels[test_pairs.idx_a], labels[test_pairs.idx_b]),
            seed=settings.seed,
        )
        if settings.calibration_repeats > 1:
            calibration = replace(
                calibration, repeats=_calibration_repeats(embeddings, labels, settings, calibration)
            )
    episodes = note = None
    if settings.episodes > 0:
        within = settings.episode_within_group and groups is not None
        try:
            episodes = episode_report(
                embeddings,
                labels,
                ways=settings.episode_ways,
                shots=settings.episode_shots,
                episodes=settings.episodes,
                groups=groups,
                within_group=within,
                seed=settings.seed,
            )
        except EvaluationError as exc:  # too few identities or samples for episodes: noted, not fatal
            note = str(exc)
    return OpenSetEvaluation(
        name,
        verification,
        identification,
        pairs,
        scores,
        split,
        calibration,
        cal_pairs,
        cal_scores,
        test_pairs,
        test_scores,
        episodes,
        note,
        labels,
        settings.seed,
    )


def _calibration_repeats(
    embeddings: np.ndarray, labels: np.ndarray, settings: EvaluationSettings, first: CalibrationReport
) -> dict[str, tuple[list[float], list[float]]]:
    """Test FAR/TAR at the calibrated threshold over `calibration_repeats` seeded identity splits."""
    out = {key: ([p.far], [p.tar]) for key, p in first.points.items()}
    for r in range(1, settings.calibration_repeats):
        seed = settings.seed + 1000 * r
        split = split_calibration(labels, settings.calibration_fraction, seed)
        each = replace(settings, seed=seed)
        cal, test = (
            _pairs_within(labels, split.calibration, each, 1),
            _pairs_within(labels, split.test, each, 2),
        )
        cal_scores = pair_scores(embeddings, cal.idx_a, cal.idx_b)
        test_scores = pair_scores(embeddings, test.idx_a, test.idx_b)
        for key in out:
            chosen = threshold_at_far(cal_scores, cal.same, float(key)).threshold
            point = measure_at(test_scores, test.same, chosen)
            out[key][0].append(point.far)
            out[key][1].append(point.tar)
    return out


class CalibrationError(EvaluationError):
    """Thresholds cannot be calibrated out of sample on this split (too few held-out identities)."""


def calibrate_out_of_sample(
    evaluation: OpenSetEvaluation, *, target_far: float = DEFAULT_TARGET_FAR, min_errors: int = 1
) -> Thresholds:
    """The manifest's thresholds: chosen on the calibration identities' pairs, checked on the test ones."""
    if evaluation.calibration_scores is None or evaluation.calibration_pairs is None:
        raise CalibrationError(
            f"cannot calibrate out of sample: {evaluation.split.note}; hold out more identities"
        )
    assert evaluation.test_scores is not None and evaluation.test_pairs is not None
    thresholds = calibrate_threshold(
        evaluation.calibration_scores,
        evaluation.calibration_pairs.same,
        target_far=target_far,
        min_errors=min_errors,
    )
    labels = evaluation.labels
    check = check_out_of_sample(
        thresholds,
        evaluation.test_scores,
        evaluation.test_pairs.same,
        len(evaluation.split.test_classes),
        ids=(labels[evaluation.test_pairs.idx_a], labels[evaluation.test_pairs.idx_b]),
        seed=evaluation.seed,
    )
    return thresholds.model_copy(
        update={"calibration_identities": len(evaluation.split.calibration_classes), "out_of_sample": check}
    )
