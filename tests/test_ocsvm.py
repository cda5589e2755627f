"""One-class SVM: the torch decision function equals scikit-learn's; tensors-only checkpoint; the fit cap."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.svm import OneClassSVM

from uadct.checkpoint import load_checkpoint, save_checkpoint
from uadct.errors import UadctError
from uadct.models import build_model


def _patches(rng: np.random.Generator, count: int, size: int = 8) -> torch.Tensor:
    return torch.from_numpy(rng.normal(0.5, 0.2, size=(count, 1, size, size)).astype(np.float32))


@pytest.mark.parametrize("options", [{"pool_size": 8}, {"pool_size": 4, "gamma": 0.5, "nu": 0.3}])
def test_torch_decision_function_matches_sklearn(options, rng):
    train, test = _patches(rng, 400), _patches(rng, 200)
    model = build_model("ocsvm", {"patch_size": 8, **options}).eval()
    with torch.no_grad():
        model.fit_statistics(train, torch.ones_like(train))
    factor = 8 // options["pool_size"]

    def vectors(x: torch.Tensor) -> np.ndarray:
        pooled = x.numpy().reshape(len(x), 8 // factor, factor, 8 // factor, factor).mean((2, 4))
        return pooled.reshape(len(x), -1).astype(np.float64)

    reference = OneClassSVM(kernel="rbf", nu=options.get("nu", 0.1), gamma=options.get("gamma", "scale")).fit(vectors(train))
    assert model.support_vectors.shape == reference.support_vectors_.shape
    with torch.no_grad():
        ours = model.decision_function(test).numpy()
        scores = model.score_patches(test)
    expected = reference.decision_function(vectors(test))
    assert np.abs(expected).max() > 1e-3  # not a trivially zero comparison
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)
    assert model.outputs == ("scalar",) and set(scores) == {"scalar"}
    assert scores["scalar"].shape == (200,) and scores["scalar"].dtype == torch.float32
    np.testing.assert_allclose(scores["scalar"].numpy(), -expected, rtol=0, atol=1e-5)


def test_fit_is_capped_and_outliers_score_higher(rng):
    train = _patches(rng, 600)
    model = build_model("ocsvm", {"patch_size": 8, "max_fit_patches": 150, "nu": 0.1}).eval()
    with torch.no_grad():
        model.fit_statistics(train, torch.ones_like(train))
        inliers = model.score_patches(_patches(rng, 100))["scalar"]
        outliers = model.score_patches(_patches(rng, 100) + 1.0)["scalar"]
    assert 15 <= len(model.support_vectors) <= 150  # nu * n <= support vectors <= n
    assert (outliers > 0).all() and (outliers.min() > inliers.max())


def test_checkpoint_holds_only_tensors_and_restores_the_support_vector_count(rng, tmp_path):
    train = _patches(rng, 120)
    model = build_model("ocsvm", {"patch_size": 8}).eval()
    with torch.no_grad():
        model.fit_statistics(train, torch.ones_like(train))
    assert len(model.support_vectors) > 0
    save_checkpoint(tmp_path / "svm.pt", model, {"patch": {"size": 8, "dims": 2}})
    payload = torch.load(tmp_path / "svm.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in payload["state_dict"].values())
    loaded = load_checkpoint(tmp_path / "svm.pt").model
    assert loaded.support_vectors.shape == model.support_vectors.shape
    test = _patches(rng, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.score_patches(test)["scalar"], model.score_patches(test)["scalar"], rtol=0, atol=0)


def test_unfitted_scoring_and_bad_settings_are_refused():
    model = build_model("ocsvm", {"patch_size": 8})
    with pytest.raises(UadctError, match="not fitted"):
        model.score_patches(torch.rand(2, 1, 8, 8))
    with pytest.raises(UadctError, match="pool_size 3 must divide the patch size 8"):
        build_model("ocsvm", {"patch_size": 8, "pool_size": 3})
    with pytest.raises(UadctError, match="nu must be in"):
        build_model("ocsvm", {"nu": 0.0})
