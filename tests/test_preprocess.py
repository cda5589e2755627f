"""Skull-stripping, registration and the preprocessing chain on real anatomy (SRI24)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from uadct.errors import PreprocessError
from uadct.io import read_image, same_grid, write_image
from uadct.preprocess.intensity import normalize_intensity
from uadct.preprocess.tissue import tissue_statistics
from uadct.preprocess.masks import binarize_and_open
from uadct.preprocess.chain import preprocess_file
from uadct.preprocess.config import PreprocessConfig
from uadct.preprocess.prepared import load_prepared
from uadct.preprocess.register import mean_displacement_mm, register_to_atlas
from uadct.preprocess.skullstrip import extract_brain_mask


def _known_affine() -> sitk.AffineTransform:
    rotation = sitk.Euler3DTransform()
    rotation.SetRotation(0.12, -0.06, 0.09)
    matrix = np.array(rotation.GetMatrix()).reshape(3, 3) @ np.diag([1.04, 0.96, 1.03])
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(matrix.ravel().tolist())
    transform.SetTranslation((7.0, -6.0, 5.0))
    transform.SetCenter((120.0, -120.0, 77.0))
    return transform


def _brain_points(atlas, step: int = 400) -> np.ndarray:
    index = np.argwhere(sitk.GetArrayViewFromImage(atlas.mask))[::step][:, ::-1]
    return np.array([atlas.brain.TransformIndexToPhysicalPoint([int(i) for i in p]) for p in index])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sitk", "elastix"])
def test_registration_recovers_a_known_affine_within_1mm(atlas, backend):
    true_atlas_to_subject = _known_affine()
    subject = sitk.Resample(atlas.brain, atlas.brain, true_atlas_to_subject.GetInverse(), sitk.sitkLinear, 0.0)
    # the subject lives on its own (oblique content, LPS->RAS stored) grid
    subject = sitk.DICOMOrient(subject, "RAS")
    registration = register_to_atlas(subject, atlas.brain, "affine", backend=backend)
    if backend == "sitk":
        assert "(Registration \"SimpleITK ImageRegistrationMethod\")" in registration.parameter_text
        assert "(Transform \"AffineTransform\")" in registration.parameter_text
    error = mean_displacement_mm(registration.atlas_to_subject, true_atlas_to_subject, _brain_points(atlas))
    assert error < 1.0, f"mean displacement error {error:.2f} mm"


@pytest.mark.slow


def test_elastix_transform_matches_transformix(atlas):
    """Our SimpleITK copy of elastix's transform resamples like transformix itself."""
    import itk

    from uadct.preprocess.register import _parameter_map, elastix_to_sitk, sitk_to_itk

    small = sitk.Shrink(atlas.brain, [2, 2, 2])
    moving = sitk.Resample(small, small, _known_affine(), sitk.sitkLinear, 0.0)
    fixed_itk, moving_itk = sitk_to_itk(small), sitk_to_itk(moving)
    _, parameters = itk.elastix_registration_method(fixed_itk, moving_itk, parameter_object=_parameter_map("affine", 2, 100, 2048), log_to_console=False)
    parameters.SetParameter(0, "ResampleInterpolator", "FinalLinearInterpolator")
    transformix = np.asarray(itk.transformix_filter(moving_itk, parameters))
    ours = sitk.GetArrayFromImage(sitk.Resample(moving, small, elastix_to_sitk(parameters), sitk.sitkLinear, 0.0))
    inside = sitk.GetArrayViewFromImage(sitk.Shrink(atlas.mask, [2, 2, 2])) > 0
    scale = np.abs(transformix[inside]).mean()
    assert np.abs(transformix[inside] - ours[inside]).mean() < 0.01 * scale


