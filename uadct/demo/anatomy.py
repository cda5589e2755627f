"""The atlas head prepared once per cohort (:class:`DemoAnatomy`): background-free head, masks, lesion sites."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from uadct.atlas import KNOWN_ATLASES, Atlas
from uadct.demo.geometry import index_to_physical, physical_to_index
from uadct.errors import AtlasError, InputError


class DemoAnatomy:
    """The atlas head prepared once per cohort: background-free head, masks, lesion sites.

    Arrays are ``(D, H, W)`` on the atlas grid.
    """

    def __init__(self, atlas: Atlas) -> None:
        if atlas.head is None:
            raise AtlasError(f"atlas {atlas.name!r} has no head image; the demo cohort needs one (use 'sri24')")
        self.atlas = atlas
        self.grid = atlas.head
        head = sitk.GetArrayFromImage(atlas.head).astype(np.float32)
        brain = sitk.GetArrayFromImage(atlas.brain).astype(np.float32)
        self.brain_mask = sitk.GetArrayFromImage(atlas.mask) > 0
        if not self.brain_mask.any():
            raise InputError(f"atlas {atlas.name!r}: the brain mask is empty")
        self.spacing_zyx = np.array(atlas.head.GetSpacing()[::-1])
        self.wm_intensity = float(np.percentile(brain[self.brain_mask], 80))
        self.head_mask, soft, surface = self._head_mask(head)
        self.head = head * soft  # drops the atlas's faint rectangular background
        # lesion sites: parenchyma (not CSF) and the distance (mm) to the edge of the brain mask
        inside = np.argwhere(self.brain_mask)
        box = tuple(slice(max(int(a) - 4, 0), int(b) + 5) for a, b in zip(inside.min(axis=0), inside.max(axis=0)))
        smooth = ndimage.gaussian_filter(brain[box], 2.0 / self.spacing_zyx, truncate=3.0)
        self.tissue_ok = np.zeros_like(self.brain_mask)
        self.tissue_ok[box] = self.brain_mask[box] & (smooth >= 0.55 * self.wm_intensity)
        crop = sitk.GetImageFromArray(self.brain_mask[box].astype(np.uint8))
        crop.SetSpacing(atlas.head.GetSpacing())
        distance = sitk.SignedMaurerDistanceMap(crop, insideIsPositive=True, squaredDistance=False, useImageSpacing=True)
        self.brain_distance_mm = np.zeros(head.shape, np.float32)
        self.brain_distance_mm[box] = np.maximum(sitk.GetArrayFromImage(distance), 0)
        self.head_centre = self.to_physical(np.argwhere(self.head_mask).mean(axis=0))
        self.head_surface = self.to_physical(surface)  # (N, 3) mm, every 2 mm over the head's outer surface

    def _head_mask(self, head: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The head (largest bright component, holes filled, dilated ~4 mm), a soft-edged weight, and the
        (N, 3) (z, y, x) indices of its surface; made at half resolution."""
        coarse = ndimage.gaussian_filter(head[::2, ::2, ::2], 1.0)
        components, _ = ndimage.label(coarse > 0.3 * self.wm_intensity)  # above the atlas's hazy background box
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        mask = ndimage.binary_fill_holes(components == sizes.argmax())
        mask = np.stack([ndimage.binary_fill_holes(plane) for plane in mask])  # the neck is open at the bottom
        mask = ndimage.binary_dilation(mask, iterations=2)
        soft = np.clip(ndimage.gaussian_filter(mask.astype(np.float32), 0.75), 0.0, 1.0)
        upsample = [np.minimum(np.arange(n) // 2, m - 1) for n, m in zip(head.shape, mask.shape)]
        grid = np.ix_(*upsample)
        surface = np.argwhere(mask & ~ndimage.binary_erosion(mask)) * 2 + 0.5
        return mask[grid], soft[grid], surface

    def to_physical(self, index_zyx: np.ndarray) -> np.ndarray:
        """Physical points (N, 3) (x, y, z mm) of continuous atlas indices (N, 3) in (z, y, x) order."""
        return index_to_physical(self.grid, np.asarray(index_zyx, dtype=float)[..., ::-1])

    def to_index(self, points: np.ndarray) -> np.ndarray:
        """Continuous atlas indices (N, 3) in (z, y, x) order of physical points (N, 3)."""
        return physical_to_index(self.grid, np.asarray(points, dtype=float))[..., ::-1]


_last_prepared: list[DemoAnatomy] = []


def prepared_anatomy(atlas: Atlas) -> DemoAnatomy:
    """The DemoAnatomy of ``atlas``, reusing the last one for the same atlas (2 s saved per cohort)."""
    for anatomy in _last_prepared:
        same_file = atlas.name in KNOWN_ATLASES and (anatomy.atlas.name, anatomy.atlas.checksum) == (atlas.name, atlas.checksum)
        if anatomy.atlas is atlas or same_file:
            return anatomy
    anatomy = DemoAnatomy(atlas)
    _last_prepared[:] = [anatomy]
    return anatomy
