"""Voxel metrics against scikit-learn and a brute-force threshold loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score

from uadct.metrics import VOXEL_METRIC_FIELDS, dice, voxel_metrics, voxel_metrics_from_groups


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
