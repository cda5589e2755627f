"""Voxel metrics against scikit-learn and a brute-force threshold loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, precision_score, recall_score, roc_auc_score

from uadct.metrics import (
    VOXEL_METRIC_FIELDS,
    auroc,
    bootstrap_auroc,
    bootstrap_mean,
    bootstrap_ratio,
    bootstrap_weights,
    classification_metrics,
    counts_at_threshold,
    curve_points,
    dice,
    dice_from_counts,
    f1_optimal_threshold,
    lesion_detection,
    percentile_interval,
    remove_small_components,
    threshold_at_fpr,
    voxel_metrics,
    voxel_metrics_from_groups,
)


def brute_force_best_dice(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Best Dice of ``scores >= t`` over every distinct score t; the highest t reaching it."""
    best, best_threshold = -1.0, math.nan
    for threshold in np.unique(scores):  # ascending, so '>=' keeps the highest among equal maxima
        value = dice(scores >= threshold, labels)
        if value >= best:
            best, best_threshold = value, float(threshold)
    return best, best_threshold


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rounding", [None, 1])
def test_auroc_and_auprc_equal_scikit_learn(seed: int, rounding: int | None) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(20_000) < 0.05
    scores = (rng.normal(size=labels.size) + 1.2 * labels).astype(np.float32)
    if rounding is not None:  # many ties
        scores = np.round(scores, rounding)
    metrics = voxel_metrics(scores, labels)
    assert metrics["auroc"] == pytest.approx(roc_auc_score(labels, scores), rel=1e-12, abs=1e-12)
    assert metrics["auprc"] == pytest.approx(average_precision_score(labels, scores), rel=1e-12, abs=1e-12)
    assert metrics["n_voxels"] == labels.size
    assert metrics["n_positive"] == int(labels.sum())
    assert set(metrics) == set(VOXEL_METRIC_FIELDS)


def test_integer_labels_and_float64_scores_are_accepted() -> None:
    rng = np.random.default_rng(5)
    labels = (rng.random(5000) < 0.3).astype(np.uint8)
    scores = rng.random(5000) + 0.2 * labels
    metrics = voxel_metrics(scores, labels)
    assert metrics["auroc"] == pytest.approx(roc_auc_score(labels, scores), rel=1e-12)
    assert metrics["auprc"] == pytest.approx(average_precision_score(labels, scores), rel=1e-12)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=6), st.booleans()),
        min_size=1,
        max_size=40,
    )
)
def test_best_dice_equals_brute_force_over_all_thresholds(pairs: list[tuple[int, bool]]) -> None:
    scores = np.array([score for score, _ in pairs], dtype=np.float32) / 2  # few values: many ties
    labels = np.array([label for _, label in pairs], dtype=bool)
    metrics = voxel_metrics(scores, labels)
    if not labels.any():
        assert math.isnan(metrics["best_dice"]) and math.isnan(metrics["best_dice_threshold"])
        return
    expected, expected_threshold = brute_force_best_dice(scores, labels)
    assert metrics["best_dice"] == pytest.approx(expected, rel=1e-12)
    assert metrics["best_dice_threshold"] == expected_threshold
    if labels.all():
        assert math.isnan(metrics["auroc"]) and math.isnan(metrics["auprc"])
    else:
        assert metrics["auroc"] == pytest.approx(roc_auc_score(labels, scores), rel=1e-12)
        assert metrics["auprc"] == pytest.approx(average_precision_score(labels, scores), rel=1e-12)


def test_ties_stay_on_the_same_side_of_a_threshold() -> None:
    # a lesion and a normal voxel with the same score cannot be separated: 2*1 / (1 + 1 + 1)
    metrics = voxel_metrics(np.array([0.7, 0.7, 0.1]), np.array([True, False, False]))
    assert metrics["best_dice"] == pytest.approx(2 / 3)
    assert metrics["best_dice_threshold"] == pytest.approx(0.7)
    assert metrics["auroc"] == pytest.approx(0.75)  # beats one normal voxel, ties the other


def test_perfect_separation() -> None:
    rng = np.random.default_rng(3)
    labels = rng.random(10_000) < 0.1
    scores = np.where(labels, rng.uniform(2, 3, labels.size), rng.uniform(0, 1, labels.size))
    metrics = voxel_metrics(scores, labels)
    assert metrics["auroc"] == 1.0
    assert metrics["auprc"] == 1.0
    assert metrics["best_dice"] == 1.0
    assert metrics["best_dice_threshold"] == scores[labels].min()


