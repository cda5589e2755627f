"""Normative model: voxel statistics against numpy, checkpoint round trip, patch path = volume path, CLI chain."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from uadct.checkpoint import load_checkpoint, save_checkpoint
from uadct.errors import UadctError
from uadct.io import read_image, write_image
from uadct.models import build_model
from uadct.patches import PatchSpec, extract_patches, grid_starts, patch_centres

SHAPE = (10, 12, 14)


def _cohort(rng: np.random.Generator, n: int = 5) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Volumes with a spatial pattern plus subject noise; each mask leaves out a random corner."""
    base = np.linspace(0.2, 1.0, int(np.prod(SHAPE)), dtype=np.float32).reshape(SHAPE)
    images, masks = [], []
    for _ in range(n):
        images.append((base + rng.normal(0, 0.1, SHAPE)).astype(np.float32))
        mask = np.ones(SHAPE, np.uint8)
        mask[: rng.integers(1, 4), : rng.integers(1, 4)] = 0
        masks.append(mask)
    return images, masks


def _raw_model(**options) -> torch.nn.Module:
    return build_model("normative", {"patch_size": 4, "smooth": 0.0, "scale_smooth": 0.0, "scale_floor": 0.0,
                                     "min_subjects": 1, "map_smooth": 0.0, **options}).eval()


def test_statistics_match_a_direct_numpy_computation(rng):
    images, masks = _cohort(rng)
    model = _raw_model()
    model.fit_volumes(images, masks)
    location, scale = model.statistics_on_grid()
    stack = np.stack(images).astype(np.float64)
    stack[np.stack(masks) == 0] = np.nan
    with pytest.warns(RuntimeWarning):  # all-NaN voxels
        median = np.nanmedian(stack, axis=0)
        mad = np.nanmedian(np.abs(stack - median), axis=0) * 1.4826
    covered = np.isfinite(median)
    assert (~covered).any() and covered.any()
    np.testing.assert_allclose(location[covered], median[covered], rtol=2e-3, atol=1e-3)  # float16 storage
    np.testing.assert_allclose(scale[covered], np.maximum(mad, 1e-3)[covered], rtol=2e-3, atol=1e-3)
    brain = np.concatenate([i[m > 0] for i, m in zip(images, masks)]).astype(np.float64)
    assert float(model.global_location) == pytest.approx(np.median(brain), rel=1e-6)
    np.testing.assert_allclose(location[~covered], np.median(brain), rtol=2e-3)  # no subject there: global values
    assert int(model.subjects) == 5


