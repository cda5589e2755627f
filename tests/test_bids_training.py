"""Training and scoring straight from a BIDS derivative written by `uadct preprocess` (BIDS file names, not image.nii.gz)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from uadct.checkpoint import load_checkpoint
from uadct.inference import score_scan
from uadct.io import read_image, write_image
from uadct.preprocess.batch import preprocess_many
from uadct.preprocess.bids import find_bids_subjects
from uadct.preprocess.config import PreprocessConfig
from uadct.preprocess.prepared import PreparedFolder, find_prepared
from uadct.training import TrainConfig, train_model


@pytest.mark.slow


def test_train_and_score_from_a_bids_derivative(small_atlas_path, tmp_path):
    template = read_image(small_atlas_path)
    array = sitk.GetArrayFromImage(template)
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "toy", "BIDSVersion": "1.9.0"}))
    for index, name in enumerate(["sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz", "sub-02/anat/sub-02_T1w.nii.gz",
                                  "sub-03/anat/sub-03_T1w.nii.gz"]):
        image = sitk.GetImageFromArray((array * (1.0 + 0.2 * index)).astype(np.float32))
        image.CopyInformation(template)
        write_image(image, bids / name)
    config = PreprocessConfig(atlas=str(small_atlas_path), skull_strip="none", registration="none", bias_correction=False)
    outcome = preprocess_many(find_bids_subjects(bids), tmp_path / "deriv", config)
    assert not outcome.failed, outcome.failed
    folders = find_prepared(tmp_path / "deriv")
    assert [PreparedFolder(f).name for f in folders] == ["sub-01_ses-1", "sub-02", "sub-03"]
    assert not any((f / "image.nii.gz").exists() for f in folders)  # BIDS derivative names only

    result = train_model(tmp_path / "deriv", tmp_path / "model.pt",
                         TrainConfig(model="cae", patch_size=16, batch_size=16, patches_per_epoch=32, validation_patches=16,
                                     statistics_patches=32, max_epochs=1, patience=5, device="cpu"))
    checkpoint = load_checkpoint(result.checkpoint)
    train, validation = checkpoint.training_subjects
    assert sorted(train + validation) == ["sub-01_ses-1", "sub-02", "sub-03"]
    assert all((f / "cache" / "image.npy").is_file() for f in folders)  # the array cache sits in each BIDS anat folder
    assert checkpoint.patch_spec.size == 16 and checkpoint.preprocess_config == config

    scored = score_scan(checkpoint, folders[1], tmp_path / "maps" / "sub-02.nii.gz", device="cpu")
    assert np.isfinite(scored.image_score) and scored.image_score > 0
    native = read_image(bids / "sub-02/anat/sub-02_T1w.nii.gz")
    assert read_image(scored.map_path).GetSize() == native.GetSize()