def test_inverted_scores_give_auroc_zero() -> None:
    labels = np.array([1, 1, 0, 0, 0], dtype=bool)
    metrics = voxel_metrics(np.array([0.0, 0.1, 0.5, 0.6, 0.7]), labels)
    assert metrics["auroc"] == 0.0
    # best is to call everything anomalous: 2*2 / (5 + 2)
    assert metrics["best_dice"] == pytest.approx(4 / 7)
    assert metrics["best_dice_threshold"] == 0.0


def test_one_class_gives_nan_not_an_exception() -> None:
    scores = np.array([0.1, 0.5, 0.9], dtype=np.float32)
    no_lesion = voxel_metrics(scores, np.zeros(3, dtype=bool))
    assert math.isnan(no_lesion["auroc"]) and math.isnan(no_lesion["auprc"])
    assert math.isnan(no_lesion["best_dice"]) and math.isnan(no_lesion["best_dice_threshold"])
    assert no_lesion["n_voxels"] == 3 and no_lesion["n_positive"] == 0

    all_lesion = voxel_metrics(scores, np.ones(3, dtype=bool))
    assert math.isnan(all_lesion["auroc"]) and math.isnan(all_lesion["auprc"])
    assert all_lesion["best_dice"] == 1.0
    assert all_lesion["best_dice_threshold"] == pytest.approx(0.1)

    empty = voxel_metrics(np.array([], dtype=np.float32), np.array([], dtype=bool))
    assert empty["n_voxels"] == 0 and math.isnan(empty["auroc"])


def test_bad_inputs_raise_value_error() -> None:
    with pytest.raises(ValueError, match="same length"):
        voxel_metrics(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="1D"):
        voxel_metrics(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        voxel_metrics(np.array([0.1, np.nan]), np.array([True, False]))


def test_groups_give_the_same_numbers_and_leave_inputs_alone() -> None:
    rng = np.random.default_rng(11)
    labels = rng.random(3000) < 0.2
    scores = rng.normal(size=3000).astype(np.float32) + labels
    lesion, normal = scores[labels], scores[~labels]
    lesion_before, normal_before = lesion.copy(), normal.copy()
    assert voxel_metrics_from_groups(lesion, normal) == voxel_metrics(scores, labels)
    np.testing.assert_array_equal(lesion, lesion_before)
    np.testing.assert_array_equal(normal, normal_before)


def test_dice() -> None:
    a = np.array([[1, 1, 0], [0, 0, 0]])
    b = np.array([[1, 0, 0], [0, 0, 1]], dtype=bool)
    assert dice(a, b) == pytest.approx(2 * 1 / (2 + 2))
    assert dice(a, a) == 1.0
    assert dice(np.zeros(5), np.zeros(5)) == 1.0
    assert dice(np.zeros(5), np.ones(5)) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        dice(np.zeros(3), np.zeros(4))


# ----------------------------------------------------------------------------- fixed FPR
def test_threshold_at_fpr_on_a_constructed_case() -> None:
    negatives = np.arange(100, dtype=np.float64)  # 0 .. 99
    positives = np.array([50.0, 97.5, 200.0])
    # 5 % of 100 normal voxels may be flagged: 95 .. 99; the lowest such threshold is 95
    threshold = threshold_at_fpr(positives, negatives, 0.05)
    assert threshold == 95.0
    tp, fp = counts_at_threshold(positives, negatives, threshold)
    assert (tp, fp) == (2, 5)
    assert dice_from_counts(tp, fp, positives.size) == pytest.approx(2 * 2 / (2 + 5 + 3))
    # 4.5 %: only 4 may be flagged -> the next distinct score above 95 is 96
    assert threshold_at_fpr(positives, negatives, 0.045) == 96.0
    # a positive between two negatives is the lowest qualifying threshold
    assert threshold_at_fpr(np.array([94.5]), negatives, 0.05) == 94.5
    assert threshold_at_fpr(np.array([95.5]), negatives, 0.05) == 95.0
    # no normal voxel may be flagged: the lesion voxel above them all still is
    assert threshold_at_fpr(positives, negatives, 0.0) == 200.0
    # ... and without one, the threshold lies just above the highest score, flagging nothing
    top = threshold_at_fpr(np.array([50.0]), negatives, 0.0)
    assert top > 99.0 and counts_at_threshold(np.array([50.0]), negatives, top) == (0, 0)
    assert threshold_at_fpr(positives, negatives, 1.0) == 0.0
    assert math.isnan(threshold_at_fpr(positives, np.zeros(0), 0.05))
    with pytest.raises(ValueError, match="fpr"):
        threshold_at_fpr(positives, negatives, 1.5)


@given(
    st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=2, max_size=60),
    st.sampled_from([0.0, 0.01, 0.1, 0.25, 0.5, 0.9]),
)
@settings(max_examples=200, deadline=None)
def test_threshold_at_fpr_equals_brute_force(pairs: list[tuple[int, bool]], fpr: float) -> None:
    scores = np.array([p[0] for p in pairs], dtype=np.float64)
    labels = np.array([p[1] for p in pairs])
    negatives, positives = np.sort(scores[~labels]), np.sort(scores[labels])
    if negatives.size == 0:
        return
    threshold = threshold_at_fpr(positives, negatives, fpr)
    # brute force: the lowest observed score meeting the budget, else "above everything"
    meeting = [t for t in np.unique(scores) if np.mean(negatives >= t) <= fpr + 1e-12]
    if meeting:
        assert threshold == min(meeting)
    else:
        assert threshold > scores.max()


