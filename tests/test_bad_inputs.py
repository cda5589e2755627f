"""A corpus of broken or unusable input volumes, built in code: each one must be refused
by :func:`uadct.io.read_image` with a one-line :class:`InputError` naming the file, and by
the CLI with exit code 2 (one command) or a recorded failure (batch), never a traceback.

Decisions for files that are unusual but usable: int8, uint16, int64 and float64 voxels
are valid intensities and are read as float32 with their values; a constant nonzero image
is accepted by ``read_image`` (masks and maps are often constant; a constant *scan* is
refused later, by intensity normalisation).
"""

from __future__ import annotations

import gzip
import json
import os
import resource
import struct
import sys
import time
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from uadct.errors import InputError
from uadct.io import read_image, read_mask

SHAPE = (12, 10, 8)  # nibabel order (x, y, z)


def _volume(dtype=np.float32) -> np.ndarray:
    """A small (x, y, z) volume with a bright cube, values 0..100."""
    data = np.zeros(SHAPE, dtype=np.float64)
    data[3:9, 2:8, 2:6] = 100.0
    data[1, 1, 1] = 37.0
    return data.astype(dtype)


def _save(image: nib.Nifti1Image, path: Path) -> Path:
    nib.save(image, str(path))
    return path


def _nifti(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None) -> Path:
    """Write a NIfTI-1 with a 1 mm RAS affine (sform and qform set)."""
    data = _volume() if data is None else data
    image = nib.Nifti1Image(data, np.eye(4) if affine is None else affine, dtype=data.dtype)
    image.header.set_qform(image.affine, 1)
    image.header.set_sform(image.affine, 1)
    return _save(image, path)


def _raw_nifti(path: Path, edit: Callable[[bytearray], None], data: np.ndarray | None = None) -> Path:
    """Write a valid NIfTI-1, then edit its bytes (header at 0..347, data from 352); gzip
    the result when ``path`` ends in .gz."""
    plain = path.with_name(path.name.removesuffix(".gz") + ".tmp.nii")
    _nifti(plain, data)
    raw = bytearray(plain.read_bytes())
    plain.unlink()
    edit(raw)
    path.write_bytes(gzip.compress(bytes(raw)) if path.name.endswith(".gz") else bytes(raw))
    return path


def _put(offset: int, fmt: str, *values) -> Callable[[bytearray], None]:
    def edit(raw: bytearray) -> None:
        struct.pack_into("<" + fmt, raw, offset, *values)

    return edit


def _dims(*dims: int) -> Callable[[bytearray], None]:
    """Overwrite dim[0..7] (offset 40, eight int16)."""
    full = list(dims) + [1] * (8 - len(dims))
    return _put(40, "8h", *full)


def _pixdim(x: float, y: float, z: float) -> Callable[[bytearray], None]:
    return _put(80, "3f", x, y, z)  # pixdim[1..3]


def _cut(fraction_or_bytes) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        noisy = np.random.default_rng(0).normal(100.0, 10.0, SHAPE).astype(np.float32)  # compresses little
        full = _nifti(path.with_name("full_" + path.name), noisy)
        data = full.read_bytes()
        keep = fraction_or_bytes if isinstance(fraction_or_bytes, int) else int(len(data) * fraction_or_bytes)
        keep = keep if keep >= 0 else len(data) + keep
        path.write_bytes(data[:keep])
        return path

    return make


def _with_nan(value: float) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        data = _volume()
        data[4, 4, 3] = value
        return _nifti(path, data)

    return make


def _sform(matrix) -> Callable[[Path], Path]:
    """Raw edit: sform rows (srow_x/y/z at 280, 296, 312) = ``matrix``, sform_code 1, qform_code 0."""
    rows = np.asarray(matrix, dtype=np.float32)[:3]

    def edit(raw: bytearray) -> None:
        struct.pack_into("<12f", raw, 280, *rows.ravel())
        struct.pack_into("<2h", raw, 252, 0, 1)

    return lambda path: _raw_nifti(path, edit)


