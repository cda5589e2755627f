"""2D images: reading PNG/JPEG/TIFF/DICOM as one-slice volumes, writing 2D maps, and ``preprocess --modality xray|image``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from images2d_data import write_dicom_image
from uadct.errors import InputError, OutputError
from uadct.images2d import dicom_window, image_notes, is_dicom_image_folder, list_images_2d
from uadct.io import read_image, write_image


def _array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def test_png_8_and_16_bit_read_with_values_as_one_slice(tmp_path, rng):
    eight = rng.integers(0, 256, (7, 9)).astype(np.uint8)
    sixteen = rng.integers(0, 65536, (7, 9)).astype(np.uint16)
    Image.fromarray(eight).save(tmp_path / "a.png")
    Image.fromarray(sixteen).save(tmp_path / "b.PNG")
    a, b = read_image(tmp_path / "a.png"), read_image(tmp_path / "b.PNG")
    assert a.GetSize() == (9, 7, 1) and a.GetPixelID() == sitk.sitkFloat32
    assert a.GetSpacing() == (1.0, 1.0, 1.0) and a.GetOrigin() == (0.0, 0.0, 0.0)
    np.testing.assert_array_equal(_array(a)[0], eight)
    np.testing.assert_array_equal(_array(b)[0], sixteen)


def test_float_tiff_and_jpeg_are_read(tmp_path, rng):
    values = rng.normal(100, 30, (6, 8)).astype(np.float32)
    Image.fromarray(values).save(tmp_path / "f.tif")
    np.testing.assert_array_equal(_array(read_image(tmp_path / "f.tif"))[0], values)
    smooth = np.tile(np.linspace(20, 220, 16), (12, 1)).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "p.jpg", quality=95)
    read = _array(read_image(tmp_path / "p.jpg"))[0]
    assert read.shape == (12, 16) and np.abs(read - smooth).max() <= 6  # lossy, but the same picture


def test_rgb_becomes_luma_grey_with_a_note_and_equal_channels_without(tmp_path, rng):
    rgb = rng.integers(0, 256, (5, 6, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    image = read_image(tmp_path / "c.png")
    expected = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    np.testing.assert_allclose(_array(image)[0], expected, atol=1e-3)
    assert "converted to grey" in image_notes(image)[0]
    grey3 = np.repeat(rgb[..., :1], 3, axis=2)
    Image.fromarray(grey3).save(tmp_path / "g.png")
    image = read_image(tmp_path / "g.png")
    assert image_notes(image) == []
    np.testing.assert_array_equal(_array(image)[0], rgb[..., 0])


def test_dicom_rescale_and_pixel_spacing(tmp_path, rng):
    stored = rng.integers(0, 4096, (6, 7))
    path = write_dicom_image(stored, tmp_path / "ct.dcm", slope=2.0, intercept=-1024.0, pixel_spacing=(0.5, 0.25), modality="CT")
    image = read_image(path)
    np.testing.assert_array_equal(_array(image)[0], stored * 2.0 - 1024.0)
    assert image.GetSize() == (7, 6, 1)
    assert image.GetSpacing()[:2] == (0.25, 0.5)  # PixelSpacing is (row spacing = y, column spacing = x)


def test_dicom_monochrome1_is_inverted_within_the_rescaled_range(tmp_path, rng):
    stored = rng.integers(0, 4096, (5, 5))
    path = write_dicom_image(stored, tmp_path / "m1.dcm", photometric="MONOCHROME1", slope=0.5, intercept=10.0,
                             imager_pixel_spacing=(0.15, 0.15))
    low, high = 0 * 0.5 + 10.0, 4095 * 0.5 + 10.0  # 12 stored bits, unsigned, through the modality LUT
    values = _array(read_image(path))[0]
    np.testing.assert_allclose(values, low + high - (stored * 0.5 + 10.0))
    assert values[stored == stored.max()].max() == values.min()  # the brightest stored value is now the darkest
    assert read_image(path).GetSpacing()[:2] == pytest.approx((0.15, 0.15))  # ImagerPixelSpacing when no PixelSpacing


def test_dicom_without_spacing_gets_1mm_and_keeps_its_window(tmp_path, rng):
    path = write_dicom_image(rng.integers(0, 100, (4, 4)), tmp_path / "IM0001", window=(40.0, 80.0))  # no suffix: the DICM marker
    image = read_image(path)
    assert image.GetSpacing()[:2] == (1.0, 1.0)
    assert dicom_window(image) == (40.0, 80.0)


def test_folders_of_2d_files_are_listed_and_dicom_images_are_not_a_series(tmp_path, rng):
    for index in range(2):
        write_dicom_image(rng.integers(0, 100, (4, 4)), tmp_path / f"x{index}.dcm", series_uid=f"1.2.3.{index}")
    Image.fromarray(np.ones((4, 4), np.uint8)).save(tmp_path / "y.png")
    (tmp_path / "notes.txt").write_text("not an image", encoding="utf-8")
    assert [p.name for p in list_images_2d(tmp_path)] == ["x0.dcm", "x1.dcm", "y.png"]
    assert is_dicom_image_folder(tmp_path)


@pytest.mark.parametrize("name,make,message", [
    ("text.png", lambda p: p.write_text("hello", encoding="utf-8"), "not a readable PNG"),
    ("cut.png", lambda p: p.write_bytes(_png_bytes()[:60]), "truncated or corrupt"),
    ("empty.jpg", lambda p: p.write_bytes(b""), "empty file"),
    ("fake.dcm", lambda p: p.write_bytes(b"\0" * 200), "not a readable DICOM"),
    ("zero.png", lambda p: Image.fromarray(np.zeros((4, 4), np.uint8)).save(p), "all zero"),
    ("tiny.png", lambda p: Image.fromarray(np.ones((1, 5), np.uint8)).save(p), "2D image of at least 2 x 2"),
])
def test_bad_2d_files_give_one_line_naming_the_file(tmp_path, name, make, message):
    path = tmp_path / name
    make(path)
    with pytest.raises(InputError) as excinfo:
        read_image(path)
    text = str(excinfo.value)
    assert text.startswith(str(path)) and message in text and "\n" not in text


def _png_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_maps_written_as_png_and_tiff_read_back_in_their_units(tmp_path, rng):
    values = rng.uniform(0, 3.5, (1, 6, 8)).astype(np.float32)
    image = sitk.GetImageFromArray(values)
    write_image(image, tmp_path / "m.tif")
    np.testing.assert_array_equal(_array(read_image(tmp_path / "m.tif")), values)  # float TIFF: exact
    write_image(image, tmp_path / "m.png")
    with Image.open(tmp_path / "m.png") as picture:
        stored = np.asarray(picture)
        assert stored.dtype == np.uint16 and stored.max() == 65535
    np.testing.assert_allclose(_array(read_image(tmp_path / "m.png")), values, atol=float(values.max()) / 65535)
    with pytest.raises(OutputError, match="m.jpg"):
        write_image(image, tmp_path / "m.jpg")
    assert not (tmp_path / "m.jpg").exists()


# ------------------------------------------------------------------------------------------ preprocess
def test_prepare_pads_to_the_size_keeps_physical_space_and_normalises_percentiles(rng):
    from uadct.preprocess.config import PreprocessConfig
    from uadct.preprocess.image2d import prepare_image_2d

    array = rng.uniform(10, 200, (1, 40, 80)).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.5, 0.5, 1.0))
    config = PreprocessConfig.for_modality("image", image_size=(32, 32))
    prepared = prepare_image_2d(image, config)
    assert prepared.image.GetSize() == (32, 32, 1)
    assert prepared.image.GetSpacing()[:2] == pytest.approx((80 * 0.5 / 32, 80 * 0.5 / 32))  # 40 mm wide in 32 pixels
    mask = _array(prepared.mask)[0]
    assert mask[:, 16].sum() == 16 and mask[16, :].sum() == 32  # 20 mm of 40 mm high: half the rows; padding outside
    centre = prepared.image.TransformContinuousIndexToPhysicalPoint((15.5, 15.5, 0))
    assert centre == pytest.approx(image.TransformContinuousIndexToPhysicalPoint((39.5, 19.5, 0)))  # same centre, same space
    inside = _array(prepared.image)[0][mask > 0]
    assert np.percentile(inside, 1) == pytest.approx(0.0, abs=1e-5) and np.percentile(inside, 99) == pytest.approx(1.0, abs=1e-5)
    assert (_array(prepared.image)[0][mask == 0] == 0).all()
    assert prepared.atlas_to_subject.GetMatrix() == (1, 0, 0, 0, 1, 0, 0, 0, 1)


def test_dicom_window_normalisation_matches_the_window_arithmetic(tmp_path, rng):
    from uadct.preprocess.config import PreprocessConfig
    from uadct.preprocess.image2d import prepare_image_2d

    stored = rng.integers(900, 1200, (16, 16))
    image = read_image(write_dicom_image(stored, tmp_path / "slide.dcm", intercept=-1024.0, window=(40, 80), modality="CT"))
    config = PreprocessConfig.for_modality("image", image_size=(16, 16), normalization="dicom-window")
    prepared = prepare_image_2d(image, config)  # same size and square pixels: the grid is the input's
    np.testing.assert_allclose(_array(prepared.image)[0], np.clip((stored - 1024.0 - 0.0) / 80.0, 0, 1), atol=1e-6)
    config = PreprocessConfig.for_modality("image", image_size=(16, 16), normalization="ct-window", ct_window=(0.0, 200.0))
    np.testing.assert_allclose(_array(prepare_image_2d(image, config).image)[0], np.clip((stored - 1024.0 + 100) / 200.0, 0, 1),
                               atol=1e-6)


def test_fov_masks_nonzero_and_otsu(rng):
    from uadct.preprocess.config import PreprocessConfig
    from uadct.preprocess.image2d import prepare_image_2d

    array = np.zeros((1, 32, 32), np.float32)
    array[0, :, 8:] = rng.uniform(5, 20, (32, 24))  # a black border (collimation) on the left
    array[0, 10:22, 14:26] = rng.uniform(150, 250, (12, 12))  # a bright object
    image = sitk.GetImageFromArray(array)
    nonzero = prepare_image_2d(image, PreprocessConfig.for_modality("xray", image_size=(32, 32)))
    np.testing.assert_array_equal(_array(nonzero.mask)[0], array[0] != 0)
    otsu = prepare_image_2d(image, PreprocessConfig.for_modality("image", image_size=(32, 32), fov_mask="otsu"))
    np.testing.assert_array_equal(_array(otsu.mask)[0], array[0] >= 150)


def test_2d_settings_that_do_not_apply_are_refused():
    from uadct.preprocess.config import PreprocessConfig

    with pytest.raises(InputError, match="skull-strip"):
        PreprocessConfig.for_modality("xray", skull_strip="deepbet")
    with pytest.raises(InputError, match="normalisation 'tissue'"):
        PreprocessConfig.for_modality("image", normalization="tissue")
    with pytest.raises(InputError, match="--image-size"):
        PreprocessConfig.for_modality("mr", image_size=(64, 64))
    assert "image_size" not in PreprocessConfig.for_modality("mr").to_dict()  # volumes' sidecars unchanged


def test_preprocess_cli_on_a_png_records_the_resize(tmp_path, rng):
    from typer.testing import CliRunner

    from uadct.cli import app

    picture = (rng.uniform(0, 1, (30, 50)) * 200 + 20).astype(np.uint8)
    picture[:, :5] = 0  # a black border left out by the xray default mask (nonzero)
    Image.fromarray(picture).save(tmp_path / "chest.png")
    result = CliRunner().invoke(app, ["preprocess", "--modality", "xray", "--image-size", "40x60", str(tmp_path / "chest.png"),
                                      "-o", str(tmp_path / "prep"), "--json"])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "prep" / "chest"
    sidecar = json.loads((folder / "preprocess.json").read_text(encoding="utf-8"))
    assert sidecar["config"]["image_size"] == [40, 60] and sidecar["atlas"] == {"name": "none", "sha256": None}
    assert sidecar["native_grid"]["size"] == [50, 30, 1]
    assert sidecar["resolution"]["resize"]["input_size"] == [30, 50]
    assert read_image(folder / "image.nii.gz").GetSize() == (60, 40, 1)
    mask = _array(read_image(folder / "mask.nii.gz", allow_empty=True))[0]
    assert mask[:, :5].sum() == 0 and mask[2:38, 10:].all()  # 50 px into 60 wide (1.2 px each), 30 into 36 rows; border left out
    assert mask[:2].sum() == 0 and mask[38:].sum() == 0  # padding above and below
