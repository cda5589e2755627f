"""Batch behaviour of the CLI: shards, SLURM arrays, JSON summaries, bad subjects."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from uadct.cli import app
from uadct.io import read_image

runner = CliRunner()
FAST = ["--skull-strip", "none", "--registration", "none", "--no-bias-correction"]


@pytest.fixture
def brains(atlas_grid_subjects, tmp_path):
    """``brains(count)``: skull-stripped scans on the 2 mm atlas grid in tmp_path/raw."""

    def make(count: int = 3) -> list:
        raw, _ = atlas_grid_subjects(tmp_path, [f"sub-{i:02d}" for i in range(count)], prepare=False)
        return sorted(raw.iterdir())

    return make


@pytest.mark.slow


def test_preprocess_shards_and_json(brains, small_atlas_path, tmp_path, monkeypatch):
    scans = brains()
    common = ["preprocess", str(tmp_path / "raw"), "-o", str(tmp_path / "prep"), "--atlas", str(small_atlas_path), *FAST, "--json"]
    first = runner.invoke(app, common + ["--shard", "0/2"])
    assert first.exit_code == 0, first.output
    assert len(json.loads(first.output)["done"]) == 2
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    second = runner.invoke(app, common)
    assert second.exit_code == 0, second.output
    assert [p.split("/")[-1] for p in json.loads(second.output)["done"]] == [scans[1].name.removesuffix(".nii.gz")]
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    again = runner.invoke(app, common)
    assert len(json.loads(again.output)["skipped"]) == 3 and not json.loads(again.output)["done"]


def test_batch_carries_on_past_a_bad_subject(brains, small_atlas_path, tmp_path):
    brains(2)
    (tmp_path / "raw" / "sub-bad.nii.gz").write_bytes(b"\x1f\x8b broken")
    result = runner.invoke(app, ["preprocess", str(tmp_path / "raw"), "-o", str(tmp_path / "prep"),
                                 "--atlas", str(small_atlas_path), *FAST, "--json"])
    assert result.exit_code == 1
    summary = json.loads(result.output)
    assert len(summary["done"]) == 2
    assert summary["failed"][0]["input"].endswith("sub-bad.nii.gz") and "sub-bad.nii.gz" in summary["failed"][0]["error"]
    assert not (tmp_path / "prep" / "sub-bad").exists()


@pytest.mark.slow


def test_score_prepared_folders_with_json_and_skip(brains, small_atlas_path, tmp_path):
    brains()
    prep = tmp_path / "prep"
    assert runner.invoke(app, ["preprocess", str(tmp_path / "raw"), "-o", str(prep), "--atlas", str(small_atlas_path), *FAST]).exit_code == 0
    model = tmp_path / "threshold.pt"
    trained = runner.invoke(app, ["train", str(prep), "-o", str(model), "--model", "threshold", "--validation-patches", "256"])
    assert trained.exit_code == 0, trained.output
    maps = tmp_path / "maps"
    result = runner.invoke(app, ["score", str(model), str(prep), "-o", str(maps), "--json", "--shard", "0/1"])
    assert result.exit_code == 0, result.output
    records = json.loads(result.output)
    assert [r["status"] for r in records] == ["done"] * 3
    anomaly_map = read_image(maps / "sub-00.nii.gz", allow_empty=True)
    assert anomaly_map.GetSize() == read_image(tmp_path / "raw" / "sub-00.nii.gz").GetSize()
    again = json.loads(runner.invoke(app, ["score", str(model), str(prep), "-o", str(maps), "--json"]).output)
    assert [r["status"] for r in again] == ["skipped"] * 3


@pytest.mark.slow


def test_a_shard_with_one_subject_still_writes_into_the_folder(brains, small_atlas_path, tmp_path):
    brains(2)
    prep = tmp_path / "prep"
    assert runner.invoke(app, ["preprocess", str(tmp_path / "raw"), "-o", str(prep), "--atlas", str(small_atlas_path), *FAST]).exit_code == 0
    model = tmp_path / "threshold.pt"
    assert runner.invoke(app, ["train", str(prep), "-o", str(model), "--model", "threshold", "--validation-patches", "256"]).exit_code == 0
    result = runner.invoke(app, ["score", str(model), str(prep), "-o", str(tmp_path / "maps"), "--shard", "1/2"])
    assert result.exit_code == 0, result.output
    assert [p.name for p in (tmp_path / "maps").glob("*.nii.gz")] == ["sub-01.nii.gz"]
    too_many = runner.invoke(app, ["score", str(model), str(prep), "-o", str(tmp_path / "one.nii.gz")])
    assert too_many.exit_code != 0 and not (tmp_path / "one.nii.gz").exists()
