"""Score-time post-processing of anomaly maps, stored with the map.

Applied on the atlas grid after the model's map and before calibrated units and the
mask threshold (a calibration is made with the same post-processing, see
:mod:`uadct.calibration`): a 3D median filter of the map inside the brain, and an eroded
brain mask (voxels closer than ``erode_mask_mm`` to the brain border are dropped: the
border is where registration and skull-stripping errors light up). Small-component
removal acts on the binary lesion mask afterwards (:func:`clean_lesion_mask`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from uadct.arrays import bounding_box
from uadct.errors import UadctError


@dataclass(frozen=True)
class PostProcess:
    """``median_filter``: cube edge in voxels (0 or 1: off); ``erode_mask_mm``: brain-mask
    erosion in mm (0: off); ``min_component_size``: lesion-mask clusters smaller than this many
    voxels of the input grid are dropped (0 or 1: off)."""

    median_filter: int = 0
    erode_mask_mm: float = 0.0
    min_component_size: int = 0

    def __post_init__(self) -> None:
        if self.median_filter < 0 or self.erode_mask_mm < 0 or self.min_component_size < 0:
            raise UadctError(f"post-processing sizes must not be negative: median filter {self.median_filter}, "
                             f"mask erosion {self.erode_mask_mm} mm, minimum component {self.min_component_size}")

    def map_settings(self) -> dict[str, Any]:
        """What changes the map's values (part of the calibration's settings); empty when off."""
        settings: dict[str, Any] = {}
        if self.median_filter > 1:
            settings["median_filter"] = int(self.median_filter)
        if self.erode_mask_mm > 0:
            settings["erode_mask_mm"] = float(self.erode_mask_mm)
        return settings

    def settings(self) -> dict[str, Any]:
        """Everything recorded with a map (map settings plus the mask's component filter)."""
        settings = self.map_settings()
        if self.min_component_size > 1:
            settings["min_component_size"] = int(self.min_component_size)
        return settings


def postprocess_map(anomaly_map: np.ndarray, mask: np.ndarray, spacing_mm: tuple[float, float, float],
                    options: PostProcess) -> tuple[np.ndarray, np.ndarray]:
    """The post-processed map and brain mask ``(D, H, W)`` (new arrays; outside the mask 0).

    ``spacing_mm``: voxel size in numpy axis order (z, y, x). The median filter sees brain
    voxels only (outside the brain is 0 and stays 0).
    """
    brain = np.asarray(mask) > 0
    result = np.where(brain, anomaly_map, 0).astype(np.float32)
    if not brain.any():
        return result, brain.astype(np.uint8)
    from scipy import ndimage

    if options.erode_mask_mm > 0:
        box = bounding_box(brain, 1)
        distance = ndimage.distance_transform_edt(np.pad(brain[box], 1), sampling=spacing_mm)[1:-1, 1:-1, 1:-1]
        eroded = np.zeros_like(brain)
        eroded[box] = distance > options.erode_mask_mm
        brain = eroded
    if options.median_filter > 1 and brain.any():
        box = bounding_box(brain, options.median_filter)
        result[box] = ndimage.median_filter(result[box], size=options.median_filter, mode="constant", cval=0.0)
    result[~brain] = 0.0
    return result, brain.astype(np.uint8)


def clean_lesion_mask(binary: np.ndarray, options: PostProcess) -> np.ndarray:
    """``binary`` without clusters smaller than ``options.min_component_size`` voxels (26-connected)."""
    from uadct.metrics import remove_small_components

    return remove_small_components(binary, options.min_component_size)


@dataclass(frozen=True)
class MapOptions:
    """Score-time options that change a map or add a lesion mask: post-processing, calibrated
    ``units`` (see :data:`uadct.calibration.UNITS`) and a voxel false-positive rate ``fpr`` for
    the binary mask (calibrated on healthy subjects)."""

    units: str = "raw"
    fpr: float | None = None
    post: PostProcess = PostProcess()

    def settings(self) -> dict[str, Any]:
        """The non-default options (recorded with the map; part of its skip-if-done settings)."""
        settings: dict[str, Any] = {}
        if self.units != "raw":
            settings["units"] = self.units
        if self.fpr is not None:
            settings["fpr"] = float(self.fpr)
        if self.post.settings():
            settings["postprocess"] = self.post.settings()
        return settings


@dataclass
class FinishedMap:
    """An atlas-grid map after post-processing and unit conversion, with its brain mask and the
    lesion threshold in the map's units (None without ``fpr``); ``record`` goes into the sidecar."""

    anomaly_map: np.ndarray
    mask: np.ndarray
    threshold: float | None
    record: dict[str, Any]


def finish_map(anomaly_map: np.ndarray, mask: np.ndarray, spacing_mm: tuple[float, float, float],
               metadata: dict[str, Any], scoring: dict[str, Any], options: MapOptions) -> FinishedMap:
    """Post-process ``anomaly_map`` ``(D, H, W)``, convert it to ``options.units`` with the checkpoint's
    calibration for these settings (``scoring``: stride, gaussian_sigma, output_kind) and find the
    threshold of ``options.fpr``."""
    from uadct.calibration import UNIT_LABELS, calibration_settings, find_calibration, threshold_at_fpr, to_units

    anomaly_map, mask = postprocess_map(anomaly_map, mask, spacing_mm, options.post)
    record: dict[str, Any] = {"postprocess": options.post.settings(), "units": options.units,
                              "unit": UNIT_LABELS.get(options.units, options.units)}
    if options.units == "raw" and options.fpr is None:
        return FinishedMap(anomaly_map, mask, None, record)
    settings = calibration_settings(scoring["stride"], scoring["gaussian_sigma"], scoring["output_kind"], options.post.map_settings())
    calibration = find_calibration(metadata, settings)
    record["calibration"] = {"subjects": calibration.subjects, "n_voxels": calibration.n_voxels, "settings": calibration.settings}
    threshold = None
    if options.fpr is not None:
        raw = threshold_at_fpr(calibration, options.fpr)
        threshold = float(to_units(np.array([raw]), calibration, options.units)[0])
        record.update(fpr=float(options.fpr), threshold_raw=raw, threshold=threshold,
                      threshold_definition=f"map > threshold flags a fraction {options.fpr:g} of healthy validation brain voxels")
    inside = mask > 0
    converted = np.zeros(anomaly_map.shape, dtype=np.float32)
    converted[inside] = to_units(anomaly_map[inside], calibration, options.units)
    return FinishedMap(converted, mask, threshold, record)
