"""Issue 15: no command may destroy a user's data (one test group per numbered item of the issue).

Full-disk and read-only cases use a small tmpfs mounted by the test (root only; skipped
with the reason otherwise).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import stat
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from uadct.errors import InputError, UadctError
from uadct.io import read_image, sha256_of, write_image, write_json

SHAPE = (12, 14, 10)


# ----------------------------------------------------------------------------- helpers
def _run(capfd, *args: str) -> tuple[int, str, str]:
    """Run the CLI in-process; (exit code, stdout, stderr) as the file descriptors saw them."""
    from uadct.cli import main

    old = sys.argv
    sys.argv = ["uadct", *args]
    try:
        with pytest.raises(SystemExit) as excinfo:
            main()
    finally:
        sys.argv = old
    captured = capfd.readouterr()
    return excinfo.value.code, captured.out, captured.err


def _one_error_line(err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err and "\x1b" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _nifti(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


@pytest.fixture(scope="module")
def setup(atlas_grid_subjects, tmp_path_factory):
    """A trained `threshold` checkpoint, its raw 2 mm scans (on the atlas grid) and prepared folders."""
    from typer.testing import CliRunner

    from uadct.cli import app

    root = tmp_path_factory.mktemp("safety")
    raw, prep = atlas_grid_subjects(root, ["case-0", "case-1", "case-2"])
    model = root / "threshold.pt"
    trained = CliRunner().invoke(app, ["train", str(prep), "-o", str(model), "--model", "threshold", "--validation-patches", "128"])
    assert trained.exit_code == 0, trained.output
    return model, raw, prep


@pytest.fixture
def scans(setup, tmp_path) -> Path:
    """A private copy of two raw scans (tests may try to destroy them)."""
    _, raw, _ = setup
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("case-0.nii.gz", "case-1.nii.gz"):
        (folder / name).write_bytes((raw / name).read_bytes())
    return folder


def _mount_tmpfs(folder: Path, size: str = "1m") -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs (full-disk / read-only filesystem)")
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True, encoding="utf-8", errors="replace")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")


def _unmount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MB tmpfs filled up to its last few KB."""
    folder = tmp_path / "full"
    _mount_tmpfs(folder)
    try:
        with open(folder / "filler", "wb", buffering=0) as handle:
            try:
                while True:
                    handle.write(b"\0" * 4096)
            except OSError:
                pass
        os.truncate(folder / "filler", max(0, (folder / "filler").stat().st_size - 8192))
        yield folder
    finally:
        _unmount(folder)


@pytest.fixture
def read_only_folder(tmp_path):
    """A tmpfs remounted read-only (chmod 555 does not stop root)."""
    folder = tmp_path / "ro"
    _mount_tmpfs(folder)
    try:
        done = subprocess.run(["mount", "-o", "remount,ro", str(folder)], capture_output=True, text=True, encoding="utf-8", errors="replace")
        if done.returncode != 0:
            pytest.skip(f"cannot remount the tmpfs read-only: {done.stderr.strip()}")
        yield folder
    finally:
        _unmount(folder)


# ----------------------------------------------------------------------------- 1. score -o = the scan
def test_1_score_refuses_to_overwrite_the_scan(setup, scans, capfd):
    model, _, _ = setup
    scan = scans / "case-0.nii.gz"
    before = sha256_of(scan)
    code, _, err = _run(capfd, "score", str(model), str(scan), "-o", str(scan))
    assert code == 2
    _one_error_line(err, str(scan), "input")
    assert sha256_of(scan) == before


def test_1_score_refuses_an_input_folder_as_output_folder(setup, scans, capfd):
    model, _, _ = setup
    (scans / "case-0.json").write_text('{"RepetitionTime": 2.0}')  # a BIDS sidecar beside the scan
    before = {p.name: sha256_of(p) for p in _files(scans)}
    code, _, err = _run(capfd, "score", str(model), str(scans), "-o", str(scans))
    assert code == 2
    _one_error_line(err, "input")
    assert {p.name: sha256_of(p) for p in _files(scans)} == before


