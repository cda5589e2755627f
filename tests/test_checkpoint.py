"""Models through the registry, and the safe save/load contract."""

from __future__ import annotations

import pickle

import pytest
import torch

from uadct.checkpoint import load_checkpoint, save_checkpoint
from uadct.errors import CheckpointError, UadctError
from uadct.models import available_models, build_model, patch_models


def _fit_a_little(model, steps: int = 3):
    """A few real optimisation steps through the model's own training hooks, then its statistics."""
    torch.manual_seed(0)
    optimizers = model.configure_optimizers(1e-3)
    size = model.config.patch_size
    model.train()
    for _ in range(steps):
        x = torch.rand(16, 1, size, size)
        losses = model.training_step(x, torch.ones_like(x), optimizers)
        assert torch.isfinite(torch.tensor(losses["loss"]))
    model.eval()
    x = torch.rand(64, 1, size, size)
    with torch.no_grad():
        model.fit_statistics(x, torch.ones_like(x))
    return model


@pytest.mark.parametrize("name", patch_models())  # normative: tests/test_normative.py
@pytest.mark.slow
def test_every_model_fit_save_load_scores_identically(name, tmp_path):
    model = _fit_a_little(build_model(name, {"patch_size": 16}))
    x = torch.rand(8, 1, 16, 16)
    with torch.no_grad():
        before = model.score_patches(x)
    save_checkpoint(tmp_path / "m.pt", model, {"patch": {"size": 16, "dims": 2}})
    loaded = load_checkpoint(tmp_path / "m.pt")
    with torch.no_grad():
        after = loaded.model.score_patches(x)
    assert loaded.metadata["model"] == name
    assert set(before) == set(after)
    for key in before:
        torch.testing.assert_close(before[key], after[key], rtol=0, atol=0)


def test_cae_masked_loss_ignores_background():
    model = build_model("cae", {"patch_size": 16}).eval()
    x = torch.rand(4, 1, 16, 16)
    mask = torch.zeros_like(x)
    mask[..., :8] = 1
    loss = model.training_loss(x, mask)["loss"]
    manual = ((x - model(x)) ** 2)[..., :8].mean()
    torch.testing.assert_close(loss, manual)


def test_hostile_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as handle:
        pickle.dump({"format": "uadct-checkpoint", "payload": Exploit()}, handle)
    torch.save({"format": "uadct-checkpoint", "payload": Exploit()}, tmp_path / "evil_zip.pt")
    for path in (evil, tmp_path / "evil_zip.pt"):
        with pytest.raises(CheckpointError) as excinfo:
            load_checkpoint(path)
        assert str(path) in str(excinfo.value)
    assert not marker.exists()


def test_unknown_model_and_version_give_lists(tmp_path):
    with pytest.raises(UadctError, match="available: .*cae"):
        build_model("nosuchmodel")
    model = build_model("cae", {"patch_size": 16})
    save_checkpoint(tmp_path / "m.pt", model, {})
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match=r"version 99 is not supported.*\[1\]"):
        load_checkpoint(tmp_path / "future.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
