"""Reading volumes safely and writing outputs atomically."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from uadct.errors import InputError
from uadct.io import atomic_path, read_image, read_mask, same_grid, write_image, write_json


def _write(array: np.ndarray, path: Path, spacing=(1.0, 1.0, 1.0)) -> Path:
    image = sitk.GetImageFromArray(array)
    if image.GetDimension() == 3:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def test_reads_3d_as_float32_keeping_geometry(tmp_path):
    image = sitk.GetImageFromArray(np.arange(24, dtype=np.int16).reshape(2, 3, 4))
    image.SetSpacing((0.9, 1.1, 2.5))
    image.SetOrigin((10.0, -5.0, 3.0))
    image.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))
    sitk.WriteImage(image, str(tmp_path / "a.nii.gz"))
    read = read_image(tmp_path / "a.nii.gz")
    assert read.GetPixelID() == sitk.sitkFloat32
    assert same_grid(read, image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), np.arange(24).reshape(2, 3, 4))


def test_accepts_4d_with_one_volume(tmp_path):
    image = sitk.JoinSeries([sitk.GetImageFromArray(np.ones((3, 4, 5), np.float32))])
    sitk.WriteImage(image, str(tmp_path / "one.nii.gz"))
    assert read_image(tmp_path / "one.nii.gz").GetSize() == (5, 4, 3)


@pytest.mark.parametrize(
    "name,make,message",
    [
        ("missing.nii.gz", None, "file not found"),
        ("text.nii.gz", lambda p: p.write_text("hello"), "not a readable NIfTI"),
        ("flat.nii.gz", lambda p: _write(np.ones((5, 6), np.float32), p), "expected a 3D volume"),
        ("nan.nii.gz", lambda p: _write(np.full((4, 4, 4), np.nan, np.float32), p), "NaN or Inf"),
        ("zero.nii.gz", lambda p: _write(np.zeros((4, 4, 4), np.float32), p), "all zero"),
        ("huge_voxels.nii.gz", lambda p: _write(np.ones((4, 4, 4), np.float32), p, (100.0, 1.0, 1.0)), "absurd voxel size"),
    ],
)
def test_bad_inputs_give_one_line_errors_naming_the_file(tmp_path, name, make, message):
    path = tmp_path / name
    if make is not None:
        make(path)
    with pytest.raises(InputError) as excinfo:
        read_image(path)
    text = str(excinfo.value)
    assert str(path) in text and message in text and "\n" not in text


def test_multi_volume_4d_is_refused(tmp_path):
    volumes = [sitk.GetImageFromArray(np.ones((3, 4, 5), np.float32)) for _ in range(2)]
    sitk.WriteImage(sitk.JoinSeries(volumes), str(tmp_path / "two.nii.gz"))
    with pytest.raises(InputError, match="4D"):
        read_image(tmp_path / "two.nii.gz")


def test_truncated_gzip_is_refused(tmp_path):
    path = _write(np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32), tmp_path / "full.nii.gz")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated.nii.gz"):
        read_image(truncated)


def test_mask_on_another_grid_is_refused(tmp_path):
    image = read_image(_write(np.ones((4, 4, 4), np.float32), tmp_path / "img.nii.gz"))
    _write(np.ones((4, 4, 4), np.uint8), tmp_path / "mask.nii.gz", spacing=(2.0, 1.0, 1.0))
    with pytest.raises(InputError, match="grid"):
        read_mask(tmp_path / "mask.nii.gz", reference=image)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out" / "map.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert not target.exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_write_image_and_json_are_complete(tmp_path):
    image = sitk.GetImageFromArray(np.ones((3, 3, 3), np.float32))
    write_image(image, tmp_path / "x.nii.gz")
    with gzip.open(tmp_path / "x.nii.gz") as handle:
        assert len(handle.read()) > 348
    write_json({"a": np.float32(1.5), "b": np.arange(2)}, tmp_path / "x.json")
    assert (tmp_path / "x.json").read_text(encoding="utf-8").strip().startswith("{")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json", "x.nii.gz"]
