"""Patch sampling for training: counter-based batches, worker processes, positions, array cache."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from uadct.augment import ContrastAugmenter
from uadct.patches import PatchSpec, extract_patches, patch_centres
from uadct.preprocess.prepared import PreparedFolder, find_prepared
from uadct.training.data import PatchSampler, epoch_batches, load_volumes

SPEC = PatchSpec(16, 2)


@pytest.fixture(scope="module")
def prep(atlas_grid_subjects, tmp_path_factory):
    return atlas_grid_subjects(tmp_path_factory.mktemp("sampler"), ["sub-00", "sub-01", "sub-02"])[1]


@pytest.fixture(scope="module")
def volumes(prep):
    return load_volumes(find_prepared(prep), SPEC, 0.5, tissue_models=True)[0]


@pytest.fixture(scope="module")
def sampler(volumes):
    augmenter = ContrastAugmenter().fit([v.tissue.theta for v in volumes])
    return PatchSampler(volumes, SPEC, seed=5, flip=True, augmenter=augmenter)


def test_a_batch_depends_only_on_seed_epoch_and_step(sampler):
    first = sampler.batch(3, 7, 32)
    sampler.batch(0, 0, 32)  # drawing others in between changes nothing
    again = sampler.batch(3, 7, 32)
    for a, b in zip(first, again):
        assert np.array_equal(a, b)
    other = sampler.batch(3, 8, 32)
    assert not np.array_equal(first[0], other[0])
    assert first[0].shape == (32, 1, 16, 16) and first[1].shape == first[0].shape and first[2].shape == (32, 3)


def test_processes_draw_disjoint_slices_of_one_global_batch(sampler):
    whole = sampler.batch(1, 2, 32)
    parts = [sampler.batch(1, 2, 32, rank=r, world_size=4) for r in range(4)]
    for index in range(3):
        assert np.array_equal(np.concatenate([p[index] for p in parts]), whole[index])
    with pytest.raises(Exception, match="divisible"):
        sampler.batch(1, 2, 30, rank=0, world_size=4)


def test_worker_processes_give_the_same_batches(sampler):
    serial = list(epoch_batches(sampler, 2, 1, 5, 16, workers=0))
    parallel = list(epoch_batches(sampler, 2, 1, 5, 16, workers=2))
    assert len(serial) == len(parallel) == 4
    for a, b in zip(serial, parallel):
        for x, y in zip(a, b):
            assert isinstance(y, torch.Tensor) and torch.equal(x, y)


def test_positions_locate_each_patch_and_mirror_with_flips(volumes):
    plain = PatchSampler(volumes, SPEC, seed=1)
    flipping = PatchSampler(volumes, SPEC, seed=1, flip=True)
    images, masks, positions = plain.batch(0, 0, 64)
    f_images, _, f_positions = flipping.batch(0, 0, 64)
    same = np.array([any(np.array_equal(extract_patches(v.image, p[None], SPEC)[0], img[0]) for v in volumes)
                     for img, p in zip(images, positions)])
    assert same.all()
    width = volumes[0].image.shape[2]
    mirrored = np.any(f_images != images, axis=(1, 2, 3))
    assert 10 < mirrored.sum() < 54  # about half are flipped
    assert np.array_equal(f_images[mirrored], images[mirrored][..., ::-1])
    assert np.array_equal(f_positions[mirrored, 2], width - 16 - positions[mirrored, 2])
    assert np.array_equal(f_positions[~mirrored], positions[~mirrored])
    centres = patch_centres(f_positions, SPEC, volumes[0].image.shape)
    assert centres.shape == (64, 3) and np.all(np.abs(centres) <= 1)
    # mirrored patches sit at the mirrored normalised x (the atlas grid is centred on the brain)
    assert np.allclose(centres[mirrored, 2], -patch_centres(positions, SPEC, volumes[0].image.shape)[mirrored, 2] + 0.0,
                       atol=1 / width + 1e-6)


def test_contrast_augmentation_changes_brain_intensities_only(volumes):
    augmenter = ContrastAugmenter(min_spread_fraction=0.1).fit([v.tissue.theta for v in volumes])
    plain = PatchSampler(volumes, SPEC, seed=2).batch(0, 0, 64)
    augmented = PatchSampler(volumes, SPEC, seed=2, augmenter=augmenter).batch(0, 0, 64)
    assert np.array_equal(plain[2], augmented[2]) and np.array_equal(plain[1], augmented[1])
    brain = plain[1] > 0.5
    assert np.array_equal(plain[0][~brain], augmented[0][~brain])
    assert np.abs(plain[0][brain] - augmented[0][brain]).mean() > 0.01


def test_cache_is_memory_mapped_reused_and_rebuilt_when_the_source_changes(prep):
    folder = find_prepared(prep)[0]
    image, mask, cache, tissue = PreparedFolder(folder).cached_arrays(tissue_model=True)
    assert isinstance(image, np.memmap) and isinstance(mask, np.memmap) and not image.flags.writeable
    assert image.dtype == np.float32 and mask.dtype == np.uint8 and image.shape == mask.shape
    assert cache == folder / "cache" and tissue is not None
    meta = json.loads((cache / "cache.json").read_text(encoding="utf-8"))
    assert meta["tissue"]["means"] == tissue.means.tolist()
    built = (cache / "image.npy").stat().st_mtime_ns
    again, _, _, tissue_again = PreparedFolder(folder).cached_arrays(tissue_model=True)
    assert (cache / "image.npy").stat().st_mtime_ns == built and np.array_equal(again, image)
    assert np.array_equal(tissue_again.means, tissue.means)
    # the prepared image changes (re-preprocessed): the cache follows it
    stat = (folder / "image.nii.gz").stat()
    os.utime(folder / "image.nii.gz", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    rebuilt, _, _, _ = PreparedFolder(folder).cached_arrays()
    assert (cache / "image.npy").stat().st_mtime_ns != built and np.array_equal(rebuilt, image)
    assert "tissue" not in json.loads((cache / "cache.json").read_text(encoding="utf-8"))
    # a corrupt array is noticed (shape recorded in cache.json) and rebuilt
    np.save(cache / "image.npy", np.zeros((2, 2), np.float32))
    repaired, _, _, _ = PreparedFolder(folder).cached_arrays()
    assert np.array_equal(repaired, image)


def test_unwritable_cache_keeps_arrays_in_memory(atlas_grid_subjects, tmp_path):
    """A prepared folder where the cache cannot be written (read-only, or here: blocked by a file)."""
    _, prep = atlas_grid_subjects(tmp_path, ["sub-00"])
    folder = find_prepared(prep)[0]
    (folder / "cache").write_text("not a folder")
    image, mask, cache, _ = PreparedFolder(folder).cached_arrays()
    assert cache is None and not isinstance(image, np.memmap) and image.shape == mask.shape and mask.any()