def _sitk(array_zyx: np.ndarray, vector: bool = False) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        sitk.WriteImage(sitk.GetImageFromArray(array_zyx, isVector=vector), str(path))
        return path

    return make


def _join(n: int) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        volume = sitk.GetImageFromArray(np.ones((4, 5, 6), np.float32))
        sitk.WriteImage(sitk.JoinSeries([volume] * n), str(path))
        return path

    return make


def _nib_data(data: np.ndarray) -> Callable[[Path], Path]:
    return lambda path: _nifti(path, data)


def _rgb(path: Path) -> Path:
    rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = 200
    return _save(nib.Nifti1Image(rgb, np.eye(4)), path)


def _sform_qform_disagree(path: Path) -> Path:
    image = nib.Nifti1Image(_volume(), np.eye(4))
    shifted = np.eye(4)
    shifted[:3, 3] = (40.0, 0.0, 0.0)
    image.header.set_sform(np.eye(4), 1)
    image.header.set_qform(shifted, 1)
    return _save(image, path)


def _symlink_loop(path: Path) -> Path:
    other = path.with_name("loop_other.nii.gz")
    os.symlink(other, path)
    os.symlink(path, other)
    return path


def _dangling(path: Path) -> Path:
    os.symlink(path.with_name("does_not_exist.nii.gz"), path)
    return path


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


def _unreadable(path: Path) -> Path:
    _nifti(path)
    path.chmod(0)
    return path


def _huge_dims(path: Path) -> Path:
    """100000^3 declared (int16 dims cap at 32767: use 32767^3 = 3.5e13 voxels) over a tiny file."""
    return _raw_nifti(path, _dims(3, 32767, 32767, 32767))


