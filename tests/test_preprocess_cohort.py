"""Cohort-scale preprocessing: several sequences, stored transforms, BIDS in and out, diverged registrations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from uadct.cli import app
from uadct.errors import InputError, PreprocessError
from uadct.io import read_image, same_grid, write_image
from uadct.preprocess.bids import SubjectInputs
from uadct.preprocess.batch import preprocess_many
from uadct.preprocess.chain import check_transform, preprocess_subject
from uadct.preprocess.config import PreprocessConfig
from uadct.preprocess.prepared import find_prepared, load_prepared
from uadct.preprocess.tissue import tissue_statistics

runner = CliRunner()
FAST = dict(skull_strip="none", registration="none", bias_correction=False)


def _true_atlas_to_subject() -> sitk.AffineTransform:
    rotation = sitk.Euler3DTransform()
    rotation.SetRotation(0.10, -0.05, 0.08)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix((np.array(rotation.GetMatrix()).reshape(3, 3) @ np.diag([1.05, 0.97, 1.02])).ravel().tolist())
    transform.SetTranslation((6.0, -5.0, 4.0))
    transform.SetCenter((120.0, -120.0, 77.0))
    return transform


def _grid(like: sitk.Image, spacing: float, shift_mm: float, orientation: str) -> sitk.Image:
    size = [int(round(s * sp / spacing)) for s, sp in zip(like.GetSize(), like.GetSpacing())]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing((spacing,) * 3)
    grid.SetOrigin(tuple(o + shift_mm for o in like.GetOrigin()))
    grid.SetDirection(like.GetDirection())
    return sitk.DICOMOrient(grid, orientation)


@pytest.fixture(scope="module")
def two_sequences(small_atlas_path, tmp_path_factory):
    """One subject's T1w (native grid: moved by a known affine, stored RAS) and a FLAIR-like scan.

    The FLAIR is the same anatomy with inverted contrast (1000 - 3 T1 inside the brain), on
    a 2.4 mm grid shifted by 3 mm: aligned prepared images correlate at -1.
    """
    template = read_image(small_atlas_path)
    truth = _true_atlas_to_subject()
    native_grid = _grid(template, 2.0, 0.0, "RAS")
    t1 = sitk.Resample(template, native_grid, truth.GetInverse(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    flair_grid = _grid(template, 2.4, 3.0, "LPS")
    t1_there = sitk.GetArrayFromImage(sitk.Resample(t1, flair_grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    flair = sitk.GetImageFromArray(np.where(t1_there > 0, 1000.0 - 3.0 * t1_there, 0.0).astype(np.float32))
    flair.CopyInformation(flair_grid)
    folder = tmp_path_factory.mktemp("sequences")
    write_image(t1, folder / "raw" / "subj_T1w.nii.gz")
    write_image(flair, folder / "raw" / "subj_FLAIR.nii.gz")
    # no N4: fitted on each sequence alone, it removes different fields from the two contrasts
    config = PreprocessConfig(atlas=str(small_atlas_path), skull_strip="none", registration="affine",
                              bias_correction=False, sequences=("T1w", "FLAIR"), reference="T1w")
    inputs = SubjectInputs("subj", {"T1w": folder / "raw" / "subj_T1w.nii.gz", "FLAIR": folder / "raw" / "subj_FLAIR.nii.gz"},
                           "T1w", Path("subj"))
    prepared, skipped = preprocess_subject(inputs, folder / "prep", config)
    assert not skipped
    return prepared, t1, template, config, inputs


def test_sequences_end_on_the_atlas_grid_aligned_with_each_other(two_sequences):
    folder, _, template, config, inputs = two_sequences
    t1 = load_prepared(folder)
    flair = load_prepared(folder, sequence="FLAIR")
    assert (t1.sequence, flair.sequence, t1.sequences) == ("T1w", "FLAIR", ["T1w", "FLAIR"])
    assert same_grid(t1.image, template) and same_grid(flair.image, template)
    inside = sitk.GetArrayFromImage(t1.mask) > 0
    a, b = sitk.GetArrayFromImage(t1.image)[inside], sitk.GetArrayFromImage(flair.image)[inside]
    assert np.corrcoef(a, b)[0, 1] < -0.97  # the same anatomy at the same voxels, contrast inverted
    shifted = np.roll(sitk.GetArrayFromImage(flair.image), 3, axis=2)[inside]
    assert np.corrcoef(a, shifted)[0, 1] > -0.6  # 3 voxels (6 mm) off is far worse
    for image in (a, b):  # each sequence normalised on its own: normal-tissue median -> 0.5 (the default normalisation)
        assert tissue_statistics(image, np.ones(image.shape))["tissue_median"] == pytest.approx(0.5, abs=0.02)
    sidecar = json.loads((folder / "preprocess.json").read_text(encoding="utf-8"))
    assert sidecar["warnings"] == ["FLAIR resampled onto the reference's grid"]
    assert set(sidecar["inputs"]) == {"T1w", "FLAIR"} and set(sidecar["sequence_normalization_stats"]) == {"FLAIR"}
    assert sorted(p.name for p in folder.iterdir()) == [
        "atlas_to_subject.tfm", "elastix_transform.txt", "image-FLAIR.nii.gz", "image.nii.gz", "mask.nii.gz",
        "preprocess.json", "subject_to_atlas.tfm"]
    with pytest.raises(InputError, match="T2w.*T1w, FLAIR"):
        load_prepared(folder, sequence="T2w")
    assert preprocess_subject(inputs, folder.parent, config)[1] is True  # resumed by checksums of both inputs


def test_stored_transforms_are_inverse_and_map_back_onto_the_native_brain(two_sequences):
    folder, native_t1, _, _, _ = two_sequences
    forward = sitk.ReadTransform(str(folder / "subject_to_atlas.tfm"))
    inverse = sitk.ReadTransform(str(folder / "atlas_to_subject.tfm"))
    sidecar = json.loads((folder / "preprocess.json").read_text(encoding="utf-8"))
    assert sidecar["transforms"]["subject_to_atlas"]["file"] == "subject_to_atlas.tfm"
    native_mask = sitk.GetArrayViewFromImage(native_t1) > 0
    index = np.argwhere(native_mask)[::97][:, ::-1]
    points = [native_t1.TransformIndexToPhysicalPoint([int(i) for i in p]) for p in index]
    for point in points:
        np.testing.assert_allclose(inverse.TransformPoint(forward.TransformPoint(point)), point, atol=1e-6)
    # the prepared image taken back to the native grid with the stored transform lies on the native brain
    prepared = load_prepared(folder)
    back = sitk.Resample(prepared.image, native_t1, forward, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    back_mask = sitk.GetArrayFromImage(sitk.Resample(prepared.mask, native_t1, forward, sitk.sitkNearestNeighbor)) > 0
    dice = 2 * np.count_nonzero(back_mask & native_mask) / (back_mask.sum() + native_mask.sum())
    assert dice > 0.9, dice
    both = back_mask & native_mask
    assert np.corrcoef(sitk.GetArrayFromImage(back)[both], sitk.GetArrayViewFromImage(native_t1)[both])[0, 1] > 0.9
    # and the registration found the true transform (mean error under 2 mm at 2 mm voxels)
    truth = _true_atlas_to_subject()
    atlas_points = [forward.TransformPoint(p) for p in points]
    error = np.mean([np.linalg.norm(np.subtract(truth.TransformPoint(q), p)) for q, p in zip(atlas_points, points)])
    assert error < 2.0, error


def _bids_dataset(root: Path, template: sitk.Image) -> None:
    array = sitk.GetArrayFromImage(template)
    (root / "dataset_description.json").parent.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "toy", "BIDSVersion": "1.9.0"}))
    scans = {"sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz": 1.0, "sub-01/ses-1/anat/sub-01_ses-1_FLAIR.nii.gz": -1.0,
             "sub-02/anat/sub-02_T1w.nii.gz": 1.2, "sub-03/anat/sub-03_T1w.nii.gz": 1.4,
             "sub-03/anat/sub-03_FLAIR.nii.gz": -1.0}
    for name, factor in scans.items():
        values = array * factor + (2000.0 if factor < 0 else 0.0) * (array > 0)
        image = sitk.GetImageFromArray(values.astype(np.float32))
        image.CopyInformation(template)
        write_image(image, root / name)


@pytest.mark.slow


def test_bids_in_bids_derivative_out(small_atlas_path, tmp_path):
    template = read_image(small_atlas_path)
    _bids_dataset(tmp_path / "bids", template)
    result = runner.invoke(app, ["preprocess", str(tmp_path / "bids"), "-o", str(tmp_path / "deriv"), "--atlas", "sri24",
                                 "--skull-strip", "none", "--registration", "none", "--no-bias-correction",
                                 "--sequences", "T1w,FLAIR", "--participant-label", "01 02", "--json"])
    assert result.exit_code == 1, result.output  # sub-02 has no FLAIR: it fails alone
    summary = json.loads(result.output)
    assert [(row["subject"], row["status"]) for row in summary["subjects"]] == [("sub-01_ses-1", "done"), ("sub-02", "failed")]
    assert "no FLAIR scan" in summary["subjects"][1]["error"]
    deriv = tmp_path / "deriv"
    description = json.loads((deriv / "dataset_description.json").read_text(encoding="utf-8"))
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "uadct"
    anat = deriv / "sub-01" / "ses-1" / "anat"
    assert sorted(p.name for p in anat.iterdir()) == [
        "preprocess.json",
        "sub-01_ses-1_from-SRI24_to-T1w_mode-points_xfm.txt",
        "sub-01_ses-1_from-T1w_to-SRI24_desc-elastix_xfm.txt",
        "sub-01_ses-1_from-T1w_to-SRI24_mode-points_xfm.txt",
        "sub-01_ses-1_space-SRI24_desc-brain_mask.nii.gz",
        "sub-01_ses-1_space-SRI24_desc-preproc_FLAIR.nii.gz",
        "sub-01_ses-1_space-SRI24_desc-preproc_T1w.nii.gz",
    ]
    assert not (deriv / "sub-02").exists() and not (deriv / "sub-03").exists()
    assert find_prepared(deriv) == [anat]
    prepared = load_prepared(anat, sequence="FLAIR")
    assert prepared.subject == "sub-01_ses-1" and same_grid(prepared.image, read_image(anat / prepared.sidecar["files"]["mask"]))
    assert list(deriv.glob("**/.*tmp")) == []
    # `uadct score model.pt deriv/ -o maps/` finds the BIDS subjects and names maps after them
    from uadct.commands._inputs import collect_score_inputs
    from uadct.inference import subject_name as _subject_name

    assert collect_score_inputs([str(deriv)]) == [anat] and _subject_name(anat) == "sub-01_ses-1"


def test_bids_participant_that_does_not_exist_is_an_input_error(small_atlas_path, tmp_path):
    from uadct.preprocess.bids import find_bids_subjects

    _bids_dataset(tmp_path / "bids", read_image(small_atlas_path))
    with pytest.raises(InputError, match="participant.*07"):
        find_bids_subjects(tmp_path / "bids", ["T1w"], participants=["sub-07"])
    subjects = find_bids_subjects(tmp_path / "bids")
    assert [(s.subject, str(s.folder), s.problem) for s in subjects] == [
        ("sub-01_ses-1", "sub-01/ses-1/anat", None), ("sub-02", "sub-02/anat", None), ("sub-03", "sub-03/anat", None)]
    # two runs of one session would share its output folder: both fail alone, with the reason
    second = tmp_path / "bids" / "sub-02" / "anat" / "sub-02_run-2_T1w.nii.gz"
    second.write_bytes((tmp_path / "bids" / "sub-02" / "anat" / "sub-02_T1w.nii.gz").read_bytes())
    clash = [s for s in find_bids_subjects(tmp_path / "bids") if s.folder == Path("sub-02/anat")]
    assert [s.subject for s in clash] == ["sub-02", "sub-02_run-2"]
    assert all("2 T1w scans for sub-02" in s.problem for s in clash)
    with pytest.raises(InputError, match="keep one per session"):
        preprocess_subject(clash[1], tmp_path / "out", PreprocessConfig(atlas=str(small_atlas_path), **FAST))


def test_find_prepared_reads_both_layouts(atlas_grid_subjects, tmp_path):
    _, prep = atlas_grid_subjects(tmp_path, ["a", "b"])
    assert [p.name for p in find_prepared(prep)] == ["a", "b"]


def test_diverged_registrations_fail_alone_and_write_nothing(small_atlas_path, tmp_path):
    template = read_image(small_atlas_path)
    array = sitk.GetArrayFromImage(template)
    raw = tmp_path / "raw"
    good = sitk.GetImageFromArray(array)
    good.CopyInformation(template)
    write_image(good, raw / "good.nii.gz")
    shifted = sitk.GetImageFromArray(np.roll(array, 30, axis=2))  # 6 cm to the side, "already on the atlas grid"
    shifted.CopyInformation(template)
    write_image(shifted, raw / "shifted.nii.gz")
    config = PreprocessConfig(atlas=str(small_atlas_path), **FAST)
    outcome = preprocess_many(sorted(raw.glob("*.nii.gz")), tmp_path / "prep", config)
    assert [p.name for p in outcome.done] == ["good"]
    assert len(outcome.failed) == 1 and "registration diverged: Dice" in outcome.failed[0][1]
    assert "shifted.nii.gz" in outcome.failed[0][1] and "\n" not in outcome.failed[0][1]
    assert sorted(p.name for p in (tmp_path / "prep").iterdir()) == ["good"]


def test_affine_registration_of_a_mostly_empty_image_is_refused(small_atlas_path, tmp_path, rng):
    """A 6.4 cm cube of noise (~260 ml): elastix must stretch it far beyond any head, or miss the brain."""
    template = read_image(small_atlas_path)
    array = np.zeros(sitk.GetArrayViewFromImage(template).shape, np.float32)
    centre = np.array(array.shape) // 2
    array[tuple(slice(c - 16, c + 16) for c in centre)] = rng.uniform(50, 100, size=(32, 32, 32))
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(template)
    write_image(image, tmp_path / "cube.nii.gz")
    config = PreprocessConfig(atlas=str(small_atlas_path), skull_strip="none", registration="affine", bias_correction=False)
    outcome = preprocess_many([tmp_path / "cube.nii.gz"], tmp_path / "prep", config)
    assert len(outcome.failed) == 1 and "registration diverged" in outcome.failed[0][1], outcome.failed
    assert not (tmp_path / "prep" / "cube").exists()


def test_check_transform_refuses_extreme_scales_and_nan():
    transform = sitk.AffineTransform(3)
    check_transform(transform)
    transform.SetMatrix((2.5, 0, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(PreprocessError, match=r"scales by 1.00..2.50"):
        check_transform(transform)
    transform.SetMatrix((1, 0, 0, 0, 1, 0, 0, 0, 1))
    transform.SetTranslation((float("nan"), 0.0, 0.0))
    with pytest.raises(PreprocessError, match="not finite"):
        check_transform(transform)


def test_cli_summary_lists_every_subject_with_status_and_warnings(small_atlas_path, tmp_path):
    template = read_image(small_atlas_path)
    array = sitk.GetArrayFromImage(template)
    for name, values in (("ok", array), ("moved", np.roll(array, 10, axis=2)), ("off", np.roll(array, 30, axis=2))):
        image = sitk.GetImageFromArray(values)
        image.CopyInformation(template)
        write_image(image, tmp_path / "raw" / f"{name}.nii.gz")
    result = runner.invoke(app, ["preprocess", str(tmp_path / "raw"), "-o", str(tmp_path / "prep"), "--atlas",
                                 str(small_atlas_path), "--skull-strip", "none", "--registration", "none",
                                 "--no-bias-correction"], terminal_width=200)
    assert result.exit_code == 1
    lines = {line.split()[1]: line for line in result.output.splitlines() if line.startswith("│ ") and line.split()[1] in ("ok", "moved", "off")}
    assert "done" in lines["ok"] and "poor registration" not in lines["ok"]
    assert "done" in lines["moved"] and "poor registration" in lines["moved"]
    assert "failed" in lines["off"] and "registration diverged" in lines["off"]


def test_plain_files_grouped_by_sequence(tmp_path):
    from uadct.preprocess.bids import group_by_sequence, parse_sequences

    names = ["a_T1w", "a_FLAIR", "b_ses-1_T1w", "c_FLAIR", "d_T2w"]
    paths = [tmp_path / f"{name}.nii.gz" for name in names]
    subjects = group_by_sequence(paths, parse_sequences("T1w,FLAIR"), "T1w")
    assert [(s.subject, list(s.images), s.missing) for s in subjects] == [
        ("a", ["T1w", "FLAIR"], []), ("b_ses-1", ["T1w"], ["FLAIR"]), ("c", ["FLAIR"], ["T1w"])]
    with pytest.raises(InputError, match="^c: no T1w scan for subject c$"):
        preprocess_subject(subjects[2], tmp_path / "out")
    with pytest.raises(InputError, match="--reference 'T2w'"):
        group_by_sequence(paths, ["T1w", "FLAIR"], "T2w")
    with pytest.raises(InputError, match="not a sequence name"):
        parse_sequences("T1w,FLAIR-2")
