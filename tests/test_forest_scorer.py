"""The features + random forest scorer: trees stored as arrays give scikit-learn's probabilities
exactly, survive a weights_only checkpoint, and score scans end to end."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from uadct.checkpoint import load_checkpoint, read_checkpoint_payload
from uadct.errors import UadctError
from uadct.forest import FOREST_MODELS, TreeEnsemble, ensemble_from_sklearn, fit_ensemble
from uadct.forest_scorer import ForestScoredModel, anomalous_copies
from uadct.inference import score_scan
from uadct.io import read_image
from uadct.training import TrainConfig, train_model

TINY_CAE = {"base_channels": 4, "latent_dim": 8, "dropout": 0.0}


@pytest.mark.parametrize("kind", FOREST_MODELS)
def test_stored_trees_give_exactly_sklearns_probabilities(kind, tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(300, 6)).astype(np.float32)
    labels = (features[:, 0] + features[:, 2] ** 2 + rng.normal(scale=0.5, size=300) > 0.8).astype(np.int64)
    estimator = fit_ensemble(features, labels, kind, trees=25, seed=1)
    torch.save({"forest": ensemble_from_sklearn(estimator).to_state()}, tmp_path / "f.pt")
    stored = TreeEnsemble.from_state(torch.load(tmp_path / "f.pt", weights_only=True)["forest"])
    unseen = (rng.normal(size=(500, 6)) * 2).astype(np.float32)
    expected = estimator.predict_proba(unseen)[:, 1]
    np.testing.assert_array_equal(stored.probability(unseen), expected)  # bit for bit
    assert 0.0 < expected.mean() < 1.0 and stored.trees == 25
    with pytest.raises(UadctError, match="features"):
        stored.probability(unseen[:, :5])


def test_damaged_forest_arrays_are_refused():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(60, 3)).astype(np.float32)
    state = ensemble_from_sklearn(fit_ensemble(features, (features[:, 0] > 0).astype(int), trees=3)).to_state()
    state["left"] = state["left"].clone().fill_(10_000)
    with pytest.raises(UadctError, match="damaged"):
        TreeEnsemble.from_state(state)


def test_synthetic_anomalies_change_every_patch_inside_the_brain():
    torch.manual_seed(0)
    images = torch.rand(6, 1, 16, 16)
    masks = torch.ones_like(images)
    corrupted = anomalous_copies(images, masks, seed=3)
    assert corrupted.shape == images.shape
    assert all((corrupted[i] - images[i]).abs().max() > 0.05 for i in range(6))
    torch.testing.assert_close(anomalous_copies(images, masks, seed=3), corrupted)  # seeded


def test_train_with_forest_scorer_then_score(atlas_grid_subjects, tmp_path):
    _, prep = atlas_grid_subjects(tmp_path, ["sub-00", "sub-01", "sub-02"])
    config = TrainConfig(model="cae", patch_size=16, batch_size=16, patches_per_epoch=32, validation_patches=64,
                         statistics_patches=32, max_epochs=1, device="cpu", calibration_subjects=1, model_options=TINY_CAE,
                         scorer="forest", forest_trees=10, forest_patches=128)
    train_model(prep, tmp_path / "forest.pt", config)
    payload = read_checkpoint_payload(tmp_path / "forest.pt")  # weights_only: nothing pickled
    assert set(payload["extra"]["forest"]) >= {"left", "right", "feature", "threshold", "value", "kind"}
    checkpoint = load_checkpoint(tmp_path / "forest.pt")
    model = checkpoint.model
    assert isinstance(model, ForestScoredModel) and model.name == "cae" and model.outputs[0] == "scalar"
    record = checkpoint.metadata["forest"]
    assert record["trees"] == 10 and record["features"] == 8 and record["healthy_patches"] == 128
    assert record["validation_auroc_synthetic"] is not None and checkpoint.metadata["calibration"]
    x = torch.rand(5, 1, 16, 16)
    with torch.no_grad():
        scores = model.score_patches(x)
        features = model.scored_model.encode_features(x).numpy()
    np.testing.assert_array_equal(scores["scalar"].numpy(), model.ensemble.probability(features).astype(np.float32))
    assert scores["voxel"].shape == (5, 16, 16)  # the network's own map stays available
    scored = score_scan(checkpoint, prep / "sub-00", tmp_path / "map.nii.gz", stride=8, device="cpu")
    values = sitk.GetArrayFromImage(read_image(scored.map_path))
    assert np.isfinite(values).all() and 0 <= values.min() and values.max() <= 1 and values.max() > 0


def test_forest_scorer_needs_an_encoder():
    from uadct.forest_scorer import require_encoder
    from uadct.models import build_model

    require_encoder(build_model("vae", {"patch_size": 16}))
    with pytest.raises(UadctError, match="needs a model with an encoder.*alphagan, bigan, cae, dae") as excinfo:
        require_encoder(build_model("threshold", {"patch_size": 16}))
    assert "\n" not in str(excinfo.value)


def test_every_model_with_an_encoder_gives_one_feature_vector_per_patch():
    from uadct.forest_scorer import has_encoder
    from uadct.models import MODEL_REGISTRY, build_model

    names = sorted(n for n, cls in MODEL_REGISTRY.items() if has_encoder(cls))
    assert {"cae", "vae", "dae", "ganomaly", "progressive-ganomaly", "fanogan", "bigan", "alphagan", "ssae",
            "dae-unet", "synthetic-anomaly"} <= set(names)
    torch.manual_seed(0)
    x = torch.rand(3, 1, 16, 16)
    for name in names:
        small = {"base_channels": 4} if "base_channels" in MODEL_REGISTRY[name].Config.__dataclass_fields__ else {}
        model = build_model(name, {"patch_size": 16, **small}).eval()
        with torch.no_grad():
            features = model.encode_features(x)
        assert features.ndim == 2 and features.shape[0] == 3 and torch.isfinite(features).all(), name
        assert not torch.allclose(features[0], features[1]), name


@pytest.mark.parametrize("name", ["dae-unet", "synthetic-anomaly"])
def test_unet_models_feed_the_forest_and_their_forest_survives_a_checkpoint(name, tmp_path):
    """The U-Net models' features are their pooled bottleneck: fit -> forest -> save -> load -> identical scores."""
    from uadct.checkpoint import save_checkpoint
    from uadct.forest_scorer import ForestSettings, fit_forest_scorer
    from uadct.models import build_model

    torch.manual_seed(0)
    model = build_model(name, {"patch_size": 16, "base_channels": 4, "levels": 2}).eval()
    x = torch.rand(6, 1, 16, 16)
    with torch.no_grad():
        features = model.encode_features(x)
        bottleneck = model.unet.encode(x)[-1]
    assert features.shape == (6, 16) and bottleneck.shape == (6, 16, 4, 4)  # 4 channels doubled twice, 16 px pooled twice
    torch.testing.assert_close(features, bottleneck.mean(dim=(2, 3)))
    rng = np.random.default_rng(0)
    images = rng.random((64, 1, 16, 16), dtype=np.float32)
    masks = np.ones_like(images)
    drawn = (images, masks, np.zeros((64, 3), np.int64))
    scored, extra, record = fit_forest_scorer(model, drawn, drawn, ForestSettings(trees=5, patches=64), torch.device("cpu"))
    assert record["features"] == 16 and record["healthy_patches"] == 64 and 0.0 <= record["validation_auroc_synthetic"] <= 1.0
    save_checkpoint(tmp_path / "m.pt", scored, {"patch": {"size": 16, "dims": 2}}, extra)
    loaded = load_checkpoint(tmp_path / "m.pt").model
    assert isinstance(loaded, ForestScoredModel) and loaded.name == name
    with torch.no_grad():
        before, after = scored.score_patches(x), loaded.score_patches(x)
    assert 0.0 <= float(before["scalar"].min()) and float(before["scalar"].max()) <= 1.0
    for key in ("scalar", "voxel"):
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    np.testing.assert_array_equal(after["scalar"].numpy(), scored.ensemble.probability(features.numpy()).astype(np.float32))
