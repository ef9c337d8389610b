"""Open-set metrics and threshold calibration checked against numbers computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bundle.manifest import Thresholds
from training.evaluate import (
    EvaluationSettings,
    calibrate_threshold,
    dir_at_far,
    equal_error_rate,
    evaluate_embeddings,
    far_is_resolvable,
    identification_report,
    kfold_accuracy,
    make_pairs,
    measure_at,
    pair_scores,
    threshold_at_far,
    verification_report,
)

# Genuine 0.9 0.8 0.4 / impostor 0.6 0.3 0.1. Sweeping the threshold down the sorted scores:
#   t=0.9: FAR 0, FRR 2/3;  t=0.8: FAR 0, FRR 1/3;  t=0.6: FAR 1/3, FRR 1/3  -> EER = 1/3 exactly at t=0.6.
# Thresholds are placed halfway to the next lower score (same rates, more margin): 0.6 -> 0.5.
OVERLAP_SCORES = np.array([0.9, 0.8, 0.4, 0.6, 0.3, 0.1])
OVERLAP_SAME = np.array([True, True, True, False, False, False])


def test_eer_of_separable_scores_is_zero_with_threshold_in_the_gap():
    scores = np.array([0.9, 0.8, 0.7, 0.2, 0.1, 0.0])
    same = np.array([True, True, True, False, False, False])
    eer, point = equal_error_rate(scores, same)
    assert eer == 0.0
    assert point.threshold == pytest.approx((0.7 + 0.2) / 2)
    assert (point.far, point.tar) == (0.0, 1.0)


def test_eer_of_overlapping_scores_matches_hand_computation():
    eer, point = equal_error_rate(OVERLAP_SCORES, OVERLAP_SAME)
    assert eer == pytest.approx(1 / 3)
    assert point.threshold == pytest.approx(0.5)
    assert point.far == pytest.approx(1 / 3)
    assert point.tar == pytest.approx(2 / 3)


def test_eer_is_interpolated_when_far_and_frr_cross_between_thresholds():
    # Genuine 0.9 0.5 / impostor 0.6 0.1:  t=0.9 FAR 0 FRR 1/2;  t=0.6 FAR 1/2 FRR 1/2 -> crossing at 1/2.
    # Genuine 0.9 0.8 0.5 0.4 / impostor 0.7 0.3: t=0.8 (FAR 0, FRR 1/2) -> t=0.7 (FAR 1/2, FRR 1/2): 1/2.
    # Use a case with a true crossing inside a segment: genuine 0.9 0.4, impostor 0.8 0.7 0.1 0.0.
    #   t=0.9: FAR 0, FRR 1/2 (diff +1/2);  t=0.8: FAR 1/4, FRR 1/2 (diff +1/4);
    #   t=0.7: FAR 1/2, FRR 1/2 (diff 0)    -> EER 1/2 exactly at a point.
    scores = np.array([0.9, 0.4, 0.8, 0.7, 0.1, 0.0])
    same = np.array([True, True, False, False, False, False])
    assert equal_error_rate(scores, same)[0] == pytest.approx(0.5)
    # Genuine 0.9 0.8 0.3, impostor 0.85 0.2: t=0.85 (FAR 1/2, FRR 2/3, diff 1/6) -> t=0.8 (FAR 1/2, FRR 1/3,
    # diff -1/6): the crossing is halfway along the segment, where FAR = 1/2 and FRR = 1/2.
    scores = np.array([0.9, 0.8, 0.3, 0.85, 0.2])
    same = np.array([True, True, True, False, False])
    assert equal_error_rate(scores, same)[0] == pytest.approx(0.5)


def test_calibration_picks_lowest_threshold_meeting_target_far():
    # 10 impostors 0.0..0.9 and genuine 0.95 0.85 0.75 0.55. FAR <= 0.1 allows one impostor (0.9) through;
    # scores can go down to 0.85 before the next impostor (0.8) would be accepted, so the threshold sits
    # halfway between 0.85 and 0.8 and accepts genuine 0.95 and 0.85: TAR 2/4.
    impostor = np.arange(10) / 10
    genuine = np.array([0.95, 0.85, 0.75, 0.55])
    scores = np.concatenate([genuine, impostor])
    same = np.concatenate([np.ones(4, bool), np.zeros(10, bool)])
    point = threshold_at_far(scores, same, 0.1)
    assert point.threshold == pytest.approx(0.825)
    assert point.far == pytest.approx(0.1)
    assert point.tar == pytest.approx(0.5)
    # FAR <= 0.2 lets 0.9 and 0.8 through: down to genuine 0.75, before impostor 0.7 -> 0.725, TAR 3/4.
    point = threshold_at_far(scores, same, 0.2)
    assert point.threshold == pytest.approx(0.725)
    assert point.tar == pytest.approx(0.75)


def test_calibrate_threshold_fills_manifest_thresholds_with_measured_rates():
    impostor = np.arange(10) / 10
    genuine = np.array([0.95, 0.85, 0.75, 0.55])
    scores = np.concatenate([genuine, impostor])
    same = np.concatenate([np.ones(4, bool), np.zeros(10, bool)])
    th = calibrate_threshold(scores, same, target_far=0.2)
    assert isinstance(th, Thresholds)
    assert th.default == pytest.approx(0.725)
    assert th.target_far == pytest.approx(0.2)
    assert th.at_target_far.tar == pytest.approx(0.75)
    assert (th.num_genuine_pairs, th.num_impostor_pairs) == (4, 10)
    # The recorded rates are what the threshold really gives on these pairs.
    again = measure_at(scores, same, th.eer.threshold)
    assert (again.far, again.tar) == (th.eer.far, th.eer.tar)


def test_calibration_falls_back_to_lowest_resolvable_far_when_impostors_are_few():
    impostor = np.arange(10) / 10
    genuine = np.array([0.95, 0.85])
    scores = np.concatenate([genuine, impostor])
    same = np.concatenate([np.ones(2, bool), np.zeros(10, bool)])
    th = calibrate_threshold(scores, same, target_far=1e-3)
    # 10 impostors resolve FAR 0.1 at best.
    assert th.target_far == pytest.approx(0.1)
    assert th.default == pytest.approx(0.825)


def test_calibration_rejects_impossible_target():
    with pytest.raises(ValueError, match="target FAR"):
        calibrate_threshold(OVERLAP_SCORES, OVERLAP_SAME, target_far=0.0)


def test_threshold_above_every_score_when_even_the_top_score_is_an_impostor():
    scores = np.array([0.99, 0.5, 0.4])
    same = np.array([False, True, False])
    point = threshold_at_far(scores, same, 0.1)
    assert point.far == 0.0 and point.tar == 0.0
    assert 0.99 < point.threshold <= 1.0


def test_far_resolvability_needs_enough_impostors():
    assert far_is_resolvable(1000, 1e-3)
    assert not far_is_resolvable(999, 1e-3)
    assert not far_is_resolvable(5000, 1e-3, min_errors=10)


def test_verification_report_marks_unresolvable_fars_instead_of_guessing():
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0.7, 0.1, 200), rng.normal(0.2, 0.1, 500)])
    same = np.concatenate([np.ones(200, bool), np.zeros(500, bool)])
    rep = verification_report(scores, same)
    assert set(rep.tar_at_far) == {"1e-01", "1e-02"}
    assert "500 impostor pairs" in rep.unresolved_fars["1e-03"]
    assert 0.99 < rep.auc <= 1.0
    assert rep.summary()["tar_at_far_1e-03"].startswith("not measured")


def test_kfold_accuracy_is_perfect_on_separable_scores_and_chance_on_identical_ones():
    scores = np.concatenate([np.linspace(0.6, 1.0, 50), np.linspace(-0.5, 0.4, 50)])
    same = np.concatenate([np.ones(50, bool), np.zeros(50, bool)])
    assert kfold_accuracy(scores, same, folds=10) == (1.0, 0.0)
    flat = np.full(100, 0.3)
    mean, _ = kfold_accuracy(flat, same, folds=10)
    assert mean == pytest.approx(0.5)


def test_kfold_accuracy_picks_threshold_on_training_folds_only():
    # Each fold of 2 pairs holds one genuine and one impostor. A threshold placed on the lowest training
    # genuine would reject the held-out genuine 0.6; the max-margin threshold (halfway into the gap) accepts.
    scores = np.array([0.9, 0.8, 0.7, 0.65, 0.6, 0.1, 0.2, 0.3, 0.4, 0.45])
    same = np.array([True] * 5 + [False] * 5)
    mean, std = kfold_accuracy(scores, same, folds=5, balance=False)
    assert mean == 1.0 and std == 0.0


def test_all_pairs_are_counted_exactly():
    labels = np.array([0, 0, 0, 1, 1, 2])
    pairs = make_pairs(labels)
    # Genuine: C(3,2) + C(2,2) = 4; impostor: C(6,2) - 4 = 11.
    assert (pairs.num_genuine, pairs.num_impostor) == (4, 11)
    assert np.all((labels[pairs.idx_a] == labels[pairs.idx_b]) == pairs.same)
    assert np.all(pairs.idx_a != pairs.idx_b)


def test_sampled_pairs_are_distinct_seeded_and_of_the_requested_kind():
    labels = np.repeat(np.arange(5), 40)
    p1 = make_pairs(labels, max_genuine=300, max_impostor=500, seed=3)
    p2 = make_pairs(labels, max_genuine=300, max_impostor=500, seed=3)
    assert (p1.num_genuine, p1.num_impostor) == (300, 500)
    assert np.array_equal(p1.idx_a, p2.idx_a) and np.array_equal(p1.idx_b, p2.idx_b)
    assert np.all((labels[p1.idx_a] == labels[p1.idx_b]) == p1.same)
    keys = set(
        zip(np.minimum(p1.idx_a, p1.idx_b).tolist(), np.maximum(p1.idx_a, p1.idx_b).tolist(), strict=True)
    )
    assert len(keys) == 800
    assert np.all(p1.idx_a != p1.idx_b)


def _lower_side_counts(labels: np.ndarray, idx_a: np.ndarray, idx_b: np.ndarray) -> np.ndarray:
    return np.bincount(labels[np.minimum(idx_a, idx_b)], minlength=labels.max() + 1)


def test_sampled_impostor_pairs_are_uniform_over_all_impostor_pairs():
    # 50 identities x 40 images (1.96M impostor pairs), 20k sampled. Under a uniform sample the identity of a
    # pair's lower index follows the share of impostor pairs whose lower index lies in that identity:
    # for sample i, the later samples of other identities. The earlier sampler kept the lowest keys
    # (np.unique sorts), so almost every lower index was a low one and most identities never appeared there.
    from scipy.stats import chisquare

    labels = np.repeat(np.arange(50), 40)
    pairs = make_pairs(labels, max_genuine=10, max_impostor=20_000, seed=1)
    imp = ~pairs.same
    observed = _lower_side_counts(labels, pairs.idx_a[imp], pairs.idx_b[imp])
    n = len(labels)
    later_other = np.array([np.sum(labels[i + 1 :] != labels[i]) for i in range(n)], dtype=np.float64)
    expected_share = np.bincount(labels, weights=later_other) / later_other.sum()
    # The last identity can never be the lower side (all its impostor partners come before it).
    assert np.all(observed[:-1] > 0), "every other identity appears on the lower-index side"
    assert chisquare(observed[:-1], expected_share[:-1] * observed.sum()).pvalue > 1e-3
    # Both sides together: each identity's share of impostor pairs is equal here (same size), 2 x 1/50.
    both = np.bincount(labels[pairs.idx_a[imp]], minlength=50) + np.bincount(
        labels[pairs.idx_b[imp]], minlength=50
    )
    assert chisquare(both).pvalue > 1e-3


def test_sampled_genuine_pairs_represent_every_identity_in_proportion_to_its_pairs():
    # 3 identities x 700 images (733k genuine pairs), 30k sampled: ~10k each. The earlier sampler gave
    # roughly [20k, 10k, 0] (lowest keys first).
    from scipy.stats import chisquare

    labels = np.repeat(np.arange(3), 700)
    pairs = make_pairs(labels, max_genuine=30_000, max_impostor=10, seed=2)
    per_class = np.bincount(labels[pairs.idx_a[pairs.same]], minlength=3)
    assert per_class.sum() == 30_000
    assert chisquare(per_class).pvalue > 1e-3
    # Unequal identities: pairs in proportion to n_c (n_c - 1) / 2, not to n_c.
    labels = np.repeat(np.arange(3), [100, 200, 400])
    pairs = make_pairs(labels, max_genuine=20_000, max_impostor=10, seed=3)
    per_class = np.bincount(labels[pairs.idx_a[pairs.same]], minlength=3)
    weights = np.array([100 * 99, 200 * 199, 400 * 399]) / 2
    assert chisquare(per_class, weights / weights.sum() * per_class.sum()).pvalue > 1e-3


def test_make_pairs_rejects_a_split_without_impostors():
    with pytest.raises(ValueError, match="no impostor pairs"):
        make_pairs([1, 1, 1])


def test_pair_scores_are_cosine_of_normalised_embeddings():
    e = np.array([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    s = pair_scores(e, np.array([0, 0, 1]), np.array([1, 2, 2]))
    assert s == pytest.approx([0.0, math.sqrt(0.5), math.sqrt(0.5)])


def test_dir_at_far_counts_only_correct_known_probes_above_the_alarm_threshold():
    # Unknown probes' best scores 0.9 0.5 0.4 0.3 ... (10 of them); FAR 0.1 allows one alarm -> threshold
    # just above 0.5. Known probes: (0.95, correct) hit, (0.6, wrong) miss, (0.55, correct) hit,
    # (0.5, correct) miss.
    unknown = np.array([0.9, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -0.1, -0.2, -0.3])
    top = np.concatenate([[0.95, 0.6, 0.55, 0.5], unknown])
    correct = np.concatenate([[True, False, True, True], np.zeros(10, bool)])
    known = np.concatenate([np.ones(4, bool), np.zeros(10, bool)])
    assert dir_at_far(top, correct, known, 0.1) == pytest.approx(0.5)
    # FAR 0 (no alarm) puts the threshold above 0.9: only 0.95 passes.
    assert dir_at_far(top, correct, known, 0.01) == pytest.approx(0.25)


def test_identification_on_perfect_clusters_is_perfect():
    rng = np.random.default_rng(1)
    centers = np.eye(6)
    labels = np.repeat(np.arange(6), 20)
    emb = centers[labels] + rng.normal(0, 0.01, (len(labels), 6))
    rep = identification_report(emb, labels, unknown_fraction=0.34, trials=3)
    assert rep.rank1 == 1.0
    assert rep.dir_at_far["1e-01"] == 1.0
    assert rep.gallery_size == 4 and rep.num_unknown_probes == 40
    assert rep.num_known_probes == 4 * 19


def test_evaluate_embeddings_ranks_clean_clusters_above_noise():
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(4), 30)
    good = np.eye(4)[labels] + rng.normal(0, 0.2, (120, 4))
    noise = rng.normal(0, 1, (120, 4))
    settings = EvaluationSettings(ident_trials=2)
    g = evaluate_embeddings("good", good, labels, settings)
    n = evaluate_embeddings("noise", noise, labels, settings)
    assert g.verification.eer < 0.1 < n.verification.eer
    # Same labels + seed -> the same pairs for both embedders.
    assert np.array_equal(g.pairs.idx_a, n.pairs.idx_a)
    summary = g.summary()
    assert summary["num_genuine_pairs"] == 4 * 435
    assert isinstance(summary["rank1"], float)


@pytest.mark.parametrize(
    ("option", "kwargs"),
    [
        ("--max-genuine", {"max_genuine": 0}),
        ("--folds", {"folds": 1}),
        ("--min-errors", {"min_errors": 0}),
        ("--unknown-fraction", {"unknown_fraction": 1.0}),
        ("--trials", {"ident_trials": 0}),
    ],
)
def test_evaluation_settings_name_the_bad_option(option, kwargs):
    with pytest.raises(ValueError, match=option):
        EvaluationSettings(**kwargs)


# --------------------------------------------------------------------- out-of-sample calibration, episodes


def test_calibration_split_is_identity_disjoint_seeded_and_says_why_when_too_small():
    from training.evaluate import split_calibration

    labels = np.repeat(np.arange(10), 5)
    a, b = split_calibration(labels, 0.5, seed=4), split_calibration(labels, 0.5, seed=4)
    assert np.array_equal(a.calibration, b.calibration)
    assert len(a.calibration_classes) == len(a.test_classes) == 5
    assert not set(labels[a.calibration]) & set(labels[a.test])
    assert sorted(np.concatenate([a.calibration, a.test]).tolist()) == list(range(50))
    assert not np.array_equal(
        a.calibration_classes, split_calibration(labels, 0.5, seed=5).calibration_classes
    )
    small = split_calibration(np.repeat(np.arange(3), 5), 0.5, seed=0)
    assert not small.has_calibration and len(small.test) == 15
    assert "each side needs at least 2" in small.note


def test_checked_point_has_exact_binomial_intervals():
    from training.evaluate import check_point, rate_interval

    # 1 false accept in 10 impostors; Clopper-Pearson 95 %: [0.00253, 0.44502] (textbook values).
    scores = np.array([0.9, 0.8, 0.2] + [0.95] + [0.1] * 9)
    same = np.array([True, True, True] + [False] * 10)
    p = check_point(scores, same, 0.5)
    assert (p.far, p.tar) == (pytest.approx(0.1), pytest.approx(2 / 3))
    assert p.far_interval.low == pytest.approx(0.00253, abs=1e-5)
    assert p.far_interval.high == pytest.approx(0.44502, abs=1e-5)
    assert rate_interval(0, 100).low == 0.0 and rate_interval(100, 100).high == 1.0


def test_thresholds_are_chosen_on_calibration_identities_and_measured_on_test_identities():
    from training.evaluate import calibrate_out_of_sample

    # 12 identities, 6 samples each, in clean clusters with noise: the threshold comes from the calibration
    # identities' pairs only, and `out_of_sample` re-measures it on the others (different pairs, no overlap).
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(12), 6)
    centers = rng.normal(size=(12, 16))
    emb = centers[labels] + 0.6 * rng.normal(size=(len(labels), 16))
    ev = evaluate_embeddings("x", emb, labels, EvaluationSettings(ident_trials=2, episodes=0))
    assert ev.split.has_calibration
    cal_ids = set(ev.split.calibration_classes.tolist())
    assert (
        set(labels[ev.calibration_pairs.idx_a]) <= cal_ids
        and set(labels[ev.calibration_pairs.idx_b]) <= cal_ids
    )
    assert not set(labels[ev.test_pairs.idx_a]) & cal_ids
    th = calibrate_out_of_sample(ev, target_far=0.05)
    cal_point = measure_at(ev.calibration_scores, ev.calibration_pairs.same, th.default)
    assert th.at_target_far.far == pytest.approx(cal_point.far) and cal_point.far <= 0.05
    test_point = measure_at(ev.test_scores, ev.test_pairs.same, th.default)
    assert th.out_of_sample.at_default.far == pytest.approx(test_point.far)
    assert th.out_of_sample.num_identities == 6 and th.calibration_identities == 6
    summary = ev.summary()
    assert summary["calibration_identities"] == 6 and "test_far_at_calibrated_1e-01" in summary


def test_out_of_sample_calibration_refuses_too_few_identities_naming_the_option():
    from training.evaluate import CalibrationError, calibrate_out_of_sample

    labels = np.repeat(np.arange(3), 10)
    emb = np.random.default_rng(0).normal(size=(30, 4))
    ev = evaluate_embeddings("x", emb, labels, EvaluationSettings(ident_trials=1, episodes=0))
    assert "not calibrated out of sample" in ev.summary()["calibration"]
    with pytest.raises(CalibrationError, match="--calibration-fraction"):
        calibrate_out_of_sample(ev)


def _episode_data(noise: float):
    # 6 identities in 2 groups ("a": 0-2, "b": 3-5), 4 samples each, around orthogonal directions.
    labels = np.repeat(np.arange(6), 4)
    emb = np.eye(6)[labels] + noise * np.random.default_rng(1).normal(size=(24, 6))
    return emb, labels, ["a", "a", "a", "b", "b", "b"]


def test_episodes_are_perfect_on_separable_embeddings_and_seeded():
    from training.evaluate import episode_report

    emb, labels, groups = _episode_data(0.01)
    r = episode_report(emb, labels, ways=3, shots=1, episodes=50, groups=groups, within_group=True, seed=0)
    assert r.accuracy == 1.0 and r.key == "3way_1shot_within_group"
    noisy, labels, _ = _episode_data(2.0)
    r1 = episode_report(noisy, labels, ways=5, shots=2, episodes=30, seed=3)
    r2 = episode_report(noisy, labels, ways=5, shots=2, episodes=30, seed=3)
    assert r1.accuracy == r2.accuracy and 0.0 < r1.accuracy < 1.0


def test_episodes_match_a_hand_computed_one_shot_case():
    from training.evaluate import episode_report

    # 2 identities, 2 samples each: identity 0 = A [1, 0], B [0.6, 0.8]; identity 1 = C [0, 1], D [0.8, 0.6].
    # The 4 support choices (one sample per identity, the other is the query), each equally likely:
    #   A,C: B->1 (0.8 > 0.6) wrong, D->0 (0.8 > 0.6) wrong: 0/2.   A,D: B->1 (0.96) wrong, C->1 right: 1/2.
    #   B,C: A->0 right, D->0 (0.96) wrong: 1/2.   B,D: A->1 (0.8) wrong, C->0 (0.8) wrong: 0/2.
    # Expected accuracy 0.25; every episode scores 0 or 1/2.
    emb = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6]])
    labels = np.array([0, 0, 1, 1])
    r = episode_report(emb, labels, ways=2, shots=1, episodes=4000, seed=0)
    assert r.accuracy == pytest.approx(0.25, abs=0.02)
    assert r.interval == pytest.approx(1.96 * 0.25 / math.sqrt(4000), rel=0.05)  # std of {0, 1/2} is 1/4


def test_within_group_episodes_draw_every_identity_from_one_group():
    from training.evaluate import episode_report

    emb, labels, groups = _episode_data(0.01)
    with pytest.raises(ValueError, match="no group has 4 identities"):
        episode_report(emb, labels, ways=4, groups=groups, within_group=True)
    with pytest.raises(ValueError, match="need the group"):
        episode_report(emb, labels, ways=3, within_group=True)


def test_identity_bootstrap_is_wide_when_one_identity_pair_makes_every_false_accept():
    from training.evaluate import check_point

    # 10 identities x 5 samples; every false accept is a pair between identities 0 and 1 (25 of the 1 125
    # impostor pairs): whether a user meets FAR 0.022 or 0 depends on having such a look-alike pair, which
    # the identity bootstrap shows (its interval reaches 0) and a binomial interval on pairs hides.
    labels = np.repeat(np.arange(10), 5)
    pairs = make_pairs(labels)
    la, lb = labels[pairs.idx_a], labels[pairs.idx_b]
    lookalike = (np.minimum(la, lb) == 0) & (np.maximum(la, lb) == 1)
    scores = np.where(pairs.same, 0.9, np.where(lookalike, 0.8, 0.1))
    binomial = check_point(scores, pairs.same, 0.5)
    boot = check_point(scores, pairs.same, 0.5, ids=(la, lb), seed=0)
    assert boot.far == binomial.far == pytest.approx(25 / 1125)
    assert binomial.far_interval.low > 0.01
    assert boot.far_interval.low == 0.0 and boot.far_interval.high > binomial.far_interval.high
    assert boot.tar_interval.low == boot.tar_interval.high == 1.0
    assert check_point(scores, pairs.same, 0.5, ids=(la, lb), seed=0) == boot
