"""`uadct preprocess --jobs N`: worker processes give the same outputs as one process."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from uadct.cli import app
from uadct.io import read_image, write_image
from uadct.preprocess.batch import preprocess_many
from uadct.preprocess.config import PreprocessConfig

runner = CliRunner()
FAST = ["--skull-strip", "none", "--registration", "none", "--no-bias-correction"]

pytestmark = pytest.mark.slow  # spawns preprocessing worker processes


def _brains(small_atlas_path, folder, count):
    """Skull-stripped scans on the 2 mm atlas grid with different contrasts, and one broken file."""
    template = read_image(small_atlas_path)
    array = sitk.GetArrayFromImage(template)
    folder.mkdir()
    for i in range(count):
        image = sitk.GetImageFromArray((array * (1.0 + 0.2 * i) + 3.0 * i * (array > 0)).astype(np.float32))
        image.CopyInformation(template)
        write_image(image, folder / f"sub-{i:02d}.nii.gz")
    (folder / "sub-bad.nii.gz").write_bytes(b"\x1f\x8b broken")
    return sorted(folder.iterdir())


def _comparable_sidecar(path):
    data = json.loads(path.read_text(encoding="utf-8"))
    return {k: data[k] for k in ("subject", "config", "atlas", "native_grid", "normalization_stats", "quality")}


def test_two_jobs_match_one_job_voxel_for_voxel(small_atlas_path, tmp_path):
    _brains(small_atlas_path, tmp_path / "raw", count=3)
    outputs = {}
    for jobs in (1, 2):
        prep = tmp_path / f"prep{jobs}"
        result = runner.invoke(app, ["preprocess", str(tmp_path / "raw"), "-o", str(prep), "--atlas", str(small_atlas_path),
                                     *FAST, "--jobs", str(jobs), "--json"])
        assert result.exit_code == 1, result.output  # the broken subject fails, the others are done
        summary = json.loads(result.output)
        assert [p.split("/")[-1] for p in summary["done"]] == ["sub-00", "sub-01", "sub-02"]
        assert len(summary["failed"]) == 1 and "sub-bad.nii.gz" in summary["failed"][0]["error"]
        outputs[jobs] = prep
    one, two = outputs[1], outputs[2]
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir()) == ["sub-00", "sub-01", "sub-02"]
    for subject in ("sub-00", "sub-01", "sub-02"):
        assert sorted(p.name for p in (one / subject).iterdir()) == sorted(p.name for p in (two / subject).iterdir())
        for name in ("image.nii.gz", "mask.nii.gz"):
            a = sitk.GetArrayFromImage(read_image(one / subject / name, allow_empty=True))
            b = sitk.GetArrayFromImage(read_image(two / subject / name, allow_empty=True))
            np.testing.assert_array_equal(a, b)
        assert (one / subject / "atlas_to_subject.tfm").read_text(encoding="utf-8") == (two / subject / "atlas_to_subject.tfm").read_text(encoding="utf-8")
        assert _comparable_sidecar(one / subject / "preprocess.json") == _comparable_sidecar(two / subject / "preprocess.json")


def test_jobs_report_progress_per_subject_and_keep_input_order(small_atlas_path, tmp_path):
    scans = _brains(small_atlas_path, tmp_path / "raw", count=2)
    config = PreprocessConfig(atlas=str(small_atlas_path), skull_strip="none", registration="none", bias_correction=False)
    seen = []
    outcome = preprocess_many(scans, tmp_path / "prep", config, jobs=2, progress=lambda path, status: seen.append((path.name, status)))
    assert sorted(seen) == [("sub-00.nii.gz", "done"), ("sub-01.nii.gz", "done"), ("sub-bad.nii.gz", "failed")]
    assert [p.name for p in outcome.done] == ["sub-00", "sub-01"]
    again = preprocess_many(scans, tmp_path / "prep", config, jobs=2)
    assert [p.name for p in again.skipped] == ["sub-00", "sub-01"] and len(again.failed) == 1
