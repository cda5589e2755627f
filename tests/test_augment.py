"""GMM/PCA contrast augmentation: tissue fit, tissue order, spread, background, seeding."""

from __future__ import annotations

import numpy as np
import pytest

from uadct.augment import ContrastAugmenter, TissueModel, fit_tissue_gmm
from uadct.errors import UadctError
from uadct.preprocess.intensity import normalize_intensity

TRUE_MEANS = np.array([0.20, 0.55, 0.90])
TRUE_STDS = np.array([0.05, 0.05, 0.04])


def tissue_volume(rng: np.random.Generator, means=TRUE_MEANS, stds=TRUE_STDS, size: int = 32):
    """A ``(size,)*3`` ball of brain: CSF core, GM shell, WM shell (random blobs mixed in).

    Returns image (background 0), mask (float32) and labels (0 CSF, 1 GM, 2 WM, -1 out).
    """
    grid = np.indices((size,) * 3) - (size - 1) / 2
    radius = np.sqrt((grid**2).sum(axis=0)) / (size / 2)
    labels = np.full(radius.shape, -1)
    labels[radius < 0.95] = 2
    labels[radius < 0.7] = 1
    labels[radius < 0.35] = 0
    # shuffle some brain voxels between classes so every patch-sized region holds several
    brain = labels >= 0
    swap = brain & (rng.random(radius.shape) < 0.3)
    labels[swap] = rng.integers(0, 3, swap.sum())
    image = np.zeros(radius.shape, np.float32)
    for k in range(3):
        where = labels == k
        image[where] = rng.normal(means[k], stds[k], where.sum())
    return image, brain.astype(np.float32), labels


def cohort(n_subjects: int, seed: int = 0, jitter: float = 0.03):
    """Percentile-normalised synthetic subjects whose class means vary by ``jitter``."""
    rng = np.random.default_rng(seed)
    subjects = []
    for _ in range(n_subjects):
        means = TRUE_MEANS + rng.normal(0, jitter, 3)
        stds = TRUE_STDS * rng.uniform(0.8, 1.25, 3)
        image, mask, labels = tissue_volume(rng, means, stds)
        image, _ = normalize_intensity(image, mask)
        subjects.append((image, mask, labels))
    return subjects


