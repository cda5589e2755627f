"""Detection metrics for anomaly maps (numpy only, no file IO).

Voxel level (this module, now): AUROC, AUPRC (average precision) and the best Dice over
all thresholds, computed from the brain voxels of one subject or of a pooled cohort.

Also here: the threshold giving a fixed voxel false-positive rate
(:func:`threshold_at_fpr`), curve points for ROC/PR plots (:func:`curve_points`),
lesion-level detection on connected components (:func:`lesion_detection`,
:func:`remove_small_components`), image-level metrics over subjects
(:func:`image_level_metrics`, :func:`f1_optimal_threshold`) and bootstrap confidence
intervals over subjects (:func:`bootstrap_weights` and the ``bootstrap_*`` helpers).

Convention for every threshold ``t``: a voxel is called anomalous when ``score >= t``, so
voxels with equal scores always fall on the same side of a threshold.

How it works: the scores of lesion voxels (positives) and of normal voxels (negatives) are
sorted separately, once. Every quantity that matters changes only at the distinct
positive scores, so the curves are evaluated there, counting negatives at or above each
one by binary search. This gives exactly the numbers of scikit-learn's
``roc_auc_score`` and ``average_precision_score`` (tested) with one sort instead of two
argsorts, and the best Dice over all thresholds in the same pass: lowering the threshold
between two distinct positive scores only adds false positives, so the maximum of
``2 TP / (TP + FP + P)`` is reached at a positive score.
"""

from __future__ import annotations

import math

import numpy as np

VOXEL_METRIC_FIELDS = ("auroc", "auprc", "best_dice", "best_dice_threshold", "n_voxels", "n_positive")


def voxel_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float | int]:
    """AUROC, AUPRC and best Dice of voxel scores against voxel labels.

    ``scores``: ``(N,)`` anomaly scores (higher = more anomalous), float; ``labels``: ``(N,)``
    lesion labels (nonzero = lesion). Both already restricted to the brain voxels.

    Returns a dict with ``auroc``, ``auprc`` (average precision, the step-wise sum
    ``sum_n (R_n - R_{n-1}) P_n`` as scikit-learn computes it, not a trapezoid),
    ``best_dice`` and ``best_dice_threshold`` (the highest threshold ``t`` reaching the best
    Dice, voxels with ``score >= t`` predicted anomalous), ``n_voxels`` and ``n_positive``.

    AUROC and AUPRC are NaN when the labels hold only one class. The best Dice and its
    threshold are NaN when there is no lesion voxel (an infinite threshold would trivially
    reach 1); with lesion voxels only, the best Dice is 1. Runs in about a second for
    10 million voxels. Raises ``ValueError`` for mismatched shapes or NaN scores.
    """
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(
            f"scores and labels must be 1D arrays of the same length, found shapes {scores.shape} and {labels.shape}"
        )
    is_lesion = labels if labels.dtype == np.bool_ else labels != 0
    # boolean indexing copies, so the copies can be sorted in place
    return voxel_metrics_from_groups(scores[is_lesion], scores[~is_lesion], overwrite_input=True)


def voxel_metrics_from_groups(
    lesion_scores: np.ndarray, normal_scores: np.ndarray, *, overwrite_input: bool = False
) -> dict[str, float | int]:
    """:func:`voxel_metrics` from the scores of lesion voxels and of normal voxels, apart.

    This is what :func:`voxel_metrics` computes; it lets a caller pooling many subjects
    keep two float arrays instead of scores plus labels. With ``overwrite_input=True``
    both arrays are sorted in place (saving a copy of each), as in ``np.percentile``.
    """
    positives = np.ravel(lesion_scores)
    negatives = np.ravel(normal_scores)
    for name, values in (("lesion_scores", positives), ("normal_scores", negatives)):
        if values.dtype.kind not in "biuf":
            raise ValueError(f"{name} must be numeric, found dtype {values.dtype}")
        if values.dtype.kind == "f" and np.isnan(values).any():
            raise ValueError(f"{name} contains {int(np.isnan(values).sum())} NaN scores")
    if overwrite_input:
        positives.sort()
        negatives.sort()
    else:
        positives = np.sort(positives)
        negatives = np.sort(negatives)
    return _metrics_of_sorted(positives, negatives)


