"""`uadct export`: the ONNX / TorchScript patch network gives the same maps as the torch model."""

from __future__ import annotations

import json
from typing import ClassVar

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from uadct.checkpoint import load_checkpoint, save_checkpoint
from uadct.export import ExportError, export_checkpoint, onnx_predictor, read_export_metadata
from uadct.models import MODEL_REGISTRY, AnomalyModel, ModelConfig, available_models, build_model, patch_models
from uadct.patches import PatchSpec, sliding_window_map
from uadct.inference import patch_predictor

onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'uadct[export]')")

PATCH = 16


def _fit_a_little(model: AnomalyModel, steps: int = 2) -> AnomalyModel:
    """A few real training steps through the model's own hooks, then its statistics (as training does)."""
    torch.manual_seed(0)
    optimizers = model.configure_optimizers(1e-3)
    size, dims = model.config.patch_size, model.config.dims
    shape = (16, 1, *([size] * dims))
    positions = (lambda n: torch.rand(n, 3) * 2 - 1) if model.uses_positions else (lambda n: None)
    model.train()
    for _ in range(steps):
        x = torch.rand(shape)
        model.training_step(x, torch.ones_like(x), optimizers, positions=positions(len(x)))
    model.eval()
    x = torch.rand((64, *shape[1:]))
    with torch.no_grad():
        model.fit_statistics(x, torch.ones_like(x), positions=positions(len(x)))
    return model


@pytest.fixture(scope="module")
def anatomy(small_atlas_path) -> tuple[np.ndarray, np.ndarray]:
    """Ten axial slices through the 2 mm SRI24 brain, normalised to [0, ~1], and its brain mask."""
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(small_atlas_path))).astype(np.float32)
    middle = array.shape[0] // 2
    volume = array[middle - 5 : middle + 5]
    volume = volume / np.percentile(volume[volume > 0], 95)
    return volume.astype(np.float32), (volume > 0).astype(np.uint8)


def _checkpoint(tmp_path, name: str, **config) -> tuple:
    model = _fit_a_little(build_model(name, {"patch_size": PATCH, **config}))
    path = save_checkpoint(tmp_path / f"{name}.pt", model, {
        "patch": {"size": model.config.patch_size, "dims": model.config.dims},
        "preprocess": {"normalization": "percentile", "percentiles": [5.0, 95.0], "atlas": "sri24"},
        "atlas": {"name": "sri24"}, "score_scale": 0.25,
    })
    return path, load_checkpoint(path)


@pytest.mark.parametrize("name", patch_models())  # normative: tests/test_normative.py
@pytest.mark.slow
def test_onnx_map_equals_torch_map_for_every_model(name, tmp_path, anatomy):
    volume, mask = (array[4:6] for array in anatomy)
    path, checkpoint = _checkpoint(tmp_path, name)
    result = export_checkpoint(path, tmp_path / "net.onnx")
    spec = PatchSpec(PATCH, 2)
    assert result.outputs == list(checkpoint.model.outputs)
    for output in checkpoint.model.outputs:
        torch_map = sliding_window_map(volume, mask, patch_predictor(checkpoint.model, torch.device("cpu"), output), spec, 4, 256)
        onnx_map = sliding_window_map(volume, mask, onnx_predictor(result.path, output), spec, 4, 97)  # another batch size
        assert np.abs(torch_map).max() > 1e-3  # the map holds something to compare
        np.testing.assert_allclose(onnx_map, torch_map, rtol=0, atol=1e-5)


@pytest.mark.slow


def test_position_conditioned_and_3d_models_export(tmp_path, anatomy):
    volume, mask = (array[3:7] for array in anatomy)
    path, checkpoint = _checkpoint(tmp_path, "vae", position_conditioning=True)
    result = export_checkpoint(path, tmp_path / "vae.onnx")
    assert result.inputs == ["patches", "positions"]
    spec = PatchSpec(PATCH, 2)
    torch_map = sliding_window_map(volume, mask, patch_predictor(checkpoint.model, torch.device("cpu"), None, volume.shape, spec),
                                   spec, 4, 256, pass_starts=True)
    onnx_map = sliding_window_map(volume, mask, onnx_predictor(result.path, None, volume.shape), spec, 4, 256, pass_starts=True)
    np.testing.assert_allclose(onnx_map, torch_map, rtol=0, atol=1e-5)

    path3, checkpoint3 = _checkpoint(tmp_path, "cae", dims=3, patch_size=8)
    result3 = export_checkpoint(path3, tmp_path / "cae3d.onnx")
    metadata = read_export_metadata(result3.path)
    assert metadata["inputs"][0]["shape"] == ["batch", 1, 8, 8, 8]
    volume, mask = anatomy
    spec3 = PatchSpec(8, 3)
    torch_map = sliding_window_map(volume, mask, patch_predictor(checkpoint3.model, torch.device("cpu")), spec3, 4, 64)
    onnx_map = sliding_window_map(volume, mask, onnx_predictor(result3.path), spec3, 4, 64)
    np.testing.assert_allclose(onnx_map, torch_map, rtol=0, atol=1e-5)


