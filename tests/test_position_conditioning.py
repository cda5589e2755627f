"""Position conditioning: the patch centre is a real input of the conditioned models, is
refused when missing, and flows through training and scoring end to end."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from uadct.checkpoint import load_checkpoint, save_checkpoint
from uadct.errors import UadctError
from uadct.io import read_image
from uadct.models import available_models, build_model
from uadct.models.base import MODEL_REGISTRY
from uadct.patches import PatchSpec, sliding_window_map
from uadct.inference import patch_predictor, score_scan
from uadct.preprocess.prepared import load_prepared
from uadct.training import TrainConfig, train_model

CONDITIONED = {
    "cae": {"base_channels": 4, "latent_dim": 8, "dropout": 0.0},
    "vae": {"base_channels": 4, "latent_dim": 8, "dropout": 0.0},
    "ganomaly": {"base_channels": 4, "latent_dim": 8},
    "progressive-ganomaly": {"base_channels": 4, "latent_dim": 8},
}


def _fitted(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name, {"patch_size": 16, "position_conditioning": True, **CONDITIONED[name]})
    optimizers = model.configure_optimizers(1e-3)
    x = torch.rand(8, 1, 16, 16)
    positions = torch.rand(8, 3) * 2 - 1
    model.train()
    model.training_step(x, torch.ones_like(x), optimizers, positions=positions)
    model.eval()
    with torch.no_grad():
        model.fit_statistics(torch.rand(32, 1, 16, 16), torch.ones(32, 1, 16, 16), positions=torch.rand(32, 3) * 2 - 1)
    return model


@pytest.mark.parametrize("name", sorted(CONDITIONED))
@pytest.mark.slow
def test_scores_depend_on_the_position_and_survive_a_checkpoint(name, tmp_path):
    model = _fitted(name)
    assert model.uses_positions
    x = torch.rand(4, 1, 16, 16)
    here = torch.tensor([[-0.5, 0.2, 0.1]]).repeat(4, 1)
    there = torch.tensor([[0.7, -0.6, -0.9]]).repeat(4, 1)
    with torch.no_grad():
        at_here, at_there = model.score_patches(x, positions=here), model.score_patches(x, positions=there)
    assert not torch.allclose(at_here["voxel"], at_there["voxel"])
    with pytest.raises(UadctError, match="positions"):
        model.score_patches(x)
    with pytest.raises(UadctError, match="positions"):
        model.score_patches(x, positions=here[:2])
    save_checkpoint(tmp_path / "m.pt", model, {"patch": {"size": 16, "dims": 2}})
    loaded = load_checkpoint(tmp_path / "m.pt").model
    with torch.no_grad():
        again = loaded.score_patches(x, positions=here)
    for key in at_here:
        torch.testing.assert_close(again[key], at_here[key], rtol=0, atol=0)


def test_unconditioned_models_ignore_positions_and_unsupported_ones_refuse():
    model = build_model("cae", {"patch_size": 16}).eval()
    assert not model.uses_positions
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.score_patches(x)["voxel"], model.score_patches(x, positions=torch.zeros(2, 3))["voxel"])
    unsupported = [name for name, cls in MODEL_REGISTRY.items() if not cls.supports_positions]
    assert set(CONDITIONED) <= set(available_models()) and unsupported
    for name in unsupported:
        with pytest.raises(UadctError, match="position_conditioning"):
            build_model(name, {"patch_size": 16, "position_conditioning": True})


@pytest.mark.slow


def test_train_and_score_with_conditioning_end_to_end(atlas_grid_subjects, tmp_path):
    raw, prep = atlas_grid_subjects(tmp_path, ["sub-00", "sub-01", "sub-02"])
    config = TrainConfig(model="cae", patch_size=16, batch_size=16, patches_per_epoch=32, validation_patches=16,
                         statistics_patches=32, max_epochs=1, device="cpu",
                         model_options={"position_conditioning": True, **CONDITIONED["cae"]})
    result = train_model(prep, tmp_path / "cond.pt", config)
    checkpoint = load_checkpoint(result.checkpoint)
    assert checkpoint.model.uses_positions and checkpoint.metadata["model_config"]["position_conditioning"] is True
    prepared = load_prepared(prep / "sub-00")
    image, mask = sitk.GetArrayFromImage(prepared.image), sitk.GetArrayFromImage(prepared.mask)
    scored = score_scan(checkpoint, prep / "sub-00", tmp_path / "map.nii.gz", stride=8, device="cpu",
                        atlas_map_path=tmp_path / "atlas_map.nii.gz")
    atlas_map = sitk.GetArrayFromImage(read_image(tmp_path / "atlas_map.nii.gz"))
    assert np.isfinite(atlas_map).all() and atlas_map.max() > 0 and scored.map_path.is_file()
    # scoring gives each patch its own centre: the same map as a predictor fed the true starts,
    # and another map than one where every patch claims to sit in the corner of the volume
    spec = PatchSpec(16, 2)
    predictor = patch_predictor(checkpoint.model, torch.device("cpu"), volume_shape=image.shape, spec=spec)
    true_map = sliding_window_map(image, mask, predictor, spec, 8, pass_starts=True)
    np.testing.assert_allclose(atlas_map, true_map, rtol=1e-5, atol=1e-6)
    corner = sliding_window_map(image, mask, lambda p, s: predictor(p, np.zeros_like(s)), spec, 8, pass_starts=True)
    assert not np.allclose(true_map, corner)
    with pytest.raises(UadctError, match="conditioned"):
        predictor(image[:2, :16, :16])