def test_1_outputs_replacing_an_input_through_a_link_or_its_sidecar_are_refused(tmp_path):
    from uadct.outputs import refuse_overwriting_inputs

    scan = _nifti(tmp_path / "sub-1.nii.gz", np.ones(SHAPE, np.float32))
    link = tmp_path / "elsewhere" / "map.nii.gz"
    link.parent.mkdir()
    link.symlink_to(scan)
    with pytest.raises(UadctError, match="sub-1.nii.gz"):
        refuse_overwriting_inputs([link], [scan])
    with pytest.raises(UadctError, match="sub-1.json"):
        refuse_overwriting_inputs([tmp_path / "sub-1.json"], [scan])
    refuse_overwriting_inputs([tmp_path / "maps" / "sub-1.nii.gz"], [scan])  # a different file is fine


# ----------------------------------------------------------------------------- 2. heatmap -o = the scan
def test_2_heatmap_refuses_to_overwrite_the_scan(tmp_path, capfd):
    scan = _nifti(tmp_path / "scan.nii.gz", np.ones(SHAPE, np.float32))
    anomaly_map = _nifti(tmp_path / "map.nii.gz", np.linspace(0, 1, int(np.prod(SHAPE)), dtype=np.float32).reshape(SHAPE))
    before = sha256_of(scan)
    code, _, err = _run(capfd, "heatmap", str(scan), str(anomaly_map), "-o", str(scan))
    assert code == 2
    _one_error_line(err, str(scan))
    assert sha256_of(scan) == before


# ----------------------------------------------------------------------------- 3. --brain-mask-out = -o
def test_3_brain_mask_folder_equal_to_map_folder_is_refused_before_work(setup, scans, tmp_path, capfd):
    model, _, _ = setup
    maps = tmp_path / "maps"
    code, _, err = _run(capfd, "score", str(model), str(scans), "-o", str(maps), "--brain-mask-out", str(maps))
    assert code == 2
    _one_error_line(err, "maps")
    assert _files(maps) == []


# ----------------------------------------------------------------------------- 4. full disk
@pytest.mark.parametrize("name", ["map.nii.gz", "map.nii"])
def test_4_write_image_on_a_full_disk_raises_and_leaves_nothing(full_disk, name):
    image = sitk.GetImageFromArray(np.random.default_rng(0).random((40, 40, 40), dtype=np.float32))
    with pytest.raises(UadctError, match="could not be written"):
        write_image(image, full_disk / name)
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


def test_4_score_into_a_full_disk_gives_one_line_and_no_map(setup, scans, full_disk, capfd):
    model, _, _ = setup
    target = full_disk / "map.nii.gz"
    code, _, err = _run(capfd, "score", str(model), str(scans / "case-0.nii.gz"), "-o", str(target))
    assert code == 2
    _one_error_line(err, str(target))
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


# ----------------------------------------------------------------------------- 5. name collisions, replaced scans
def test_5_score_refuses_two_inputs_with_one_map_name(setup, scans, tmp_path, capfd):
    model, _, _ = setup
    image = read_image(scans / "case-0.nii.gz")
    sitk.WriteImage(image, str(scans / "case-0.nii"))  # same subject id, other suffix
    code, _, err = _run(capfd, "score", str(model), str(scans), "-o", str(tmp_path / "maps"))
    assert code == 2
    _one_error_line(err, "case-0.nii", "case-0.nii.gz")
    assert _files(tmp_path / "maps") == []


def test_5_preprocess_refuses_two_inputs_with_one_folder_name(scans, tmp_path, capfd, small_atlas_path):
    sitk.WriteImage(read_image(scans / "case-0.nii.gz"), str(scans / "case-0.nii"))
    out = tmp_path / "prep"
    code, _, err = _run(capfd, "preprocess", str(scans), "-o", str(out), "--atlas", str(small_atlas_path),
                        "--skull-strip", "none", "--registration", "none", "--no-bias-correction")
    assert code == 2
    _one_error_line(err, "case-0.nii", "case-0.nii.gz")
    assert _files(out) == []


