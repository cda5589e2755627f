"""Scoring options (gaussian averaging, output kind, MOOD layout) and native-grid maps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from uadct.checkpoint import load_checkpoint, save_checkpoint
from uadct.cli import app
from uadct.errors import UadctError
from uadct.io import read_image, write_image
from uadct.calibration import mood_scaled
from uadct.inference import patch_predictor

runner = CliRunner()
FAST = ["--skull-strip", "none", "--registration", "none", "--no-bias-correction"]


@pytest.fixture(scope="module")
def threshold_model(atlas_grid_subjects, tmp_path_factory):
    """A `threshold` (intensity) model trained on two prepared 2 mm subjects, and their folders."""
    root = tmp_path_factory.mktemp("scoring")
    _, prep = atlas_grid_subjects(root, ["case-0", "case-1"])
    model = root / "threshold.pt"
    trained = runner.invoke(app, ["train", str(prep), "-o", str(model), "--model", "threshold", "--validation-patches", "256"])
    assert trained.exit_code == 0, trained.output
    return model, prep, root


def test_gaussian_option_is_recorded_and_keeps_an_identity_map(threshold_model, tmp_path):
    model, prep, _ = threshold_model
    plain = runner.invoke(app, ["score", str(model), str(prep / "case-0"), "-o", str(tmp_path / "plain.nii.gz")])
    weighted = runner.invoke(app, ["score", str(model), str(prep / "case-0"), "-o", str(tmp_path / "gauss.nii.gz"), "--gaussian", "0.125"])
    assert plain.exit_code == 0 and weighted.exit_code == 0, weighted.output
    assert json.loads((tmp_path / "gauss.json").read_text(encoding="utf-8"))["gaussian_sigma"] == 0.125
    assert json.loads((tmp_path / "plain.json").read_text(encoding="utf-8"))["gaussian_sigma"] is None
    # the intensity model is an identity predictor: weighted averaging of identical copies changes nothing
    a = sitk.GetArrayFromImage(read_image(tmp_path / "plain.nii.gz", allow_empty=True))
    b = sitk.GetArrayFromImage(read_image(tmp_path / "gauss.nii.gz", allow_empty=True))
    assert a.max() > 0
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    bad = runner.invoke(app, ["score", str(model), str(prep / "case-0"), "-o", str(tmp_path / "bad.nii.gz"), "--gaussian", "0"])
    assert isinstance(bad.exception, UadctError) and "gaussian sigma" in str(bad.exception)


def test_output_kind_must_be_declared_by_the_model(threshold_model, tmp_path):
    model, prep, _ = threshold_model
    ok = runner.invoke(app, ["score", str(model), str(prep / "case-0"), "-o", str(tmp_path / "v.nii.gz"), "--output-kind", "voxel"])
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "v.json").read_text(encoding="utf-8"))["output_kind"] == "voxel"
    refused = runner.invoke(app, ["score", str(model), str(prep / "case-0"), "-o", str(tmp_path / "s.nii.gz"), "--output-kind", "scalar"])
    assert isinstance(refused.exception, UadctError)
    assert "no 'scalar' output" in str(refused.exception) and "declares voxel" in str(refused.exception)
    assert not (tmp_path / "s.nii.gz").exists()


class _TwoOutputs(torch.nn.Module):
    name = "two"
    outputs = ("scalar", "voxel")

    def score_patches(self, patches, masks=None, positions=None):
        return {"voxel": patches[:, 0] * 2, "scalar": patches.flatten(1).mean(1)}


def test_predictor_defaults_to_the_first_declared_output():
    patches = np.arange(2 * 16, dtype=np.float32).reshape(2, 4, 4)
    model = _TwoOutputs()
    assert patch_predictor(model, torch.device("cpu"))(patches).shape == (2,)
    np.testing.assert_array_equal(patch_predictor(model, torch.device("cpu"), "voxel")(patches), patches * 2)
    with pytest.raises(UadctError, match="declares scalar, voxel"):
        patch_predictor(model, torch.device("cpu"), "map")


def test_mood_scaling_fixed_scale_and_per_case_fallback():
    anomaly_map = np.array([[[5.0, 1.0, 3.0, 9.0]]], np.float32)
    mask = np.array([[[0, 1, 1, 1]]], np.uint8)
    scaled, how = mood_scaled(anomaly_map, mask, None)
    np.testing.assert_allclose(scaled, [[[0.0, 0.0, 0.25, 1.0]]])
    assert "per-case" in how
    scaled, how = mood_scaled(anomaly_map, mask, 6.0)
    np.testing.assert_allclose(scaled, [[[0.0, 1 / 6, 0.5, 1.0]]], rtol=1e-6)
    assert "score_scale" in how


def test_mood_layout_names_maps_like_inputs_with_sample_scores(threshold_model, tmp_path):
    model, _, root = threshold_model
    raw = root / "raw"
    out = tmp_path / "mood"
    result = runner.invoke(app, ["score", str(model), str(raw / "case-0.nii.gz"), str(raw / "case-1.nii.gz"), "-o", str(out), "--mood", "--json"])
    assert result.exit_code == 0, result.output
    for name in ("case-0.nii.gz", "case-1.nii.gz"):
        image = read_image(out / name, allow_empty=True)
        reference = read_image(raw / name)
        assert image.GetSize() == reference.GetSize() and image.GetPixelID() == sitk.sitkFloat32
        values = sitk.GetArrayFromImage(image)
        brain = sitk.GetArrayFromImage(reference) > 0
        assert values.min() >= 0.0 and values.max() <= 1.0
        assert values.max() > 0.99  # the brightest 0.1 % of healthy voxels reach the scale
        assert not values[~brain].any()
        sample = float((out / f"{name}.txt").read_text(encoding="utf-8"))
        assert 0.0 <= sample <= 1.0 and sample > 0.5  # mean of the top voxels of a [0, 1] map
    assert json.loads((out / "case-0.json").read_text(encoding="utf-8"))["mood_scaling"].endswith("(checkpoint score_scale)")


def test_training_stores_a_healthy_score_scale_that_mood_maps_divide_by(threshold_model, tmp_path):
    """The scale is the 99.9th percentile of held-out healthy scores; every MOOD map is clip(map / scale)."""
    from uadct.preprocess.prepared import load_prepared

    model, prep, _ = threshold_model
    checkpoint = load_checkpoint(model)
    scale = checkpoint.metadata["score_scale"]
    validation = checkpoint.metadata["training"]["validation_subjects"]
    prepared = load_prepared(prep / validation[0])
    brain = sitk.GetArrayFromImage(prepared.image)[sitk.GetArrayFromImage(prepared.mask) > 0]
    # the intensity model scores a voxel by its intensity: the scale is a high healthy intensity
    assert np.quantile(brain, 0.99) < scale <= brain.max() + 1e-6
    plain = runner.invoke(app, ["score", str(model), str(prep / "case-1"), "-o", str(tmp_path / "plain.nii.gz")])
    mood = runner.invoke(app, ["score", str(model), str(prep / "case-1"), "-o", str(tmp_path / "mood"), "--mood"])
    assert plain.exit_code == 0 and mood.exit_code == 0, mood.output
    raw_map = sitk.GetArrayFromImage(read_image(tmp_path / "plain.nii.gz", allow_empty=True))
    scaled = sitk.GetArrayFromImage(read_image(tmp_path / "mood" / "case-1.nii.gz", allow_empty=True))
    below = (raw_map > 0.05 * scale) & (raw_map < 0.95 * scale)  # clipping before or after interpolation agree away from 0 and 1
    np.testing.assert_allclose(scaled[below], raw_map[below] / scale, atol=1e-5)
    assert np.all(scaled[raw_map >= scale] >= 0.999)


def _oblique_lps_scan(brain: sitk.Image, spacing=(1.8, 2.2, 3.0), degrees=(6.0, -4.0, 3.0)) -> sitk.Image:
    """The brain resampled onto a rotated (not axis-aligned), anisotropic LPS grid covering it."""
    rotation = sitk.Euler3DTransform()
    rotation.SetRotation(*np.deg2rad(degrees))
    direction = np.array(rotation.GetMatrix()).reshape(3, 3)
    centre = np.array(brain.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in brain.GetSize()]))
    extent = np.array(brain.GetSize()) * np.array(brain.GetSpacing())
    size = [int(np.ceil(e * 1.15 / s)) for e, s in zip(extent, spacing)]
    origin = centre - direction @ ((np.array(size) - 1) / 2.0 * np.array(spacing))
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing(spacing)
    grid.SetDirection(direction.ravel().tolist())
    grid.SetOrigin(origin.tolist())
    return sitk.Resample(brain, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


@pytest.mark.slow
def test_map_of_an_oblique_anisotropic_lps_scan_lies_on_its_grid(threshold_model, small_atlas_path, tmp_path):
    model, _, _ = threshold_model
    checkpoint = load_checkpoint(model)
    affine = tmp_path / "affine.pt"
    save_checkpoint(affine, checkpoint.model, {**checkpoint.metadata, "preprocess": {**checkpoint.preprocess, "registration": "affine"}})
    scan = _oblique_lps_scan(read_image(small_atlas_path))
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(scan.GetDirection()) == "LPS"
    assert not np.allclose(np.abs(np.array(scan.GetDirection())), np.eye(3).ravel())
    write_image(scan, tmp_path / "oblique.nii.gz")
    result = runner.invoke(app, ["score", str(affine), str(tmp_path / "oblique.nii.gz"), "-o", str(tmp_path / "map.nii.gz")])
    assert result.exit_code == 0, result.output
    written = read_image(tmp_path / "oblique.nii.gz")
    anomaly_map = read_image(tmp_path / "map.nii.gz", allow_empty=True)
    assert anomaly_map.GetSize() == written.GetSize()
    np.testing.assert_allclose(anomaly_map.GetSpacing(), written.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(anomaly_map.GetOrigin(), written.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(anomaly_map.GetDirection(), written.GetDirection(), atol=1e-6)
    assert anomaly_map.GetPixelID() == sitk.sitkFloat32
    values = sitk.GetArrayFromImage(anomaly_map)
    brain = sitk.GetArrayFromImage(written) > 0
    assert values[brain].mean() > 0 and (values[brain] > 0).mean() > 0.8
    assert values[0].max() == 0 and values[:, 0].max() == 0  # the border of the field of view is background
