"""HD-BET 2.0 skull-stripping: its nnU-Net model run in memory, without pickle or worker processes.

HD-BET 2.0 (``HD_BET/hd_bet_prediction.py``) is an nnU-Net v2 model, fold ``all``,
predicted with ``tile_step_size=0.5``, Gaussian tile weighting and test-time mirroring
only when asked (its CLI recommends ``--disable_tta`` on CPU). Its input is read by
nnU-Net's ``SimpleITKIO``: the voxel array in SimpleITK's ``(z, y, x)`` order with the
spacing reversed, no reorientation (the network was trained with mirroring and rotation
augmentation); nnU-Net's own preprocessing (crop to nonzero, z-score, resampling to the
plans' spacing) and the resampling of the segmentation back onto the input grid happen
inside ``predict_single_npy_array``. Label ``brain`` of its ``dataset.json`` (1) is the
brain mask; nothing else is done to it.

Weights are looked up in ``--hdbet-weights``, then ``$UADCT_HDBET_WEIGHTS``, then HD-BET's
own folder ``~/hd-bet_params/release_2.0.0`` (where ``hd-bet`` downloads them).
nnU-Net reads ``checkpoint_final.pth`` with ``torch.load(weights_only=False)``, which runs
any code a crafted pickle holds; here the checkpoint is read with ``weights_only=True``
and the predictor built with ``manual_initialization``, and the network class named in
``plans.json`` must come from ``dynamic_network_architectures`` (its layer types from
``torch.nn``), so a weights folder cannot make this process run code.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from uadct.errors import PreprocessError

log = logging.getLogger(__name__)

HDBET_WEIGHTS_ENV = "UADCT_HDBET_WEIGHTS"
HDBET_DEFAULT_WEIGHTS = Path("~/hd-bet_params/release_2.0.0")  # HD_BET.paths.folder_with_parameter_files
HDBET_FOLD = "all"
HDBET_CHECKPOINT = "checkpoint_final.pth"
HDBET_TILE_STEP = 0.5
ALLOWED_NETWORK_MODULE = "dynamic_network_architectures."
ALLOWED_LAYER_MODULE = "torch.nn."


def weights_candidates(weights: str | Path | None = None) -> list[Path]:
    """The folders tried, in order: ``weights``, ``$UADCT_HDBET_WEIGHTS``, HD-BET's default."""
    candidates = []
    if weights is not None:
        candidates.append(Path(weights).expanduser())
    if os.environ.get(HDBET_WEIGHTS_ENV):
        candidates.append(Path(os.environ[HDBET_WEIGHTS_ENV]).expanduser())
    candidates.append(HDBET_DEFAULT_WEIGHTS.expanduser())
    return candidates


def resolve_weights(weights: str | Path | None = None) -> Path:
    """The first candidate folder holding ``dataset.json``, ``plans.json`` and ``fold_all/checkpoint_final.pth``."""
    tried = weights_candidates(weights)
    for folder in tried:
        if all((folder / name).is_file() for name in ("dataset.json", "plans.json", f"fold_{HDBET_FOLD}/{HDBET_CHECKPOINT}")):
            return folder
    raise PreprocessError(
        f"no HD-BET weights (dataset.json, plans.json, fold_{HDBET_FOLD}/{HDBET_CHECKPOINT}) in "
        f"{', '.join(str(p) for p in dict.fromkeys(tried))}; run `hd-bet` once to download them or pass --hdbet-weights DIR"
    )


def load_checkpoint_safely(path: str | Path) -> dict[str, Any]:
    """Read an nnU-Net checkpoint with ``torch.load(weights_only=True)`` (tensors, dicts, strings, numbers).

    NumPy scalars and arrays (nnU-Net's training log holds them) are allowed as data;
    anything else a pickle would import, and so any code it would run, is refused.
    """
    import torch

    safe = [np.dtype, np.ndarray, type(np.dtype(np.float64)), type(np.dtype(np.float32)), type(np.dtype(np.int64))]
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]
    safe += [scalar, _reconstruct]
    try:
        with torch.serialization.safe_globals(safe):
            checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if "GLOBAL" in line or "global" in line.lower()]
        reason = lines[0].rstrip(".") if lines else "an unsafe pickle"
        raise PreprocessError(f"{path}: refused to load, it holds more than weights ({reason})") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise PreprocessError(f"{path}: not a readable checkpoint ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})") from None
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise PreprocessError(f"{path}: not an nnU-Net checkpoint (no network_weights)")
    return checkpoint


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise PreprocessError(f"{path}: not readable JSON ({exc})") from None


def _check_architecture(configuration: dict[str, Any], plans_path: Path) -> None:
    """Refuse network classes outside dynamic_network_architectures and layers outside torch.nn."""
    architecture = configuration.get("architecture", {})
    name = str(architecture.get("network_class_name", ""))
    if not name.startswith(ALLOWED_NETWORK_MODULE):
        raise PreprocessError(f"{plans_path}: network class {name!r} is not from {ALLOWED_NETWORK_MODULE.rstrip('.')}")
    kwargs = architecture.get("arch_kwargs", {})
    for key in architecture.get("_kw_requires_import", []):
        value = kwargs.get(key)
        if value is not None and not str(value).startswith(ALLOWED_LAYER_MODULE):
            raise PreprocessError(f"{plans_path}: {key} {value!r} is not a {ALLOWED_LAYER_MODULE.rstrip('.')} layer")


