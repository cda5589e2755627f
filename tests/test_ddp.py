"""Distributed training on CPU (gloo): torchrun end to end, and 2 processes == 1 process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from uadct.checkpoint import load_checkpoint
from uadct.models.base import AnomalyModel, ModelConfig
from uadct.training import TrainConfig, resume_path, train_model


pytestmark = pytest.mark.slow  # torch.multiprocessing and torchrun start several training processes

NAME = "test-linear-autoencoder"


class LinearAutoencoder(AnomalyModel):
    """Test model without batch norm or dropout, with a per-patch mean loss, so the
    gradient of a global batch is exactly the mean of its halves' gradients.

    Nameless, so importing this file registers nothing; :func:`_register` adds it under
    ``NAME`` for the test that needs it (the conftest fixture removes it afterwards)."""

    name = ""
    summary = "test only"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        voxels = config.patch_size ** config.dims
        self.encode = nn.Linear(voxels, 8)
        self.decode = nn.Linear(8, voxels)

    def training_loss(self, patches: torch.Tensor, masks: torch.Tensor, positions: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        flat = patches.flatten(1)
        return {"loss": (self.decode(self.encode(flat)) - flat).square().mean()}

    def score_patches(self, patches: torch.Tensor, masks: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        flat = patches.flatten(1)
        return {"voxel": (self.decode(self.encode(flat)) - flat).square().view_as(patches)[:, 0]}


def _register() -> type[AnomalyModel]:
    """The test model registered under ``NAME`` in this process (training processes call it too)."""
    from uadct.models.base import MODEL_REGISTRY

    if NAME not in MODEL_REGISTRY:
        type("RegisteredLinearAutoencoder", (LinearAutoencoder,), {"name": NAME})
    return MODEL_REGISTRY[NAME]


@pytest.fixture
def linear_model(model_registry) -> type[AnomalyModel]:
    return _register()


@pytest.fixture(scope="module")
def prep(atlas_grid_subjects, tmp_path_factory):
    return atlas_grid_subjects(tmp_path_factory.mktemp("ddp"), ["sub-00", "sub-01", "sub-02"])[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_in_group(rank: int, world_size: int, port: int, prep: str, out: str, config: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    _register()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        train_model(prep, out, TrainConfig(**config))
    finally:
        dist.destroy_process_group()


def test_two_processes_average_gradients_like_one_process_with_the_global_batch(prep, tmp_path, linear_model):
    config = dict(model=linear_model.name, batch_size=32, learning_rate=1e-3, patches_per_epoch=128,
                  validation_patches=64, statistics_patches=64, max_epochs=2, patience=10, device="cpu")
    single = train_model(prep, tmp_path / "one.pt", TrainConfig(**config))
    torch.multiprocessing.spawn(_train_in_group, args=(2, _free_port(), str(prep), str(tmp_path / "two.pt"), config), nprocs=2)
    two = load_checkpoint(tmp_path / "two.pt")
    one = load_checkpoint(single.checkpoint)
    assert two.metadata["training"]["processes"] == 2
    for key, value in one.model.state_dict().items():
        assert torch.allclose(value, two.model.state_dict()[key], rtol=1e-4, atol=1e-6), key
    moved = max(float((v - two.model.state_dict()[k]).abs().max()) for k, v in one.model.state_dict().items())
    assert moved < 1e-5
    # the all-reduced validation loss equals the single process's (same patches, other summation order)
    assert np.allclose([r["validation_loss"] for r in two.metadata["history"]],
                       [r["validation_loss"] for r in single.history], rtol=1e-5)
    assert not resume_path(tmp_path / "two.pt").exists()


def test_torchrun_two_processes_train_a_model_that_loads_and_scores(prep, tmp_path):
    from uadct.inference import score_scan
    from uadct.preprocess.prepared import find_prepared

    out = tmp_path / "model.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "uadct", "train", str(prep), "-o", str(out), "--model", "cae", "--epochs", "2", "--patience", "10",
               "--batch-size", "16", "--patches-per-epoch", "64", "--validation-patches", "32", "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("model ") == 1, result.stdout  # only rank 0 reports
    checkpoint = load_checkpoint(out)
    assert checkpoint.metadata["training"]["processes"] == 2
    assert checkpoint.metadata["training"]["epochs_run"] == 2
    assert not resume_path(out).exists()
    scored = score_scan(checkpoint, find_prepared(prep)[0], tmp_path / "map.nii.gz", device="cpu")
    assert np.isfinite(scored.image_score)