@pytest.mark.parametrize("backend", ["sitk", pytest.param("elastix", marks=pytest.mark.slow)])  # elastix: ~12 s of ITK loading
def test_rigid_and_none_registrations(atlas, backend):
    small = sitk.Shrink(atlas.brain, [2, 2, 2])
    assert register_to_atlas(small, small, "none", backend=backend).atlas_to_subject.GetMatrix() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    shifted = sitk.Resample(small, small, sitk.TranslationTransform(3, (4.0, -3.0, 2.0)), sitk.sitkLinear, 0.0)
    rigid = register_to_atlas(shifted, small, "rigid", backend=backend)
    np.testing.assert_allclose(rigid.atlas_to_subject.TransformPoint((120.0, -120.0, 70.0)), (116.0, -117.0, 68.0), atol=1.0)
    # a rigid result has no scale or shear
    np.testing.assert_allclose(np.linalg.svd(np.reshape(rigid.atlas_to_subject.GetMatrix(), (3, 3)), compute_uv=False), 1.0, atol=1e-6)
    with pytest.raises(PreprocessError, match="unknown registration"):
        register_to_atlas(small, small, "bspline", backend=backend)
    with pytest.raises(PreprocessError, match="unknown registration backend 'ants'"):
        register_to_atlas(small, small, "affine", backend="ants")


def test_sitk_registration_is_the_same_whatever_the_global_thread_count(small_atlas_path):
    """The sitk backend runs on one thread of its own: a rebuild gives the same transform on any machine."""
    atlas_brain = read_image(small_atlas_path)
    moving = sitk.Resample(atlas_brain, atlas_brain, _known_affine(), sitk.sitkLinear, 0.0)
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    results = []
    try:
        for threads in (1, 2):
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
            registration = register_to_atlas(moving, atlas_brain, "affine", backend="sitk")
            results.append(registration.atlas_to_subject.GetParameters() + registration.atlas_to_subject.GetCenter())
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)
    assert results[0] == results[1]


def test_registration_backend_is_recorded_and_old_records_mean_elastix():
    from uadct.errors import InputError

    assert PreprocessConfig().registration_backend == "sitk"
    assert PreprocessConfig.for_modality("mr", registration_backend="elastix").registration_backend == "elastix"
    old = PreprocessConfig().to_dict()
    del old["registration_backend"]
    assert PreprocessConfig.from_dict(old).registration_backend == "elastix"
    assert PreprocessConfig.from_dict(PreprocessConfig().to_dict()) == PreprocessConfig()
    with pytest.raises(InputError, match="unknown registration backend 'ants'"):
        PreprocessConfig.for_modality("mr", registration_backend="ants")


@pytest.mark.slow


def test_deepbet_mask_matches_atlas_brain_in_any_orientation(atlas):
    head = sitk.Shrink(atlas.head, [1, 1, 1])
    reference = sitk.GetArrayViewFromImage(atlas.mask) > 0
    for orientation in ("LPS", "RAS", "PIR"):
        oriented = sitk.DICOMOrient(head, orientation)
        mask = extract_brain_mask(oriented, "deepbet")
        assert same_grid(mask, oriented)
        back = sitk.GetArrayFromImage(sitk.Resample(mask, atlas.brain, sitk.Transform(), sitk.sitkNearestNeighbor)) > 0
        dice = 2 * np.count_nonzero(back & reference) / (back.sum() + reference.sum())
        assert dice > 0.9, f"{orientation}: Dice {dice:.3f}"


def test_mask_binarise_and_open_removes_specks():
    array = np.zeros((30, 30, 30), np.float32)
    array[5:25, 5:25, 5:25] = 0.8
    array[2, 2, 2] = 1.0  # a speck: gone after opening
    array[10, 10, 10] = 0.3  # below 0.5 inside: a hole, not foreground
    mask = sitk.GetArrayFromImage(binarize_and_open(sitk.GetImageFromArray(array)))
    assert mask[2, 2, 2] == 0 and mask[15, 15, 15] == 1 and mask[10, 10, 10] == 0


def test_percentile_normalisation_maps_5th_and_95th_to_0_and_1(rng):
    array = rng.normal(100, 20, size=(20, 20, 20)).astype(np.float32)
    mask = np.zeros_like(array, dtype=np.uint8)
    mask[2:18, 2:18, 2:18] = 1
    normalized, stats = normalize_intensity(array, mask)
    inside = normalized[mask > 0]
    assert np.percentile(inside, 5) == pytest.approx(0.0, abs=1e-5)
    assert np.percentile(inside, 95) == pytest.approx(1.0, abs=1e-5)
    assert not normalized[mask == 0].any()
    z, _ = normalize_intensity(array, mask, "zscore")
    assert z[mask > 0].mean() == pytest.approx(0.0, abs=1e-4) and z[mask > 0].std() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow


def test_preprocess_file_writes_a_complete_folder_and_resumes(small_cohort, small_atlas_path, tmp_path):
    scan = small_cohort.healthy[0]
    config = PreprocessConfig(atlas=str(small_atlas_path))
    folder, skipped = preprocess_file(scan, tmp_path, config)
    assert not skipped
    assert sorted(p.name for p in folder.iterdir()) == [
        "atlas_to_subject.tfm", "elastix_transform.txt", "image.nii.gz", "mask.nii.gz", "preprocess.json",
        "subject_to_atlas.tfm"]
    sidecar = json.loads((folder / "preprocess.json").read_text(encoding="utf-8"))
    assert sidecar["config"] == config.to_dict()
    assert sidecar["quality"]["mask_dice"] > 0.8
    assert set(sidecar["timings_s"]) >= {"skull_strip", "registration", "normalization"}
    prepared = load_prepared(folder)
    template = read_image(small_atlas_path)
    assert same_grid(prepared.image, template) and same_grid(prepared.mask, template)
    inside = sitk.GetArrayFromImage(prepared.image)[sitk.GetArrayFromImage(prepared.mask) > 0]
    # the default normalisation (since the lesion-robust chain): the tissue peak -> 1, zero stays 0
    assert (config.normalization, config.bias_correction_method) == ("tissue", "robust")
    assert tissue_statistics(inside, np.ones(inside.shape))["tissue_median"] == pytest.approx(0.5, abs=0.02)
    assert sidecar["normalization_stats"]["tissue_sd"] > 0
    # same parameters, same input: skipped; no temporary folders are left behind
    assert preprocess_file(scan, tmp_path, config)[1] is True
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]


@pytest.mark.slow


def test_preprocess_errors_name_the_file_and_leave_nothing(tmp_path, small_atlas_path):
    blank = sitk.Image([40, 40, 40], sitk.sitkFloat32)
    blank[20, 20, 20] = 1.0
    write_image(blank, tmp_path / "speck.nii.gz")
    with pytest.raises(PreprocessError, match="speck.nii.gz"):
        preprocess_file(tmp_path / "speck.nii.gz", tmp_path / "out", PreprocessConfig(atlas=str(small_atlas_path)))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cli_records_the_registration_backend_and_refuses_an_unknown_one(small_atlas_path, tmp_path):
    from typer.testing import CliRunner

    from uadct.cli import app

    template = read_image(small_atlas_path)
    moved = sitk.Resample(template, template, sitk.TranslationTransform(3, (3.0, -2.0, 1.0)), sitk.sitkLinear, 0.0)
    (tmp_path / "raw").mkdir()
    write_image(moved, tmp_path / "raw" / "sub-01.nii.gz")
    fast = ["--atlas", str(small_atlas_path), "--skull-strip", "none", "--no-bias-correction"]
    result = CliRunner().invoke(app, ["preprocess", str(tmp_path / "raw"), "-o", str(tmp_path / "prep"), *fast])
    assert result.exit_code == 0, result.output
    sidecar = json.loads((tmp_path / "prep" / "sub-01" / "preprocess.json").read_text(encoding="utf-8"))
    assert sidecar["config"]["registration_backend"] == "sitk" and sidecar["quality"]["mask_dice"] > 0.9
    assert "SimpleITK ImageRegistrationMethod" in (tmp_path / "prep" / "sub-01" / "elastix_transform.txt").read_text(encoding="utf-8")
    bad = CliRunner().invoke(app, ["preprocess", str(tmp_path / "raw"), "-o", str(tmp_path / "bad"), *fast, "--registration-backend", "ants"])
    assert bad.exit_code != 0 and "unknown registration backend 'ants'" in str(bad.exception) + bad.output
    assert not (tmp_path / "bad" / "sub-01").exists()
