"""Volume -> anomaly map: the inferer built once per checkpoint, and the subject loop.

:class:`Inferer` is made once per checkpoint (like MONAI's ``SlidingWindowInferer`` or
nnU-Net's predictor initialised from a model folder): device, model placement, patch
spec, output kind, the settings a map is recorded with, and the memory probe are fixed
there. Per volume it scores every patch that touches the brain mask on the atlas grid
and averages the voxel map over overlaps. :meth:`Inferer.score_scan` takes a raw scan
through the preprocessing recorded in the checkpoint (or uses a prepared subject folder
as is) and resamples the map onto the subject's own grid (same size, spacing, origin and
direction as the input scan; float32; background 0). :func:`score_many` owns the loop
over subjects and returns the same :class:`~uadct.batch.BatchOutcome` as preprocessing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk
import torch

from uadct.arrays import top_k_mean
from uadct.atlas import load_atlas
from uadct.batch import BatchOutcome, SubjectRecord
from uadct.calibration import mood_scaled, resolve_output_kind
from uadct.checkpoint import Checkpoint, load_checkpoint
from uadct.device import resolve_device
from uadct.dicom import is_dicom_folder
from uadct.errors import CheckpointError, InputError, UadctError
from uadct.io import array_like, map_sidecar_path, read_image, sha256_of, strip_nifti_suffix, write_image, write_text
from uadct.locks import output_lock, remove_stale_temporaries
from uadct.memory import BatchPlan
from uadct.outputs import check_output_file, check_output_folder, refuse_overwriting_inputs, refuse_shared_outputs
from uadct.patches import sliding_window_map
from uadct.patch_scoring import patch_predictor, plan_scoring_batch, scoring_bytes_per_patch  # noqa: F401 (re-exported)
from uadct.postprocess import MapOptions, clean_lesion_mask, finish_map
from uadct.preprocess.chain import run_preprocessing
from uadct.preprocess.prepared import PreparedFolder, prepared_name
from uadct.preprocess.resolution import harmonized_config
from uadct.scoremap import ScoreSidecar, map_state, mood_score_path

log = logging.getLogger(__name__)

IMAGE_SCORE_TOP_K = 1000  # voxels (~1 ml at 1 mm) averaged for the image-level score
IMAGE_SCORE_FRACTION_2D = 0.01  # 2D images (one slice): the top 1 % of the field of view's pixels


@dataclass
class ScoreResult:
    """Where the outputs went and what was measured."""

    map_path: Path
    json_path: Path
    image_score: float
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class ScoreOutcome:
    """What happened to one subject: ``status`` is done, skipped or busy (failures raise)."""

    status: str
    result: ScoreResult | None = None
    message: str = ""


def image_level_score(anomaly_map: np.ndarray, mask: np.ndarray, top_k: int | None = None) -> float:
    """Mean of the ``top_k`` highest map values inside the mask (float64; 0.0 for an empty mask).

    ``top_k`` defaults to :func:`image_score_top_k` of the mask.
    """
    return top_k_mean(anomaly_map[mask > 0], image_score_top_k(mask) if top_k is None else top_k)


def image_score_top_k(mask: np.ndarray) -> int:
    """Voxels averaged for the image score: 1000 in a volume; 1 % of the mask in a 2D image ``(1, H, W)``."""
    if mask.ndim == 3 and mask.shape[0] == 1:
        return max(1, int(round(IMAGE_SCORE_FRACTION_2D * np.count_nonzero(mask))))
    return IMAGE_SCORE_TOP_K


class Inferer:
    """A checkpoint made ready to score: built once, called per volume or per subject.

    ``stride`` (voxels), ``gaussian_sigma`` (gaussian-weighted overlap averaging, sigma as
    a fraction of the patch edge; None: plain mean), ``output_kind`` (``"voxel"`` or
    ``"scalar"``; default the model's first declared output), ``mood`` (maps scaled to
    [0, 1], see :func:`uadct.calibration.mood_scaled`). ``batch_size`` None picks the
    largest batch that fits ``max_memory`` bytes (default: a share of the free memory,
    see :mod:`uadct.memory`); a given batch that does not fit is a
    :class:`~uadct.memory.MemoryLimitError`. A batch that runs out of memory anyway is
    split and retried.
    """

    def __init__(self, checkpoint: Checkpoint | str | Path, stride: int = 4, batch_size: int | None = None,
                 device: str = "auto", gaussian_sigma: float | None = None, output_kind: str | None = None,
                 mood: bool = False, max_memory: int | None = None, harmonize: bool = True,
                 map_options: MapOptions | None = None, covariates: Any = None) -> None:
        map_options = map_options or MapOptions()
        if mood and (map_options.units != "raw" or map_options.fpr is not None):
            raise UadctError("--mood maps are scaled to [0, 1] by the MOOD rule; leave out --units and --fpr")
        if gaussian_sigma is not None and not gaussian_sigma > 0:
            raise UadctError(f"gaussian sigma must be a positive fraction of the patch size, got {gaussian_sigma}")
        if batch_size is not None and batch_size < 1:
            raise UadctError(f"batch size must be at least 1 patch, got {batch_size}")
        if isinstance(checkpoint, Checkpoint):
            self.checkpoint_path, self.checkpoint = checkpoint.path, checkpoint
        else:
            from uadct.pretrained import resolve_checkpoint

            self.checkpoint_path = resolve_checkpoint(checkpoint)  # a file, or a shipped model's name
            self.checkpoint = load_checkpoint(self.checkpoint_path)
        self.stride, self.batch_size, self.gaussian_sigma, self.mood = stride, batch_size, gaussian_sigma, mood
        self.max_memory = max_memory
        self.map_options = map_options
        self.requested_output_kind = output_kind
        self.harmonize = harmonize  # blur a raw scan finer than the training data to its resolution first
        self.spec = self.checkpoint.patch_spec
        self.device = resolve_device(device)
        self.model = self.checkpoint.model.to(self.device).eval()
        self.output_kind = resolve_output_kind(self.model, output_kind)
        self._per_patch: int | None = None  # memory probe, measured on first use
        # subject covariates (a uadct.covariates.CovariateSource) for models conditioned on them;
        # score_scan looks each subject up, __call__ uses the current one
        self.covariates = covariates
        self.subject_covariates: np.ndarray | None = None

    def use_subject(self, subject: str) -> None:
        """Look up ``subject``'s covariates for the next maps (a model conditioned on them; else nothing to do)."""
        if not getattr(self.model, "uses_covariates", False):
            return
        if self.covariates is None:
            raise UadctError(f"{self.checkpoint_path or 'model'}: conditioned on subject covariates; give --covariates "
                             "participants.tsv or --age/--sex")
        self.subject_covariates = self.covariates.vector(subject)

    @property
    def settings(self) -> dict[str, Any]:
        """Everything that decides a map's values; a map made with other settings is not "done"."""
        return score_settings(self.checkpoint, self.stride, self.gaussian_sigma, self.output_kind, self.mood, self.map_options)

    def plan(self, volume_shape: tuple[int, ...]) -> BatchPlan:
        """The batch plan for a volume of ``volume_shape`` (fails before any work when it cannot fit)."""
        if self._per_patch is None:
            self._per_patch = scoring_bytes_per_patch(self.model, self.spec, self.device)
        return plan_scoring_batch(self.model, self.spec, tuple(volume_shape), self.device, self.batch_size,
                                  self.max_memory, per_patch=self._per_patch)

    def __call__(self, image: np.ndarray, mask: np.ndarray, progress: Callable[[int, int], None] | None = None,
                 plan_out: dict[str, Any] | None = None) -> np.ndarray:
        """Anomaly map ``(D, H, W)`` float32 of a prepared volume on the atlas grid (not MOOD-scaled).

        ``plan_out`` receives the batch plan (for sidecars and logs).
        """
        if hasattr(self.model, "score_volume") and self.requested_output_kind in (None, "voxel") and self.gaussian_sigma is None:
            if plan_out is not None:  # voxel-wise models (normative) map the whole volume at once
                plan_out.update({"whole_volume": True})
            return self.model.score_volume(image, mask)
        predictor = patch_predictor(self.model, self.device, self.output_kind, volume_shape=image.shape, spec=self.spec,
                                    covariates=self.subject_covariates)
        plan = self.plan(image.shape)
        log.info("scoring %s", plan.describe())
        stats: dict[str, Any] = {}
        result = sliding_window_map(
            image.astype(np.float32), mask, predictor, self.spec, self.stride, plan.batch_size,
            gaussian_sigma=self.gaussian_sigma, progress=progress, adapt_to_memory=True, stats=stats,
            pass_starts=self.model.uses_positions,
        )
        if plan_out is not None:
            plan_out.update({"batch_size": plan.batch_size, "memory_budget_bytes": plan.budget,
                             "bytes_per_patch": plan.per_patch, "fixed_bytes": plan.fixed, **stats})
        return result

    def score_scan(self, subject: str | Path, out_path: str | Path, atlas_map_path: str | Path | None = None,
                   brain_mask_path: str | Path | None = None, progress: Callable[[int, int], None] | None = None,
                   lesion_mask_path: str | Path | None = None) -> ScoreResult:
        """Score a raw scan (or a prepared subject folder) and write its native-space map.

        Also writes ``<map>.json`` (:class:`~uadct.scoremap.ScoreSidecar`), always last, so
        a map is complete only when its sidecar exists; optionally the map on the atlas
        grid and the brain mask on the subject's grid. With ``mood`` the map is scaled to
        [0, 1] and the image-level score of the scaled map, also in [0, 1], is written
        alone to ``<map>.txt`` (MOOD sample score). ``map_options`` (see
        :mod:`uadct.postprocess`): post-processing, calibrated units and a healthy
        false-positive rate; with its ``fpr``, ``lesion_mask_path`` receives the binary
        lesion mask (uint8, the input's grid).
        """
        map_options = self.map_options
        if lesion_mask_path is not None and map_options.fpr is None:
            raise UadctError(f"{lesion_mask_path}: a lesion mask needs a false-positive rate (--fpr)")
        checkpoint, subject, out_path = self.checkpoint, Path(subject), Path(out_path)
        self.use_subject(subject_name(subject))  # before minutes of preprocessing: a subject without a row fails now
        timings: dict[str, float] = {}
        clock = time.perf_counter()
        if subject.is_dir() and not is_dicom_folder(subject):  # a DICOM series folder is a raw scan
            folder = PreparedFolder(subject)
            if not folder.exists():
                raise InputError(f"{subject}: a folder must be a prepared subject (with {folder.sidecar_path.name})")
            prepared = folder.load()
            _check_compatible(checkpoint, folder.config, subject)
            input_sha, native = folder.input_sha256, prepared.native_reference
            resolution = folder.sidecar.get("resolution", {})
        else:
            image = read_image(subject)
            try:
                config = harmonized_config(checkpoint.preprocess_config, checkpoint.metadata, self.harmonize)
            except (TypeError, ValueError, AttributeError) as exc:
                raise CheckpointError(f"{self.checkpoint_path or 'checkpoint'}: its preprocessing settings are invalid ({exc})") from None
            atlas = None if config.is_2d else load_atlas(config.atlas)  # 2D images: resized, no atlas
            if atlas is not None and checkpoint.atlas_sha256 and checkpoint.atlas_sha256 != atlas.checksum:
                raise CheckpointError(f"the atlas {config.atlas!r} in the cache differs from the one the model was trained on (checksum)")
            # fail on a batch that cannot fit before minutes of preprocessing
            self.plan((1, *config.image_size) if atlas is None else atlas.brain.GetSize()[::-1])
            try:
                prepared = run_preprocessing(image, config, atlas)
            except UadctError as exc:
                raise type(exc)(f"{subject}: {exc}") from None
            input_sha, native = sha256_of(subject), image
            resolution = prepared.resolution
        timings["preprocess"] = round(time.perf_counter() - clock, 3)
        clock = time.perf_counter()
        mask_array = sitk.GetArrayFromImage(prepared.mask)
        plan: dict[str, Any] = {}
        atlas_map = self(sitk.GetArrayFromImage(prepared.image), mask_array, progress, plan_out=plan)
        if not np.isfinite(atlas_map).all():
            raise UadctError(f"{subject}: the model gave NaN or infinite scores ({self.checkpoint_path or 'checkpoint'}); "
                             "no map was written")
        atlas_mask = prepared.mask
        finished = finish_map(atlas_map, mask_array, tuple(prepared.image.GetSpacing()[::-1]), checkpoint.metadata,
                              self.settings, map_options)
        atlas_map, mask_array = finished.anomaly_map, finished.mask
        if map_options.post.map_settings():
            atlas_mask = array_like(mask_array, atlas_mask)
        scaling = None
        if self.mood:
            atlas_map, scaling = mood_scaled(atlas_map, mask_array, checkpoint.score_scale)
        timings["score"] = round(time.perf_counter() - clock, 3)
        clock = time.perf_counter()
        atlas_map_image = array_like(atlas_map, prepared.image)
        subject_to_atlas = prepared.atlas_to_subject.GetInverse()
        native_map = sitk.Resample(atlas_map_image, native, subject_to_atlas, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        native_mask = sitk.Resample(atlas_mask, native, subject_to_atlas, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        native_map = sitk.Mask(native_map, native_mask)
        if self.mood:  # linear interpolation cannot leave [0, 1]; clamp float rounding anyway
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
        if self.mood:
            write_text(f"{score:.6f}\n", mood_score_path(out_path))
        if atlas_map_path is not None:
            write_image(atlas_map_image, atlas_map_path)
        if brain_mask_path is not None:
            write_image(native_mask, brain_mask_path)
        sidecar = ScoreSidecar(
            subject=str(subject), input_sha256=input_sha, map=str(out_path), image_score=score,
            image_score_definition=(f"mean of the top {IMAGE_SCORE_TOP_K} map voxels inside the brain (atlas grid)"
                                    if mask_array.shape[0] > 1 else f"mean of the top {image_score_top_k(mask_array)} map "
                                    f"pixels (1 %) inside the field of view (prepared grid)"),
            checkpoint=str(self.checkpoint_path) if self.checkpoint_path else None, model=checkpoint.model_name,
            stride=self.stride, output_kind=self.output_kind, gaussian_sigma=self.gaussian_sigma, mood_scaling=scaling,
            settings=self.settings, batch=plan, timings_s=timings, extra={**finished.record, "resolution": resolution},
        )
        json_path = sidecar.write(out_path)
        return ScoreResult(out_path, json_path, score, timings)

    def score_if_needed(self, subject: str | Path, out_path: str | Path, force: bool = False,
                        brain_mask_path: str | Path | None = None, lesion_mask_path: str | Path | None = None,
                        **options: Any) -> ScoreOutcome:
        """Score one subject unless its map is complete; safe beside other tasks writing the same folder.

        Holds the map's lock (:mod:`uadct.locks`) while deciding and writing, so two array
        tasks never write one map; a map another live task holds is reported ``busy``.
        Temporary files left by a killed run are removed; a map whose sidecar is missing
        (the run died between the two writes) is redone. A complete map made with other
        settings is an error unless ``force``. ``options`` go to :meth:`score_scan`.
        """
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with output_lock(out_path.parent, out_path.name) as mine:
            if not mine:
                return ScoreOutcome("busy", message=f"{out_path}: another task is writing this map")
            for written in (out_path, map_sidecar_path(out_path), mood_score_path(out_path), brain_mask_path, lesion_mask_path):
                if written is not None:
                    remove_stale_temporaries(written)
            state = map_state(out_path, self.settings, input_checksum(subject))
            if state == "done" and lesion_mask_path is not None and not Path(lesion_mask_path).is_file():
                state = "missing"
            if state == "done" and not force:
                return ScoreOutcome("skipped", message=f"{out_path}: done")
            if state == "different" and not force:
                raise UadctError(f"{out_path}: exists, made with another checkpoint or other settings; use --force to overwrite")
            return ScoreOutcome("done", self.score_scan(subject, out_path, brain_mask_path=brain_mask_path,
                                                        lesion_mask_path=lesion_mask_path, **options))


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


def score_volume(checkpoint: Checkpoint, image: np.ndarray, mask: np.ndarray, stride: int = 4, batch_size: int | None = None,
                 device: str = "auto", progress: Callable[[int, int], None] | None = None, gaussian_sigma: float | None = None,
                 output_kind: str | None = None, max_memory: int | None = None,
                 plan_out: dict[str, Any] | None = None) -> np.ndarray:
    """Anomaly map ``(D, H, W)`` float32 of one prepared volume on the atlas grid (see :class:`Inferer`)."""
    inferer = Inferer(checkpoint, stride, batch_size, device, gaussian_sigma, output_kind, max_memory=max_memory)
    return inferer(image, mask, progress, plan_out)


def score_scan(checkpoint: Checkpoint | str | Path, subject: str | Path, out_path: str | Path, stride: int = 4,
               batch_size: int | None = None, device: str = "auto", atlas_map_path: str | Path | None = None,
               brain_mask_path: str | Path | None = None, progress: Callable[[int, int], None] | None = None,
               gaussian_sigma: float | None = None, output_kind: str | None = None, mood: bool = False,
               max_memory: int | None = None, harmonize: bool = True, map_options: MapOptions | None = None,
               lesion_mask_path: str | Path | None = None, covariates: Any = None) -> ScoreResult:
    """Score one raw scan or prepared subject folder (:meth:`Inferer.score_scan`); ``covariates``: a
    :class:`uadct.covariates.CovariateSource` for a model conditioned on them."""
    inferer = Inferer(checkpoint, stride, batch_size, device, gaussian_sigma, output_kind, mood, max_memory, harmonize,
                      map_options, covariates)
    return inferer.score_scan(subject, out_path, atlas_map_path, brain_mask_path, progress, lesion_mask_path)


def input_checksum(subject: str | Path) -> str | None:
    """SHA-256 of a raw scan, or the one a prepared folder's sidecar records for its input."""
    subject = Path(subject)
    if subject.is_dir():
        try:
            return PreparedFolder(subject).input_sha256
        except (InputError, AttributeError):
            return None
    return sha256_of(subject) if subject.is_file() else None


def subject_name(path: Path) -> str:
    """The id a scan or prepared folder is scored under (the map is ``<id>.nii.gz``)."""
    return prepared_name(path) if path.is_dir() else strip_nifti_suffix(path)


def score_many(
    inferer: Inferer,
    inputs: list[Path],
    output: str | Path,
    force: bool = False,
    brain_mask_out: str | Path | None = None,
    lesion_mask_out: str | Path | None = None,
    progress: Callable[[SubjectRecord], None] | None = None,
) -> BatchOutcome:
    """Score every input (raw scans or prepared folders); a failing subject is recorded and the batch carries on.

    ``output`` is a map file when it ends in ``.nii``/``.nii.gz`` (one input; a failure
    then raises) and a folder of ``<id>.nii.gz`` maps otherwise; with ``inferer.mood`` it
    is always a folder and a raw scan's map keeps the scan's file name (MOOD layout).
    ``brain_mask_out``: the brain masks on the subjects' grids, ``lesion_mask_out``: the
    binary lesion masks (needs the inferer's ``fpr``); a file or a folder alike.
    Each record's ``values`` hold ``image_score`` of a scored subject; ``progress`` is
    called with each record as it is made.
    """
    output = Path(output)
    many = inferer.mood or not str(output).lower().endswith((".nii", ".nii.gz", ".png", ".tif", ".tiff"))
    if not many and len(inputs) > 1:
        raise InputError(f"{output}: {len(inputs)} inputs need an output folder, not a single map file")
    inputs = [Path(path) for path in inputs]
    targets = {path: score_targets(path, output, brain_mask_out, many, inferer.mood) for path in inputs}
    check_score_outputs(targets, output, brain_mask_out, many)
    lesion_targets: dict[Path, Path] = {}
    if lesion_mask_out is not None:  # binary lesion masks (--fpr): never over an input, a map or another subject's mask
        lesion_targets = {path: Path(lesion_mask_out) / f"{subject_name(path)}.nii.gz" if many else Path(lesion_mask_out)
                          for path in inputs}
        if len(set(lesion_targets.values())) < len(lesion_targets) or set(lesion_targets.values()) & {t for t, _ in targets.values()}:
            raise InputError(f"{lesion_mask_out}: lesion masks would overwrite each other or a map; give another --mask-out")
        refuse_overwriting_inputs(list(lesion_targets.values()), list(targets))
        (check_output_folder if many else check_output_file)(lesion_mask_out)
    outcome = BatchOutcome()
    for path in inputs:
        name = subject_name(path)
        target, mask_target = targets[path]
        lesion_target = lesion_targets.get(path)
        started = time.perf_counter()
        try:
            result = inferer.score_if_needed(path, target, force=force, brain_mask_path=mask_target, lesion_mask_path=lesion_target)
        except UadctError as exc:
            if not many:
                raise
            record = SubjectRecord(name, path, "failed", round(time.perf_counter() - started, 2), target, error=str(exc))
        else:
            seconds = round(time.perf_counter() - started, 2)
            values = {"image_score": result.result.image_score} if result.result is not None else {}
            record = SubjectRecord(name, path, result.status, seconds, target, error=result.message or None, values=values)
        outcome.records.append(record)
        if progress is not None:
            progress(record)
    return outcome


def score_targets(path: Path, output: Path, brain_mask_out: str | Path | None, many: bool,
                  mood: bool) -> tuple[Path, Path | None]:
    """The map and brain-mask files one input is written to."""
    name = subject_name(path)
    target = output / f"{name}.nii.gz" if many else output
    if mood and not path.is_dir():
        target = output / path.name  # MOOD: the map carries the input's file name
    mask_target = None
    if brain_mask_out is not None:
        mask_target = Path(brain_mask_out) / f"{name}.nii.gz" if many else Path(brain_mask_out)
    return target, mask_target


def check_score_outputs(targets: dict[Path, tuple[Path, Path | None]], output: Path,
                        brain_mask_out: str | Path | None, many: bool) -> None:
    """Before any scoring: no output replaces an input or another output, and every folder is writable."""
    written = {path: [target, map_sidecar_path(target), mood_score_path(target), mask]
               for path, (target, mask) in targets.items()}
    refuse_shared_outputs(written.items())
    refuse_overwriting_inputs([item for items in written.values() for item in items], list(targets))
    for folder_or_file in (output, brain_mask_out):
        if folder_or_file is not None:
            (check_output_folder if many else check_output_file)(folder_or_file)


def _check_compatible(checkpoint: Checkpoint, prepared_config: dict[str, Any], subject: Path) -> None:
    expected = checkpoint.preprocess
    keys = ("atlas", "normalization", "percentiles", "skull_strip", "registration")
    differing = [k for k in keys if expected.get(k) != prepared_config.get(k)]
    if differing:
        raise CheckpointError(
            f"{subject}: prepared with other parameters than the model expects ({', '.join(differing)}); "
            "score the raw scan instead or preprocess it with the model's settings"
        )