def class_means(batch: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``(B, 3)`` mean intensity of each labelled class, per row of ``batch`` ``(B, 1, ...)``."""
    return np.stack([batch[:, 0][:, labels == k].mean(axis=1) for k in range(3)], axis=1)


def test_fit_recovers_known_tissue_parameters():
    image, mask, _ = tissue_volume(np.random.default_rng(1), size=48)
    model = fit_tissue_gmm(image, mask)
    assert np.allclose(model.means, TRUE_MEANS, atol=0.015), model.means
    assert np.allclose(np.sqrt(model.variances), TRUE_STDS, rtol=0.2), np.sqrt(model.variances)
    assert model.weights.sum() == pytest.approx(1.0)
    assert model.theta.shape == (6,)


@pytest.mark.slow


def test_augmented_tissues_keep_their_order_and_stay_in_the_training_spread():
    subjects = cohort(12)
    models = [fit_tissue_gmm(image, mask) for image, mask, _ in subjects]
    thetas = np.array([m.theta for m in models])
    augmenter = ContrastAugmenter().fit(thetas)
    # the training distribution, measured the same way as the augmented images
    measured = np.array([class_means(image[None, None], labels)[0] for image, _, labels in subjects])
    low = measured.mean(axis=0) - 3 * measured.std(axis=0)
    high = measured.mean(axis=0) + 3 * measured.std(axis=0)
    rng = np.random.default_rng(7)
    changed = 0.0
    for (image, mask, labels), model in zip(subjects, models):
        batch = np.broadcast_to(image[None, None], (40, 1) + image.shape).copy()
        masks = np.broadcast_to(mask[None, None], batch.shape).copy()
        out = augmenter.augment(batch, masks, model, rng)
        means = class_means(out, labels)
        assert np.all(np.diff(means, axis=1) > 0), "tissue order CSF < GM < WM broken"
        assert np.all((means > low) & (means < high)), (means.min(axis=0), means.max(axis=0), low, high)
        changed = max(changed, float(np.abs(means - class_means(batch, labels)).max()))
    assert changed > 0.01, "augmentation should move the class means"


def test_default_mode_keeps_background_zero_and_percentile_scale():
    (image, mask, _), = cohort(1, seed=3)
    model = fit_tissue_gmm(image, mask)
    augmenter = ContrastAugmenter(min_spread_fraction=0.1).fit([model.theta])
    batch = np.broadcast_to(image[None, None], (16, 1) + image.shape).copy()
    masks = np.broadcast_to(mask[None, None], batch.shape).copy()
    out = augmenter.augment(batch, masks, model, np.random.default_rng(0))
    assert out.dtype == np.float32 and out.shape == batch.shape
    assert np.all(out[masks == 0] == 0)
    inside = out[:, 0][:, mask > 0]
    low, high = np.percentile(inside, [5, 95], axis=1)
    assert np.allclose(low, 0, atol=0.02) and np.allclose(high, 1, atol=0.02)
    assert not np.allclose(out, batch, atol=1e-3)


def test_zscore_and_noise_background_follow_the_method():
    (image, mask, _), = cohort(1, seed=4)
    model = fit_tissue_gmm(image, mask)
    augmenter = ContrastAugmenter(zscore=True, noise_background=True).fit([model.theta])
    batch = np.broadcast_to(image[None, None], (8, 1) + image.shape).copy()
    masks = np.broadcast_to(mask[None, None], batch.shape).copy()
    out = augmenter.augment(batch, masks, model, np.random.default_rng(0))
    inside = out[:, 0][:, mask > 0]
    assert np.allclose(inside.mean(axis=1), 0, atol=0.03)
    assert np.allclose(inside.std(axis=1), 1, atol=0.03)
    background = out[masks == 0]
    assert abs(background.std() - 1.0) < 0.05 and abs(background.mean()) < 0.05


@pytest.mark.slow


def test_same_seed_same_output_other_seed_other_output():
    subjects = cohort(4, seed=5)
    models = [fit_tissue_gmm(image, mask) for image, mask, _ in subjects]
    augmenter = ContrastAugmenter().fit([m.theta for m in models])
    image, mask, _ = subjects[0]
    patches = np.stack([image[16, 4:20, 4:20], image[12, 10:26, 8:24]])[:, None]
    masks = np.stack([mask[16, 4:20, 4:20], mask[12, 10:26, 8:24]])[:, None]
    first = augmenter.augment(patches, masks, models[0], np.random.default_rng(11))
    again = augmenter.augment(patches, masks, models[0], np.random.default_rng(11))
    other = augmenter.augment(patches, masks, models[0], np.random.default_rng(12))
    assert np.array_equal(first, again)
    assert not np.allclose(first, other)
    assert fit_tissue_gmm(image, mask, seed=0).means.tolist() == fit_tissue_gmm(image, mask, seed=0).means.tolist()


def test_few_subjects_still_vary_every_parameter_and_keep_variances_positive():
    subjects = cohort(2, seed=6)
    models = [fit_tissue_gmm(image, mask) for image, mask, _ in subjects]
    augmenter = ContrastAugmenter().fit([m.theta for m in models])
    assert np.all(augmenter.half_widths_ > 0), "degenerate PCA: some direction cannot move"
    drawn = augmenter.sample_thetas(models[0], 2000, np.random.default_rng(0))
    assert np.all(drawn[:, 3:] >= augmenter.min_variance_ratio * models[0].variances)
    assert np.all(np.diff(drawn[:, :3], axis=1) > 0)
    assert np.all(drawn.std(axis=0) > 0)
    # one subject: the floor alone gives the spread (2 % of each parameter)
    single = ContrastAugmenter().fit([models[0].theta])
    spread = single.sample_thetas(models[0], 4000, np.random.default_rng(1)).std(axis=0)
    expected = 0.02 * np.abs(models[0].theta) / np.sqrt(3)
    assert np.allclose(spread, expected, rtol=0.1)


def test_real_atlas_slice_keeps_tissue_order(atlas):
    import SimpleITK as sitk

    image = sitk.GetArrayFromImage(atlas.brain).astype(np.float32)
    mask = (sitk.GetArrayFromImage(atlas.mask) > 0).astype(np.float32)
    image, _ = normalize_intensity(image, mask)
    model = fit_tissue_gmm(image, mask)
    assert np.all(np.diff(model.means) > 0.2), model.means
    assert model.means[0] < 0.3 < 0.8 < model.means[2]
    rng = np.random.default_rng(0)
    thetas = [model.theta * (1 + rng.normal(0, 0.05, 6)) for _ in range(10)]
    augmenter = ContrastAugmenter().fit(thetas)
    index = image.shape[0] // 2 + 10
    slab, slab_mask = image[index : index + 1], mask[index : index + 1]
    labels = np.where(slab_mask > 0, np.abs(slab[..., None] - model.means).argmin(axis=-1), -1)
    batch = np.broadcast_to(slab[None], (64, 1) + slab.shape[1:]).copy()
    masks = np.broadcast_to(slab_mask[None], batch.shape).copy()
    out = augmenter.augment(batch, masks, model, rng)
    assert np.all(out[masks == 0] == 0)
    assert np.all(np.diff(class_means(out, labels[0]), axis=1) > 0)


def test_bad_inputs_raise_uadct_errors():
    image, mask, _ = tissue_volume(np.random.default_rng(0))
    with pytest.raises(UadctError, match="shape"):
        fit_tissue_gmm(image, mask[:-1])
    with pytest.raises(UadctError, match="voxels"):
        fit_tissue_gmm(image, np.zeros_like(mask))
    model = fit_tissue_gmm(image, mask)
    with pytest.raises(UadctError, match="not fitted"):
        ContrastAugmenter().augment(image[None, None, 0], mask[None, None, 0], model, np.random.default_rng(0))
    with pytest.raises(UadctError, match="theta"):
        ContrastAugmenter().fit([])
    fitted = ContrastAugmenter().fit([model.theta])
    with pytest.raises(UadctError, match="shape"):
        fitted.augment(image[None, None, 0], mask[None, 0], model, np.random.default_rng(0))
    assert isinstance(model, TissueModel)
