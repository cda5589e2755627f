"""Synthetic disks (uadct.synthetic) on the real SRI24 brain at 1 mm and 2 mm."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from uadct.errors import UadctError
from uadct.io import read_image
from uadct.synthetic import (
    PAPER_INTENSITIES, DiskPlacement, disk_mask, disk_offsets, insert_disk, insert_random_disk, paper_to_normalised,
    place_disk, resize_disk, tissue_anchors,
)


@pytest.fixture(scope="module")
def brain(atlas):
    """The SRI24 brain at 1 mm, normalised like `uadct preprocess` (5th/95th percentile -> 0/1)."""
    from uadct.preprocess.intensity import normalize_intensity

    mask = sitk.GetArrayFromImage(atlas.mask) > 0
    image = sitk.GetArrayFromImage(atlas.brain).astype(np.float32)
    image, _ = normalize_intensity(image, mask.astype(np.uint8), "percentile", (5.0, 95.0), (40.0, 80.0))
    return image, mask, tuple(float(s) for s in atlas.brain.GetSpacing()[::-1])


@pytest.mark.parametrize("diameter", [1, 2, 3, 4, 5, 10, 35])
def test_disk_spans_its_diameter_and_area_at_1mm(diameter):
    offsets = disk_offsets(float(diameter), (1.0, 1.0))
    extent = offsets.max(axis=0) - offsets.min(axis=0) + 1
    assert extent.tolist() == [diameter, diameter]  # n mm across = n voxels along y and along x
    area = math.pi * diameter**2 / 4
    if diameter >= 4:
        assert abs(len(offsets) - area) / area < 0.08
    else:  # a few voxels: the discrete disk is the 1, 2x2, 3x3 block
        assert len(offsets) == diameter**2


def test_disk_follows_anisotropic_spacing():
    offsets = disk_offsets(10.0, (2.0, 0.5))  # 5 voxels along y, 20 along x
    extent = offsets.max(axis=0) - offsets.min(axis=0) + 1
    assert extent.tolist() == [5, 20]
    assert abs(len(offsets) * 2.0 * 0.5 - math.pi * 25) / (math.pi * 25) < 0.1


def test_inserted_disk_lies_in_the_brain_with_the_exact_intensity(brain):
    image, mask, spacing = brain
    placement = place_disk(mask, spacing, 35.0, 50, seed=3)
    assert placement.inside_fraction >= 0.98
    volume, lesion = insert_disk(image, mask, placement, 0.7, spacing)
    assert volume.dtype == np.float32 and lesion.dtype == bool and volume.shape == image.shape
    assert not (lesion & ~mask).any()
    assert np.all(volume[lesion] == np.float32(0.7))
    assert np.array_equal(volume[~lesion], image[~lesion])  # nothing else changes, the input is not modified
    slices = np.flatnonzero(lesion.any(axis=(1, 2)))
    assert slices[0] == placement.first_slice and len(slices) == 50 and np.all(np.diff(slices) == 1)
    whole = disk_mask(image.shape, placement, spacing)
    per_slice = whole.sum(axis=(1, 2))[slices]
    assert np.all(per_slice == len(disk_offsets(35.0, (1.0, 1.0))))
    assert abs(per_slice[0] - math.pi * 17.5**2) / (math.pi * 17.5**2) < 0.02  # 35 mm across at 1 mm
    assert lesion.sum() / whole.sum() == pytest.approx(placement.inside_fraction)
    ys, xs = np.nonzero(whole[slices[0]])
    assert (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) == (35, 35)


def test_disk_size_at_2mm(small_atlas_path):
    small = read_image(small_atlas_path)
    mask = sitk.GetArrayFromImage(small) > 0
    spacing = tuple(float(s) for s in small.GetSpacing()[::-1])
    volume, lesion = insert_random_disk(sitk.GetArrayFromImage(small), mask, spacing, 10.0, 5.0, n_slices=8, seed=1)
    slices = np.flatnonzero(lesion.any(axis=(1, 2)))
    assert len(slices) == 8
    ys, xs = np.nonzero(lesion[slices[3]])
    assert (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) == (5, 5)  # 10 mm at 2 mm = 5 voxels
    assert lesion[slices[3]].sum() == 21
    assert np.all(volume[lesion] == 5.0) and not (lesion & ~mask).any()


@pytest.fixture(scope="module")
def small_brain(small_atlas_path):
    """The SRI24 brain at 2 mm (mask: brain > 0) for the cheaper placement tests."""
    small = read_image(small_atlas_path)
    image = sitk.GetArrayFromImage(small).astype(np.float32)
    return image, image > 0, tuple(float(s) for s in small.GetSpacing()[::-1])


def test_placement_is_deterministic_for_a_seed(small_brain):
    _, mask, spacing = small_brain
    first = place_disk(mask, spacing, 10.0, 25, seed=7)
    assert place_disk(mask, spacing, 10.0, 25, seed=7) == first
    others = {place_disk(mask, spacing, 10.0, 25, seed=s) for s in range(4)}
    assert len(others) > 1  # the seed does move the disk
    assert first.inside_fraction == 1.0  # a 10 mm, 50 mm tall cylinder fits wholly in a brain


def test_resize_keeps_the_position(small_brain):
    image, mask, spacing = small_brain
    base = place_disk(mask, spacing, 10.0, 25, seed=2)  # 5 voxels across at 2 mm
    small = resize_disk(base, 6.0, spacing[1:])  # 3 voxels across
    _, big_lesion = insert_disk(image, mask, base, 1.0, spacing)
    _, small_lesion = insert_disk(image, mask, small, 1.0, spacing)
    assert small_lesion.sum() == 25 * 9
    assert not (small_lesion & ~big_lesion).any()  # the 6 mm disk sits inside the 10 mm one
    assert (small.first_slice, small.n_slices) == (base.first_slice, base.n_slices)


def test_paper_scale_maps_tissue_anchors(brain):
    image, mask, _ = brain
    anchors = tissue_anchors(image, mask)
    # a T1 normalised 5th/95th -> 0/1: grey matter mid-range, white matter near 1
    assert 0.3 < anchors.grey_matter < 0.7 < anchors.white_matter < 1.1
    assert paper_to_normalised(0.25, anchors) == pytest.approx(anchors.grey_matter)
    assert paper_to_normalised(0.45, anchors) == pytest.approx(anchors.white_matter)
    mapped = [paper_to_normalised(p, anchors) for p in PAPER_INTENSITIES]
    assert np.all(np.diff(mapped) > 0) and mapped[-1] > 1.5 * anchors.white_matter


def test_bad_requests_are_refused(small_brain):
    image, mask, spacing = small_brain
    with pytest.raises(UadctError, match="diameter"):
        disk_offsets(0.0, (1.0, 1.0))
    with pytest.raises(UadctError, match="slices"):
        place_disk(mask, spacing, 10.0, mask.shape[0] + 1)
    with pytest.raises(UadctError, match="empty"):
        place_disk(np.zeros((10, 10, 10), bool), (1.0, 1.0, 1.0), 3.0, 2)
    with pytest.raises(UadctError, match="shape"):
        insert_disk(image, mask[:-1], DiskPlacement(0, 1, 5.0, 5.0, 3.0, 1.0), 1.0, spacing)
