"""Writing 2D test images: DICOM files with pydicom (photometric interpretation, rescale, spacing, window tags)
and small PNG cohorts with a known bright square in the abnormal ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_dicom_image(stored: np.ndarray, path: Path, *, photometric: str = "MONOCHROME2", slope: float | None = None,
                      intercept: float | None = None, bits_stored: int = 12, signed: bool = False,
                      pixel_spacing: tuple[float, float] | None = None, imager_pixel_spacing: tuple[float, float] | None = None,
                      window: tuple[float, float] | None = None, modality: str = "DX",
                      series_uid: str = "1.2.826.0.1.3680043.2.1125.7.1") -> Path:
    """Write ``stored`` ``(H, W)`` (the stored integer values) as a single-frame, uncompressed DICOM image.

    Tags follow DICOM PS3.3 C.7.6.3 (Image Pixel) and C.11.1 (Modality LUT): the reader must
    apply ``slope``/``intercept`` and invert ``MONOCHROME1`` itself.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = series_uid + ".9"
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.PatientName = "Test^Xray"
    ds.PatientID = "XRAY01"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if slope is not None or intercept is not None:
        ds.RescaleSlope = f"{slope if slope is not None else 1:g}"
        ds.RescaleIntercept = f"{intercept if intercept is not None else 0:g}"
    if pixel_spacing is not None:
        ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
    if imager_pixel_spacing is not None:
        ds.ImagerPixelSpacing = [f"{v:g}" for v in imager_pixel_spacing]
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = f"{window[0]:g}", f"{window[1]:g}"
    ds.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def blob_image(rng: np.random.Generator, abnormal: bool, shape: tuple[int, int] = (48, 60)) -> np.ndarray:
    """An 8-bit picture: a smooth bright ellipse with noise; an abnormal one has a bright square at rows 18-30, columns 34-46."""
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]]
    picture = 90 + 80 * np.exp(-((x - shape[1] / 2) ** 2 / 300 + (y - shape[0] / 2) ** 2 / 200)) + rng.normal(0, 4, shape)
    if abnormal:
        picture[18:30, 34:46] += 110
    return np.clip(picture, 0, 255).astype(np.uint8)


def write_png_cohort(root: Path, n_train: int = 6, n_test: int = 3, seed: int = 0) -> dict[str, Path]:
    """``root/train/*.png`` (normal), ``root/test/normal/*.png`` and ``root/test/abnormal/*.png`` (bright square)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folders = {"train": root / "train", "normal": root / "test" / "normal", "abnormal": root / "test" / "abnormal"}
    counts = {"train": n_train, "normal": n_test, "abnormal": n_test}
    for kind, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(counts[kind]):
            Image.fromarray(blob_image(rng, kind == "abnormal")).save(folder / f"{kind}{index}.png")
    return folders
