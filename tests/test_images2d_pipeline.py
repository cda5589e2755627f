"""2D images end to end through the CLI: preprocess -> train -> score (maps on each input's size) -> heatmap -> evaluate."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from typer.testing import CliRunner

from images2d_data import write_png_cohort
from uadct.cli import app
from uadct.io import read_image, same_grid

runner = CliRunner()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A PNG cohort (48 x 60 pictures; abnormal ones with a bright square), preprocessed to 32 x 32 and a model on it."""
    root = tmp_path_factory.mktemp("png2d")
    folders = write_png_cohort(root)
    done = runner.invoke(app, ["preprocess", "--modality", "image", "--image-size", "32", str(folders["train"]), "-o", str(root / "prep")])
    assert done.exit_code == 0, done.output
    done = runner.invoke(app, ["train", str(root / "prep"), "-o", str(root / "model.pt"), "--model", "normative",
                               "--patch-size", "8", "--epochs", "1", "--patches-per-epoch", "64", "--validation-patches", "16",
                               "--device", "cpu"])
    assert done.exit_code == 0, done.output
    return root, folders


def test_score_writes_maps_on_each_inputs_own_grid_and_an_image_score(cohort):
    root, folders = cohort
    done = runner.invoke(app, ["score", str(root / "model.pt"), str(root / "test"), "-o", str(root / "maps"), "--device", "cpu"])
    assert done.exit_code == 0, done.output
    maps = sorted((root / "maps").glob("*.nii.gz"))
    assert [p.name for p in maps] == [f"{kind}{i}.nii.gz" for kind in ("abnormal", "normal") for i in range(3)]
    picture = read_image(folders["abnormal"] / "abnormal0.png")
    anomaly_map = read_image(root / "maps" / "abnormal0.nii.gz", allow_empty=True)
    assert anomaly_map.GetSize() == (60, 48, 1) and same_grid(anomaly_map, picture)
    values = sitk.GetArrayFromImage(anomaly_map)[0]
    assert values[20:28, 36:44].mean() > 3 * values[values > 0].mean()  # the bright square stands out, at its place
    sidecars = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in (root / "maps").glob("*.json")}
    assert "1 %" in sidecars["abnormal0"]["image_score_definition"]
    assert min(sidecars[f"abnormal{i}"]["image_score"] for i in range(3)) > max(sidecars[f"normal{i}"]["image_score"] for i in range(3))


def test_png_map_and_heatmap_have_the_inputs_size(cohort):
    root, folders = cohort
    source = folders["abnormal"] / "abnormal1.png"
    done = runner.invoke(app, ["score", str(root / "model.pt"), str(source), "-o", str(root / "one.png"), "--device", "cpu"])
    assert done.exit_code == 0, done.output
    with Image.open(root / "one.png") as picture:
        assert picture.size == (60, 48) and np.asarray(picture).dtype == np.uint16
    assert (root / "one.json").is_file()
    done = runner.invoke(app, ["heatmap", str(source), str(root / "one.png"), "-o", str(root / "overlay.png")])
    assert done.exit_code == 0, done.output
    with Image.open(root / "overlay.png") as overlay:
        assert overlay.size[0] > overlay.size[1] > 200  # one wide panel (60 x 48 picture) plus its colour bar


def test_evaluate_with_image_labels_and_png_lesion_masks(cohort):
    root, folders = cohort
    if not (root / "maps").is_dir():
        runner.invoke(app, ["score", str(root / "model.pt"), str(root / "test"), "-o", str(root / "maps"), "--device", "cpu"])
    done = runner.invoke(app, ["evaluate", str(root / "maps"), "--image-labels", str(root / "test"), "-o", str(root / "report"),
                               "--bootstrap", "50"])
    assert done.exit_code == 0, done.output
    result = json.loads((root / "report" / "image_level.json").read_text(encoding="utf-8"))
    assert result["metrics"]["n_abnormal"] == 3 and result["metrics"]["n_normal"] == 3
    assert result["metrics"]["auroc"] == 1.0 and result["metrics"]["auprc"] == 1.0
    table = root / "labels.tsv"
    table.write_text("image\tlabel\n" + "".join(f"normal{i}.png\tnormal\n" for i in range(3))
                     + "abnormal0\tabnormal\nabnormal1\t1\n", encoding="utf-8")
    done = runner.invoke(app, ["evaluate", str(root / "maps"), "--image-labels", str(table), "-o", str(root / "report_tsv"),
                               "--bootstrap", "0", "--no-plots"])
    assert done.exit_code == 0, done.output
    result = json.loads((root / "report_tsv" / "image_level.json").read_text(encoding="utf-8"))
    assert result["maps_without_label"] == ["abnormal2"] and result["metrics"]["n_abnormal"] == 2
    labels = root / "masks"
    labels.mkdir()
    for kind in ("normal", "abnormal"):
        for index in range(3):
            mask = np.zeros((48, 60), np.uint8)
            if kind == "abnormal":
                mask[18:30, 34:46] = 1
            Image.fromarray(mask).save(labels / f"{kind}{index}.png")
    done = runner.invoke(app, ["evaluate", str(root / "maps"), str(labels), "-o", str(root / "report_voxels"), "--bootstrap", "0",
                               "--no-plots"])
    assert done.exit_code == 0, done.output
    pooled = json.loads((root / "report_voxels" / "metrics.json").read_text(encoding="utf-8"))["pooled"]
    assert pooled["auroc"] > 0.95 and pooled["image_level"]["auroc"] == 1.0


def test_a_bad_image_fails_alone_with_one_line(cohort, tmp_path):
    root, folders = cohort
    batch = tmp_path / "batch"
    batch.mkdir()
    (batch / "good.png").write_bytes((folders["normal"] / "normal0.png").read_bytes())
    (batch / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    done = subprocess.run([sys.executable, "-m", "uadct", "score", str(root / "model.pt"), str(batch), "-o", str(tmp_path / "maps"),
                           "--device", "cpu"], capture_output=True, text=True, encoding="utf-8", errors="replace",
                          env={**os.environ, "COLUMNS": "400"})
    assert done.returncode == 1
    failures = [line for line in done.stderr.splitlines() if "failed" in line]
    assert len(failures) == 1 and str(batch / "broken.png") in failures[0] and "PNG" in failures[0]
    assert (tmp_path / "maps" / "good.nii.gz").is_file() and not (tmp_path / "maps" / "broken.nii.gz").exists()
