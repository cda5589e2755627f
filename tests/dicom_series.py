"""Writing DICOM series from volumes for the tests: one file per axial slice, with geometry tags."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def write_series(image: sitk.Image, folder: Path, *, modality: str = "MR", series_uid: str = "1.2.826.0.1.3680043.2.1125.1",
                 description: str = "T1", rescale_intercept: float | None = None, tilt_deg: float | None = None,
                 skip_slices: tuple[int, ...] = (), duplicate_slice: int | None = None,
                 rotate_slice: int | None = None, shear_mm: float = 0.0, prefix: str = "") -> Path:
    """Write ``image`` (3D, int16-castable) as a DICOM series, one file per k-slice, into ``folder``.

    The slice tags follow DICOM PS3.3 C.7.6.2: Image Position (Patient) is the centre of the
    first voxel of each slice, Image Orientation (Patient) the direction cosines of rows and
    columns. ``rescale_intercept`` stores CT values with that intercept (slope 1), so readers
    must apply it to get HU back. The other options break the series in the ways scanners do.
    """
    folder.mkdir(parents=True, exist_ok=True)
    pixels = sitk.Cast(image, sitk.sitkInt16)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    orientation = list(direction[:, 0]) + list(direction[:, 1])
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    study = series_uid.rsplit(".", 1)[0] + ".9"
    stamp = time.strftime("%Y%m%d")
    for k in range(image.GetSize()[2]):
        if k in skip_slices:
            continue
        index = k - 1 if duplicate_slice is not None and k == duplicate_slice + 1 else k
        piece = pixels[:, :, k]
        position = list(image.TransformIndexToPhysicalPoint((0, 0, index)))
        position[0] += shear_mm * k
        slice_orientation = orientation
        if rotate_slice is not None and k == rotate_slice:
            slice_orientation = [orientation[1], orientation[0], orientation[2], orientation[4], orientation[3], orientation[5]]
        tags = {
            "0008|0060": modality,
            "0008|0020": stamp,
            "0008|103e": description,
            "0010|0010": "Test^Atlas",
            "0010|0020": "ATLAS01",
            "0020|000d": study,
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "\\".join(f"{v:.6f}" for v in slice_orientation),
            "0008|0018": f"{series_uid}.{k + 1}",
            "0018|0050": f"{image.GetSpacing()[2]:.6f}",
            "0028|0030": f"{image.GetSpacing()[1]:.6f}\\{image.GetSpacing()[0]:.6f}",
        }
        if rescale_intercept is not None:
            tags["0028|1052"] = f"{rescale_intercept:g}"
            tags["0028|1053"] = "1"
            tags["0028|1054"] = "HU"
        if tilt_deg is not None:
            tags["0018|1120"] = f"{tilt_deg:g}"
        for key, value in tags.items():
            piece.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{prefix}slice{k:04d}.dcm"))
        writer.Execute(piece)
    return folder