def test_curve_points_run_from_nothing_flagged_to_everything() -> None:
    rng = np.random.default_rng(3)
    positives = np.sort(rng.normal(2.0, 1.0, 500))
    negatives = np.sort(rng.normal(0.0, 1.0, 5000))
    points = curve_points(positives, negatives)
    assert points["fpr"][0] == 0.0 and points["tpr"][0] == 0.0
    assert points["fpr"][-1] == 1.0 and points["tpr"][-1] == 1.0
    assert np.all(np.diff(points["fpr"]) >= 0) and np.all(np.diff(points["tpr"]) >= 0)
    assert points["precision"][-1] == pytest.approx(500 / 5500)
    # the trapezoid under the sampled curve is close to the exact AUROC
    area = np.trapezoid(points["tpr"], points["fpr"])
    assert area == pytest.approx(roc_auc_score(np.r_[np.ones(500), np.zeros(5000)], np.r_[positives, negatives]), abs=0.005)
    assert curve_points(positives, np.zeros(0))["fpr"].size == 0


# ----------------------------------------------------------------------------- components
def test_small_components_are_removed_with_26_connectivity() -> None:
    binary = np.zeros((10, 10, 10), dtype=bool)
    binary[1, 1, 1] = binary[2, 2, 2] = True  # diagonal neighbours: one component of 2
    binary[5, 5, 2:7] = True  # a line of 5
    binary[8, 8, 8] = True  # a single voxel
    kept = remove_small_components(binary, 2)
    assert kept.sum() == 7 and not kept[8, 8, 8]
    kept = remove_small_components(binary, 3)
    assert kept.sum() == 5 and kept[5, 5, 2:7].all()
    assert remove_small_components(binary, 0).sum() == 8
    assert remove_small_components(binary, 6).sum() == 0


def test_lesion_detection_counts_on_constructed_components() -> None:
    lesions = np.zeros((20, 20, 20), dtype=bool)
    lesions[2:5, 2:5, 2:5] = True  # lesion A, 27 voxels
    lesions[10:12, 10:12, 10:12] = True  # lesion B, 8 voxels
    lesions[16:18, 2:4, 2:4] = True  # lesion C, 8 voxels: missed
    predicted = np.zeros_like(lesions)
    predicted[2:5, 2:5, 4:7] = True  # covers 9 voxels of A (one third) and spills outside it
    predicted[11, 11, 11] = True  # one voxel of B
    predicted[15, 15, 15] = True  # false-positive cluster 1
    predicted[7:9, 15:17, 2] = True  # false-positive cluster 2
    counts = lesion_detection(predicted, lesions)
    assert counts == {"n_lesions": 3, "n_detected": 2, "n_predicted_clusters": 4, "n_fp_clusters": 2}
    # a third of A is covered, 1/8 of B
    assert lesion_detection(predicted, lesions, min_overlap=0.3)["n_detected"] == 1
    assert lesion_detection(predicted, lesions, min_overlap=0.34)["n_detected"] == 0
    # diagonal contact is contact (26-connectivity): a cluster touching A's corner is not a false positive
    predicted[5, 5, 0] = True
    assert lesion_detection(predicted, lesions)["n_fp_clusters"] == 3
    assert lesion_detection(np.zeros_like(lesions), lesions)["n_detected"] == 0
    with pytest.raises(ValueError, match="shapes"):
        lesion_detection(predicted[:5], lesions)