def _import_predictor():
    """nnU-Net's predictor class; its import prints warnings about unset paths, which are swallowed."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    except ImportError:
        raise PreprocessError("the hd-bet backend needs nnunetv2: pip install 'uadct[hdbet]'") from None
    return nnUNetPredictor


@functools.lru_cache(maxsize=2)
def load_hdbet_predictor(folder: str, mirroring: bool = False):
    """An ``nnUNetPredictor`` for the HD-BET model in ``folder``, built without unpickling code."""
    import torch

    nnUNetPredictor = _import_predictor()
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    import nnunetv2

    root = Path(folder)
    dataset_json = _read_json(root / "dataset.json")
    plans = _read_json(root / "plans.json")
    checkpoint_path = root / f"fold_{HDBET_FOLD}" / HDBET_CHECKPOINT
    checkpoint = load_checkpoint_safely(checkpoint_path)
    try:
        configuration_name = str(checkpoint["init_args"]["configuration"])
        trainer_name = str(checkpoint["trainer_name"])
    except (KeyError, TypeError):
        raise PreprocessError(f"{checkpoint_path}: no init_args.configuration or trainer_name") from None
    plans_manager = PlansManager(plans)
    if configuration_name not in plans_manager.available_configurations:
        raise PreprocessError(f"{root / 'plans.json'}: no configuration {configuration_name!r} (the checkpoint's)")
    configuration_manager = plans_manager.get_configuration(configuration_name)
    _check_architecture(configuration_manager.configuration, root / "plans.json")
    trainer_class = recursive_find_python_class(str(Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer"),
                                                trainer_name, "nnunetv2.training.nnUNetTrainer")
    if trainer_class is None:
        raise PreprocessError(f"{checkpoint_path}: trainer {trainer_name!r} is not part of nnunetv2")
    label_manager = plans_manager.get_label_manager(dataset_json)
    network = trainer_class.build_network_architecture(
        configuration_manager.network_arch_class_name,
        configuration_manager.network_arch_init_kwargs,
        configuration_manager.network_arch_init_kwargs_req_import,
        determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
        label_manager.num_segmentation_heads,
        enable_deep_supervision=False,
    )
    try:
        network.load_state_dict(checkpoint["network_weights"])
    except RuntimeError as exc:
        raise PreprocessError(f"{checkpoint_path}: weights do not fit the network in plans.json ({str(exc).splitlines()[0]})") from None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with contextlib.redirect_stdout(io.StringIO()):
        predictor = nnUNetPredictor(
            tile_step_size=HDBET_TILE_STEP,
            use_gaussian=True,
            use_mirroring=mirroring,
            perform_everything_on_device=device.type == "cuda",
            device=device,
            verbose=False,
            verbose_preprocessing=False,
            allow_tqdm=False,
        )
        predictor.manual_initialization(
            network, plans_manager, configuration_manager, [checkpoint["network_weights"]], dataset_json,
            trainer_name, checkpoint.get("inference_allowed_mirroring_axes"),
        )
    predictor.network.to(device)
    return predictor


def _brain_label(dataset_json: dict[str, Any]) -> int:
    """The value of label ``brain`` in the model's dataset.json (HD-BET: 1)."""
    try:
        return int(dataset_json.get("labels", {}).get("brain", 1))
    except (TypeError, ValueError):
        raise PreprocessError(f"dataset.json: label 'brain' is {dataset_json['labels']['brain']!r}, not a number") from None


def hdbet_mask(image: sitk.Image, weights: str | Path | None = None, mirroring: bool = False) -> sitk.Image:
    """HD-BET brain mask (uint8, 1 = brain) of a head MR scan, on the scan's own grid."""
    folder = resolve_weights(weights)
    predictor = load_hdbet_predictor(str(folder.resolve()), mirroring)
    # what nnU-Net's SimpleITKIO hands the predictor: (c, z, y, x) float32, spacing (z, y, x)
    array = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32))[None]
    properties = {"spacing": list(image.GetSpacing())[::-1]}
    with contextlib.redirect_stdout(io.StringIO()):
        segmentation = predictor.predict_single_npy_array(array, properties, None, None, False)
    segmentation = np.asarray(segmentation)
    if segmentation.shape != array.shape[1:]:
        raise PreprocessError(f"HD-BET returned a {segmentation.shape} segmentation for a {array.shape[1:]} image")
    mask = sitk.GetImageFromArray((segmentation == _brain_label(predictor.dataset_json)).astype(np.uint8))
    mask.CopyInformation(image)
    return mask


def checkpoint_sha256(weights: str | Path | None = None) -> str:
    """Checksum of the checkpoint :func:`hdbet_mask` uses (for the sidecar)."""
    from uadct.io import sha256_of

    return sha256_of(resolve_weights(weights) / f"fold_{HDBET_FOLD}" / HDBET_CHECKPOINT)
