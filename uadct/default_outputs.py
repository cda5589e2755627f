"""Where each command writes when no ``-o`` is given: next to or outside the inputs, never into them.

The rules (documented in docs/outputs.md):

- ``preprocess``: a BIDS dataset ``D`` -> ``D/derivatives/uadct/`` (the BIDS convention); one
  folder ``F`` (scans or a DICOM series) -> the sibling ``F-uadct/``; anything else (files,
  several inputs, ``-``) -> ``uadct-prep/`` in the working directory.
- ``train``: ``<model>.pt`` in the working directory (``cae.pt``).
- ``score``: one scan ``scan.nii.gz`` (or one DICOM series folder, or one prepared subject) ->
  ``<id>_anomaly.nii.gz`` in the working directory; one folder of scans or prepared subjects
  ``F`` -> the sibling ``F-maps/``; several inputs, ``-`` or ``--mood`` -> ``maps/`` in the working directory.
- ``heatmap``: ``<map id>_heatmap.png`` in the working directory; with ``--html``, ``heatmaps.html``.
- ``evaluate``: the maps folder ``M`` -> the sibling ``M-report/``.
- ``export``: ``<checkpoint name>.onnx`` (``.ts`` for TorchScript) in the working directory.
- ``demo``: ``uadct-demo/`` in the working directory.

Every rule yields a path outside the input files and folders (a BIDS derivative lives in the
dataset's ``derivatives/`` folder, which BIDS reserves for outputs).
"""

from __future__ import annotations

from pathlib import Path

from uadct.io import strip_nifti_suffix

MAP_SUFFIX = "_anomaly.nii.gz"
DEMO_OUTPUT = Path("uadct-demo")
PREP_OUTPUT = Path("uadct-prep")
MAPS_OUTPUT = Path("maps")
HTML_OUTPUT = Path("heatmaps.html")


def _sibling(folder: Path, suffix: str) -> Path:
    folder = Path(folder).resolve()  # "." and "scans/" get a real name
    return folder.parent / f"{folder.name}{suffix}"


def _is_bids(folder: Path) -> bool:
    from uadct.preprocess.bids import is_bids

    return is_bids(folder)


def preprocess_output(inputs: list[str]) -> Path:
    """Default output folder of ``uadct preprocess INPUTS``."""
    if len(inputs) == 1 and inputs[0] != "-" and Path(inputs[0]).is_dir():
        folder = Path(inputs[0])
        if _is_bids(folder):
            return folder / "derivatives" / "uadct"
        return _sibling(folder, "-uadct")
    return PREP_OUTPUT


def train_output(model: str) -> Path:
    """Default checkpoint of ``uadct train --model MODEL``: ``MODEL.pt`` in the working directory."""
    return Path(f"{model}.pt")


def score_output(inputs: list[str], paths: list[Path], folder: bool = False) -> Path:
    """Default output of ``uadct score``: one map for one scan, else a folder of maps.

    ``inputs`` are the arguments as typed, ``paths`` what they expanded to (scans, prepared
    subject folders, DICOM series folders); ``folder``: always a folder (``--mood``).
    """
    if len(inputs) == 1 and inputs[0] != "-":
        given = Path(inputs[0])
        if len(paths) == 1 and paths[0] == given and not folder:  # one scan, one series, one prepared subject
            return Path(map_name(given))
        if given.is_dir():
            return _sibling(given, "-maps")
    return MAPS_OUTPUT


def map_name(path: Path) -> str:
    """``scans/sub-01.nii.gz`` -> ``sub-01_anomaly.nii.gz`` (folders: their subject name)."""
    if path.is_dir():
        from uadct.preprocess.prepared import prepared_name

        return prepared_name(path) + MAP_SUFFIX
    return strip_nifti_suffix(path) + MAP_SUFFIX


def heatmap_output(anomaly_map: Path, html: bool) -> Path:
    """Default figure of ``uadct heatmap``: ``<map id>_heatmap.png``, or ``heatmaps.html``."""
    if html:
        return HTML_OUTPUT
    return Path(strip_nifti_suffix(anomaly_map) + "_heatmap.png")


def evaluate_output(maps: Path) -> Path:
    """Default report folder of ``uadct evaluate MAPS LABELS``: the sibling ``MAPS-report/``."""
    return _sibling(maps, "-report")


def export_output(checkpoint: Path, export_format: str) -> Path:
    """Default file of ``uadct export``: ``<checkpoint name>.onnx`` (``.ts`` for TorchScript) here."""
    suffix = ".ts" if export_format.strip().lower() == "torchscript" else ".onnx"
    return Path(Path(checkpoint).name.removesuffix(".pt") + suffix)


def demo_output() -> Path:
    """Default folder of ``uadct demo``."""
    return DEMO_OUTPUT