@pytest.mark.slow


def test_metadata_holds_what_scoring_needs_and_torchscript_matches(tmp_path):
    path, checkpoint = _checkpoint(tmp_path, "ganomaly")
    result = export_checkpoint(path, tmp_path / "g.ts", format="torchscript")
    metadata = json.loads((tmp_path / "g.ts.json").read_text(encoding="utf-8"))
    assert metadata["model"] == "ganomaly" and metadata["runtime"] == "torchscript"
    assert metadata["patch"]["size"] == PATCH and metadata["patch"]["dims"] == 2 and metadata["patch"]["stride_default"] == 4
    assert metadata["normalisation"]["percentiles"] == [5.0, 95.0]
    assert metadata["score_scale"] == 0.25 and metadata["image_score"]["top_k"] == 1000
    assert [o["name"] for o in metadata["outputs"]] == ["scalar", "voxel"] and metadata["default_output"] == "scalar"
    assert metadata["checkpoint"]["sha256"] == checkpoint.sha256
    loaded = torch.jit.load(str(result.path))
    x = torch.rand(5, 1, PATCH, PATCH)  # a batch size the trace never saw
    with torch.no_grad():
        scalar, voxel = loaded(x)
        expected = checkpoint.model.score_patches(x)
    torch.testing.assert_close(scalar, expected["scalar"], rtol=0, atol=1e-5)
    torch.testing.assert_close(voxel, expected["voxel"], rtol=0, atol=1e-5)


def test_a_score_that_is_not_one_pass_is_refused_in_one_line(tmp_path):
    # defined here, not at module level: defining it registers it, and other test files parametrise over the registry
    class _SearchModel(AnomalyModel):
        """A score found by a data-dependent number of refinement passes (like AnoGAN's latent search)."""

        name: ClassVar[str] = "test-latent-search"
        outputs: ClassVar[tuple[str, ...]] = ("scalar",)

        def __init__(self, config: ModelConfig) -> None:
            super().__init__(config)
            self.weight = torch.nn.Parameter(torch.ones(()))

        def score_patches(self, patches, masks=None, positions=None):
            estimate = patches.mean(dim=(1, 2, 3))
            for _ in range(int(patches.sum()) % 5 + 1):  # how many passes depends on the data
                estimate = 0.5 * (estimate + patches.amax(dim=(1, 2, 3))) * self.weight
            return {"scalar": estimate}

    try:
        model = _SearchModel(ModelConfig(patch_size=PATCH))
        save_checkpoint(tmp_path / "s.pt", model, {"patch": {"size": PATCH, "dims": 2}})
        with pytest.raises(ExportError, match="not one network pass") as caught:
            export_checkpoint(tmp_path / "s.pt", tmp_path / "s.onnx")
        assert "\n" not in str(caught.value) and str(tmp_path / "s.pt") in str(caught.value)
        assert not (tmp_path / "s.onnx").exists() and not (tmp_path / "s.onnx.json").exists()
    finally:
        MODEL_REGISTRY.pop(_SearchModel.name, None)


def test_a_voxel_wise_model_is_refused_in_one_line(tmp_path):
    normative = build_model("normative")
    save_checkpoint(tmp_path / "n.pt", normative, {"patch": {"size": PATCH, "dims": 2}})
    with pytest.raises(ExportError, match="maps whole volumes") as caught:
        export_checkpoint(tmp_path / "n.pt", tmp_path / "n.onnx")
    assert "\n" not in str(caught.value) and not (tmp_path / "n.onnx").exists()


@pytest.mark.slow


def test_cli_export_and_its_errors(tmp_path):
    from typer.testing import CliRunner

    from uadct.cli import app

    path, _ = _checkpoint(tmp_path, "dae")
    runner = CliRunner()
    done = runner.invoke(app, ["export", str(path), "-o", str(tmp_path / "d.onnx")])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "d.onnx").stat().st_size > 1000 and read_export_metadata(tmp_path / "d.onnx")["model"] == "dae"
    again = runner.invoke(app, ["export", str(path), "-o", str(tmp_path / "d.onnx")])
    assert again.exit_code != 0 and "--force" in str(again.exception)
    bad = runner.invoke(app, ["export", str(path), "-o", str(tmp_path / "d.x"), "--format", "tflite"])
    assert bad.exit_code != 0 and "onnx or torchscript" in str(bad.exception)
    assert not (tmp_path / "d.x").exists()