def _metrics_of_sorted(positives: np.ndarray, negatives: np.ndarray) -> dict[str, float | int]:
    """The voxel metrics from ascending-sorted positive and negative scores."""
    n_positive = int(positives.size)
    n_negative = int(negatives.size)
    result: dict[str, float | int] = {
        "auroc": math.nan,
        "auprc": math.nan,
        "best_dice": math.nan,
        "best_dice_threshold": math.nan,
        "n_voxels": n_positive + n_negative,
        "n_positive": n_positive,
    }
    if n_positive == 0:
        return result

    # distinct positive scores (ascending), where each starts in `positives`, how many share it
    starts = np.flatnonzero(np.concatenate(([True], positives[1:] != positives[:-1])))
    thresholds = positives[starts]
    counts = np.diff(np.append(starts, n_positive))
    # with threshold t: TP = positives >= t, FP = negatives >= t
    true_positives = n_positive - starts
    negatives_below = np.searchsorted(negatives, thresholds, side="left")
    false_positives = n_negative - negatives_below

    dice = 2.0 * true_positives / (true_positives + false_positives + n_positive)
    best = int(dice.size - 1 - np.argmax(dice[::-1]))  # the highest threshold among equal maxima
    result["best_dice"] = float(dice[best])
    result["best_dice_threshold"] = float(thresholds[best])

    if n_negative == 0:
        return result
    # AUROC = P(score of a lesion voxel > score of a normal voxel) + 0.5 P(equal) (Mann-Whitney)
    negatives_at_or_below = np.searchsorted(negatives, thresholds, side="right")
    twice_wins = int(np.dot(counts, negatives_below + negatives_at_or_below))
    result["auroc"] = twice_wins / (2.0 * n_positive * n_negative)
    # AP = sum over thresholds of (recall increase) * precision; recall moves only at positives
    precision = true_positives / (true_positives + false_positives)
    result["auprc"] = float(np.dot(counts, precision) / n_positive)
    return result


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap ``2 |A & B| / (|A| + |B|)`` of two binary arrays (nonzero = foreground).

    1.0 when both are empty. Raises ``ValueError`` when the shapes differ.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"dice needs arrays of the same shape, found {a.shape} and {b.shape}")
    a = a if a.dtype == np.bool_ else a != 0
    b = b if b.dtype == np.bool_ else b != 0
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(a & b)) / total


