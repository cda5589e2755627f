"""Covariate conditioning: participants TSV parsing and encoding, one-line errors for missing subjects,
and a model whose scores change with the subject's covariates, through training and scoring."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from uadct.checkpoint import load_checkpoint, save_checkpoint
from uadct.covariates import CovariateEncoding, CovariateSource, CovariateTable, encoding_of
from uadct.errors import UadctError
from uadct.inference import score_scan
from uadct.io import read_image
from uadct.models import build_model
from uadct.training import TrainConfig, train_model

PARTICIPANTS = "participant_id\tage\tsex\thandedness\nsub-00\t30\tF\tR\nsub-01\t50\tm\tL\n02\t70\tM\tn/a\nsub-03\tn/a\tF\tR\n"


def _tsv(tmp_path, text=PARTICIPANTS):
    path = tmp_path / "participants.tsv"
    path.write_text(text, encoding="utf-8")
    return path


def test_participants_tsv_is_parsed_and_encoded(tmp_path):
    table = CovariateTable.read(_tsv(tmp_path))
    assert table.columns == ["age", "sex", "handedness"]
    assert table.row("sub-01_ses-2")["age"] == "50"  # a session of sub-01
    assert table.row("sub-02")["sex"] == "M"  # an id written without "sub-"
    encoding = CovariateEncoding.fit(table, ["sub-00", "sub-01", "sub-02"])
    assert encoding.columns == ["age", "sex"] and encoding.names == ["age", "sex=F", "sex=M"]
    sd = np.std([30.0, 50.0, 70.0])
    np.testing.assert_allclose(encoding.for_subject(table, "sub-00"), [(30 - 50) / sd, 1, 0], rtol=1e-6)
    np.testing.assert_allclose(encoding.for_subject(table, "sub-01"), [0, 0, 1], atol=1e-7)  # "m" is "M"
    again = CovariateEncoding.from_dict(encoding.to_dict())
    np.testing.assert_array_equal(again.for_subject(table, "sub-02"), encoding.for_subject(table, "sub-02"))
    given = CovariateSource(encoding, values={"age": "60", "sex": "f"}).vector("anyone")
    np.testing.assert_allclose(given, [10 / sd, 1, 0], rtol=1e-6)
    messages = {
        "no row for subject 'sub-09'": lambda: table.row("sub-09"),
        "subject 'sub-03' has no value for 'age'": lambda: encoding.for_subject(table, "sub-03"),
        "no column 'weight'": lambda: CovariateEncoding.fit(table, ["sub-00"], ["weight"]),
        "sex='X', a value not seen in training": lambda: encoding.encode_row({"age": "1", "sex": "X"}, "s", "t.tsv"),
        "not a number": lambda: encoding.encode_row({"age": "old", "sex": "F"}, "s", "t.tsv"),
    }
    for message, call in messages.items():
        with pytest.raises(UadctError, match=message) as excinfo:
            call()
        text = str(excinfo.value)
        assert "\n" not in text and ("participants.tsv" in text or "t.tsv" in text)
    with pytest.raises(UadctError, match="has 2 fields"):
        CovariateTable.read(_tsv(tmp_path, "participant_id\tage\tsex\nsub-00\t30\n"))


def test_conditioned_cae_scores_change_with_the_covariates_and_survive_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_model("cae", {"patch_size": 16, "base_channels": 4, "latent_dim": 8, "dropout": 0.0, "covariates": 3})
    optimizers = model.configure_optimizers(1e-3)
    x = torch.rand(8, 1, 16, 16)
    model.train()
    model.training_step(x, torch.ones_like(x), optimizers, covariates=torch.randn(8, 3))
    model.eval()
    young, old = torch.tensor([[-1.0, 1, 0]]).repeat(4, 1), torch.tensor([[1.5, 0, 1]]).repeat(4, 1)
    with torch.no_grad():
        at_young, at_old = model.score_patches(x[:4], covariates=young), model.score_patches(x[:4], covariates=old)
    assert not torch.allclose(at_young["voxel"], at_old["voxel"])
    with pytest.raises(UadctError, match="covariates"):
        model.score_patches(x[:4])
    save_checkpoint(tmp_path / "m.pt", model, {"patch": {"size": 16, "dims": 2}})
    with torch.no_grad():
        again = load_checkpoint(tmp_path / "m.pt").model.score_patches(x[:4], covariates=young)
    torch.testing.assert_close(again["voxel"], at_young["voxel"], rtol=0, atol=0)
    with pytest.raises(UadctError, match="not supported by this model; models that support it: cae"):
        build_model("ssae", {"patch_size": 16, "covariates": 2})


def test_train_with_covariates_then_score_with_a_table_or_given_values(atlas_grid_subjects, tmp_path):
    _, prep = atlas_grid_subjects(tmp_path, ["sub-00", "sub-01", "sub-02"])
    tsv = _tsv(tmp_path)
    config = TrainConfig(model="cae", patch_size=16, batch_size=16, patches_per_epoch=32, validation_patches=16,
                         statistics_patches=32, max_epochs=1, device="cpu", covariates=str(tsv),
                         model_options={"base_channels": 4, "latent_dim": 8, "dropout": 0.0})
    train_model(prep, tmp_path / "cov.pt", config)
    checkpoint = load_checkpoint(tmp_path / "cov.pt")
    assert checkpoint.model.uses_covariates and checkpoint.metadata["model_config"]["covariates"] == 3
    encoding = encoding_of(checkpoint.metadata)
    assert encoding is not None and encoding.names == ["age", "sex=F", "sex=M"]
    maps = {}
    for label, source in {"table": CovariateSource(encoding, CovariateTable.read(tsv)),
                          "young": CovariateSource(encoding, values={"age": "20", "sex": "F"}),
                          "old": CovariateSource(encoding, values={"age": "90", "sex": "M"})}.items():
        result = score_scan(checkpoint, prep / "sub-00", tmp_path / f"{label}.nii.gz", stride=8, device="cpu", covariates=source)
        maps[label] = sitk.GetArrayFromImage(read_image(result.map_path))
    assert np.isfinite(maps["table"]).all() and maps["table"].max() > 0
    assert not np.allclose(maps["young"], maps["old"])
    with pytest.raises(UadctError, match="conditioned on subject covariates"):
        score_scan(checkpoint, prep / "sub-00", tmp_path / "none.nii.gz", stride=8, device="cpu")
    (tmp_path / "other").mkdir()
    lacking = _tsv(tmp_path / "other", "participant_id\tage\tsex\nsub-00\t30\tF\n")
    with pytest.raises(UadctError, match="no row for subject 'sub-01'") as excinfo:  # a scored subject without a row
        score_scan(checkpoint, prep / "sub-01", tmp_path / "s1.nii.gz", stride=8, device="cpu",
                   covariates=CovariateSource(encoding, CovariateTable.read(lacking)))
    assert "\n" not in str(excinfo.value)


def test_training_subject_without_a_row_is_a_one_line_error(tmp_path):
    """What train_model runs on its loaded volumes before building the model."""
    from types import SimpleNamespace

    from uadct.covariates import attach_training_covariates

    volumes = [SimpleNamespace(subject=name, covariates=None) for name in ("sub-00", "sub-01_ses-1", "sub-05")]
    with pytest.raises(UadctError, match=r"participants.tsv: no row for subject 'sub-05'") as excinfo:
        attach_training_covariates(_tsv(tmp_path), (), volumes[:2], volumes[2:])
    assert "\n" not in str(excinfo.value)
    encoding = attach_training_covariates(_tsv(tmp_path), ("age",), volumes[:2], [])
    assert encoding.names == ["age"] and [float(v.covariates[0]) for v in volumes[:2]] == [-1.0, 1.0]


def test_cli_trains_a_forest_on_features_and_covariates_and_scores_with_them(atlas_grid_subjects, tmp_path):
    """The SSAE cannot take covariates, so only the forest does: features = its band codes + age."""
    from typer.testing import CliRunner

    from uadct.cli import app

    _, prep = atlas_grid_subjects(tmp_path, ["sub-00", "sub-01", "sub-02"])
    runner = CliRunner()
    trained = runner.invoke(app, [
        "train", str(prep), "-o", str(tmp_path / "m.pt"), "--model", "ssae", "--epochs", "1", "--batch-size", "16",
        "--patches-per-epoch", "16", "--validation-patches", "16", "--device", "cpu",
        "-O", "base_channels=4", "-O", "latent_dim=4", "-O", "bands=2", "--covariates", str(_tsv(tmp_path)),
        "--covariate-columns", "age", "--scorer", "forest", "--forest-model", "gradient-boosting", "--forest-trees", "4",
        "--forest-patches", "32",
    ])
    assert trained.exit_code == 0, trained.output
    checkpoint = load_checkpoint(tmp_path / "m.pt")
    model = checkpoint.model
    assert checkpoint.metadata["model_config"]["covariates"] == 0 and model.forest_covariates == 1  # only the forest takes age
    assert checkpoint.metadata["forest"]["features"] == 2 * 4 + 1 and checkpoint.metadata["forest"]["covariate_features"] == ["age"]
    assert checkpoint.metadata["calibration"][0]["n_voxels"] > 1000  # its calibration subject scored with its own age
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        with pytest.raises(UadctError, match="covariates"):
            model.score_patches(x)
        scores = model.score_patches(x, covariates=torch.full((3, 1), 0.5))
        features = np.concatenate([model.scored_model.encode_features(x).numpy(), np.full((3, 1), 0.5, np.float32)], axis=1)
    np.testing.assert_array_equal(scores["scalar"].numpy(), model.ensemble.probability(features).astype(np.float32))
    scored = runner.invoke(app, ["score", str(tmp_path / "m.pt"), str(prep / "sub-00"), "-o", str(tmp_path / "a.nii.gz"),
                                 "--stride", "8", "--device", "cpu", "--age", "44"])
    assert scored.exit_code == 0, scored.output
    assert np.isfinite(sitk.GetArrayFromImage(read_image(tmp_path / "a.nii.gz"))).all()
    refused = runner.invoke(app, ["score", str(tmp_path / "m.pt"), str(prep / "sub-00"), "-o", str(tmp_path / "b.nii.gz"),
                                  "--device", "cpu"])
    assert refused.exit_code != 0 and "conditioned on subject covariates (age)" in str(refused.exception)


def test_covariate_model_gets_a_healthy_calibration_thresholds_and_recalibrates_with_its_table(atlas_grid_subjects, tmp_path):
    """Training scores its calibration subjects with their own rows; `score --fpr --mask-out` then works with
    --age/--sex, and `uadct calibrate` needs the table (a one-line error naming the checkpoint without it)."""
    from typer.testing import CliRunner

    from uadct.calibrate_maps import calibrate_volumes, prepared_volumes
    from uadct.cli import app

    _, prep = atlas_grid_subjects(tmp_path, ["sub-00", "sub-01", "sub-02"])
    tsv = _tsv(tmp_path)
    config = TrainConfig(model="cae", patch_size=16, batch_size=16, patches_per_epoch=32, validation_patches=16,
                         statistics_patches=32, max_epochs=1, device="cpu", covariates=str(tsv), calibration_subjects=1,
                         model_options={"base_channels": 4, "latent_dim": 8, "dropout": 0.0})
    result = train_model(prep, tmp_path / "cov.pt", config)
    checkpoint = load_checkpoint(tmp_path / "cov.pt")
    calibrations = checkpoint.metadata["calibration"]
    assert len(calibrations) == 1 and calibrations[0]["subjects"] == result.validation_subjects[:1]
    assert calibrations[0]["n_voxels"] > 1000 and calibrations[0]["values"][-1] > calibrations[0]["values"][0]

    # the calibration depends on the covariates it is given (they reach the model)
    encoding = encoding_of(checkpoint.metadata)
    volumes, spacing = prepared_volumes([prep / "sub-00"])
    fitted = {label: calibrate_volumes(checkpoint, volumes, spacing, stride=8, device="cpu",
                                       covariates=CovariateSource(encoding, values=values)).values
              for label, values in {"young": {"age": "20", "sex": "F"}, "old": {"age": "90", "sex": "M"}}.items()}
    assert not np.allclose(fitted["young"], fitted["old"])

    runner = CliRunner()
    scored = runner.invoke(app, ["score", str(tmp_path / "cov.pt"), str(prep / "sub-00"), "-o", str(tmp_path / "m.nii.gz"),
                                 "--device", "cpu", "--age", "50", "--sex", "F", "--units", "z", "--fpr", "0.01",
                                 "--mask-out", str(tmp_path / "lesions.nii.gz")])
    assert scored.exit_code == 0, scored.output
    z_map = sitk.GetArrayFromImage(read_image(tmp_path / "m.nii.gz"))
    lesions = sitk.GetArrayFromImage(read_image(tmp_path / "lesions.nii.gz"))
    assert np.isfinite(z_map).all() and set(np.unique(lesions)) <= {0, 1} and lesions.shape == z_map.shape

    refused = runner.invoke(app, ["calibrate", str(tmp_path / "cov.pt"), str(prep / "sub-01"), "-o", str(tmp_path / "c.pt"),
                                  "--device", "cpu"])
    message = str(refused.exception)
    assert refused.exit_code != 0 and "cov.pt: the model is conditioned on subject covariates (age, sex)" in message
    assert "--covariates" in message and "\n" not in message and not (tmp_path / "c.pt").exists()
    calibrated = runner.invoke(app, ["calibrate", str(tmp_path / "cov.pt"), str(prep / "sub-01"), str(prep / "sub-02"),
                                     "-o", str(tmp_path / "c.pt"), "--device", "cpu", "--stride", "8", "--covariates", str(tsv)])
    assert calibrated.exit_code == 0, calibrated.output
    stored = load_checkpoint(tmp_path / "c.pt").metadata["calibration"]
    assert len(stored) == 2 and stored[1]["settings"]["stride"] == 8 and len(stored[1]["subjects"]) == 2
