"""Patch grid, training-position sampling and overlap-add aggregation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uadct.errors import UadctError
from uadct.patches import (
    OverlapAccumulator,
    PatchSpec,
    extract_patches,
    grid_starts,
    sliding_window_map,
    valid_training_starts,
)


@pytest.mark.parametrize("dims,size,stride", [(2, 16, 4), (2, 32, 4), (3, 8, 4), (2, 5, 3)])
def test_identity_predictor_reconstructs_arange_exactly(dims, size, stride):
    shape = (12, 45, 50)
    volume = np.arange(np.prod(shape), dtype=np.float64).reshape(shape).astype(np.float32)
    mask = np.ones(shape, np.uint8)
    result = sliding_window_map(volume, mask, lambda p: p, PatchSpec(size, dims), stride, batch_size=97)
    np.testing.assert_array_equal(result, volume)


def test_partial_mask_reconstructs_inside_and_zero_outside(rng):
    shape = (10, 40, 40)
    volume = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    mask = np.zeros(shape, np.uint8)
    mask[2:8, 10:30, 5:25] = 1
    result = sliding_window_map(volume, mask, lambda p: p, PatchSpec(16, 2), 4)
    np.testing.assert_array_equal(result[mask > 0], volume[mask > 0])
    assert not result[mask == 0].any()


def test_gaussian_weighting_still_reconstructs_identity():
    shape = (4, 33, 37)
    volume = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    result = sliding_window_map(volume, np.ones(shape), lambda p: p, PatchSpec(16, 2), 4, gaussian_sigma=0.25)
    np.testing.assert_allclose(result, volume, rtol=1e-6)


def test_scalar_scores_spread_over_patch():
    shape = (1, 16, 32)
    accumulator = OverlapAccumulator(shape, PatchSpec(16, 2))
    accumulator.add(np.array([[0, 0, 0], [0, 0, 16]]), np.array([1.0, 3.0]))
    result = accumulator.result()
    assert np.all(result[:, :, :16] == 1.0) and np.all(result[:, :, 16:] == 3.0)


def test_grid_only_keeps_patches_touching_the_mask():
    mask = np.zeros((3, 64, 64), np.uint8)
    mask[1, 30, 30] = 1
    positions = grid_starts(mask, PatchSpec(16, 2), stride=4)
    assert len(positions) > 0
    assert set(positions[:, 0]) == {1}
    for z, y, x in positions:
        assert y <= 30 < y + 16 and x <= 30 < x + 16
    # every patch that contains the voxel on the stride-4 lattice is there: 4 x 4
    assert len(positions) == 16


def test_training_positions_have_at_most_half_background(rng):
    mask = (rng.random((6, 40, 40)) < 0.6).astype(np.uint8)
    spec = PatchSpec(8, 2)
    positions = valid_training_starts(mask, spec, max_background=0.5, stride=1)
    patches = extract_patches(mask, positions, spec)
    assert len(positions) > 0
    assert np.all(patches.mean(axis=(1, 2)) >= 0.5)
    # and none is missing: brute force over every position
    expected = sum(
        mask[z, y : y + 8, x : x + 8].mean() >= 0.5 for z in range(6) for y in range(33) for x in range(33)
    )
    assert len(positions) == expected


def test_bad_geometry_is_refused():
    with pytest.raises(UadctError):
        PatchSpec(16, 4)
    with pytest.raises(UadctError):
        grid_starts(np.ones((2, 8, 8)), PatchSpec(16, 2))
    with pytest.raises(UadctError):
        grid_starts(np.ones((2, 32, 32)), PatchSpec(16, 2), stride=0)
    with pytest.raises(UadctError, match="larger than the patch"):
        grid_starts(np.ones((2, 32, 32)), PatchSpec(8, 2), stride=9)


@settings(max_examples=40, deadline=None)
@given(
    d=st.integers(1, 5), h=st.integers(8, 30), w=st.integers(8, 30),
    size=st.integers(4, 8), stride=st.integers(1, 8), seed=st.integers(0, 10_000),
)
def test_property_every_mask_voxel_is_covered_and_identity_holds(d, h, w, size, stride, seed):
    stride = min(stride, size)
    rng = np.random.default_rng(seed)
    mask = (rng.random((d, h, w)) < 0.3).astype(np.uint8)
    volume = rng.normal(size=(d, h, w)).astype(np.float32)
    spec = PatchSpec(size, 2)
    result = sliding_window_map(volume, mask, lambda p: p, spec, stride, batch_size=7)
    np.testing.assert_allclose(result[mask > 0], volume[mask > 0], rtol=1e-5, atol=1e-6)
    assert not result[mask == 0].any()


@pytest.mark.parametrize("dims,size,sigma", [(2, 8, None), (2, 8, 0.25), (3, 4, None), (3, 5, 0.3), (3, 16, None), (3, 16, 0.2)])
def test_vectorised_accumulator_matches_a_patch_by_patch_loop(dims, size, sigma, rng):
    """Repeated and overlapping positions inside one ``add`` call are all counted (2D: scatter; 3D 16^3: block adds)."""
    shape = (9, 20, 22) if size < 9 else (17, 30, 31)
    spec = PatchSpec(size, dims)
    dz, dy, dx = spec.shape
    positions = np.stack(
        [rng.integers(0, shape[0] - dz + 1, 300), rng.integers(0, shape[1] - dy + 1, 300), rng.integers(0, shape[2] - dx + 1, 300)], 1
    )
    positions[50:60] = positions[0]  # the same patch several times in one batch
    values = rng.normal(size=(300,) + spec.shape)
    accumulator = OverlapAccumulator(shape, spec, sigma)
    accumulator.add(positions[:170], values[:170])
    accumulator.add(positions[170:], values[170:].reshape(130, -1))
    total, count = np.zeros(shape), np.zeros(shape)
    for (z, y, x), value in zip(positions, values):
        total[z : z + dz, y : y + dy, x : x + dx] += value * accumulator.weights
        count[z : z + dz, y : y + dy, x : x + dx] += accumulator.weights
    np.testing.assert_allclose(accumulator.total, total, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(accumulator.count, count, rtol=1e-12)
    assert count.min() == 0 or size >= 9  # small patches leave voxels uncovered: they stay 0
    np.testing.assert_array_equal(accumulator.result()[count == 0], 0)


def test_training_positions_never_overlap_excluded_voxels(rng):
    mask = np.ones((4, 40, 40), np.uint8)
    lesion = np.zeros_like(mask)
    lesion[2, 18:22, 25:27] = 1
    spec = PatchSpec(8, 2)
    kept = valid_training_starts(mask, spec, stride=1, exclude=lesion)
    everything = valid_training_starts(mask, spec, stride=1)
    assert 0 < len(kept) < len(everything)
    assert not extract_patches(lesion, kept, spec).any()
    # and only overlapping patches were dropped
    dropped = len(everything) - len(kept)
    assert dropped == sum(lesion[z, y : y + 8, x : x + 8].any() for z, y, x in everything)


def test_patch_centres_span_minus_one_to_one():
    from uadct.patches import PatchSpec, patch_centres

    spec = PatchSpec(size=4, dims=3)
    shape = (8, 8, 8)
    centres = patch_centres(np.array([[0, 0, 0], [4, 4, 4], [2, 0, 4]]), spec, shape)
    assert centres.dtype == np.float32 and centres.shape == (3, 3)
    np.testing.assert_allclose(centres[0], [-0.5, -0.5, -0.5])
    np.testing.assert_allclose(centres[1], [0.5, 0.5, 0.5])
    np.testing.assert_allclose(centres[2], [0.0, -0.5, 0.5])
    flat = patch_centres(np.array([[3, 0, 0]]), PatchSpec(size=4, dims=2), (8, 8, 8))
    np.testing.assert_allclose(flat[0], [-0.125, -0.5, -0.5])
