"""The pretrained models shipped in the package: cards, checksums, names, scoring with no training."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from uadct.checkpoint import load_checkpoint
from uadct.cli import app
from uadct.errors import CheckpointError, UadctError
from uadct.io import sha256_of
from uadct.pretrained import PRETRAINED_DIR, model_card, pretrained_names, resolve_checkpoint

runner = CliRunner()
CARD_FIELDS = ("title", "method", "preprocessing", "training_data", "benchmark", "limits", "sha256", "speed", "rebuild")


def test_t1_is_shipped_and_matches_its_card():
    assert "t1" in pretrained_names()
    for name in pretrained_names():
        path = PRETRAINED_DIR / f"{name}.pt"
        card = model_card(name)
        assert all(field in card for field in CARD_FIELDS), name
        assert sha256_of(path) == card["sha256"] and path.stat().st_size == card["size_bytes"]
        assert path.stat().st_size < 25e6
        payload = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
        assert payload["format"] == "uadct-checkpoint"
        assert {n.split("/")[0] for n in zipfile.ZipFile(path).namelist()} == {"archive"}  # no temporary file name inside
        metadata = load_checkpoint(path).metadata
        assert metadata["preprocess"]["atlas"] == "sri24@2mm"  # a name, not a path on the machine that built it
        assert metadata["calibration"], "shipped models are calibrated (--fpr, --units)"
        assert "/work/" not in json.dumps(metadata) and "seconds" not in metadata["training"]
    data = model_card("t1")["training_data"]
    assert data["licence"] == "CC BY-SA 3.0" and data["attribution"] == "IXI dataset, Imperial College London"


def test_names_resolve_files_still_work_and_unknown_names_list_the_shipped_ones(tmp_path):
    assert resolve_checkpoint("t1") == PRETRAINED_DIR / "t1.pt"
    copy = tmp_path / "t1"  # a file of that name in the working folder wins: paths work as before
    copy.write_bytes(b"x")
    assert resolve_checkpoint(copy) == copy
    with pytest.raises(CheckpointError, match=r"not a pretrained model name \(pretrained: .*t1"):
        resolve_checkpoint("t2")
    result = runner.invoke(app, ["score", "t2", str(tmp_path / "scan.nii.gz"), "-o", str(tmp_path / "map.nii.gz")])
    assert isinstance(result.exception, UadctError) and "pretrained: " in str(result.exception)


def test_models_pretrained_prints_the_card():
    result = runner.invoke(app, ["models", "--pretrained"])
    assert result.exit_code == 0, result.output
    card = model_card("t1")
    assert card["sha256"] in result.output and "CC BY-SA 3.0" in result.output and "IXI" in result.output
    as_json = runner.invoke(app, ["models", "--pretrained", "--json"])
    assert json.loads(as_json.stdout)["t1"]["sha256"] == card["sha256"]


def test_pretrained_model_scores_a_small_prepared_scan_and_finds_a_lesion():
    """The atlas brain at 2 mm, normalised like the chain does, with one bright blob."""
    from uadct.atlas import load_atlas
    from uadct.inference import score_volume

    checkpoint = load_checkpoint(resolve_checkpoint("t1"))
    atlas = load_atlas(checkpoint.preprocess["atlas"])
    assert atlas.checksum == checkpoint.metadata["atlas"]["sha256"]
    image = sitk.GetArrayFromImage(atlas.brain).astype(np.float32)
    mask = sitk.GetArrayFromImage(atlas.mask)
    low, high = np.percentile(image[mask > 0], [5, 95])
    image = np.where(mask > 0, (image - low) / (high - low), 0).astype(np.float32)
    centre = np.array(np.nonzero(mask)).mean(axis=1).astype(int) + np.array([4, 0, 8])
    grid = np.indices(image.shape).transpose(1, 2, 3, 0)
    blob = (np.linalg.norm(grid - centre, axis=-1) <= 3) & (mask > 0)
    image[blob] += 1.5
    anomaly_map = score_volume(checkpoint, image, mask, device="cpu")
    assert anomaly_map.shape == image.shape and np.isfinite(anomaly_map).all()
    assert not anomaly_map[mask == 0].any()
    assert anomaly_map[blob].mean() > np.quantile(anomaly_map[(mask > 0) & ~blob], 0.99)


@pytest.mark.slow
def test_score_t1_on_a_raw_head_writes_map_and_mask_on_its_grid(small_cohort, tmp_path):
    scan = small_cohort.test[0]
    result = runner.invoke(app, ["score", "t1", str(scan), "-o", str(tmp_path / "map.nii.gz"), "--fpr", "0.01",
                                 "--mask-out", str(tmp_path / "lesions.nii.gz")])
    assert result.exit_code == 0, result.output
    raw = sitk.ReadImage(str(scan))
    for name in ("map.nii.gz", "lesions.nii.gz"):
        out = sitk.ReadImage(str(tmp_path / name))
        assert out.GetSize() == raw.GetSize() and out.GetSpacing() == raw.GetSpacing()
        assert out.GetOrigin() == raw.GetOrigin() and out.GetDirection() == raw.GetDirection()
    sidecar = json.loads((tmp_path / "map.json").read_text(encoding="utf-8"))
    assert sidecar["settings"]["checkpoint_sha256"] == model_card("t1")["sha256"] and sidecar["fpr"] == 0.01