def test_5_a_replaced_scan_is_scored_again(setup, scans, tmp_path, capfd):
    model, raw, _ = setup
    scan = scans / "case-0.nii.gz"
    target = tmp_path / "maps" / "case-0.nii.gz"
    assert _run(capfd, "score", str(model), str(scan), "-o", str(target))[0] in (0, None)
    first = sitk.GetArrayFromImage(read_image(target, allow_empty=True))
    scan.write_bytes((raw / "case-2.nii.gz").read_bytes())  # another scan under the same name
    assert _run(capfd, "score", str(model), str(scan), "-o", str(target))[0] in (0, None)
    sidecar = json.loads(target.with_name("case-0.json").read_text(encoding="utf-8"))
    assert sidecar["input_sha256"] == sha256_of(scan)
    assert not np.array_equal(first, sitk.GetArrayFromImage(read_image(target, allow_empty=True)))


# ----------------------------------------------------------------------------- 6. memory from a small file
def _zero_float64_nifti_gz(path: Path, edge: int) -> Path:
    """An all-zero edge^3 float64 .nii.gz of a few MB at most (gzip members of compressed zeros)."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape((edge, edge, edge))
    header.set_data_dtype(np.float64)
    header.set_zooms((1.0, 1.0, 1.0))
    header.set_qform(np.eye(4), code=1)
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 352
    head = header.binaryblock + b"\0" * (352 - len(header.binaryblock))
    slab = edge * edge * 8  # one slice of zeros
    member = gzip.compress(b"\0" * slab, compresslevel=9)
    with open(path, "wb") as handle:
        handle.write(gzip.compress(head))
        for _ in range(edge):
            handle.write(member)
    return path


def test_6_memory_is_checked_from_the_header_before_reading(tmp_path):
    path = _zero_float64_nifti_gz(tmp_path / "zeros.nii.gz", 512)
    assert path.stat().st_size < 8 << 20
    # VmHWM is this process's own peak (ru_maxrss would carry the forking pytest's peak across exec)
    probe = ("import sys\nfrom uadct.io import read_image\n"
             "try:\n    read_image(sys.argv[1])\nexcept Exception as exc:\n    print(exc)\n"
             "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))")
    done = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    message, peak_kb = done.stdout.strip().splitlines()
    assert "GiB of memory" in message and "--max-memory" in message and str(path) in message, message
    assert int(peak_kb) < 1_000_000, f"peak {int(peak_kb) / 1e6:.2f} GB before refusing"


def test_6_max_memory_allows_more(tmp_path, monkeypatch):
    from uadct.io import MAX_IMAGE_MEMORY_ENV

    path = _zero_float64_nifti_gz(tmp_path / "zeros.nii.gz", 64)  # 64^3 float64: 4.5 MB to read
    monkeypatch.setenv(MAX_IMAGE_MEMORY_ENV, str(1 << 20))
    with pytest.raises(InputError, match="GiB of memory"):
        read_image(path)
    monkeypatch.setenv(MAX_IMAGE_MEMORY_ENV, str(64 << 20))
    with pytest.raises(InputError, match="all zero"):  # read, then refused for what it holds
        read_image(path)


# ----------------------------------------------------------------------------- 7. degenerate maps in evaluate
def _lesion_cohort(tmp_path: Path, n: int = 3) -> tuple[Path, Path, Path]:
    maps, labels, masks = tmp_path / "maps", tmp_path / "labels", tmp_path / "masks"
    for i in range(n):
        brain = np.zeros(SHAPE, np.uint8)
        brain[2:10, 2:12, 2:8] = 1
        label = np.zeros(SHAPE, np.uint8)
        label[4 + i % 2 : 6 + i % 2, 4:6, 3:5] = 1
        _nifti(maps / f"s{i}.nii.gz", np.zeros(SHAPE, np.float32))
        _nifti(labels / f"s{i}.nii.gz", label)
        _nifti(masks / f"s{i}.nii.gz", brain)
    return maps, labels, masks


def test_7_all_zero_maps_without_brain_masks_are_not_a_perfect_score(tmp_path):
    from uadct.evaluate import EvaluationOptions, evaluate_folder

    maps, labels, _ = _lesion_cohort(tmp_path)
    options = EvaluationOptions(plots=False, bootstrap=0)
    with pytest.raises(InputError, match="all zero"):
        evaluate_folder(maps, labels, tmp_path / "report", options=options)


def test_7_constant_maps_with_brain_masks_are_reported_as_uninformative(tmp_path):
    from uadct.evaluate import EvaluationOptions, evaluate_folder

    maps, labels, masks = _lesion_cohort(tmp_path)
    options = EvaluationOptions(plots=False, bootstrap=0)
    result = evaluate_folder(maps, labels, tmp_path / "report", brain_masks_dir=masks, options=options)
    assert result.pooled["auroc"] == pytest.approx(0.5)
    assert result.pooled["best_dice"] < 0.5
    lesion = result.pooled["lesion"]
    assert lesion["n_detected"] == 0 and lesion["n_lesions"] == 3
    assert lesion["subjects_where_threshold_flags_everything"] == ["s0", "s1", "s2"]
    assert all(row["constant_map"] and row["threshold_flags"] == "everything" for row in result.per_subject)
    assert math.isnan(result.pooled["image_level"]["f1"])
    assert "equal" in result.pooled["image_level"]["degenerate"]
    text = (tmp_path / "report" / "metrics.json").read_text(encoding="utf-8")
    json.loads(text)
    assert "NaN" not in text


# ----------------------------------------------------------------------------- 8. NaN weights, NaN in JSON
def _edited_checkpoint(model: Path, target: Path, edit) -> Path:
    payload = torch.load(model, weights_only=True)
    edit(payload)
    torch.save(payload, target)
    return target


def test_8_checkpoint_with_nan_weights_is_refused(setup, scans, tmp_path, capfd):
    model, _, _ = setup

    def poison(payload):
        name = next(k for k, v in payload["state_dict"].items() if v.is_floating_point())
        payload["state_dict"][name] = torch.full_like(payload["state_dict"][name], float("nan"))

    bad = _edited_checkpoint(model, tmp_path / "nan.pt", poison)
    out = tmp_path / "maps" / "map.nii.gz"
    code, _, err = _run(capfd, "score", str(bad), str(scans / "case-0.nii.gz"), "-o", str(out))
    assert code == 2
    _one_error_line(err, str(bad), "NaN")
    assert _files(out.parent) == []


def test_8_json_never_holds_nan(tmp_path):
    path = write_json({"image_score": float("nan"), "values": [np.float32("inf"), 1.5], "n": np.int64(3)}, tmp_path / "x.json")
    assert json.loads(path.read_text(encoding="utf-8")) == {"image_score": None, "values": [None, 1.5], "n": 3}


def test_8_a_map_with_non_finite_scores_is_refused(setup, tmp_path):
    from uadct.checkpoint import load_checkpoint
    from uadct.inference import score_scan

    model, raw, _ = setup
    checkpoint = load_checkpoint(model)  # checked on load; poisoned afterwards, in memory
    checkpoint.model.config.mode = "deviation"  # |x - median| / MAD
    with torch.no_grad():
        checkpoint.model.median.fill_(float("nan"))
    out = tmp_path / "map.nii.gz"
    with pytest.raises(UadctError, match="NaN or infinite"):
        score_scan(checkpoint, raw / "case-0.nii.gz", out)
    assert not out.exists()


# ----------------------------------------------------------------------------- 9. one line instead of tracebacks
def test_9_read_only_output_folder_is_refused_before_work(setup, scans, read_only_folder, capfd):
    model, _, prep = setup
    code, _, err = _run(capfd, "score", str(model), str(scans / "case-0.nii.gz"), "-o", str(read_only_folder / "map.nii.gz"))
    assert code == 2
    _one_error_line(err, str(read_only_folder))
    code, out, err = _run(capfd, "train", str(prep), "-o", str(read_only_folder / "model.pt"), "--model", "threshold")
    assert code == 2
    _one_error_line(err, str(read_only_folder))


def test_9_an_existing_folder_as_output_file_is_refused_before_training(setup, tmp_path, capfd):
    _, _, prep = setup
    folder = tmp_path / "dir.pt"
    folder.mkdir()
    code, out, err = _run(capfd, "train", str(prep), "-o", str(folder), "--model", "threshold", "--validation-patches", "128")
    assert code == 2
    _one_error_line(err, str(folder), "folder")
    assert "epoch" not in out + err and list(folder.iterdir()) == [] and not Path(f"{folder}.resume.pt").exists()


def test_9_an_existing_folder_as_map_file_and_a_file_as_folder_are_refused(setup, scans, tmp_path, capfd):
    model, _, _ = setup
    folder = tmp_path / "map.nii.gz"
    folder.mkdir()
    code, _, err = _run(capfd, "score", str(model), str(scans / "case-0.nii.gz"), "-o", str(folder))
    assert code == 2
    _one_error_line(err, str(folder), "folder")
    a_file = tmp_path / "maps"
    a_file.write_text("not a folder")
    code, _, err = _run(capfd, "score", str(model), str(scans), "-o", str(a_file))
    assert code == 2
    _one_error_line(err, str(a_file), "file")
    code, _, err = _run(capfd, "preprocess", str(scans), "-o", str(a_file / "sub"), "--skull-strip", "none")
    assert code == 2
    _one_error_line(err, str(a_file))


def test_9_disk_full_during_preprocess_is_one_recorded_failure(scans, full_disk, small_atlas_path, capfd):
    code, out, err = _run(capfd, "preprocess", str(scans / "case-0.nii.gz"), "-o", str(full_disk / "prep"),
                          "--atlas", str(small_atlas_path), "--skull-strip", "none", "--registration", "none",
                          "--no-bias-correction", "--json")
    assert code == 1, err
    assert "Traceback" not in out + err
    summary = json.loads(out)
    assert len(summary["failed"]) == 1 and "could not be written" in summary["failed"][0]["error"], summary
    assert [p for p in _files(full_disk) if p.name != "filler"] == []


def _set(path: list, value):
    def edit(payload):
        if path[0] == "state_dict":
            payload["state_dict"] = value
            return
        metadata = json.loads(payload["metadata"])
        node = metadata
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        if path == ["patch", "size"]:  # edited consistently, so the geometry cross-check does not catch it
            metadata["model_config"]["patch_size"] = value
        payload["metadata"] = json.dumps(metadata)
    return edit


@pytest.mark.parametrize("edit, extra", [
    (["state_dict"], ["a", "list"]),
    (["state_dict"], "a string"),
    (["preprocess"], ["a", "list"]),
    (["patch", "size"], "abc"),
    (["score_scale"], "big"),
], ids=["state_dict-list", "state_dict-string", "preprocess-list", "patch-size-abc", "score_scale-big"])
def test_9_edited_checkpoints_are_refused_with_one_line(setup, scans, tmp_path, capfd, edit, extra):
    model, _, _ = setup
    bad = _edited_checkpoint(model, tmp_path / "edited.pt", _set(edit, extra))
    code, _, err = _run(capfd, "score", str(bad), str(scans / "case-0.nii.gz"), "-o", str(tmp_path / "maps"), "--mood")
    assert code == 2
    _one_error_line(err, str(bad))
    assert _files(tmp_path / "maps") == []


# ----------------------------------------------------------------------------- 10. broken links in an input folder
def test_10_broken_links_and_loops_in_an_input_folder_are_reported(setup, scans, tmp_path, capfd):
    model, _, _ = setup
    (scans / "gone.nii.gz").symlink_to(tmp_path / "missing.nii.gz")
    (scans / "loop.nii.gz").symlink_to(scans / "loop.nii.gz")
    code, out, err = _run(capfd, "score", str(model), str(scans), "-o", str(tmp_path / "maps"), "--json")
    assert code == 1
    failed = {r["subject"]: r["error"] for r in json.loads(out) if r["status"] == "failed"}
    assert sorted(failed) == ["gone", "loop"], out
    assert all("link" in message for message in failed.values()), failed
    assert sorted(p.name for p in _files(tmp_path / "maps")) == ["case-0.json", "case-0.nii.gz", "case-1.json", "case-1.nii.gz"]


# ----------------------------------------------------------------------------- 11. permissions follow the umask
@pytest.mark.slow
def test_11_outputs_follow_the_umask(setup, scans, tmp_path, capfd, small_atlas_path):
    model, _, prep = setup
    old = os.umask(0o022)
    try:
        maps = tmp_path / "maps"
        assert _run(capfd, "score", str(model), str(scans), "-o", str(maps))[0] in (0, None)
        png = tmp_path / "heat.png"
        assert _run(capfd, "heatmap", str(scans / "case-0.nii.gz"), str(maps / "case-0.nii.gz"), "-o", str(png))[0] in (0, None)
        trained = tmp_path / "model.pt"
        assert _run(capfd, "train", str(prep), "-o", str(trained), "--model", "threshold", "--validation-patches", "128")[0] in (0, None)
        out = tmp_path / "prep"
        assert _run(capfd, "preprocess", str(scans / "case-0.nii.gz"), "-o", str(out), "--atlas", str(small_atlas_path),
                    "--skull-strip", "none", "--registration", "none", "--no-bias-correction")[0] in (0, None)
    finally:
        os.umask(old)
    written = [*_files(maps), png, trained, *_files(out)]
    assert len(written) >= 8
    modes = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in written}
    assert set(modes.values()) == {"0o644"}, modes
    assert oct(stat.S_IMODE((out / "case-0").stat().st_mode)) == "0o755"


# ----------------------------------------------------------------------------- 12. messages
def test_12_a_2d_file_gives_exactly_one_line(setup, tmp_path, capfd):
    model, _, _ = setup
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((20, 20), np.float32)), str(flat))
    code, _, err = _run(capfd, "score", str(model), str(flat), "-o", str(tmp_path / "map.nii.gz"))
    assert code == 2
    _one_error_line(err, str(flat))


def test_12_pickled_code_is_refused_in_one_clean_line(tmp_path, capfd):
    import collections

    hostile = tmp_path / "hostile.pt"
    torch.save({"x": collections.Counter("abc"), "f": os.system}, hostile)
    code, _, err = _run(capfd, "score", str(hostile), str(tmp_path / "s.nii.gz"), "-o", str(tmp_path / "m.nii.gz"))
    assert code == 2
    line = _one_error_line(err, str(hostile), "refused")
    assert "weights_only" not in line and "trust" not in line


def test_12_a_text_file_is_not_a_checkpoint(tmp_path, capfd):
    text = tmp_path / "model.pt"
    text.write_text("hello, I am not a model\n")
    code, _, err = _run(capfd, "score", str(text), str(tmp_path / "s.nii.gz"), "-o", str(tmp_path / "m.nii.gz"))
    assert code == 2
    line = _one_error_line(err, str(text), "not a checkpoint")
    assert "other than tensors" not in line


def test_12_nifti2_gets_a_clear_line(tmp_path):
    import nibabel as nib

    path = tmp_path / "two.nii.gz"
    nib.Nifti2Image(np.ones(SHAPE, np.float32), np.eye(4)).to_filename(str(path))
    with pytest.raises(InputError, match="NIfTI-2"):
        read_image(path)


@pytest.mark.slow  # the first elastix call loads ITK's elastix module (a minute on 2 busy cores)
def test_12_elastix_failure_never_advises_logtoconsole(small_atlas_path):
    from uadct.errors import PreprocessError
    from uadct.preprocess.register import register_to_atlas

    atlas_brain = read_image(small_atlas_path)
    array = sitk.GetArrayFromImage(atlas_brain)
    hostile = sitk.GetImageFromArray(np.where(array > 0, array * 1e30, 0).astype(np.float32))  # huge intensities
    hostile.CopyInformation(atlas_brain)
    with pytest.raises(PreprocessError) as excinfo:
        register_to_atlas(hostile, atlas_brain, "affine", resolutions=1, iterations=5, samples=256, backend="elastix")
    message = str(excinfo.value)
    assert "LogToConsole" not in message and "\n" not in message and ".hxx" not in message, message
    assert "internal elastix error" in message.lower() and "intensities span" in message


def test_12_mood_refuses_a_nifti_file_name_and_makes_no_folder(setup, scans, tmp_path, capfd):
    model, _, _ = setup
    target = tmp_path / "x.nii.gz"
    code, _, err = _run(capfd, "score", str(model), str(scans / "case-0.nii.gz"), "-o", str(target), "--mood")
    assert code == 2
    _one_error_line(err, "--mood")
    assert not target.exists()


def test_12_preprocess_help_keeps_its_bracketed_defaults():
    from typer.testing import CliRunner

    from uadct.cli import app

    result = CliRunner().invoke(app, ["preprocess", "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    text = " ".join(result.output.replace("│", " ").split())
    for phrase in ("[default: from --modality]", "[default: on for mr, off for ct]", "[default: 40]", "[default: 80]",
                   "[default: the first]", "[default: $UADCT_HDBET_WEIGHTS, then"):
        assert phrase in text, phrase
    assert text.count("[default:") >= 8