# ----------------------------------------------------------------------------- fixed false-positive rate
def threshold_at_fpr(sorted_positives: np.ndarray, sorted_negatives: np.ndarray, fpr: float) -> float:
    """The lowest threshold ``t`` whose false-positive rate ``#(negatives >= t) / #negatives`` is <= ``fpr``.

    Inputs are ascending-sorted ``(N,)`` score arrays. Among thresholds meeting the
    false-positive budget the lowest one has the highest sensitivity, so this is the
    operating point "at most ``fpr`` of the normal voxels flagged". Ties can make the
    achieved rate lower than ``fpr`` (equal scores stay on one side). The threshold is an
    observed score when one qualifies, else just above the highest score (nothing flagged).
    NaN without negatives. Raises ``ValueError`` unless ``0 <= fpr <= 1``.
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must lie in [0, 1], got {fpr!r}")
    n_negative = int(sorted_negatives.size)
    if n_negative == 0:
        return math.nan
    # at least `needed` negatives must lie strictly below t
    needed = int(math.ceil(n_negative * (1.0 - fpr) - 1e-9))
    if needed <= 0:
        lowest = [float(a[0]) for a in (sorted_positives, sorted_negatives) if a.size]
        return min(lowest)
    below = sorted_negatives[needed - 1]
    candidates = []
    for values in (sorted_negatives, sorted_positives):
        index = int(np.searchsorted(values, below, side="right"))
        if index < values.size:
            candidates.append(float(values[index]))
    if candidates:
        return min(candidates)
    # one step up in the scores' own precision, so the threshold compares the same in float32 and float64
    dtype = below.dtype if below.dtype.kind == "f" else np.dtype(np.float64)
    return float(np.nextafter(below.astype(dtype), dtype.type(np.inf)))


def counts_at_threshold(sorted_positives: np.ndarray, sorted_negatives: np.ndarray, threshold: float) -> tuple[int, int]:
    """(true positives, false positives) with ``score >= threshold``, from ascending-sorted scores.

    The threshold is compared in the scores' precision (as ``scores >= threshold`` does for a
    float32 array and a Python float).
    """

    def at_or_above(values: np.ndarray) -> int:
        value = values.dtype.type(threshold) if values.dtype.kind == "f" else threshold
        return int(values.size - np.searchsorted(values, value, side="left"))

    true_positives = at_or_above(sorted_positives)
    false_positives = at_or_above(sorted_negatives)
    return true_positives, false_positives


def dice_from_counts(true_positives: int, false_positives: int, n_positive: int) -> float:
    """``2 TP / (TP + FP + P)``; NaN when there is no lesion voxel."""
    if n_positive == 0:
        return math.nan
    return 2.0 * true_positives / (true_positives + false_positives + n_positive)


def curve_points(
    sorted_positives: np.ndarray, sorted_negatives: np.ndarray, n_points: int = 256
) -> dict[str, np.ndarray]:
    """ROC and precision-recall points at up to ``n_points`` thresholds, for plotting.

    Thresholds are quantiles of all scores (so the points follow the data, not the score
    range), plus both ends. Returns ``fpr``, ``tpr`` (= recall) and ``precision``, each
    ``(M,) float64`` with ``fpr`` ascending; empty arrays when a class is missing.
    """
    if sorted_positives.size == 0 or sorted_negatives.size == 0:
        empty = np.zeros(0)
        return {"fpr": empty, "tpr": empty, "precision": empty}
    quantiles = np.linspace(0.0, 1.0, n_points)
    thresholds = np.unique(
        np.concatenate(
            (np.quantile(sorted_positives, quantiles), np.quantile(sorted_negatives, quantiles), [np.inf])
        )
    )[::-1]
    tp = sorted_positives.size - np.searchsorted(sorted_positives, thresholds, side="left")
    fp = sorted_negatives.size - np.searchsorted(sorted_negatives, thresholds, side="left")
    flagged = tp + fp
    precision = np.where(flagged > 0, tp / np.maximum(flagged, 1), 1.0)
    return {"fpr": fp / sorted_negatives.size, "tpr": tp / sorted_positives.size, "precision": precision}


# ----------------------------------------------------------------------------- connected components
def remove_small_components(binary: np.ndarray, min_size: int) -> np.ndarray:
    """``binary`` without its 26-connected components smaller than ``min_size`` voxels (a new array)."""
    binary = np.asarray(binary, dtype=bool)
    if min_size <= 1 or not binary.any():
        return binary.copy()
    from scipy import ndimage

    components, _ = ndimage.label(binary, structure=np.ones((3,) * binary.ndim, dtype=bool))
    sizes = np.bincount(components.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[components]


def lesion_detection(predicted: np.ndarray, lesions: np.ndarray, min_overlap: float = 0.0) -> dict[str, int]:
    """Lesion-level counts from a binary prediction and a binary lesion label (same shape).

    Lesions and predicted clusters are 26-connected components. A lesion is *detected*
    when at least ``max(1, min_overlap * lesion size)`` of its voxels are predicted; a
    predicted cluster is a *false-positive cluster* when it touches no lesion voxel.
    Returns ``n_lesions``, ``n_detected``, ``n_predicted_clusters``, ``n_fp_clusters``.
    """
    from scipy import ndimage

    predicted = np.asarray(predicted, dtype=bool)
    lesions = np.asarray(lesions, dtype=bool)
    if predicted.shape != lesions.shape:
        raise ValueError(f"prediction and label shapes differ: {predicted.shape} and {lesions.shape}")
    structure = np.ones((3,) * predicted.ndim, dtype=bool)
    lesion_ids, n_lesions = ndimage.label(lesions, structure=structure)
    cluster_ids, n_clusters = ndimage.label(predicted, structure=structure)
    sizes = np.bincount(lesion_ids.ravel(), minlength=n_lesions + 1)
    hits = np.bincount(lesion_ids[predicted], minlength=n_lesions + 1)
    needed = np.maximum(1, np.ceil(min_overlap * sizes - 1e-9))
    n_detected = int(np.count_nonzero(hits[1:] >= needed[1:]))
    touching = np.unique(cluster_ids[lesions & predicted])
    n_true_clusters = int(np.count_nonzero(touching))
    return {
        "n_lesions": int(n_lesions),
        "n_detected": n_detected,
        "n_predicted_clusters": int(n_clusters),
        "n_fp_clusters": int(n_clusters) - n_true_clusters,
    }


# ----------------------------------------------------------------------------- image level
IMAGE_METRIC_FIELDS = ("accuracy", "sensitivity", "specificity", "precision", "f1")


def classification_metrics(scores: np.ndarray, abnormal: np.ndarray, threshold: float) -> dict[str, float | int]:
    """Accuracy, sensitivity, specificity, precision and F1 with ``score >= threshold`` called abnormal.

    ``scores``: ``(N,)`` image scores; ``abnormal``: ``(N,)`` bool truth. A ratio with a zero
    denominator is NaN (e.g. specificity without normal images); F1 is 0 when nothing is
    right. Also returns the confusion counts ``tp``, ``fp``, ``tn``, ``fn``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    abnormal = np.asarray(abnormal, dtype=bool)
    called = scores >= threshold
    tp = int(np.count_nonzero(called & abnormal))
    fp = int(np.count_nonzero(called & ~abnormal))
    fn = int(np.count_nonzero(~called & abnormal))
    tn = int(np.count_nonzero(~called & ~abnormal))

    def ratio(a: int, b: int) -> float:
        return a / b if b else math.nan

    f1 = ratio(2 * tp, 2 * tp + fp + fn)
    return {
        "accuracy": ratio(tp + tn, tp + tn + fp + fn),
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "precision": ratio(tp, tp + fp),
        "f1": 0.0 if math.isnan(f1) and tp + fp + fn > 0 else f1,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def f1_optimal_threshold(scores: np.ndarray, abnormal: np.ndarray) -> float:
    """The image-score threshold (``score >= t`` abnormal) with the highest F1; the highest such ``t`` on ties.

    Candidates are the distinct scores of the abnormal images (F1 only changes there for
    the better). NaN without abnormal images.
    """
    scores = np.asarray(scores, dtype=np.float64)
    abnormal = np.asarray(abnormal, dtype=bool)
    if not abnormal.any():
        return math.nan
    candidates = np.unique(scores[abnormal])
    positives = np.sort(scores[abnormal])
    negatives = np.sort(scores[~abnormal])
    tp = positives.size - np.searchsorted(positives, candidates, side="left")
    fp = negatives.size - np.searchsorted(negatives, candidates, side="left")
    f1 = 2 * tp / (2 * tp + fp + (positives.size - tp))
    best = int(candidates.size - 1 - np.argmax(f1[::-1]))
    return float(candidates[best])


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUROC of ``(N,)`` scores against ``(N,)`` binary labels; NaN with one class only."""
    return float(voxel_metrics(np.asarray(scores, dtype=np.float64), np.asarray(labels))["auroc"])


def auprc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUPRC (average precision, label 1 = positive) of ``(N,)`` scores; NaN with one class only."""
    return float(voxel_metrics(np.asarray(scores, dtype=np.float64), np.asarray(labels))["auprc"])


# ----------------------------------------------------------------------------- bootstrap over subjects
def bootstrap_weights(n_subjects: int, n_resamples: int, seed: int = 0) -> np.ndarray:
    """``(B, n)`` float64: how often each subject is drawn in each of ``B`` resamples with replacement.

    Every bootstrap statistic below is a weighted version of its point estimate, so one
    matrix serves all metrics and they see the same resamples (seeded: reproducible).
    """
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_subjects, size=(n_resamples, n_subjects))
    weights = np.zeros((n_resamples, n_subjects))
    np.add.at(weights, (np.repeat(np.arange(n_resamples), n_subjects), draws.ravel()), 1.0)
    return weights


