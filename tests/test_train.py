"""The training engine: reproducibility, resume after interruption, signals, loss logs."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from uadct.checkpoint import load_checkpoint, read_checkpoint_payload
from uadct.cli import app
from uadct.errors import UadctError
from uadct.io import read_image, write_image
from uadct.training import TrainConfig, TrainingInterrupted, resume_path, train_model

TINY = dict(model="cae", patch_size=16, batch_size=16, patches_per_epoch=64, validation_patches=32,
            statistics_patches=64, max_epochs=2, patience=10, device="cpu")


@pytest.fixture(scope="module")
def prep(atlas_grid_subjects, tmp_path_factory):
    """Three prepared subjects (skull-stripped, already on the 2 mm atlas grid)."""
    return atlas_grid_subjects(tmp_path_factory.mktemp("train"), ["sub-00", "sub-01", "sub-02"])[1]


def _weights(path):
    return read_checkpoint_payload(path)["state_dict"]


def _assert_identical(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _differs(a, b):
    return any(not torch.equal(a[key], b[key]) for key in a if a[key].is_floating_point())


@pytest.mark.slow


def test_same_seed_gives_identical_weights(prep, tmp_path):
    first = train_model(prep, tmp_path / "a.pt", TrainConfig(**TINY, seed=1))
    second = train_model(prep, tmp_path / "b.pt", TrainConfig(**TINY, seed=1))
    other = train_model(prep, tmp_path / "c.pt", TrainConfig(**TINY, seed=2))
    in_workers = train_model(prep, tmp_path / "d.pt", TrainConfig(**TINY, seed=1, workers=2))
    _assert_identical(_weights(first.checkpoint), _weights(second.checkpoint))
    _assert_identical(_weights(first.checkpoint), _weights(in_workers.checkpoint))
    assert load_checkpoint(in_workers.checkpoint).metadata["training"]["workers"] == 2
    assert [r["train_loss"] for r in first.history] == [r["train_loss"] for r in second.history]
    assert _differs(_weights(first.checkpoint), _weights(other.checkpoint))
    assert not torch.are_deterministic_algorithms_enabled()  # the global setting is restored


@pytest.mark.slow


def test_resume_after_a_crash_matches_one_run(prep, tmp_path):
    config = TrainConfig(**{**TINY, "max_epochs": 4})
    whole = train_model(prep, tmp_path / "whole.pt", config)
    assert not resume_path(tmp_path / "whole.pt").exists()

    def crash_after_second_epoch(event, info):
        if event == "epoch" and info["epoch"] == 1:
            raise RuntimeError("node lost")

    with pytest.raises(RuntimeError, match="node lost"):
        train_model(prep, tmp_path / "split.pt", config, progress=crash_after_second_epoch)
    assert resume_path(tmp_path / "split.pt").is_file() and not (tmp_path / "split.pt").exists()
    resumed = train_model(prep, tmp_path / "split.pt", config, resume=True)
    assert [r["epoch"] for r in resumed.history] == [0, 1, 2, 3]
    assert [r["validation_loss"] for r in resumed.history] == [r["validation_loss"] for r in whole.history]
    _assert_identical(_weights(whole.checkpoint), _weights(resumed.checkpoint))
    assert not resume_path(tmp_path / "split.pt").exists()


@pytest.mark.slow


def test_resume_with_more_epochs_matches_one_run(prep, tmp_path):
    whole = train_model(prep, tmp_path / "whole.pt", TrainConfig(**{**TINY, "max_epochs": 3}))
    short = TrainConfig(**{**TINY, "max_epochs": 2})

    def crash(event, info):  # killed after its last epoch, before the final checkpoint
        if event == "epoch" and info["epoch"] == 1:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        train_model(prep, tmp_path / "grown.pt", short, progress=crash)
    grown = train_model(prep, tmp_path / "grown.pt", TrainConfig(**{**TINY, "max_epochs": 3}), resume=True)
    _assert_identical(_weights(whole.checkpoint), _weights(grown.checkpoint))


@pytest.mark.slow


def test_sigterm_mid_epoch_saves_state_and_resume_is_exact(prep, tmp_path):
    config = TrainConfig(**{**TINY, "max_epochs": 2})
    whole = train_model(prep, tmp_path / "whole.pt", config)
    before = signal.getsignal(signal.SIGTERM)

    def terminate(event, info):
        if event == "step" and info["epoch"] == 1 and info["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted, match=r"interrupted at epoch 1 step 2; .*run the same command again to resume"):
        train_model(prep, tmp_path / "cut.pt", config, progress=terminate)
    assert signal.getsignal(signal.SIGTERM) is before
    assert resume_path(tmp_path / "cut.pt").is_file()
    resumed = train_model(prep, tmp_path / "cut.pt", config, resume=True)
    _assert_identical(_weights(whole.checkpoint), _weights(resumed.checkpoint))
    assert resumed.history[1]["train_loss"] == pytest.approx(whole.history[1]["train_loss"], rel=1e-12)


@pytest.mark.slow


def test_resume_refuses_other_settings(prep, tmp_path):
    def crash(event, info):
        if event == "epoch":
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        train_model(prep, tmp_path / "m.pt", TrainConfig(**TINY), progress=crash)
    with pytest.raises(Exception, match="other training settings"):
        train_model(prep, tmp_path / "m.pt", TrainConfig(**{**TINY, "learning_rate": 0.1}), resume=True)


@pytest.mark.slow


def test_history_written_as_json_and_csv(prep, tmp_path):
    result = train_model(prep, tmp_path / "m.pt", TrainConfig(**TINY))
    history = json.loads((tmp_path / "m.pt.history.json").read_text(encoding="utf-8"))
    with open(tmp_path / "m.pt.history.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(history) == len(result.history) == 2
    assert [float(r["validation_loss"]) for r in rows] == [h["validation_loss"] for h in history]
    assert list(rows[0]) == ["epoch", "train_loss", "validation_loss", "seconds", "patches_per_second"]


@pytest.mark.slow
def test_cli_sigterm_then_resume(prep, tmp_path):
    model = tmp_path / "model.pt"
    command = [sys.executable, "-m", "uadct", "train", str(prep), "-o", str(model), "--model", "cae", "--epochs", "200",
               "--patience", "200", "--batch-size", "16", "--patches-per-epoch", "64", "--validation-patches", "32",
               "--device", "cpu"]
    env = {**os.environ, "UADCT_HOME": os.environ.get("UADCT_HOME", str(tmp_path / "home"))}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace", env=env)
    seen = []
    deadline = time.monotonic() + 120
    try:
        for line in process.stderr:
            seen.append(line)
            if line.startswith("epoch 0 "):
                break
            assert time.monotonic() < deadline, "".join(seen)
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    stderr = "".join(seen) + rest
    assert process.returncode == 2, stderr
    assert "run the same command again to resume" in stderr
    assert resume_path(model).is_file() and not model.exists()
    # finish quickly: the epoch limit may change on resume
    finished = CliRunner().invoke(app, ["train", str(prep), "-o", str(model), "--model", "cae", "--epochs", "3", "--patience", "200",
                                        "--batch-size", "16", "--patches-per-epoch", "64", "--validation-patches", "32",
                                        "--device", "cpu", "--resume"])
    assert finished.exit_code == 0, finished.output
    checkpoint = load_checkpoint(model)
    assert checkpoint.metadata["training"]["epochs_run"] == 3
    assert not resume_path(model).exists()


def test_exclude_labels_keeps_patches_off_known_lesions(atlas_grid_subjects, tmp_path):
    """Subjects with known lesions contribute only their normal tissue (as the WMH study did)."""
    from uadct.patches import PatchSpec, extract_patches
    from uadct.preprocess.prepared import find_prepared
    from uadct.training.data import load_volumes

    raw, prep = atlas_grid_subjects(tmp_path, ["sub-00", "sub-01"], contrast_step=0.1)
    template = read_image(raw / "sub-00.nii.gz")
    array = sitk.GetArrayFromImage(template)
    brain = np.argwhere(array > 0)
    centre = brain[len(brain) // 2]
    lesion = np.zeros(array.shape, np.uint8)
    lesion[centre[0] - 2 : centre[0] + 3, centre[1] - 3 : centre[1] + 4, centre[2] - 3 : centre[2] + 4] = 1
    label = sitk.GetImageFromArray(lesion)
    label.CopyInformation(template)
    (tmp_path / "labels").mkdir()
    write_image(label, tmp_path / "labels" / "sub-00.nii.gz")
    spec = PatchSpec(16, 2)
    subjects = find_prepared(prep)
    plain, _ = load_volumes(subjects, spec, 0.5)
    excluded, _ = load_volumes(subjects, spec, 0.5, tmp_path / "labels")
    assert len(excluded[0].starts) < len(plain[0].starts)
    assert not extract_patches(lesion, excluded[0].starts, spec).any()
    assert np.array_equal(excluded[1].starts, plain[1].starts)  # no label: untouched


CLI_TINY = ["--model", "cae", "--patience", "200", "--batch-size", "16", "--patches-per-epoch", "128", "--validation-patches", "32",
            "--device", "cpu", "--augment", "gmm,flip"]


@pytest.mark.slow
def test_cli_kill_9_then_the_same_command_finishes_like_an_uninterrupted_run(prep, tmp_path):
    """Issue 7: SIGKILL mid-training, then the same command: no truncated file, identical weights."""
    (tmp_path / "whole").mkdir()
    (tmp_path / "cut").mkdir()
    whole, model = tmp_path / "whole" / "model.pt", tmp_path / "cut" / "model.pt"
    uninterrupted = CliRunner().invoke(app, ["train", str(prep), "-o", str(whole), "--epochs", "2", *CLI_TINY])
    assert uninterrupted.exit_code == 0, uninterrupted.output
    command = [sys.executable, "-m", "uadct", "train", str(prep), "-o", str(model), "--epochs", "2", *CLI_TINY]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace")
    deadline = time.monotonic() + 180
    try:
        while not resume_path(model).is_file() and process.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        process.kill()  # SIGKILL: no handler runs, nothing is flushed
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL, process.stderr.read()
    assert resume_path(model).is_file() and not model.exists(), "killed too late to test anything"
    again = CliRunner().invoke(app, ["train", str(prep), "-o", str(model), "--epochs", "2", *CLI_TINY])
    assert again.exit_code == 0, again.output
    assert "resuming the interrupted run" in again.output and "at epoch 1" in again.output
    _assert_identical(_weights(whole), _weights(model))
    assert sorted(p.name for p in model.parent.iterdir()) == ["model.pt", "model.pt.history.csv", "model.pt.history.json"]
    history = json.loads((tmp_path / "cut" / "model.pt.history.json").read_text(encoding="utf-8"))
    assert [r["epoch"] for r in history] == [0, 1]
    assert [r["validation_loss"] for r in history] == [r["validation_loss"] for r in json.loads(
        (tmp_path / "whole" / "model.pt.history.json").read_text(encoding="utf-8"))]


@pytest.mark.slow


def test_cli_resume_file_of_other_settings_is_refused_and_force_starts_over(prep, tmp_path):
    model = tmp_path / "m.pt"

    def crash(event, info):
        if event == "epoch":
            raise RuntimeError("stop")

    config = TrainConfig(model="cae", batch_size=16, patches_per_epoch=64, validation_patches=32, max_epochs=2, patience=200,
                         device="cpu", learning_rate=0.1)
    with pytest.raises(RuntimeError):
        train_model(prep, model, config, progress=crash)
    args = ["train", str(prep), "-o", str(model), "--model", "cae", "--epochs", "2", "--patience", "200", "--batch-size", "16",
            "--patches-per-epoch", "64", "--validation-patches", "32", "--device", "cpu"]
    refused = CliRunner().invoke(app, args)  # (the console script turns the UadctError into one line, exit 2)
    assert isinstance(refused.exception, UadctError), refused.output
    assert "other training settings (learning_rate 0.1 -> 0.001)" in str(refused.exception)
    assert "--no-resume (--force) to start afresh" in str(refused.exception)
    assert resume_path(model).is_file() and not model.exists()
    # the same settings as the interrupted run resume it
    resumed = CliRunner().invoke(app, [*args, "--lr", "0.1"])
    assert resumed.exit_code == 0 and "resuming the interrupted run" in resumed.output, resumed.output
    with pytest.raises(RuntimeError):
        train_model(prep, model, config, progress=crash)
    forced = CliRunner().invoke(app, [*args, "--force"])
    assert forced.exit_code == 0 and "resuming" not in forced.output, forced.output
    assert load_checkpoint(model).metadata["training"]["learning_rate"] == 0.001
    assert not resume_path(model).exists()


def _trainable_models():
    from uadct.models import build_model, patch_models

    return [name for name in patch_models() if any(p.requires_grad for p in build_model(name, {"patch_size": 16}).parameters())]


@pytest.mark.parametrize("name", _trainable_models())
@pytest.mark.slow
def test_every_model_trains_under_bfloat16_autocast(name):
    """The AMP path (CUDA in real use) exercised on CPU: every model's training hook runs under autocast."""
    from uadct.models import build_model
    from uadct.device import autocast as _autocast

    torch.manual_seed(0)
    model = build_model(name, {"patch_size": 16}).train()
    optimizers = model.configure_optimizers(1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(8, 1, 16, 16)
    m = torch.ones_like(x)
    with _autocast(torch.device("cpu"), True):
        assert torch.is_autocast_enabled("cpu")
        losses = model.training_step(x, m, optimizers)
    assert all(np.isfinite(v) for v in losses.values()), losses
    assert _differs(before, model.state_dict())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay float32


@pytest.mark.slow


def test_amp_on_cpu_runs_bfloat16_and_is_off_by_default(prep, tmp_path):
    plain = train_model(prep, tmp_path / "plain.pt", TrainConfig(**{**TINY, "max_epochs": 1}))
    mixed = train_model(prep, tmp_path / "amp.pt", TrainConfig(**{**TINY, "max_epochs": 1, "amp": True}))
    assert load_checkpoint(plain.checkpoint).metadata["training"]["amp"] is None
    assert load_checkpoint(mixed.checkpoint).metadata["training"]["amp"] == "bfloat16"
    assert np.isfinite(mixed.best_validation_loss)
    assert _differs(_weights(plain.checkpoint), _weights(mixed.checkpoint))  # bfloat16 arithmetic was used


def test_position_conditioned_models_get_patch_centres_in_every_hook(prep, tmp_path):
    from torch import nn

    from uadct.models.base import AnomalyModel

    seen: dict[str, list[torch.Tensor]] = {"train": [], "validation": [], "statistics": []}

    class PositionProbe(AnomalyModel):
        name = "test-position-probe"
        uses_positions = True
        outputs = ("scalar",)

        def __init__(self, config):
            super().__init__(config)
            self.weight = nn.Parameter(torch.zeros(3))

        def training_loss(self, patches, masks, positions=None):
            return {"loss": (patches.mean(dim=(1, 2, 3)) - positions @ self.weight).square().mean()}

        def training_step(self, patches, masks, optimizers, positions=None):
            seen["train"].append(positions)
            loss = self.training_loss(patches, masks, positions)["loss"]
            optimizers["model"].zero_grad()
            loss.backward()
            optimizers["model"].step()
            return {"loss": float(loss.detach())}

        def validation_loss(self, patches, masks, positions=None):
            seen["validation"].append(positions)
            return float(self.training_loss(patches, masks, positions)["loss"])

        def fit_statistics(self, patches, masks, positions=None):
            seen["statistics"].append(positions)

        def score_patches(self, patches, masks=None, positions=None):
            return {"scalar": patches.mean(dim=(1, 2, 3))}

    try:
        train_model(prep, tmp_path / "p.pt", TrainConfig(**{**TINY, "model": "test-position-probe", "max_epochs": 1}))
    finally:
        from uadct.models.base import MODEL_REGISTRY

        MODEL_REGISTRY.pop("test-position-probe", None)
    probe = seen["train"].pop(0)  # the memory check's one step on a copy of the model, with 4 patches
    assert probe.shape == (4, 3)
    assert len(seen["train"]) == 4 and len(seen["validation"]) == 2 and len(seen["statistics"]) == 1
    for positions, rows in [(seen["train"][0], 16), (seen["validation"][0], 16), (seen["statistics"][0], 64)]:
        assert positions.shape == (rows, 3) and positions.dtype == torch.float32
        assert float(positions.abs().max()) <= 1 and len(torch.unique(positions[:, 1])) > 1