# ----------------------------------------------------------------------------- image level
@pytest.mark.parametrize("seed", [0, 1])
def test_classification_metrics_equal_scikit_learn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    abnormal = rng.random(60) < 0.4
    scores = np.round(rng.normal(abnormal * 1.0, 1.0), 1)
    metrics = classification_metrics(scores, abnormal, 0.5)
    called = scores >= 0.5
    assert metrics["accuracy"] == pytest.approx(accuracy_score(abnormal, called))
    assert metrics["sensitivity"] == pytest.approx(recall_score(abnormal, called))
    assert metrics["specificity"] == pytest.approx(recall_score(~abnormal, ~called))
    assert metrics["precision"] == pytest.approx(precision_score(abnormal, called))
    assert metrics["f1"] == pytest.approx(f1_score(abnormal, called))
    assert auroc(scores, abnormal) == pytest.approx(roc_auc_score(abnormal, scores))


def test_classification_metrics_undefined_ratios_are_nan() -> None:
    metrics = classification_metrics(np.array([1.0, 2.0]), np.array([True, True]), 1.5)
    assert math.isnan(metrics["specificity"]) and metrics["sensitivity"] == 0.5 and metrics["precision"] == 1.0
    assert math.isnan(auroc(np.array([1.0, 2.0]), np.array([True, True])))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_f1_optimal_threshold_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    abnormal = rng.random(40) < 0.5
    scores = np.round(rng.normal(abnormal * 1.0, 1.0), 1)
    threshold = f1_optimal_threshold(scores, abnormal)
    candidates = np.unique(scores)
    f1 = np.array([f1_score(abnormal, scores >= t) for t in candidates])
    assert f1_score(abnormal, scores >= threshold) == pytest.approx(f1.max())
    assert threshold == candidates[np.flatnonzero(f1 == f1.max())[-1]]  # the highest among ties
    assert math.isnan(f1_optimal_threshold(scores, np.zeros(40, dtype=bool)))


# ----------------------------------------------------------------------------- bootstrap
def test_bootstrap_weights_are_resamples_with_replacement() -> None:
    weights = bootstrap_weights(7, 500, seed=1)
    assert weights.shape == (500, 7) and np.all(weights.sum(axis=1) == 7)
    assert np.array_equal(weights, bootstrap_weights(7, 500, seed=1))
    assert not np.array_equal(weights, bootstrap_weights(7, 500, seed=2))
    # each subject is drawn on average once per resample
    assert weights.mean() == pytest.approx(1.0, abs=0.05)


def test_bootstrap_statistics_equal_explicit_resamples() -> None:
    rng = np.random.default_rng(0)
    n = 12
    values = rng.normal(size=n)
    values[3] = np.nan  # undefined for one subject: left out of each mean
    scores = rng.normal(size=n)
    labels = np.arange(n) % 3 == 0
    numerators, denominators = rng.integers(0, 5, n), rng.integers(5, 10, n)
    weights = bootstrap_weights(n, 20, seed=4)
    means, ratios, aurocs = bootstrap_mean(values, weights), bootstrap_ratio(numerators, denominators, weights), bootstrap_auroc(scores, labels, weights)
    for b in range(20):
        drawn = np.repeat(np.arange(n), weights[b].astype(int))
        assert means[b] == pytest.approx(np.nanmean(values[drawn]))
        assert ratios[b] == pytest.approx(numerators[drawn].sum() / denominators[drawn].sum())
        if labels[drawn].any() and (~labels[drawn]).any():
            assert aurocs[b] == pytest.approx(roc_auc_score(labels[drawn], scores[drawn]))
        else:
            assert math.isnan(aurocs[b])


def test_bootstrap_interval_holds_the_estimate_and_shrinks_with_more_subjects() -> None:
    rng = np.random.default_rng(5)
    widths = []
    for n in (10, 40, 160):
        values = rng.beta(8, 2, size=n)  # e.g. per-subject AUROCs
        low, high = percentile_interval(bootstrap_mean(values, bootstrap_weights(n, 1000, seed=0)))
        assert low < values.mean() < high
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    assert widths[2] < 0.6 * widths[0]
    assert all(math.isnan(v) for v in percentile_interval(np.array([np.nan, np.nan])))