# name -> (builder, words the message must contain)
BAD_INPUTS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "empty.nii.gz": (lambda p: (p.write_bytes(b""), p)[1], "empty"),
    "empty.nii": (lambda p: (p.write_bytes(b""), p)[1], "empty"),
    "text.nii.gz": (lambda p: (p.write_text("subject 12, see notes\n"), p)[1], "not a readable NIfTI"),
    "gzip_of_garbage.nii.gz": (lambda p: (p.write_bytes(gzip.compress(os.urandom(2000))), p)[1], "not a readable NIfTI"),
    "garbage_not_gzip.nii.gz": (lambda p: (p.write_bytes(b"\x1f\x8b" + os.urandom(500)), p)[1], "not a readable NIfTI"),
    "cut_in_header.nii.gz": (_cut(60), "not a readable NIfTI"),
    "cut_at_30pct.nii.gz": (_cut(0.3), "truncated"),
    "cut_at_half.nii.gz": (_cut(0.5), "truncated"),
    "cut_near_end.nii.gz": (_cut(-12), "truncated"),
    "cut_uncompressed.nii": (_cut(600), "truncated"),
    "header_only.nii": (_cut(352), "truncated"),
    "magic_n+2.nii": (lambda p: _raw_nifti(p, _put(344, "4s", b"n+2\0")), "not a readable NIfTI"),
    "magic_garbage.nii.gz": (lambda p: _raw_nifti(p, _put(344, "4s", b"zzzz")), "not a readable NIfTI"),
    "sizeof_hdr_wrong.nii": (lambda p: _raw_nifti(p, _put(0, "i", 123)), "not a readable NIfTI"),
    "more_voxels_than_data.nii": (lambda p: _raw_nifti(p, _dims(3, 64, 64, 64)), "truncated"),
    "more_voxels_than_data.nii.gz": (lambda p: _raw_nifti(p, _dims(3, 64, 64, 64)), "truncated"),
    "billion_voxels_tiny_data.nii.gz": (lambda p: _raw_nifti(p, _dims(3, 1000, 1000, 1000)), "truncated"),
    "vox_offset_past_end.nii": (lambda p: _raw_nifti(p, _put(108, "f", 1e6)), "truncated"),
    "huge_dims.nii.gz": (_huge_dims, "too large"),
    "dim0_zero.nii": (lambda p: _raw_nifti(p, _put(40, "h", 0)), "dim[0]"),
    "dim0_nine.nii": (lambda p: _raw_nifti(p, _put(40, "h", 9)), "dim[0]"),
    "negative_dim.nii": (lambda p: _raw_nifti(p, _dims(3, 12, -10, 8)), "dim"),
    "unknown_datatype.nii": (lambda p: _raw_nifti(p, _put(70, "h", 999)), "not a readable NIfTI"),
    "nan.nii.gz": (_with_nan(np.nan), "NaN or Inf"),
    "plus_inf.nii.gz": (_with_nan(np.inf), "NaN or Inf"),
    "minus_inf.nii.gz": (_with_nan(-np.inf), "NaN or Inf"),
    "zero_voxel_size.nii.gz": (lambda p: _raw_nifti(p, _pixdim(1.0, 0.0, 1.0)), "voxel size"),
    "negative_voxel_size.nii.gz": (lambda p: _raw_nifti(p, _pixdim(1.0, -1.0, 1.0)), "voxel size"),
    "absurd_voxel_size.nii.gz": (lambda p: _raw_nifti(p, _pixdim(1e6, 1.0, 1.0)), "voxel size"),
    "sheared_sform.nii.gz": (_sform([[1, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), "affine"),
    "singular_sform.nii.gz": (_sform([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), "affine"),
    "sform_qform_disagree.nii.gz": (_sform_qform_disagree, "sform and qform"),
    "flat_2d.nii.gz": (_sitk(np.ones((10, 12), np.float32)), "3D"),
    "4d_three_volumes.nii.gz": (_join(3), "4D"),
    "5d.nii.gz": (_nib_data(np.ones((6, 5, 4, 1, 2), np.float32)), "5D"),
    "rgb.nii.gz": (_rgb, "components"),
    "vector_sitk.nii.gz": (_sitk(np.ones((4, 5, 6, 3), np.float32), vector=True), "components"),
    "complex64.nii.gz": (_nib_data(_volume(np.complex64)), "complex"),
    "complex128.nii.gz": (_nib_data(_volume(np.complex128)), "complex"),
    "all_zero.nii.gz": (_nib_data(np.zeros(SHAPE, np.float32)), "all zero"),
    "folder.nii.gz": (_folder, "folder"),
    "symlink_loop.nii.gz": (_symlink_loop, "link"),
    "dangling_link.nii.gz": (_dangling, "link"),
    "missing.nii.gz": (lambda p: p, "file not found"),
    "no_read_permission.nii.gz": (_unreadable, "permission"),
}


def _build(tmp_path: Path, name: str) -> tuple[Path, str]:
    if name == "no_read_permission.nii.gz" and os.geteuid() == 0:
        pytest.skip("root can read any file")
    make, words = BAD_INPUTS[name]
    folder = tmp_path / "inputs"
    folder.mkdir(exist_ok=True)
    return make(folder / name), words


def test_corpus_is_large_enough():
    assert len(BAD_INPUTS) >= 30


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_read_image_refuses_with_one_line_naming_the_file(tmp_path, name):
    path, words = _build(tmp_path, name)
    with pytest.raises(InputError) as excinfo:
        read_image(path)
    text = str(excinfo.value)
    assert str(path) in text, text
    assert "\n" not in text, text
    assert words in text, text


def _valid_map(tmp_path: Path) -> Path:
    return _nifti(tmp_path / "map.nii.gz", np.ones(SHAPE, np.float32))


def _run_cli(monkeypatch, *args: str) -> int:
    from uadct.cli import main

    monkeypatch.setattr(sys, "argv", ["uadct", *args])
    with pytest.raises(SystemExit) as excinfo:
        main()
    return excinfo.value.code


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_cli_heatmap_exits_2_with_one_line_and_no_output(tmp_path, monkeypatch, capsys, name):
    path, _ = _build(tmp_path, name)
    out_png = tmp_path / "out" / "heatmap.png"
    code = _run_cli(monkeypatch, "heatmap", str(path), str(_valid_map(tmp_path)), "-o", str(out_png))
    captured = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in captured.err + captured.out
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], captured.err
    assert not out_png.exists()


def test_cli_preprocess_batch_records_every_failure(tmp_path, monkeypatch, capsys):
    names = [n for n in sorted(BAD_INPUTS) if n not in ("no_read_permission.nii.gz", "missing.nii.gz", "folder.nii.gz")]
    # x.nii and x.nii.gz would be written to one folder x/, which the output policy refuses before
    # any work (tests/test_data_safety.py): keep one of each pair
    names = [n for n in names if not (n.endswith(".nii") and n + ".gz" in names)]
    paths = [_build(tmp_path, name)[0] for name in names]
    output = tmp_path / "prep"
    code = _run_cli(monkeypatch, "preprocess", *map(str, paths), "-o", str(output), "--skull-strip", "none",
                    "--registration", "none", "--no-bias-correction", "--json")
    captured = capsys.readouterr()
    assert code == 1, captured.err
    assert "Traceback" not in captured.err + captured.out
    summary = json.loads(captured.out)
    assert summary["done"] == [] and summary["skipped"] == []
    failed = {entry["input"]: entry["error"] for entry in summary["failed"]}
    assert sorted(failed) == sorted(map(str, paths))
    for path, error in failed.items():
        assert path in error and "\n" not in error, error
    written = [p for p in output.rglob("*") if p.is_file()] if output.exists() else []
    assert not [p for p in written if p.name.endswith(".nii.gz")], written


def test_a_single_slice_is_a_2d_image_and_the_3d_chain_refuses_it(tmp_path, monkeypatch, capsys):
    """One slice is what a 2D image's map or prepared image is (uadct.images2d): read; MR/CT preprocessing refuses it."""
    path = _nib_data(np.ones((12, 10, 1), np.float32))(tmp_path / "single_slice.nii.gz")
    assert read_image(path).GetSize() == (12, 10, 1)
    code = _run_cli(monkeypatch, "preprocess", str(path), "-o", str(tmp_path / "prep"), "--skull-strip", "none",
                    "--registration", "none", "--no-bias-correction", "--json")
    captured = capsys.readouterr()
    assert code == 1 and "Traceback" not in captured.err + captured.out
    (failure,) = json.loads(captured.out)["failed"]
    assert failure["error"].startswith(str(path)) and "3D" in failure["error"] and "\n" not in failure["error"]


def test_mask_on_another_grid_is_refused_naming_the_mask(tmp_path):
    image = read_image(_nifti(tmp_path / "image.nii.gz"))
    mask_data = np.ones((12, 10, 9), np.uint8)
    mask = _nifti(tmp_path / "mask.nii.gz", mask_data)
    with pytest.raises(InputError) as excinfo:
        read_mask(mask, reference=image)
    assert str(mask) in str(excinfo.value) and "size" in str(excinfo.value)


def test_cli_heatmap_refuses_a_label_on_another_grid(tmp_path, monkeypatch, capsys):
    subject = _nifti(tmp_path / "image.nii.gz")
    label = _nifti(tmp_path / "label.nii.gz", np.ones(SHAPE, np.uint8), affine=np.diag([2.0, 1.0, 1.0, 1.0]))
    out_png = tmp_path / "heatmap.png"
    code = _run_cli(monkeypatch, "heatmap", str(subject), str(_valid_map(tmp_path)), "-o", str(out_png),
                    "--label", str(label))
    captured = capsys.readouterr()
    assert code == 2 and str(label) in captured.err and "Traceback" not in captured.err
    assert not out_png.exists()


def test_huge_declared_dims_are_refused_fast_without_allocating(tmp_path):
    for name in ("huge_dims.nii.gz", "billion_voxels_tiny_data.nii.gz"):
        path, _ = _build(tmp_path, name)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        started = time.perf_counter()
        with pytest.raises(InputError):
            read_image(path)
        assert time.perf_counter() - started < 2.0
        grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        assert grown_mib < 200, f"{name}: peak memory grew by {grown_mib:.0f} MiB"


@pytest.mark.parametrize(
    "dtype,values",
    [
        (np.int8, [-128, -5, 0, 7, 127]),
        (np.uint8, [0, 1, 128, 255, 3]),
        (np.uint16, [0, 1, 4095, 40000, 65535]),
        (np.int16, [-32768, -1, 0, 1000, 32767]),
        (np.int32, [-100000, 0, 7, 123456, 16777216]),
        (np.int64, [-100000, 0, 7, 123456, 16777216]),
        (np.float64, [-1.5, 0.0, 0.25, 1234.5, 3.0e6]),
        (np.float32, [-1.5, 0.0, 0.25, 1234.5, 3.0e6]),
    ],
)
def test_valid_voxel_types_are_read_with_their_values(tmp_path, dtype, values):
    data = np.zeros(SHAPE, dtype=dtype)
    data[:5, 0, 0] = np.array(values, dtype=dtype)
    path = _nifti(tmp_path / f"{np.dtype(dtype).name}.nii.gz", data)
    image = read_image(path)
    array = sitk.GetArrayFromImage(image)  # (z, y, x)
    assert image.GetPixelID() == sitk.sitkFloat32 and array.shape == SHAPE[::-1]
    np.testing.assert_array_equal(array.transpose(2, 1, 0), data.astype(np.float32))


def test_scaled_integers_are_read_with_the_scaling(tmp_path):
    data = _volume(np.int16)
    image = nib.Nifti1Image(data, np.eye(4))
    image.header.set_slope_inter(0.5, 10.0)
    path = _save(image, tmp_path / "scaled.nii")
    array = sitk.GetArrayFromImage(read_image(path)).transpose(2, 1, 0)
    np.testing.assert_allclose(array, data * 0.5 + 10.0)


def test_constant_image_is_accepted(tmp_path):
    path = _nifti(tmp_path / "constant.nii.gz", np.full(SHAPE, 7.0, np.float32))
    array = sitk.GetArrayFromImage(read_image(path))
    assert array.shape == SHAPE[::-1] and np.all(array == 7.0)


def test_geometry_matches_simpleitk(tmp_path):
    affine = np.array([[0, -0.9, 0, 20.0], [1.2, 0, 0, -30.0], [0, 0, 2.5, 5.0], [0, 0, 0, 1]])
    path = _nifti(tmp_path / "oblique.nii.gz", _volume(np.int16), affine)
    image, reference = read_image(path), sitk.ReadImage(str(path))
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing())
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin())
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(reference))


@pytest.fixture(scope="module")
def intensity_model(atlas_grid_subjects, tmp_path_factory) -> Path:
    """A `threshold` checkpoint trained on two prepared 2 mm subjects."""
    from typer.testing import CliRunner

    from uadct.cli import app

    root = tmp_path_factory.mktemp("bad-inputs-model")
    _, prep = atlas_grid_subjects(root, ["case-0", "case-1"])
    model = root / "threshold.pt"
    trained = CliRunner().invoke(app, ["train", str(prep), "-o", str(model), "--model", "threshold", "--validation-patches", "128"])
    assert trained.exit_code == 0, trained.output
    return model


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_cli_score_exits_2_with_one_line_and_no_output(tmp_path, monkeypatch, capsys, intensity_model, name):
    path, _ = _build(tmp_path, name)
    out_map = tmp_path / "out" / "map.nii.gz"
    code = _run_cli(monkeypatch, "score", str(intensity_model), str(path), "-o", str(out_map))
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert "Traceback" not in captured.err + captured.out
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], captured.err
    assert not [p for p in out_map.parent.rglob("*") if p.is_file()] if out_map.parent.exists() else True
