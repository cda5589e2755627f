"""DICOM series folders: geometry and HU from the tags, refused series, preprocess and score from DICOM."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from dicom_series import write_series
from uadct.cli import app
from uadct.dicom import choose_series, is_dicom_folder, read_series
from uadct.errors import InputError
from uadct.io import read_image, sha256_of

MR_UID = "1.2.826.0.1.3680043.2.1125.7.1"
CT_UID = "1.2.826.0.1.3680043.2.1125.7.2"


@pytest.fixture(scope="module")
def head(atlas) -> sitk.Image:
    """The SRI24 head T1 on a 4 mm grid in LPS orientation (60 x 60 x 39 voxels), as int16 values."""
    grid = sitk.Image([60, 60, 39], sitk.sitkFloat32)
    grid.SetSpacing((4.0, 4.0, 4.0))
    grid.SetOrigin((0.0, -239.0, 0.0))
    resampled = sitk.Resample(atlas.head, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.Cast(sitk.Round(resampled), sitk.sitkInt16)


def _same_grid(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


def test_mr_series_keeps_geometry_and_values(head, tmp_path):
    folder = write_series(head, tmp_path / "mr", series_uid=MR_UID)
    assert is_dicom_folder(folder) and not is_dicom_folder(tmp_path)
    image = read_series(folder)
    _same_grid(image, head)
    assert image.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(head).astype(np.float32))
    # the input-reading code takes the folder like a file, and its checksum is stable
    _same_grid(read_image(folder), head)
    assert sha256_of(folder) == sha256_of(folder) and len(sha256_of(folder)) == 64


def test_ct_series_in_hounsfield_units(head, tmp_path):
    """Stored values are HU + 1024 (rescale intercept -1024): the reader must give HU back."""
    array = sitk.GetArrayFromImage(head).astype(np.float32)
    hu = np.where(array > 20, 30 + 50 * array / array.max(), -1000).astype(np.int16)  # brain-like 30-80 HU, air -1000
    hu[:, :, :3] = 1200  # a bone-like stripe
    ct = sitk.GetImageFromArray(hu)
    ct.CopyInformation(head)
    folder = write_series(ct, tmp_path / "ct", modality="CT", series_uid=CT_UID, rescale_intercept=-1024)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(next(folder.iterdir())))
    reader.ReadImageInformation()
    assert float(reader.GetMetaData("0028|1052")) == -1024
    image = read_series(folder)
    _same_grid(image, head)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), hu.astype(np.float32))
    assert sitk.GetArrayFromImage(image).min() == -1000


def test_several_series_need_a_uid(head, tmp_path):
    folder = tmp_path / "two"
    write_series(head, folder, series_uid=MR_UID, prefix="a")
    write_series(sitk.Cast(head * 2, sitk.sitkInt16), folder, series_uid=CT_UID, description="second", prefix="b")
    with pytest.raises(InputError) as error:
        read_series(folder)
    message = str(error.value)
    assert "2 DICOM series" in message and MR_UID in message and CT_UID in message and "--series-uid" in message
    assert "\n" not in message
    second = read_series(folder, CT_UID)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(second), 2 * sitk.GetArrayFromImage(head).astype(np.float32))
    assert choose_series(folder, MR_UID).n_files == head.GetSize()[2]
    with pytest.raises(InputError, match="no series 9.9.9"):
        read_series(folder, "9.9.9")


@pytest.mark.parametrize("breakage, expected", [
    ({"tilt_deg": 12.0}, "gantry tilt of 12 degrees"),
    ({"shear_mm": 1.5}, "drift across the slice plane"),
    ({"skip_slices": (20,)}, "missing or irregular slices: 8.00 mm gap"),
    ({"duplicate_slice": 10}, "duplicate slices at"),
    ({"rotate_slice": 5}, "mixed slice orientations"),
])
def test_broken_series_refused_in_one_line(head, tmp_path, breakage, expected):
    folder = write_series(head, tmp_path / "broken", **breakage)
    with pytest.raises(InputError) as error:
        read_series(folder)
    assert expected in str(error.value) and str(folder) in str(error.value)
    assert "\n" not in str(error.value)


def test_preprocess_and_score_a_dicom_folder(small_atlas_path, threshold_model, tmp_path, monkeypatch):
    """`uadct preprocess dicom/` and `uadct score model.pt dicom/`: the map is NIfTI on the series' grid."""
    template = read_image(small_atlas_path)
    scan = sitk.Cast(sitk.Round(template * 1000.0), sitk.sitkInt16)
    series = write_series(scan, tmp_path / "patient01", series_uid=MR_UID)
    dicom_image = read_series(series)
    # SRI24's grid is left-handed; a DICOM stack is right-handed, so the series runs the other way in k
    assert dicom_image.GetSize() == template.GetSize()
    runner = CliRunner()
    fast = ["--atlas", str(small_atlas_path), "--skull-strip", "none", "--registration", "none", "--no-bias-correction"]
    result = runner.invoke(app, ["preprocess", str(series), *fast])
    assert result.exit_code == 0, result.output
    prep = tmp_path / "patient01-uadct"  # the default output: a sibling folder, the series untouched
    assert (prep / "patient01" / "image.nii.gz").is_file()
    assert sorted(p.name for p in series.iterdir()) == sorted(f"slice{k:04d}.dcm" for k in range(scan.GetSize()[2]))
    prepared = read_image(prep / "patient01" / "image.nii.gz")
    assert prepared.GetSize() == template.GetSize()

    monkeypatch.chdir(tmp_path)
    scored = runner.invoke(app, ["score", str(threshold_model), str(series), "--batch-size", "4096"])
    assert scored.exit_code == 0, scored.output
    anomaly_map = read_image(tmp_path / "patient01_anomaly.nii.gz", allow_empty=True)
    _same_grid(anomaly_map, dicom_image)
