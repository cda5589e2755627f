"""Synthetic lesions for real scans: seeded, inside the brain, soft-edged, hyper and hypo, sized in mm."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from uadct.errors import UadctError
from uadct.lesions import draw_lesions, insert_lesions


def _head(shape=(40, 48, 44)):
    z, y, x = np.indices(shape)
    centre = np.array(shape) / 2
    brain = ((z - centre[0]) ** 2 / 16**2 + (y - centre[1]) ** 2 / 20**2 + (x - centre[2]) ** 2 / 18**2) < 1
    csf = ((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2] - 10) ** 2) < 5**2  # a CSF-like pocket
    image = np.where(brain, np.where(csf, 30.0, 100.0), 10.0).astype(np.float32)
    image += np.random.default_rng(1).normal(0, 2, shape).astype(np.float32)
    return image, brain


def test_same_seed_same_lesions_and_lesions_stay_in_the_brain():
    image, brain = _head()
    spacing = (2.0, 1.5, 1.0)
    first = draw_lesions(brain, spacing, np.random.default_rng(5))
    again = draw_lesions(brain, spacing, np.random.default_rng(5))
    assert first == again and 1 <= len(first) <= 3
    other = draw_lesions(brain, spacing, np.random.default_rng(6))
    assert other != first
    lesioned, label = insert_lesions(image, brain, spacing, first)
    assert label.any() and not (label.astype(bool) & ~brain).any()
    assert (lesioned[~brain] == image[~brain]).all()  # nothing changes outside the brain
    assert lesioned.dtype == np.float32 and label.dtype == np.uint8


@pytest.mark.parametrize("kind", ["hyper", "hypo"])
def test_polarity_size_and_soft_edges(kind):
    image, brain = _head()
    spacing = (1.0, 1.0, 1.0)
    lesions = draw_lesions(brain, spacing, np.random.default_rng(0), count=1, kinds=(kind,), diameters_mm=(12.0, 12.0))
    lesioned, label = insert_lesions(image, brain, spacing, lesions)
    inside = label > 0
    change = lesioned[inside].mean() - image[inside].mean()
    assert (change > 20) if kind == "hyper" else (change < -20)
    volume = inside.sum()  # an irregular ball 12 mm across: a few hundred to a few thousand mm3
    assert 0.3 * (np.pi / 6 * 12**3) < volume < 3 * (np.pi / 6 * 12**3)
    ring = ndimage.binary_dilation(inside, iterations=2) & ~inside & brain
    # soft edge: just outside the label the intensity is between the lesion's and the tissue's
    ring_change = lesioned[ring].mean() - image[ring].mean()
    assert 0 < abs(ring_change) < abs(change) and np.sign(ring_change) == np.sign(change)
    assert lesioned[inside].std() > image[inside].std()  # textured


def test_an_empty_brain_is_refused():
    with pytest.raises(UadctError, match="no brain voxel"):
        draw_lesions(np.zeros((5, 5, 5)), (1.0, 1.0, 1.0), np.random.default_rng(0))
