"""Usage lines without -o: every command has a default output that never touches the inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from uadct import default_outputs as rules
from uadct.cli import app

FAST = ["--skull-strip", "none", "--registration", "none", "--no-bias-correction"]


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def test_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bids = tmp_path / "ds"
    (bids / "sub-01" / "anat").mkdir(parents=True)
    (bids / "dataset_description.json").write_text("{}")
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "a.nii.gz").write_bytes(b"")
    assert rules.preprocess_output([str(bids)]) == bids / "derivatives" / "uadct"
    assert rules.preprocess_output(["scans/"]) == tmp_path / "scans-uadct"
    assert rules.preprocess_output(["scans/a.nii.gz"]) == Path("uadct-prep")
    assert rules.preprocess_output(["-"]) == Path("uadct-prep")
    assert rules.train_output("vae") == Path("vae.pt")
    assert rules.score_output(["scans/a.nii.gz"], [Path("scans/a.nii.gz")]) == Path("a_anomaly.nii.gz")
    assert rules.score_output(["scans"], [scans / "a.nii.gz"]) == tmp_path / "scans-maps"
    assert rules.score_output(["-"], [Path("x.nii.gz")]) == Path("maps")
    assert rules.score_output(["a.nii.gz", "b.nii.gz"], [Path("a.nii.gz"), Path("b.nii.gz")]) == Path("maps")
    assert rules.heatmap_output(Path("maps/sub-01.nii.gz"), html=False) == Path("sub-01_heatmap.png")
    assert rules.heatmap_output(Path("maps"), html=True) == Path("heatmaps.html")
    assert rules.evaluate_output(Path("maps/")) == tmp_path / "maps-report"
    # run from inside the scans folder, the single-map default still differs from the scan's name
    assert rules.score_output(["a.nii.gz"], [Path("a.nii.gz")]) != Path("a.nii.gz")


@pytest.mark.slow


def test_preprocess_and_score_without_output(small_atlas_path, atlas_grid_subjects, threshold_model, tmp_path, monkeypatch):
    raw, _ = atlas_grid_subjects(tmp_path, ["s1", "s2"], prepare=False)
    before = _files(raw)
    runner = CliRunner()
    done = runner.invoke(app, ["preprocess", str(raw), "--atlas", str(small_atlas_path), *FAST])
    assert done.exit_code == 0, done.output
    assert f"output: {tmp_path / 'raw-uadct'}" in done.output
    assert sorted(p.name for p in (tmp_path / "raw-uadct").iterdir() if not p.name.startswith(".")) == ["s1", "s2"]

    # a BIDS dataset: the derivative goes to <dataset>/derivatives/uadct
    bids = tmp_path / "bids"
    (bids / "sub-01" / "anat").mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.9.0"}))
    shutil.copy(raw / "s1.nii.gz", bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    done = runner.invoke(app, ["preprocess", str(bids), "--atlas", str(small_atlas_path), *FAST])
    assert done.exit_code == 0, done.output
    derivative = bids / "derivatives" / "uadct"
    assert (derivative / "dataset_description.json").is_file()
    assert list((derivative / "sub-01" / "anat").glob("sub-01_*desc-preproc_T1w.nii.gz"))

    monkeypatch.chdir(tmp_path)
    one = runner.invoke(app, ["score", str(threshold_model), str(raw / "s1.nii.gz"), "--batch-size", "4096"])
    assert one.exit_code == 0, one.output
    assert (tmp_path / "s1_anomaly.nii.gz").is_file() and (tmp_path / "s1_anomaly.json").is_file()
    many = runner.invoke(app, ["score", str(threshold_model), str(raw), "--batch-size", "4096", "--json"])
    assert many.exit_code == 0, many.output
    assert sorted(p.name for p in (tmp_path / "raw-maps").glob("*.nii.gz")) == ["s1.nii.gz", "s2.nii.gz"]
    assert _files(raw) == before  # the inputs were never touched
    # the usage lines of before keep working
    explicit = runner.invoke(app, ["score", str(threshold_model), str(raw / "s2.nii.gz"), "-o", str(tmp_path / "m.nii.gz"),
                                   "--batch-size", "4096"])
    assert explicit.exit_code == 0 and (tmp_path / "m.nii.gz").is_file()
