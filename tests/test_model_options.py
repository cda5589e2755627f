"""Model options from the command line (`train -O KEY=VALUE`, `models NAME`) and 3D patches end to end."""

from __future__ import annotations

import subprocess
import sys

import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from uadct.checkpoint import load_checkpoint, save_checkpoint
from uadct.cli import app
from uadct.errors import UadctError
from uadct.io import read_image
from uadct.models import available_models, build_model, patch_models
from uadct.models.base import _convert, model_options, parse_model_options


def test_values_are_converted_by_the_config_field_types():
    parsed = parse_model_options("ocsvm", ["nu=0.25", "pool_size=4", "gamma=scale", "position-conditioning=yes"])
    assert parsed == {"nu": 0.25, "pool_size": 4, "gamma": "scale", "position_conditioning": True}
    assert parse_model_options("ocsvm", ["gamma=0.5"]) == {"gamma": 0.5}  # float | str: a number when it is one
    assert parse_model_options("cae", ["position_conditioning=off", "loss=l1"]) == {"position_conditioning": False, "loss": "l1"}
    assert _convert("1, 2,3", tuple[int, ...]) == (1, 2, 3)
    assert _convert("0.5,2", tuple[float, float]) == (0.5, 2.0)
    assert _convert("none", int | None) is None
    for text, kind in [("1,2,3", tuple[float, float]), ("maybe", bool), ("1.5", int), ("x", float)]:
        with pytest.raises(ValueError):
            _convert(text, kind)


@pytest.mark.parametrize(
    "items, message",
    [
        (["latent=3"], "has no option 'latent'; valid: base_channels, dropout, latent_dim, loss, position_conditioning, top_k"),
        (["latent_dim=big"], "latent_dim='big': expected int"),
        (["latent_dim"], "not key=value"),
        (["patch_size=32"], "use --patch-size"),
    ],
)
def test_bad_options_give_one_line_errors(items, message):
    with pytest.raises(UadctError, match=message.replace("(", r"\(").replace(")", r"\)")) as excinfo:
        parse_model_options("cae", items)
    assert "\n" not in str(excinfo.value)


def test_every_option_of_every_model_is_documented_and_builds():
    for name in available_models():
        options = model_options(name)
        undocumented = [o.name for o in options if not o.help]
        assert not undocumented, f"{name}: options without a meaning {undocumented}"
        assert "patch_size" not in {o.name for o in options}
        build_model(name, {o.name: o.default for o in options})  # the listed defaults are the real ones


def test_models_command_lists_a_models_options():
    result = CliRunner().invoke(app, ["models", "progressive-ganomaly"])
    assert result.exit_code == 0, result.output
    for word in ("fade_patches", "65536", "start_size", "position_conditioning", "latent_dim"):
        assert word in result.output
    assert "fade_patches" not in CliRunner().invoke(app, ["models"]).output


@pytest.mark.slow


def test_train_refuses_an_unknown_option_in_one_line(tmp_path):
    process = subprocess.run(
        [sys.executable, "-m", "uadct", "train", str(tmp_path), "-o", str(tmp_path / "m.pt"), "--model", "ganomaly", "-O", "latnt_dim=4"],
        capture_output=True, text=True, encoding="utf-8", errors="replace",
    )
    assert process.returncode == 2
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and "no option 'latnt_dim'" in lines[0] and "latent_dim" in lines[0]


@pytest.mark.parametrize("name", patch_models())  # normative: tests/test_normative.py
@pytest.mark.slow
def test_every_model_works_on_3d_patches(name, tmp_path):
    torch.manual_seed(0)
    model = build_model(name, {"patch_size": 8, "dims": 3})
    optimizers = model.configure_optimizers(1e-3)
    x = torch.rand(4, 1, 8, 8, 8)
    model.train()
    model.training_step(x, torch.ones_like(x), optimizers)
    model.eval()
    with torch.no_grad():
        model.fit_statistics(torch.rand(32, 1, 8, 8, 8), torch.ones(32, 1, 8, 8, 8))
        before = model.score_patches(x)
    if "voxel" in before:
        assert before["voxel"].shape == (4, 8, 8, 8)
    save_checkpoint(tmp_path / "m.pt", model, {"patch": {"size": 8, "dims": 3}})
    with torch.no_grad():
        after = load_checkpoint(tmp_path / "m.pt").model.score_patches(x)
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)


@pytest.mark.slow


def test_cli_train_3d_then_score_maps_on_the_input_grid(atlas_grid_subjects, tmp_path):
    raw, prep = atlas_grid_subjects(tmp_path, ["sub-00", "sub-01", "sub-02"])
    runner = CliRunner()
    trained = runner.invoke(app, [
        "train", str(prep), "-o", str(tmp_path / "m3d.pt"), "--model", "cae", "--dims", "3", "--patch-size", "16",
        "--epochs", "1", "--batch-size", "8", "--patches-per-epoch", "16", "--validation-patches", "8", "--device", "cpu",
        "-O", "base_channels=4", "-O", "latent_dim=8",
    ])
    assert trained.exit_code == 0, trained.output
    checkpoint = load_checkpoint(tmp_path / "m3d.pt")
    assert checkpoint.metadata["patch"] == {"size": 16, "dims": 3}
    assert checkpoint.metadata["model_config"]["latent_dim"] == 8 and checkpoint.metadata["training"]["model_options"] == {
        "base_channels": 4, "latent_dim": 8}
    scan = raw / "sub-00.nii.gz"
    scored = runner.invoke(app, ["score", str(tmp_path / "m3d.pt"), str(scan), "-o", str(tmp_path / "map.nii.gz"),
                                 "--stride", "8", "--device", "cpu"])
    assert scored.exit_code == 0, scored.output
    anomaly_map, source = read_image(tmp_path / "map.nii.gz"), read_image(scan)
    assert anomaly_map.GetSize() == source.GetSize() and anomaly_map.GetSpacing() == source.GetSpacing()
    assert anomaly_map.GetOrigin() == source.GetOrigin()
    values = sitk.GetArrayFromImage(anomaly_map)
    assert values.max() > 0 and (values[sitk.GetArrayFromImage(source) == 0] == 0).all()
