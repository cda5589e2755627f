"""Volume -> anomaly map: strided patches over the brain, overlap-averaged, back to native space.

A raw scan goes through the preprocessing recorded in the checkpoint (or a prepared
subject folder is used as is), the model scores every patch that touches the brain
mask on the atlas grid, the voxel map is averaged over overlaps, and the map is
resampled onto the subject's own grid (same size, spacing, origin and direction as
the input scan; float32; background 0).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk
import torch

from uadct.atlas import load_atlas
from uadct.checkpoint import Checkpoint, load_checkpoint
from uadct.dicom import is_dicom_folder
from uadct.errors import CheckpointError, InputError, UadctError
from uadct.io import array_like, map_sidecar_path, read_image, sha256_of, write_image, write_json, write_text
from uadct.locks import output_lock, remove_stale_temporaries
from uadct.memory import BatchPlan, default_budget, inference_bytes_per_patch, model_bytes, plan_batch
from uadct.patches import PatchSpec, patch_centres, sliding_window_map
from uadct.postprocess import MapOptions, clean_lesion_mask, finish_map
from uadct.preprocess.pipeline import SIDECAR, PreprocessConfig, load_prepared, run_preprocessing
from uadct.preprocess.resolution import harmonized_config
from uadct.train import resolve_device

log = logging.getLogger(__name__)

IMAGE_SCORE_TOP_K = 1000  # voxels (~1 ml at 1 mm) averaged for the image-level score
MOOD_SCALE_KEY = "score_scale"  # checkpoint metadata: robust maximum of healthy voxel scores


@dataclass
class ScoreResult:
    """Where the outputs went and what was measured."""

    map_path: Path
    json_path: Path
    image_score: float
    timings: dict[str, float] = field(default_factory=dict)


def resolve_output_kind(model: torch.nn.Module, output: str | None) -> str:
    """The model output to map: ``output`` if the model declares it, else its first declared one."""
    declared = tuple(getattr(model, "outputs", ("voxel",)))
    if output is None:
        return declared[0]
    if output not in declared:
        raise UadctError(
            f"model {getattr(model, 'name', type(model).__name__)!r} has no {output!r} output; "
            f"it declares {', '.join(declared)}"
        )
    return output


def patch_predictor(
    model: torch.nn.Module, device: torch.device, output: str | None = None,
    volume_shape: tuple[int, int, int] | None = None, spec: PatchSpec | None = None,
) -> Callable[..., np.ndarray]:
    """Wrap a model's ``score_patches`` as a numpy ``(B, *patch) -> (B, *patch) or (B,)`` function.

    ``output`` is ``"voxel"`` or ``"scalar"``; default the model's first declared output.
    For a position-conditioned model (``model.uses_positions``) the function also takes
    the patches' first voxels ``(B, 3)`` and passes their centres
    (:func:`uadct.patches.patch_centres` on ``volume_shape``) to the model.
    """
    key = resolve_output_kind(model, output)
    conditioned = bool(getattr(model, "uses_positions", False))

    @torch.inference_mode()
    def predict(patches: np.ndarray, starts: np.ndarray | None = None) -> np.ndarray:
        batch = torch.from_numpy(np.ascontiguousarray(patches, dtype=np.float32)).unsqueeze(1).to(device)
        extra = {}
        if conditioned:
            if starts is None or volume_shape is None or spec is None:
                raise UadctError(f"model {getattr(model, 'name', '?')!r} is conditioned on patch positions; give the patch starts and volume shape")
            extra["positions"] = torch.from_numpy(patch_centres(starts, spec, volume_shape)).to(device)
        return model.score_patches(batch, **extra)[key].float().cpu().numpy()

    return predict


def score_volume(
    checkpoint: Checkpoint,
    image: np.ndarray,
    mask: np.ndarray,
    stride: int = 4,
    batch_size: int | None = None,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    gaussian_sigma: float | None = None,
    output_kind: str | None = None,
    max_memory: int | None = None,
    plan_out: dict[str, Any] | None = None,
) -> np.ndarray:
    """Anomaly map ``(D, H, W)`` float32 of a prepared volume on the atlas grid.

    ``gaussian_sigma``: gaussian-weighted overlap averaging (sigma as a fraction of the
    patch edge; None: plain mean). ``output_kind``: ``"voxel"`` or ``"scalar"`` (default:
    the model's first declared output). ``batch_size`` None picks the largest batch that
    fits ``max_memory`` bytes (default: a share of the free memory, see
    :mod:`uadct.memory`); a given batch that does not fit is a :class:`MemoryLimitError`.
    A batch that runs out of memory anyway is split and retried. ``plan_out`` receives
    the batch plan (for sidecars and logs).
    """
    patch = checkpoint.metadata.get("patch", {})
    spec = PatchSpec(int(patch.get("size", 16)), int(patch.get("dims", 2)))
    if gaussian_sigma is not None and not gaussian_sigma > 0:
        raise UadctError(f"gaussian sigma must be a positive fraction of the patch size, got {gaussian_sigma}")
    if batch_size is not None and batch_size < 1:
        raise UadctError(f"batch size must be at least 1 patch, got {batch_size}")
    torch_device = resolve_device(device)
    model = checkpoint.model.to(torch_device).eval()
    if hasattr(model, "score_volume") and output_kind in (None, "voxel") and gaussian_sigma is None:
        if plan_out is not None:  # voxel-wise models (normative) map the whole volume at once
            plan_out.update({"whole_volume": True})
        return model.score_volume(image, mask)
    predictor = patch_predictor(model, torch_device, output_kind, volume_shape=image.shape, spec=spec)
    plan = plan_scoring_batch(model, spec, image.shape, torch_device, batch_size, max_memory)
    log.info("scoring %s", plan.describe())
    stats: dict[str, Any] = {}
    result = sliding_window_map(
        image.astype(np.float32), mask, predictor, spec, stride, plan.batch_size, gaussian_sigma=gaussian_sigma,
        progress=progress, adapt_to_memory=True, stats=stats, pass_positions=bool(getattr(model, "uses_positions", False)),
    )
    if plan_out is not None:
        plan_out.update({"batch_size": plan.batch_size, "memory_budget_bytes": plan.budget,
                         "bytes_per_patch": plan.per_patch, "fixed_bytes": plan.fixed, **stats})
    return result


# bytes per atlas-grid voxel the scorer holds whatever the batch: the image (float32, and
# its copy), the mask, the float64 sum and int32 count of the accumulator, the transient
# int64 cumulative sums of the count, the position grid's box sums and the float32 result
SCORING_BYTES_PER_VOXEL = 72
# bytes per patch voxel outside the model: the cut patch (float32), its tensor copy, the
# float64 values and int64 flat indices of the overlap-add
SCORING_BYTES_PER_PATCH_VOXEL = 32


def plan_scoring_batch(model: torch.nn.Module, spec: PatchSpec, volume_shape: tuple[int, ...], device: torch.device,
                       batch_size: int | None = None, max_memory: int | None = None) -> BatchPlan:
    """The scoring batch size for ``model`` on a volume of ``volume_shape`` within a memory budget."""
    patch_voxels = int(np.prod(spec.shape))
    model_shape = (1,) + tuple(spec.shape[1:] if spec.dims == 2 else spec.shape)
    score = None
    if getattr(model, "uses_positions", False):  # the probe batch sits at the volume centre
        score = lambda batch: model.score_patches(batch, positions=batch.new_zeros(len(batch), 3))  # noqa: E731
    per_patch = inference_bytes_per_patch(model, model_shape, device, score) + SCORING_BYTES_PER_PATCH_VOXEL * patch_voxels
    fixed = SCORING_BYTES_PER_VOXEL * int(np.prod(volume_shape)) + model_bytes(model)
    budget = max_memory if max_memory is not None else default_budget(device)
    return plan_batch(batch_size, per_patch, fixed, budget, "scoring")


def mood_scaled(anomaly_map: np.ndarray, mask: np.ndarray, scale: float | None) -> tuple[np.ndarray, str]:
    """Map values in [0, 1] for MOOD submissions, and how they were scaled.

    With ``scale`` (a robust maximum of healthy voxel scores stored in the checkpoint as
    ``metadata["score_scale"]``) the map is ``clip(map / scale, 0, 1)``: the same monotone
    function for every case, so voxels stay comparable across cases (MOOD pools voxels of
    all cases for its voxel-level AP). Without it the map is min-max scaled per case inside
    the brain: ranks inside a case are kept, but across cases they are not (a healthy case
    also reaches 1). Outside the brain the map is 0.
    """
    inside = mask > 0
    out = np.zeros(anomaly_map.shape, dtype=np.float32)
    if not inside.any():
        return out, "empty brain mask"
    values = anomaly_map[inside].astype(np.float64)
    if scale is not None and scale > 0:
        out[inside] = np.clip(values / scale, 0.0, 1.0)
        return out, f"clip(map / {scale:.6g}, 0, 1) (checkpoint {MOOD_SCALE_KEY})"
    low, high = float(values.min()), float(values.max())
    out[inside] = (values - low) / (high - low) if high > low else 0.0
    return out, "per-case min-max inside the brain"


SCORE_SCALE_QUANTILE = 0.999


def estimate_score_scale(model: torch.nn.Module, patches: np.ndarray, masks: np.ndarray, batch_size: int,
                         device: torch.device, output_kind: str | None = None, quantile: float = SCORE_SCALE_QUANTILE,
                         hook_options: Callable[[slice], dict[str, Any]] | None = None) -> float | None:
    """A robust maximum of healthy scores: the ``quantile`` of the model's outputs on held-out
    healthy patches ``(N, 1, *patch)`` (voxel outputs inside the brain masks, or the
    per-patch scalars). ``hook_options(rows)`` gives extra keyword arguments for the
    patches ``rows`` (a slice), e.g. the positions of position-conditioned models. Stored in checkpoints as ``score_scale`` so MOOD maps are scaled by
    one fixed, case-independent factor. None when nothing was scored or the value is not positive.
    ``centres`` ``(N, 3)``: the patch centres, passed to position-conditioned models.
    """
    key = resolve_output_kind(model, output_kind)
    values = []
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(patches), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(patches[start : start + batch_size], dtype=np.float32)).to(device)
            mask = torch.from_numpy(np.ascontiguousarray(masks[start : start + batch_size], dtype=np.float32)).to(device)
            extra = hook_options(slice(start, start + batch_size)) if hook_options else {}
            output = model.score_patches(batch, mask, **extra)[key].float()
            if key == "voxel":
                output = output.reshape(mask.shape)[mask > 0]
            values.append(output.reshape(-1).cpu().numpy())
    flat = np.concatenate(values) if values else np.zeros(0)
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return None
    scale = float(np.quantile(flat, quantile))
    return scale if scale > 0 else None


def image_level_score(anomaly_map: np.ndarray, mask: np.ndarray, top_k: int = IMAGE_SCORE_TOP_K) -> float:
    """Mean of the ``top_k`` highest map values inside the mask."""
    values = anomaly_map[mask > 0]
    if values.size == 0:
        return 0.0
    k = min(top_k, values.size)
    return float(np.partition(values, values.size - k)[-k:].mean())


def score_settings(checkpoint: Checkpoint, stride: int = 4, gaussian_sigma: float | None = None,
                   output_kind: str | None = None, mood: bool = False, map_options: MapOptions | None = None) -> dict[str, Any]:
    """Everything that decides a map's values; a map made with other settings is not "done"."""
    return {
        "checkpoint_sha256": checkpoint.sha256,
        "stride": int(stride),
        "gaussian_sigma": gaussian_sigma,
        "output_kind": resolve_output_kind(checkpoint.model, output_kind),
        "mood": bool(mood),
        **(map_options.settings() if map_options is not None else {}),  # only non-default options: old maps stay "done"
    }


def score_scan(
    checkpoint: Checkpoint | str | Path,
    subject: str | Path,
    out_path: str | Path,
    stride: int = 4,
    batch_size: int | None = None,
    device: str = "auto",
    atlas_map_path: str | Path | None = None,
    brain_mask_path: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    gaussian_sigma: float | None = None,
    output_kind: str | None = None,
    mood: bool = False,
    max_memory: int | None = None,
    harmonize: bool = True,
    map_options: MapOptions | None = None,
    lesion_mask_path: str | Path | None = None,
) -> ScoreResult:
    """Score a raw scan (or a prepared subject folder) and write its native-space map.

    Also writes ``<map>.json`` (image-level score, checkpoint, settings, timings), always
    last, so a map is complete only when its sidecar exists; optionally the map on the
    atlas grid and the brain mask on the subject's grid. With ``mood`` the map is scaled
    to [0, 1] (see :func:`mood_scaled`) and the image-level score of the scaled map, also
    in [0, 1], is written alone to ``<map>.txt`` (MOOD sample score). ``batch_size`` None:
    automatic within ``max_memory`` bytes (see :func:`score_volume`). ``harmonize``: blur a
    raw scan finer than the model's training data to its resolution first (see
    :mod:`uadct.preprocess.resolution`). ``map_options``: post-processing, calibrated units
    and a healthy false-positive rate (see :mod:`uadct.postprocess`); with its ``fpr``,
    ``lesion_mask_path`` receives the binary lesion mask (uint8, the input's grid).
    """
    map_options = map_options or MapOptions()
    if lesion_mask_path is not None and map_options.fpr is None:
        raise UadctError(f"{lesion_mask_path}: a lesion mask needs a false-positive rate (--fpr)")
    if mood and (map_options.units != "raw" or map_options.fpr is not None):
        raise UadctError("--mood maps are scaled to [0, 1] by the MOOD rule; leave out --units and --fpr")
    if not isinstance(checkpoint, Checkpoint):
        from uadct.pretrained import resolve_checkpoint

        checkpoint_path = resolve_checkpoint(checkpoint)  # a file, or a shipped model's name
        checkpoint = load_checkpoint(checkpoint_path)
    else:
        checkpoint_path = None
    subject = Path(subject)
    out_path = Path(out_path)
    settings = score_settings(checkpoint, stride, gaussian_sigma, output_kind, mood, map_options)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    if subject.is_dir() and not is_dicom_folder(subject):  # a DICOM series folder is a raw scan
        if not (subject / SIDECAR).is_file():
            raise InputError(f"{subject}: a folder must be a prepared subject (with {SIDECAR})")
        prepared = load_prepared(subject)
        _check_compatible(checkpoint, prepared.sidecar.get("config", {}), subject)
        atlas_image, atlas_mask = prepared.image, prepared.mask
        transform = prepared.atlas_to_subject
        native = prepared.native_reference
        input_sha = prepared.sidecar.get("input", {}).get("sha256")
        resolution = prepared.sidecar.get("resolution", {})
    else:
        image = read_image(subject)
        try:
            config = harmonized_config(PreprocessConfig.from_dict(checkpoint.preprocess), checkpoint.metadata, harmonize)
        except (TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{checkpoint_path or 'checkpoint'}: its preprocessing settings are invalid ({exc})") from None
        atlas = load_atlas(config.atlas)
        expected = checkpoint.metadata.get("atlas", {}).get("sha256")
        if expected and expected != atlas.checksum:
            raise CheckpointError(f"the atlas {config.atlas!r} in the cache differs from the one the model was trained on (checksum)")
        _check_memory_before_work(checkpoint, atlas.brain.GetSize()[::-1], device, batch_size, max_memory)
        try:
            result = run_preprocessing(image, config, atlas)
        except UadctError as exc:
            raise type(exc)(f"{subject}: {exc}") from None
        atlas_image, atlas_mask, transform, native = result.image, result.mask, result.atlas_to_subject, image
        input_sha = sha256_of(subject)
        resolution = result.resolution
    timings["preprocess"] = round(time.perf_counter() - clock, 3)
    clock = time.perf_counter()
    mask_array = sitk.GetArrayFromImage(atlas_mask)
    plan: dict[str, Any] = {}
    atlas_map = score_volume(
        checkpoint, sitk.GetArrayFromImage(atlas_image), mask_array, stride, batch_size, device, progress,
        gaussian_sigma=gaussian_sigma, output_kind=output_kind, max_memory=max_memory, plan_out=plan,
    )
    if not np.isfinite(atlas_map).all():
        raise UadctError(f"{subject}: the model gave NaN or infinite scores ({checkpoint_path or 'checkpoint'}); "
                         "no map was written")
    finished = finish_map(atlas_map, mask_array, tuple(atlas_image.GetSpacing()[::-1]), checkpoint.metadata, settings, map_options)
    atlas_map, mask_array = finished.anomaly_map, finished.mask
    if map_options.post.map_settings():
        atlas_mask = array_like(mask_array, atlas_mask)
    scaling = None
    if mood:
        scale = checkpoint.metadata.get(MOOD_SCALE_KEY)
        atlas_map, scaling = mood_scaled(atlas_map, mask_array, float(scale) if scale is not None else None)
    timings["score"] = round(time.perf_counter() - clock, 3)
    clock = time.perf_counter()
    atlas_map_image = array_like(atlas_map, atlas_image)
    subject_to_atlas = transform.GetInverse()
    native_map = sitk.Resample(atlas_map_image, native, subject_to_atlas, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    native_mask = sitk.Resample(atlas_mask, native, subject_to_atlas, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    native_map = sitk.Mask(native_map, native_mask)
    if mood:  # linear interpolation cannot leave [0, 1]; clamp float rounding anyway
        native_map = sitk.Clamp(native_map, sitk.sitkFloat32, 0.0, 1.0)
    timings["resample"] = round(time.perf_counter() - clock, 3)
    lesion_mask = None
    if finished.threshold is not None:
        above = (sitk.GetArrayFromImage(native_map) > finished.threshold) & (sitk.GetArrayFromImage(native_mask) > 0)
        lesion_mask = sitk.GetImageFromArray(clean_lesion_mask(above, map_options.post).astype(np.uint8))
        lesion_mask.CopyInformation(native)
        finished.record["lesion_voxels"] = int(sitk.GetArrayViewFromImage(lesion_mask).sum())
        finished.record["lesion_mask"] = str(lesion_mask_path) if lesion_mask_path is not None else None
    score = image_level_score(atlas_map, mask_array)
    write_image(native_map, out_path)
    if lesion_mask is not None and lesion_mask_path is not None:
        Path(lesion_mask_path).parent.mkdir(parents=True, exist_ok=True)
        write_image(lesion_mask, lesion_mask_path)
    if mood:
        write_text(f"{score:.6f}\n", mood_score_path(out_path))
    if atlas_map_path is not None:
        write_image(atlas_map_image, atlas_map_path)
    if brain_mask_path is not None:
        write_image(native_mask, brain_mask_path)
    json_path = map_sidecar_path(out_path)
    write_json(
        {
            "subject": str(subject),
            "input_sha256": input_sha,
            "map": str(out_path),
            "image_score": score,
            "image_score_definition": f"mean of the top {IMAGE_SCORE_TOP_K} map voxels inside the brain (atlas grid)",
            "checkpoint": str(checkpoint_path) if checkpoint_path else None,
            "model": checkpoint.metadata.get("model"),
            "stride": stride,
            "output_kind": settings["output_kind"],
            "gaussian_sigma": gaussian_sigma,
            "mood_scaling": scaling,
            **finished.record,
            "settings": settings,
            "batch": plan,
            "timings_s": timings,
            "resolution": resolution,
        },
        json_path,
    )
    return ScoreResult(out_path, json_path, score, timings)


def _check_memory_before_work(checkpoint: Checkpoint, volume_shape: tuple[int, ...], device: str,
                              batch_size: int | None, max_memory: int | None) -> None:
    """Fail on a batch that cannot fit before minutes of preprocessing are spent."""
    patch = checkpoint.metadata.get("patch", {})
    spec = PatchSpec(int(patch.get("size", 16)), int(patch.get("dims", 2)))
    torch_device = resolve_device(device)
    plan_scoring_batch(checkpoint.model.to(torch_device).eval(), spec, tuple(volume_shape), torch_device, batch_size, max_memory)


def mood_score_path(map_path: str | Path) -> Path:
    """``case.nii.gz`` -> ``case.nii.gz.txt`` (the MOOD sample-score file)."""
    return Path(str(map_path) + ".txt")


def input_checksum(subject: str | Path) -> str | None:
    """SHA-256 of a raw scan, or the one a prepared folder's sidecar records for its input."""
    subject = Path(subject)
    if subject.is_dir():
        try:
            return json.loads((subject / SIDECAR).read_text()).get("input", {}).get("sha256")
        except (OSError, ValueError, AttributeError):
            return None
    return sha256_of(subject) if subject.is_file() else None


def map_state(out_path: str | Path, settings: dict[str, Any], input_sha256: str | None = None) -> str:
    """``"done"`` (map and sidecar there, same settings, same input checksum when given),
    ``"stale"`` (the input was replaced since), ``"different"`` (made with other settings or
    another checkpoint) or ``"missing"`` (absent, or left incomplete by a killed run)."""
    out_path = Path(out_path)
    json_path = map_sidecar_path(out_path)
    if not out_path.is_file() or not json_path.is_file():
        return "missing"
    if settings.get("mood") and not mood_score_path(out_path).is_file():
        return "missing"
    try:
        sidecar = json.loads(json_path.read_text())
        recorded = sidecar.get("settings")
    except (OSError, ValueError, AttributeError):
        return "missing"
    if recorded != settings:
        return "different"
    return "stale" if input_sha256 is not None and sidecar.get("input_sha256") != input_sha256 else "done"


@dataclass
class ScoreOutcome:
    """What happened to one subject in a batch: ``status`` is done, skipped, busy or failed."""

    status: str
    result: ScoreResult | None = None
    message: str = ""


def score_if_needed(
    checkpoint: Checkpoint,
    subject: str | Path,
    out_path: str | Path,
    force: bool = False,
    brain_mask_path: str | Path | None = None,
    **options: Any,
) -> ScoreOutcome:
    """Score one subject unless its map is complete; safe beside other tasks writing the same folder.

    Holds the map's lock (:mod:`uadct.locks`) while deciding and writing, so two array
    tasks never write one map; a map another live task holds is reported ``busy``.
    Temporary files left by a killed run are removed; a map whose sidecar is missing
    (the run died between the two writes) is redone. A complete map made with other
    settings is an error unless ``force``. ``options`` go to :func:`score_scan`.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    settings = score_settings(checkpoint, options.get("stride", 4), options.get("gaussian_sigma"),
                              options.get("output_kind"), options.get("mood", False), options.get("map_options"))
    lesion_mask_path = options.get("lesion_mask_path")
    with output_lock(out_path.parent, out_path.name) as mine:
        if not mine:
            return ScoreOutcome("busy", message=f"{out_path}: another task is writing this map")
        for written in (out_path, map_sidecar_path(out_path), mood_score_path(out_path), brain_mask_path, lesion_mask_path):
            if written is not None:
                remove_stale_temporaries(written)
        state = map_state(out_path, settings, input_checksum(subject))
        if state == "done" and lesion_mask_path is not None and not Path(lesion_mask_path).is_file():
            state = "missing"
        if state == "done" and not force:
            return ScoreOutcome("skipped", message=f"{out_path}: done")
        if state == "different" and not force:
            raise UadctError(f"{out_path}: exists, made with another checkpoint or other settings; use --force to overwrite")
        return ScoreOutcome("done", score_scan(checkpoint, subject, out_path, brain_mask_path=brain_mask_path, **options))


def _check_compatible(checkpoint: Checkpoint, prepared_config: dict[str, Any], subject: Path) -> None:
    expected = checkpoint.preprocess
    keys = ("atlas", "normalization", "percentiles", "skull_strip", "registration")
    differing = [k for k in keys if expected.get(k) != prepared_config.get(k)]
    if differing:
        raise CheckpointError(
            f"{subject}: prepared with other parameters than the model expects ({', '.join(differing)}); "
            "score the raw scan instead or preprocess it with the model's settings"
        )