def percentile_interval(samples: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap ``samples`` (NaN samples dropped); (NaN, NaN) when none is left."""
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return math.nan, math.nan
    tail = 50.0 * (1.0 - confidence)
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return float(low), float(high)


def bootstrap_mean(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``(B,)`` weighted means of per-subject ``values`` ``(n,)``; NaN values are left out of each mean."""
    values = np.asarray(values, dtype=np.float64)
    defined = np.isfinite(values)
    total = weights[:, defined] @ values[defined]
    count = weights[:, defined].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / count


def bootstrap_ratio(numerators: np.ndarray, denominators: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``(B,)`` ratios of weighted sums, e.g. pooled detection rate = detected / lesions over subjects."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights @ np.asarray(numerators, dtype=np.float64)) / (weights @ np.asarray(denominators, dtype=np.float64))


def bootstrap_auroc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``(B,)`` AUROC of one score per subject over subject resamples (Mann-Whitney with weights).

    AUROC_b = sum_ij w_i w_j [s_i > s_j] (+1/2 on ties) / (sum_i w_i * sum_j w_j), i abnormal,
    j normal; NaN for a resample holding one class only.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    positive, negative = scores[labels], scores[~labels]
    wins = (positive[:, None] > negative[None, :]) + 0.5 * (positive[:, None] == negative[None, :])
    w_pos, w_neg = weights[:, labels], weights[:, ~labels]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.einsum("bi,ij,bj->b", w_pos, wins, w_neg) / (w_pos.sum(axis=1) * w_neg.sum(axis=1))