def test_smoothing_floor_and_tails(rng):
    images, masks = _cohort(rng)
    smooth = build_model("normative", {"patch_size": 4, "scale_floor": 0.9, "recentre": False}).eval()
    smooth.fit_volumes(images, masks)
    location, scale = smooth.statistics_on_grid()
    raw = _raw_model()
    raw.fit_volumes(images, masks)
    raw_location, raw_scale = raw.statistics_on_grid()
    inner = (slice(3, -3),) * 3
    assert np.abs(np.diff(location[inner], axis=2)).mean() < np.abs(np.diff(raw_location[inner], axis=2)).mean()
    assert scale.min() >= 0.9 * np.median(scale) * (1 - 2e-3)  # the floor holds
    test, brain = images[0] + 0.0, np.ones(SHAPE, np.uint8)
    test[5, 6, 7] += 3.0
    test[2, 3, 4] -= 3.0
    maps = {}
    for tail in ("both", "upper", "lower"):
        model = _raw_model(tail=tail, recentre=False)
        model.fit_volumes(images, masks)
        maps[tail] = model.score_volume(test, brain)
    z = (test - raw_location) / raw_scale
    np.testing.assert_allclose(maps["both"], np.abs(z), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(maps["upper"], np.maximum(z, 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(maps["lower"], np.maximum(-z, 0), rtol=1e-5, atol=1e-5)
    assert maps["upper"][5, 6, 7] > 5 and maps["upper"][2, 3, 4] == 0 and maps["lower"][2, 3, 4] > 5


def test_default_map_is_the_raw_map_smoothed_inside_the_brain(rng):
    """map_smooth defaults to 1 voxel: the map is the unsmoothed one, smoothed by normalised convolution in the brain."""
    from uadct.models.normative import masked_smooth

    images, masks = _cohort(rng)
    brain = np.zeros(SHAPE, bool)
    brain[1:-1, 1:-1, 1:-1] = True
    smoothed = build_model("normative", {"patch_size": 4, "smooth": 0.0, "scale_smooth": 0.0, "scale_floor": 0.0,
                                         "min_subjects": 1}).eval()
    assert smoothed.config.map_smooth == 1.0
    raw = _raw_model()
    for model in (smoothed, raw):
        model.fit_volumes(images, masks)
    test = images[1] + 0.0
    test[5, 6, 7] += 3.0
    expected = masked_smooth(raw.score_volume(test, brain), brain, 1.0, fill=0.0)
    expected[~brain] = 0.0
    np.testing.assert_allclose(smoothed.score_volume(test, brain), expected, rtol=1e-5, atol=1e-5)


def test_recentre_removes_a_global_offset(rng):
    images, masks = _cohort(rng)
    model = _raw_model()
    model.fit_volumes(images, masks)
    brain = np.ones(SHAPE, np.uint8)
    np.testing.assert_allclose(model.score_volume(images[0] + 0.5, brain), model.score_volume(images[0], brain), atol=2e-3)


def test_checkpoint_round_trip_gives_identical_scores_and_stays_small(rng, tmp_path):
    images, masks = _cohort(rng)
    model = build_model("normative", {"patch_size": 4, "blend": 0.3}).eval()
    model.fit_volumes(images, masks)
    save_checkpoint(tmp_path / "n.pt", model, {"patch": {"size": 4, "dims": 2}})
    loaded = load_checkpoint(tmp_path / "n.pt").model
    assert loaded.location.dtype == torch.float16 and loaded.location.shape == model.location.shape
    brain = (masks[1] > 0).astype(np.uint8)
    np.testing.assert_array_equal(loaded.score_volume(images[1], brain), model.score_volume(images[1], brain))
    assert (tmp_path / "n.pt").stat().st_size < 2 * 4 * np.prod(SHAPE) + 50_000


def test_patch_path_equals_the_volume_path(rng):
    images, masks = _cohort(rng)
    model = _raw_model(recentre=False, blend=0.2)
    model.fit_volumes(images, masks)
    test, brain = images[2], np.ones(SHAPE, np.uint8)
    full = model.score_volume(test, brain)
    for spec in (PatchSpec(4, 2), PatchSpec(4, 3)):
        starts = grid_starts(brain, spec, 2)
        patches = torch.from_numpy(extract_patches(test, starts, spec)).unsqueeze(1)
        centres = torch.from_numpy(patch_centres(starts, spec, SHAPE))
        with torch.no_grad():
            voxel = model.score_patches(patches, positions=centres)["voxel"].numpy()
        for start, values in zip(starts, voxel):
            box = tuple(slice(int(a), int(a) + n) for a, n in zip(start, spec.shape))
            np.testing.assert_allclose(values.reshape(spec.shape), full[box], rtol=1e-5, atol=1e-5)


def test_bad_settings_and_unfitted_use_are_refused(rng):
    with pytest.raises(UadctError, match="unknown tail 'left'"):
        build_model("normative", {"tail": "left"})
    with pytest.raises(UadctError, match="position_conditioning must stay on"):
        build_model("normative", {"position_conditioning": False})
    with pytest.raises(UadctError, match="not fitted"):
        build_model("normative", {}).score_volume(np.zeros(SHAPE, np.float32), np.ones(SHAPE))
    model = _raw_model()
    model.fit_volumes(*_cohort(rng))
    with pytest.raises(UadctError, match="not on the training atlas grid"):
        model.score_volume(np.zeros((3, 3, 3), np.float32), np.ones((3, 3, 3)))


@pytest.mark.slow


def test_cli_train_and_score_a_raw_scan_on_its_own_grid(atlas_grid_subjects, tmp_path):
    from typer.testing import CliRunner

    from uadct.cli import app

    raw, prep = atlas_grid_subjects(tmp_path, [f"sub-{i:02d}" for i in range(4)], contrast_step=0.02)
    runner = CliRunner()
    trained = runner.invoke(app, ["train", str(prep), "-o", str(tmp_path / "n.pt"), "--model", "normative",
                                  "--device", "cpu", "-O", "tail=upper"])
    assert trained.exit_code == 0, trained.output
    checkpoint = load_checkpoint(tmp_path / "n.pt")
    assert checkpoint.metadata["model"] == "normative" and checkpoint.metadata["model_config"]["tail"] == "upper"
    assert bool(checkpoint.model.fitted) and checkpoint.metadata.get("score_scale") is not None
    assert (tmp_path / "n.pt").stat().st_size < 3_000_000
    source = read_image(raw / "sub-00.nii.gz")
    array = sitk.GetArrayFromImage(source)
    lesioned = array.copy()
    z, y, x = (np.array(np.nonzero(array > 0)).mean(axis=1)).astype(int)
    lesioned[z - 2 : z + 2, y - 3 : y + 3, x - 3 : x + 3] *= 1.8
    image = sitk.GetImageFromArray(lesioned)
    image.CopyInformation(source)
    write_image(image, tmp_path / "lesioned.nii.gz")
    scored = runner.invoke(app, ["score", str(tmp_path / "n.pt"), str(tmp_path / "lesioned.nii.gz"),
                                 "-o", str(tmp_path / "map.nii.gz"), "--device", "cpu"])
    assert scored.exit_code == 0, scored.output
    anomaly = read_image(tmp_path / "map.nii.gz")
    assert anomaly.GetSize() == source.GetSize() and anomaly.GetOrigin() == source.GetOrigin()
    values = sitk.GetArrayFromImage(anomaly)
    inside = np.zeros(values.shape, bool)
    inside[z - 2 : z + 2, y - 3 : y + 3, x - 3 : x + 3] = True
    inside &= array > 0
    brain = (array > 0) & ~inside
    assert np.median(values[inside]) > np.percentile(values[brain], 99)  # a noise-free cohort: edges vary most


@pytest.mark.parametrize("tail", ["both", "upper"])
def test_gate_and_blend_against_their_definitions(tail, rng):
    images, masks = _cohort(rng)
    brain = np.ones(SHAPE, np.uint8)
    raw = _raw_model(tail=tail, recentre=False)
    raw.fit_volumes(images, masks)
    location, scale = raw.statistics_on_grid()
    g_loc, g_scale = float(raw.global_location), float(raw.global_scale)
    test = images[3] + rng.normal(0, 0.2, SHAPE).astype(np.float32)
    local, glob = (test - location) / scale, (test - g_loc) / g_scale

    def tail_of(z):
        return np.abs(z) if tail == "both" else np.maximum(z, 0)

    for options, expected in (
        ({"gate": True}, np.sqrt(tail_of(local) * tail_of(glob) * (local * glob > 0))),
        ({"blend": 0.5}, tail_of(local) + 0.5 * tail_of(glob)),
    ):
        model = _raw_model(tail=tail, recentre=False, **options)
        model.fit_volumes(images, masks)
        np.testing.assert_allclose(model.score_volume(test, brain), expected, rtol=1e-4, atol=1e-4)


def test_auto_tail_follows_the_training_contrast(rng):
    """White matter brighter than grey matter (by the atlas T1): both tails; inverted (T2/FLAIR): the bright tail."""
    from uadct.models.normative import t1_like

    reference = rng.random(SHAPE).astype(np.float32) + 0.1
    images, masks = _cohort(rng)
    t1 = [(reference * 2 + rng.normal(0, 0.05, SHAPE)).astype(np.float32) for _ in images]
    flair = [(3 - reference * 2 + rng.normal(0, 0.05, SHAPE)).astype(np.float32) for _ in images]
    for data, expected in ((t1, "both"), (flair, "upper")):
        model = _raw_model(tail="auto")
        model.fit_volumes(data, masks, reference=reference)
        assert model.tail == expected and t1_like(model.statistics_on_grid()[0], reference) == (expected == "both")
    model = _raw_model(tail="auto")
    model.fit_volumes(flair, masks)  # no reference: both tails
    assert model.tail == "both"
