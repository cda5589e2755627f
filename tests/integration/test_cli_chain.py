"""The whole command-line chain on a small cohort built from real anatomy.

demo -> preprocess -> train -> score -> heatmap -> evaluate, in-process through the
Typer app, at 2 mm with a 2 mm SRI24 template so it runs in about a minute.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from uadct import __version__
from uadct.cli import app, main
from uadct.io import read_image, same_grid

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_version_and_help():
    assert __version__ in invoke("--version").output
    assert "preprocess" in invoke("--help").output


@pytest.mark.slow
def test_full_chain_on_demo_cohort(small_cohort, small_atlas_path, tmp_path):
    prep, maps, masks = tmp_path / "prep", tmp_path / "maps", tmp_path / "masks"
    invoke("preprocess", small_cohort.root / "healthy", "-o", prep, "--atlas", small_atlas_path)
    assert len([p for p in prep.iterdir() if p.is_dir()]) == len(small_cohort.healthy)

    model = tmp_path / "model.pt"
    invoke("train", prep, "-o", model, "--patch-size", "16", "--epochs", "3", "--patience", "2",
           "--patches-per-epoch", "2048", "--validation-patches", "512", "--seed", "1")
    assert model.is_file()

    invoke("score", model, small_cohort.root / "test", "-o", maps, "--brain-mask-out", masks)
    for scan in small_cohort.test:
        name = scan.name
        anomaly_map, subject = read_image(maps / name, allow_empty=True), read_image(scan)
        assert same_grid(anomaly_map, subject), "the map must lie exactly on the input's grid"
        assert anomaly_map.GetPixelID() == sitk.sitkFloat32
        array = sitk.GetArrayFromImage(anomaly_map)
        brain = sitk.GetArrayFromImage(read_image(masks / name, allow_empty=True)) > 0
        assert array[brain].max() > 0 and not array[~brain].any()
        sidecar = json.loads((maps / name.replace(".nii.gz", ".json")).read_text(encoding="utf-8"))
        assert sidecar["image_score"] > 0

    first = small_cohort.test[0]
    png = tmp_path / "fig.png"
    invoke("heatmap", first, maps / first.name, "-o", png, "--label", small_cohort.labels[0])
    assert png.stat().st_size > 10_000

    report = tmp_path / "report"
    result = invoke("evaluate", maps, small_cohort.root / "labels", "-o", report, "--brain-masks", masks)
    assert "pooled" in result.output
    metrics = json.loads((report / "metrics.json").read_text(encoding="utf-8"))
    assert (report / "report.md").is_file() and (report / "metrics.csv").is_file()
    # the default model (normative, fitted on 3 subjects) finds inserted lesions better than chance
    assert metrics["pooled"]["auroc"] > 0.6, metrics["pooled"]


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys, monkeypatch):
    (tmp_path / "model.pt").write_bytes(b"junk")
    (tmp_path / "scan.nii.gz").write_text("not a nifti")
    monkeypatch.setattr("sys.argv", ["uadct", "score", str(tmp_path / "model.pt"), str(tmp_path / "scan.nii.gz"),
                                     "-o", str(tmp_path / "map.nii.gz")])
    with pytest.raises(SystemExit) as excinfo:
        main()
    assert excinfo.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "model.pt" in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "map.nii.gz").exists()
