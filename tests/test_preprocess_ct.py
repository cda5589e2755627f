"""Head CT support: the HU skull-strip backend, the brain window, the --modality defaults."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from uadct.errors import InputError, PreprocessError
from uadct.preprocess.intensity import normalize_intensity
from uadct.preprocess.config import PreprocessConfig
from uadct.preprocess.skullstrip import extract_brain_mask

AIR_HU, CSF_HU, SCALP_HU, BONE_HU = -1000.0, 5.0, 40.0, (700.0, 1500.0)


def _on_2mm(image: sitk.Image, interpolator: int) -> sitk.Image:
    size = [int(round(s * sp / 2.0)) for s, sp in zip(image.GetSize(), image.GetSpacing())]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing((2.0, 2.0, 2.0))
    grid.SetOrigin(image.GetOrigin())
    grid.SetDirection(image.GetDirection())
    return sitk.Resample(image, grid, sitk.Transform(), interpolator, 0.0, image.GetPixelID())


def synthetic_head_ct(atlas, rng: np.random.Generator) -> tuple[sitk.Image, np.ndarray]:
    """A head CT (HU, 2 mm) built from the SRI24 head T1, and the atlas brain mask on its grid.

    Brain tissue 20-45 HU by T1 brightness (CSF ~5 HU), a 2 mm CSF/dura layer, a 6 mm
    skull of 700-1500 HU around it, scalp and neck (head voxels outside) at ~40 HU, air
    -1000 HU, plus 3 HU of noise. The skull has a foramen magnum: the brainstem runs into
    soft tissue below, so the backend must cut that bridge itself.
    """
    head = sitk.GetArrayFromImage(_on_2mm(sitk.Cast(atlas.head, sitk.sitkFloat32), sitk.sitkLinear))
    brain_image = _on_2mm(atlas.mask, sitk.sitkNearestNeighbor)
    brain = sitk.GetArrayFromImage(brain_image) > 0
    t1 = sitk.GetArrayFromImage(_on_2mm(sitk.Cast(atlas.brain, sitk.sitkFloat32), sitk.sitkLinear))
    from scipy import ndimage

    head_mask = ndimage.binary_fill_holes(head > 0.1 * np.percentile(head[head > 0], 50)) | brain
    ball = ndimage.generate_binary_structure(3, 1)
    inner = ndimage.binary_dilation(brain, ball, iterations=1)  # 2 mm CSF / dura
    outer = ndimage.binary_dilation(inner, ball, iterations=3)  # 6 mm skull
    skull = outer & ~inner
    # foramen magnum: a hole in the skull's floor under the brainstem, soft tissue below it
    z_brain = np.nonzero(brain.any(axis=(1, 2)))[0]
    floor = slice(0, z_brain.min() + 1)
    footprint = ndimage.binary_erosion(brain[z_brain.min():z_brain.min() + 3].any(axis=0), iterations=1)
    skull[floor][:, footprint] = False
    head_mask[floor][:, footprint] = True
    ct = np.full(head.shape, AIR_HU, dtype=np.float32)
    ct[head_mask | outer] = SCALP_HU
    ct[inner & ~brain] = CSF_HU
    ct[skull] = rng.uniform(*BONE_HU, size=int(skull.sum()))
    inside = t1[brain]
    relative = np.clip((inside - np.percentile(inside, 2)) / (np.percentile(inside, 98) - np.percentile(inside, 2)), 0, 1)
    ct[brain] = np.where(relative < 0.25, CSF_HU, 20.0 + 25.0 * relative)
    ct += rng.normal(0.0, 3.0, size=ct.shape).astype(np.float32)
    image = sitk.GetImageFromArray(ct)
    image.CopyInformation(brain_image)
    return image, brain


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def test_ct_skull_strip_finds_the_atlas_brain(atlas, rng):
    image, truth = synthetic_head_ct(atlas, rng)
    mask = sitk.GetArrayFromImage(extract_brain_mask(image, "ct")) > 0
    assert mask.shape == truth.shape
    assert dice(mask, truth) > 0.85
    hu = sitk.GetArrayViewFromImage(image)
    assert not (mask & (hu > 300)).any()  # no bone inside


def test_ct_skull_strip_refuses_an_mr_scan(atlas):
    with pytest.raises(PreprocessError, match="HU"):
        extract_brain_mask(_on_2mm(atlas.brain, sitk.sitkLinear), "ct")


def test_ct_window_maps_the_window_edges_to_0_and_1():
    level, width = 40.0, 80.0
    array = np.array([[[level - width / 2, level, level + width / 2, -1000.0, 1000.0, 12.0]]], dtype=np.float32)
    mask = np.ones_like(array, dtype=np.uint8)
    mask[0, 0, 5] = 0
    normalized, stats = normalize_intensity(array, mask, "ct-window", ct_window=(level, width))
    np.testing.assert_allclose(normalized[0, 0], [0.0, 0.5, 1.0, 0.0, 1.0, 0.0], atol=1e-6)
    assert stats == {"level": level, "width": width}
    narrow, _ = normalize_intensity(array, mask, "ct-window", ct_window=(30.0, 20.0))
    np.testing.assert_allclose(narrow[0, 0, :3], [0.0, 1.0, 1.0])  # window 20..40 HU
    with pytest.raises(PreprocessError, match="width"):
        normalize_intensity(array, mask, "ct-window", ct_window=(40.0, 0.0))


def test_modality_defaults_and_overrides():
    ct = PreprocessConfig.for_modality("ct")
    assert (ct.skull_strip, ct.bias_correction, ct.normalization, ct.ct_window) == ("ct", False, "ct-window", (40.0, 80.0))
    assert PreprocessConfig.for_modality("mr") == PreprocessConfig()
    custom = PreprocessConfig.for_modality("ct", skull_strip="none", bias_correction=None, ct_window=(50.0, 100.0))
    assert (custom.skull_strip, custom.bias_correction, custom.ct_window) == ("none", False, (50.0, 100.0))
    assert PreprocessConfig.from_dict(custom.to_dict()) == custom
    with pytest.raises(InputError, match="pet"):
        PreprocessConfig.for_modality("pet")


def test_cli_modality_ct_end_to_end(atlas, small_atlas_path, tmp_path, rng):
    """`--modality ct` picks the ct skull-strip, no N4 and the brain window (registration off: same grid)."""
    import json

    from typer.testing import CliRunner

    from uadct.cli import app
    from uadct.io import read_image, write_image

    image, truth = synthetic_head_ct(atlas, rng)
    write_image(image, tmp_path / "raw" / "ct-01.nii.gz")
    result = CliRunner().invoke(app, ["preprocess", str(tmp_path / "raw"), "-o", str(tmp_path / "prep"),
                                      "--atlas", str(small_atlas_path), "--modality", "ct", "--registration", "none",
                                      "--ct-width", "60", "--json"])
    assert result.exit_code == 0, result.output
    sidecar = json.loads((tmp_path / "prep" / "ct-01" / "preprocess.json").read_text(encoding="utf-8"))
    config = sidecar["config"]
    assert (config["skull_strip"], config["bias_correction"], config["normalization"], config["ct_window"]) == ("ct", False, "ct-window", [40.0, 60.0])
    prepared = sitk.GetArrayFromImage(read_image(tmp_path / "prep" / "ct-01" / "image.nii.gz"))
    mask = sitk.GetArrayFromImage(read_image(tmp_path / "prep" / "ct-01" / "mask.nii.gz")) > 0
    assert prepared.min() >= 0.0 and prepared.max() <= 1.0
    assert dice(mask, truth) > 0.85
