"""Calibrated units, healthy-FPR lesion masks and score-time post-processing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from typer.testing import CliRunner

from uadct.calibration import Calibration, cumulative, fit_calibration, quantile_levels, threshold_at_fpr, to_units
from uadct.cli import app
from uadct.errors import UadctError
from uadct.postprocess import PostProcess, postprocess_map

runner = CliRunner()


def test_calibration_is_numpys_quantile_function_and_its_units_mean_what_they_say():
    rng = np.random.default_rng(1)
    subjects = [rng.gamma(2.0, 1.0, 40_000) for _ in range(3)]
    calibration = fit_calibration(subjects, ["a", "b", "c"], {"stride": 4})
    pooled = np.concatenate(subjects)
    levels = quantile_levels(pooled.size)
    assert 900 <= levels.size <= 1001 and levels[0] == 0.0 and levels[-1] == 1.0
    assert levels[-2] > 1 - 2.0 / pooled.size  # the tail reaches one voxel of the pool
    np.testing.assert_allclose(calibration.values, np.quantile(pooled, levels))
    fresh = rng.gamma(2.0, 1.0, 200_000)  # new healthy voxels of the same distribution
    for fpr in (0.1, 0.01, 0.001):
        threshold = threshold_at_fpr(calibration, fpr)
        assert threshold == pytest.approx(np.quantile(pooled, 1 - fpr), rel=1e-3)
        assert np.mean(fresh > threshold) == pytest.approx(fpr, rel=0.15)
        assert to_units(np.array([threshold]), calibration, "logp")[0] == pytest.approx(-np.log10(fpr), abs=0.02)
    median = np.median(pooled)
    assert to_units(np.array([median]), calibration, "z")[0] == pytest.approx(0.0, abs=0.01)
    assert to_units(np.array([median]), calibration, "quantile")[0] == pytest.approx(0.5, abs=0.002)
    np.testing.assert_allclose(cumulative(np.array([-1.0, 1e9]), calibration), [0.0, 1.0])
    assert to_units(np.array([1e9]), calibration, "logp")[0] == pytest.approx(-np.log10(calibration.p_floor))
    again = Calibration.from_dict(json.loads(json.dumps(calibration.to_dict())))
    np.testing.assert_array_equal(again.values, calibration.values)
    with pytest.raises(UadctError, match="false-positive rate"):
        threshold_at_fpr(calibration, 1.5)


def test_point_mass_keeps_its_highest_level():
    values = np.concatenate([np.zeros(900), np.linspace(1, 2, 100)])
    calibration = fit_calibration([values])
    assert cumulative(np.array([0.0]), calibration)[0] == pytest.approx(0.9, abs=0.002)


def test_postprocessing_matches_scipy():
    rng = np.random.default_rng(2)
    brain = np.zeros((20, 24, 22), bool)
    brain[3:17, 4:20, 3:19] = True
    anomaly_map = rng.random(brain.shape).astype(np.float32)
    filtered, mask = postprocess_map(anomaly_map, brain, (2.0, 2.0, 2.0), PostProcess(median_filter=3))
    expected = ndimage.median_filter(np.where(brain, anomaly_map, 0), size=3, mode="constant")
    np.testing.assert_allclose(filtered[brain], expected[brain])
    assert not filtered[~brain].any()
    _, eroded = postprocess_map(anomaly_map, brain, (2.0, 2.0, 2.0), PostProcess(erode_mask_mm=3.0))
    # 3 mm at 2 mm voxels: the outer 2 voxel layers (distances 2 and 2.83..) go, the third (>= 4 mm... 6 mm) stays
    distance = ndimage.distance_transform_edt(np.pad(brain, 1), sampling=2.0)[1:-1, 1:-1, 1:-1]
    np.testing.assert_array_equal(eroded > 0, distance > 3.0)
    assert eroded.sum() < brain.sum()
    with pytest.raises(UadctError, match="must not be negative"):
        PostProcess(median_filter=-1)


# ----------------------------------------------------------------------------- through train and score
@pytest.fixture(scope="module")
def healthy(small_atlas_path, tmp_path_factory):
    """Six noisy healthy scans on the 2 mm atlas grid (4 train, 2 calibration), one more healthy test scan, prepared."""
    from uadct.io import read_image, write_image
    from uadct.preprocess.batch import preprocess_many
    from uadct.preprocess.config import PreprocessConfig

    root = tmp_path_factory.mktemp("calibration")
    template = read_image(small_atlas_path)
    array = sitk.GetArrayFromImage(template)
    rng = np.random.default_rng(5)
    for folder, names in (("train", [f"h{i}" for i in range(6)]), ("test", ["t0"])):
        (root / "raw" / folder).mkdir(parents=True)
        for name in names:
            noise = ndimage.gaussian_filter(rng.normal(0, 1, array.shape), 1.0) * 0.25 * array.max()
            image = sitk.GetImageFromArray(np.where(array > 0, array * rng.uniform(0.9, 1.1) + noise, 0).astype(np.float32))
            image.CopyInformation(template)
            write_image(image, root / "raw" / folder / f"{name}.nii.gz")
        config = PreprocessConfig(atlas=str(small_atlas_path), skull_strip="none", registration="none", bias_correction=False)
        outcome = preprocess_many(sorted((root / "raw" / folder).glob("*.nii.gz")), root / "prep" / folder, config)
        assert not outcome.failed, outcome.failed
    model = root / "model.pt"
    trained = runner.invoke(app, ["train", str(root / "prep" / "train"), "-o", str(model), "--model", "threshold",
                                  "-O", "mode=deviation", "--validation-patches", "256"])
    assert trained.exit_code == 0, trained.output
    return root, model


@pytest.mark.slow


def test_training_stores_the_validation_maps_quantiles(healthy):
    from uadct.checkpoint import load_checkpoint
    from uadct.preprocess.prepared import load_prepared
    from uadct.inference import score_volume

    root, model = healthy
    checkpoint = load_checkpoint(model)
    [stored] = checkpoint.metadata["calibration"]
    validation = checkpoint.metadata["training"]["validation_subjects"]
    assert stored["subjects"] == validation and len(validation) >= 1
    voxels = []
    for name in validation:  # direct computation: the maps `uadct score` makes, brain voxels pooled
        prepared = load_prepared(root / "prep" / "train" / name)
        mask = sitk.GetArrayFromImage(prepared.mask)
        voxels.append(score_volume(checkpoint, sitk.GetArrayFromImage(prepared.image), mask, device="cpu")[mask > 0])
    pooled = np.concatenate(voxels)
    assert stored["n_voxels"] == pooled.size
    np.testing.assert_allclose(stored["values"], np.quantile(pooled.astype(np.float64), stored["levels"]), rtol=1e-5, atol=1e-6)


def test_fpr_mask_flags_about_one_percent_of_a_healthy_scan(healthy, tmp_path):
    root, model = healthy
    scan = root / "raw" / "test" / "t0.nii.gz"
    result = runner.invoke(app, ["score", str(model), str(scan), "-o", str(tmp_path / "t0.nii.gz"), "--fpr", "0.01",
                                 "--mask-out", str(tmp_path / "lesions.nii.gz"), "--units", "logp",
                                 "--brain-mask-out", str(tmp_path / "brain.nii.gz")])
    assert result.exit_code == 0, result.output
    mask = sitk.ReadImage(str(tmp_path / "lesions.nii.gz"))
    raw = sitk.ReadImage(str(scan))
    assert mask.GetSize() == raw.GetSize() and mask.GetSpacing() == raw.GetSpacing() and mask.GetOrigin() == raw.GetOrigin()
    assert mask.GetDirection() == raw.GetDirection() and mask.GetPixelID() == sitk.sitkUInt8
    brain = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "brain.nii.gz"))) > 0
    flagged = sitk.GetArrayFromImage(mask) > 0
    assert not (flagged & ~brain).any()
    assert 0.003 < flagged[brain].mean() < 0.03
    sidecar = json.loads((tmp_path / "t0.json").read_text(encoding="utf-8"))
    assert sidecar["fpr"] == 0.01 and sidecar["units"] == "logp" and sidecar["threshold"] == pytest.approx(2.0, abs=0.05)
    assert sidecar["lesion_voxels"] == int(flagged.sum()) and sidecar["settings"]["fpr"] == 0.01
    logp = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "t0.nii.gz")))
    np.testing.assert_array_equal(flagged, (logp > sidecar["threshold"]) & brain)
    again = runner.invoke(app, ["score", str(model), str(scan), "-o", str(tmp_path / "t0.nii.gz"), "--fpr", "0.01",
                                "--mask-out", str(tmp_path / "lesions.nii.gz"), "--units", "logp", "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout)[0]["status"] == "skipped"
    other = runner.invoke(app, ["score", str(model), str(scan), "-o", str(tmp_path / "t0.nii.gz"), "--fpr", "0.05",
                                "--mask-out", str(tmp_path / "lesions.nii.gz"), "--units", "logp"])
    assert isinstance(other.exception, UadctError) and "--force" in str(other.exception)


@pytest.mark.slow


def test_postprocessing_needs_its_own_calibration_and_is_recorded(healthy, tmp_path):
    root, model = healthy
    scan = root / "raw" / "test" / "t0.nii.gz"
    args = ["--median-filter", "3", "--erode-mask", "4", "--min-component-size", "3", "--fpr", "0.01"]
    refused = runner.invoke(app, ["score", str(model), str(scan), "-o", str(tmp_path / "a.nii.gz"), *args,
                                  "--mask-out", str(tmp_path / "m.nii.gz")])
    assert isinstance(refused.exception, UadctError) and "uadct calibrate" in str(refused.exception)
    assert not (tmp_path / "a.nii.gz").exists() and not (tmp_path / "m.nii.gz").exists()
    calibrated = tmp_path / "calibrated.pt"
    made = runner.invoke(app, ["calibrate", str(model), str(root / "prep" / "train"), "-o", str(calibrated),
                               "--median-filter", "3", "--erode-mask", "4"])
    assert made.exit_code == 0, made.output
    plain = runner.invoke(app, ["score", str(calibrated), str(scan), "-o", str(tmp_path / "p.nii.gz")])
    scored = runner.invoke(app, ["score", str(calibrated), str(scan), "-o", str(tmp_path / "a.nii.gz"), *args,
                                 "--mask-out", str(tmp_path / "m.nii.gz")])
    assert plain.exit_code == 0 and scored.exit_code == 0, scored.output
    sidecar = json.loads((tmp_path / "a.json").read_text(encoding="utf-8"))
    assert sidecar["postprocess"] == {"median_filter": 3, "erode_mask_mm": 4.0, "min_component_size": 3}
    assert sidecar["settings"]["postprocess"] == sidecar["postprocess"]
    smoothed = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "a.nii.gz")))
    original = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "p.nii.gz")))
    assert np.count_nonzero(smoothed) < np.count_nonzero(original)  # eroded brain
    assert smoothed[smoothed > 0].std() < original[original > 0].std()  # median-filtered
    flagged = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "m.nii.gz"))) > 0
    labels, count = ndimage.label(flagged, structure=np.ones((3, 3, 3)))
    assert count == 0 or np.bincount(labels.ravel())[1:].min() >= 3
