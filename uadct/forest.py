"""Tree ensembles stored as plain arrays: fitted with scikit-learn, evaluated with numpy.

Checkpoints load with ``torch.load(weights_only=True)``, which refuses pickled objects,
so a fitted forest cannot travel as a scikit-learn object. :func:`ensemble_from_sklearn`
takes a fitted ``RandomForestClassifier`` or ``HistGradientBoostingClassifier`` (binary)
apart into per-node arrays (children, split feature, threshold, leaf value; trees padded
to the largest), :meth:`TreeEnsemble.to_state` / :meth:`TreeEnsemble.from_state` turn
them into tensors and back, and :meth:`TreeEnsemble.probability` evaluates them exactly
as scikit-learn's ``predict_proba(X)[:, 1]`` does:

- random forest: features cast to float32 (as scikit-learn does), ``x <= threshold`` goes
  left; the leaf's class-1 fraction, summed over the trees in order in float64, divided by
  the number of trees;
- gradient boosting: features in float64; the baseline plus the leaf values summed in
  order, through the logistic function (``scipy.special.expit``).

Features must be finite (the networks' codes are); NaN routing is not stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from uadct.errors import CheckpointError, UadctError

FOREST_MODELS = ("random-forest", "gradient-boosting")


@dataclass
class TreeEnsemble:
    """Trees as ``(T, N)`` arrays (N = nodes of the largest tree; a leaf's ``left`` is -1)."""

    kind: str
    left: np.ndarray  # int64
    right: np.ndarray  # int64
    feature: np.ndarray  # int64
    threshold: np.ndarray  # float64
    value: np.ndarray  # float64: class-1 fraction (forest) or raw leaf value (boosting)
    baseline: float = 0.0  # boosting: the raw prediction before the first tree
    n_features: int = 0

    @property
    def trees(self) -> int:
        return int(self.left.shape[0])

    def leaf_values(self, features: np.ndarray) -> np.ndarray:
        """``(n, n_features)`` -> each tree's leaf value ``(n, T)`` (float64)."""
        if features.ndim != 2 or features.shape[1] != self.n_features:
            raise UadctError(f"forest scorer: expected features (n, {self.n_features}), got {features.shape}")
        x = features.astype(np.float32 if self.kind == "random-forest" else np.float64).astype(np.float64)
        if not np.isfinite(x).all():
            raise UadctError("forest scorer: features hold NaN or infinite values")
        n, trees = len(x), self.trees
        node = np.zeros((n, trees), np.int64)
        columns = np.arange(trees)[None, :]
        rows = np.arange(n)[:, None]
        while True:
            inner = self.left[columns, node] >= 0
            if not inner.any():
                break
            goes_left = x[rows, self.feature[columns, node].clip(min=0)] <= self.threshold[columns, node]
            step = np.where(goes_left, self.left[columns, node], self.right[columns, node])
            node = np.where(inner, step, node)
        return self.value[columns, node]

    def probability(self, features: np.ndarray) -> np.ndarray:
        """The class-1 probability ``(n,)`` float64, as scikit-learn's ``predict_proba(features)[:, 1]``."""
        values = self.leaf_values(features)
        total = np.zeros(len(values), np.float64)
        if self.kind == "gradient-boosting":
            total += self.baseline
        for t in range(self.trees):  # in order, as scikit-learn accumulates
            total += values[:, t]
        if self.kind == "random-forest":
            total /= self.trees
            return total
        from scipy.special import expit

        return expit(total)

    def to_state(self) -> dict[str, Any]:
        """Tensors and plain values only (safe for ``weights_only`` loading)."""
        return {"kind": self.kind, "left": torch.from_numpy(self.left), "right": torch.from_numpy(self.right),
                "feature": torch.from_numpy(self.feature), "threshold": torch.from_numpy(self.threshold),
                "value": torch.from_numpy(self.value), "baseline": float(self.baseline), "n_features": int(self.n_features)}

    @classmethod
    def from_state(cls, state: Any) -> "TreeEnsemble":
        try:
            arrays = {k: state[k].numpy() for k in ("left", "right", "feature", "threshold", "value")}
            ensemble = cls(str(state["kind"]), arrays["left"].astype(np.int64), arrays["right"].astype(np.int64),
                           arrays["feature"].astype(np.int64), arrays["threshold"].astype(np.float64),
                           arrays["value"].astype(np.float64), float(state["baseline"]), int(state["n_features"]))
        except (KeyError, TypeError, AttributeError, ValueError):
            raise CheckpointError("checkpoint forest scorer is damaged (expected kind, left, right, feature, threshold, value)") from None
        shapes = {a.shape for a in (ensemble.left, ensemble.right, ensemble.feature, ensemble.threshold, ensemble.value)}
        nodes = ensemble.left.shape[1] if ensemble.left.ndim == 2 else 0
        if (ensemble.kind not in FOREST_MODELS or len(shapes) != 1 or ensemble.left.ndim != 2 or ensemble.trees == 0
                or ensemble.left.max() >= nodes or ensemble.right.max() >= nodes or ensemble.feature.max() >= ensemble.n_features):
            raise CheckpointError("checkpoint forest scorer is damaged (inconsistent tree arrays)")
        return ensemble


def fit_ensemble(features: np.ndarray, labels: np.ndarray, kind: str = "random-forest", trees: int = 100,
                 seed: int = 0) -> Any:
    """A fitted scikit-learn classifier of ``labels`` (0 healthy, 1 anomalous) from ``features``."""
    if kind == "random-forest":
        from sklearn.ensemble import RandomForestClassifier

        estimator: Any = RandomForestClassifier(n_estimators=trees, min_samples_leaf=2, random_state=seed, n_jobs=1)
    elif kind == "gradient-boosting":
        from sklearn.ensemble import HistGradientBoostingClassifier

        estimator = HistGradientBoostingClassifier(max_iter=trees, early_stopping=False, random_state=seed)
    else:
        raise UadctError(f"unknown forest model {kind!r}; expected one of {', '.join(FOREST_MODELS)}")
    if len(np.unique(labels)) != 2:
        raise UadctError("forest scorer: need healthy and anomalous examples")
    return estimator.fit(np.asarray(features, np.float32), labels)


def ensemble_from_sklearn(estimator: Any) -> TreeEnsemble:
    """The arrays of a fitted binary ``RandomForestClassifier`` or ``HistGradientBoostingClassifier``."""
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier

    if isinstance(estimator, RandomForestClassifier):
        if list(estimator.classes_) != [0, 1]:
            raise UadctError("forest scorer: the classes must be 0 (healthy) and 1 (anomalous)")
        trees = []
        for tree in (e.tree_ for e in estimator.estimators_):
            counts = tree.value[:, 0, :].astype(np.float64)
            sums = counts.sum(1)
            fraction = counts[:, 1] if np.allclose(sums, 1.0, rtol=0, atol=1e-9) else counts[:, 1] / np.where(sums == 0, 1.0, sums)
            trees.append((tree.children_left, tree.children_right, tree.feature, tree.threshold, fraction))
        return _padded("random-forest", trees, 0.0, int(estimator.n_features_in_))
    if isinstance(estimator, HistGradientBoostingClassifier):
        if estimator.n_trees_per_iteration_ != 1 or list(estimator.classes_) != [0, 1]:
            raise UadctError("forest scorer: gradient boosting must be a binary classifier of 0 and 1")
        trees = []
        for (predictor,) in estimator._predictors:  # one tree per iteration (binary)
            nodes = predictor.nodes
            if nodes["is_categorical"].any():
                raise UadctError("forest scorer: categorical splits are not supported")
            leaf = nodes["is_leaf"].astype(bool)
            trees.append((np.where(leaf, -1, nodes["left"].astype(np.int64)), np.where(leaf, -1, nodes["right"].astype(np.int64)),
                          np.where(leaf, -2, nodes["feature_idx"].astype(np.int64)), nodes["num_threshold"].astype(np.float64),
                          nodes["value"].astype(np.float64)))
        baseline = float(np.asarray(estimator._baseline_prediction).reshape(-1)[0])
        return _padded("gradient-boosting", trees, baseline, int(estimator.n_features_in_))
    raise UadctError(f"forest scorer: cannot store a {type(estimator).__name__}")


def _padded(kind: str, trees: list[tuple[np.ndarray, ...]], baseline: float, n_features: int) -> TreeEnsemble:
    nodes = max(len(t[0]) for t in trees)

    def stack(index: int, fill: float, dtype: type) -> np.ndarray:
        out = np.full((len(trees), nodes), fill, dtype=dtype)
        for row, tree in enumerate(trees):
            out[row, : len(tree[index])] = tree[index]
        return out

    return TreeEnsemble(kind, stack(0, -1, np.int64), stack(1, -1, np.int64), stack(2, -2, np.int64),
                        stack(3, 0.0, np.float64), stack(4, 0.0, np.float64), baseline, n_features)
