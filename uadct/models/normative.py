"""Normative model: voxel-wise statistics of the healthy population on the atlas grid.

For every atlas voxel the training subjects give a robust location (median) and scale
(MAD x 1.4826) of the prepared intensity; both are smoothed in space by normalised
convolution (only voxels that some subject's brain covers count), and the scale is held
above a floor, ``scale_floor`` times the median scale over the brain, so two or three
training subjects still give sane z values. A subject's map is the z score
``(x - location) / scale`` after removing the subject's median offset from the
location inside the brain (``recentre``), taken two-sided (``|z|``), bright only
(``max(z, 0)``) or dark only (``max(-z, 0)``) by ``tail``; ``tail="auto"`` (the
default) takes both tails when the training contrast is T1-like and the bright tail on
T2/FLAIR-like data (:func:`t1_like`). ``blend`` adds that
fraction of the global robust deviation (the ``threshold`` model's ``deviation``);
``gate`` keeps a voxel only where the local and the global deviation agree in sign and
takes their geometric mean (a voxel must be unusual both for its place and for the
brain; its ranking does not depend on the units of either); ``map_smooth`` smooths the
map inside the brain (default 1 voxel: chosen on the real-data benchmark's IXI test with a
seed that is not reported, and by the shipped ``t1`` model's evaluation; docs/benchmarks.md).

The statistics are fitted from whole prepared volumes (:meth:`fit_volumes`, called by
the training engine) and kept as float16 buffers on the bounding box of the voxels
some training brain covers. Scoring is voxel-wise: :meth:`score_volume` maps a whole
prepared volume at once; :meth:`score_patches` does the same for patches given their
positions (the engine's patch path, which then averages identical values).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Sequence

import numpy as np
import torch

from uadct.errors import UadctError
from uadct.models.base import ModelConfig, NonTrainableModel

TAILS = ("both", "upper", "lower")
TAIL_CHOICES = ("auto", *TAILS)
MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation
MINIMUM_SCALE = 1e-3  # intensity units; guards constant data
SLAB = 16  # atlas slices per block while computing medians (bounds memory on 1 mm grids)


@dataclasses.dataclass
class NormativeConfig(ModelConfig):
    """Normative model settings."""

    position_conditioning: bool = True  # patches are located on the atlas grid by their centres (always on)
    tail: str = "auto"  # "both" (|z|), "upper" (bright only), "lower" (dark only), "auto": both on T1-like, upper on T2/FLAIR-like
    smooth: float = 1.0  # gaussian sigma (voxels) smoothing the location map; 0: none
    scale_smooth: float = 2.0  # gaussian sigma (voxels) smoothing the scale map; 0: none
    scale_floor: float = 0.5  # scale >= this fraction of the median scale over the brain
    recentre: bool = True  # remove the subject's median offset from the location inside the brain
    blend: float = 0.0  # weight of the global robust deviation |x - median| / (1.4826 MAD) added to the z map
    gate: bool = False  # map = sqrt(local tail x global tail), 0 where the two deviations disagree in sign
    map_smooth: float = 1.0  # gaussian sigma (voxels) smoothing the map inside the brain (whole volumes only); 0: none
    min_subjects: int = 2  # voxels covered by fewer training brains take the global statistics
    fit_validation: bool = False  # also fit on the validation subjects (tiny cohorts; score_scale is then optimistic)


class NormativeModel(NonTrainableModel):
    name = "normative"
    summary = "voxel-wise healthy-population median/MAD on the atlas grid, smoothed; map = z score"
    outputs = ("voxel",)
    Config = NormativeConfig
    supports_positions = True

    def __init__(self, config: NormativeConfig) -> None:
        if config.tail not in TAIL_CHOICES:
            raise UadctError(f"normative: unknown tail {config.tail!r}; expected one of {', '.join(TAIL_CHOICES)}")
        if not config.position_conditioning:
            raise UadctError("normative: position_conditioning must stay on (the model is voxel-wise on the atlas grid)")
        if min(config.smooth, config.scale_smooth, config.scale_floor, config.blend, config.map_smooth) < 0:
            raise UadctError("normative: smooth, scale_smooth, scale_floor, blend and map_smooth must be >= 0")
        if config.min_subjects < 1:
            raise UadctError(f"normative: min_subjects must be >= 1, got {config.min_subjects}")
        super().__init__(config)
        self.register_buffer("grid_shape", torch.zeros(3, dtype=torch.int64))  # full atlas grid (D, H, W)
        self.register_buffer("box_start", torch.zeros(3, dtype=torch.int64))  # where the stored box starts
        self.register_buffer("location", torch.zeros(1, 1, 1, dtype=torch.float16))
        self.register_buffer("scale", torch.ones(1, 1, 1, dtype=torch.float16))
        self.register_buffer("global_location", torch.tensor(0.0))
        self.register_buffer("global_scale", torch.tensor(1.0))
        self.register_buffer("subjects", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("tail_code", torch.tensor(TAILS.index(config.tail) if config.tail in TAILS else 0))
        self._register_load_state_dict_pre_hook(self._resize_buffers)

    def _resize_buffers(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """The stored box's size is only known from the checkpoint: take the incoming shapes.
        Checkpoints written before ``tail_code`` existed used the configured tail (``auto`` did not exist)."""
        if prefix + "tail_code" not in state_dict:
            state_dict[prefix + "tail_code"] = self.tail_code.clone()
        for key in ("location", "scale"):
            incoming = state_dict.get(prefix + key)
            if incoming is not None and tuple(incoming.shape) != tuple(getattr(self, key).shape):
                setattr(self, key, torch.empty_like(incoming))

    # ------------------------------------------------------------------ fitting
    @property
    def tail(self) -> str:
        """The tail in use: the configured one, or the one ``"auto"`` chose when fitting."""
        return TAILS[int(self.tail_code)]

    def fit_volumes(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                    reference: np.ndarray | None = None) -> None:
        """Fit the voxel statistics from prepared volumes ``(D, H, W)`` on one atlas grid.

        ``masks`` (> 0: use the voxel) are the brain masks, with any known lesion removed.
        ``reference``: the atlas T1 brain on the same grid, which ``tail="auto"`` uses to
        tell the training contrast (see :func:`t1_like`); without it ``auto`` means both tails.
        """
        if not images:
            raise UadctError("normative: no training subject")
        shape = tuple(images[0].shape)
        if any(tuple(i.shape) != shape for i in images) or any(tuple(m.shape) != shape for m in masks):
            raise UadctError("normative: training volumes are not all on one atlas grid")
        location, scale, count = voxel_statistics(images, masks)
        covered = count >= self.config.min_subjects
        if not covered.any():
            raise UadctError(f"normative: no voxel is inside at least {self.config.min_subjects} training brains")
        all_brain = np.concatenate([np.asarray(i)[np.asarray(m) > 0] for i, m in zip(images, masks)]).astype(np.float64)
        global_location = float(np.median(all_brain))
        global_scale = max(float(np.median(np.abs(all_brain - global_location))) * MAD_TO_SIGMA, MINIMUM_SCALE)
        box = bounding_box(count > 0)
        covered, location, scale = covered[box], location[box], scale[box]
        location = masked_smooth(location, covered, self.config.smooth, fill=global_location)
        scale = masked_smooth(scale, covered, self.config.scale_smooth, fill=global_scale)
        floor = max(self.config.scale_floor * float(np.median(scale[covered])), MINIMUM_SCALE)
        scale = np.maximum(scale, floor)
        self.grid_shape = torch.tensor(shape, dtype=torch.int64)
        self.box_start = torch.tensor([s.start for s in box], dtype=torch.int64)
        self.location = torch.from_numpy(location.astype(np.float16))
        self.scale = torch.from_numpy(scale.astype(np.float16))
        self.global_location.fill_(global_location)
        self.global_scale.fill_(global_scale)
        self.subjects.fill_(len(images))
        self.fitted.fill_(True)
        if self.config.tail == "auto":
            like_t1 = reference is None or t1_like(self.statistics_on_grid()[0], reference)
            self.tail_code.fill_(TAILS.index("both" if like_t1 else "upper"))

    # ------------------------------------------------------------------ scoring
    def statistics_on_grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Location and scale maps (float32) on the whole atlas grid (global values outside the box)."""
        self._require_fitted()
        shape = tuple(int(s) for s in self.grid_shape)
        location = np.full(shape, float(self.global_location), np.float32)
        scale = np.full(shape, float(self.global_scale), np.float32)
        box = tuple(slice(int(a), int(a) + n) for a, n in zip(self.box_start, self.location.shape))
        location[box] = self.location.float().cpu().numpy()
        scale[box] = self.scale.float().cpu().numpy()
        return location, scale

    def score_volume(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The anomaly map ``(D, H, W)`` float32 of a prepared volume on the training grid (0 outside ``mask``)."""
        self._require_fitted()
        if tuple(image.shape) != tuple(int(s) for s in self.grid_shape):
            raise UadctError(f"normative: volume {tuple(image.shape)} is not on the training atlas grid "
                             f"{tuple(int(s) for s in self.grid_shape)}")
        location, scale = self.statistics_on_grid()
        x = np.asarray(image, np.float32)
        brain = np.asarray(mask) > 0
        offset = float(np.median((x - location)[brain])) if self.config.recentre and brain.any() else 0.0
        z = (x - location - offset) / scale
        out = self._combine(z, (x - float(self.global_location)) / float(self.global_scale))
        if self.config.map_smooth > 0:
            out = masked_smooth(out, brain, self.config.map_smooth, fill=0.0)
        out = out.astype(np.float32)
        out[~brain] = 0.0
        return out

    def _combine(self, local: Any, global_: Any) -> Any:
        """The map from the local z and the global deviation (numpy arrays or tensors alike)."""
        out = self._tail(local)
        if self.config.gate:
            agree = (local * global_) > 0
            out = (out * self._tail(global_) * agree) ** 0.5
        if self.config.blend:
            out = out + self.config.blend * self._tail(global_)
        return out

    def _tail(self, z: Any) -> Any:
        if self.tail == "both":
            return abs(z)
        if self.tail == "upper":
            return z.clip(min=0) if isinstance(z, np.ndarray) else z.clamp_min(0)
        return (-z).clip(min=0) if isinstance(z, np.ndarray) else (-z).clamp_min(0)

    def score_patches(
        self, patches: torch.Tensor, masks: torch.Tensor | None = None, positions: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``"voxel"`` ``(B, *patch)`` z maps of patches located by their centres ``positions``.

        Without a whole volume the subject's offset is not known and the map cannot be
        smoothed: patches are scored without ``recentre`` and ``map_smooth``.
        """
        self._require_fitted()
        positions = self.require_positions(positions, patches.shape[0])
        location, scale = (torch.from_numpy(a).to(patches.device) for a in self.statistics_on_grid())
        shape = torch.tensor(location.shape, dtype=torch.float64, device=patches.device)
        spatial = patches.shape[2:]
        patch = torch.tensor(spatial if len(spatial) == 3 else (1, *spatial), dtype=torch.float64, device=patches.device)
        starts = torch.round((positions.double() + 1.0) * shape / 2.0 - patch / 2.0).long()  # inverts patch_centres
        offsets = [torch.arange(int(n), device=patches.device) for n in patch]
        grids = [(starts[:, axis].view(-1, 1, 1, 1) + offsets[axis].view(*(-1 if a == axis else 1 for a in range(3))))
                 .clamp(0, int(shape[axis]) - 1) for axis in range(3)]
        z = (patches.reshape(patches.shape[0], *patch.long().tolist()).float()
             - location[grids[0], grids[1], grids[2]]) / scale[grids[0], grids[1], grids[2]]
        voxel = self._combine(z, (patches.reshape(z.shape).float() - self.global_location) / self.global_scale)
        voxel = voxel.reshape(patches.shape[0], *spatial)
        if masks is not None:
            voxel = voxel * masks[:, 0]
        return {"voxel": voxel}


def t1_like(location: np.ndarray, reference: np.ndarray) -> bool:
    """Whether the population's contrast is T1-like: white matter brighter than grey matter.

    White and grey matter are read off the atlas T1 ``reference`` (same grid): its
    brightest 30 % of brain voxels (white matter) and those between its 35th and 60th
    percentiles (mostly grey matter). ``tail="auto"`` then scores both tails on T1-like
    data (lesions are dark or bright there) and only the bright tail otherwise (T2, FLAIR:
    lesions are bright, and dark deviations are mostly CSF spaces that differ in size).
    """
    brain = reference > 0
    if not brain.any():
        return True
    low, mid, high = np.percentile(reference[brain], [35, 60, 70])
    white = brain & (reference >= high)
    grey = brain & (reference >= low) & (reference < mid)
    return bool(np.median(location[white]) > np.median(location[grey]))


def voxel_statistics(images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-voxel median, MAD x 1.4826 and count of the subjects whose mask covers the voxel.

    Voxels no subject covers get NaN location and scale. Computed in slabs of atlas slices.
    """
    shape = tuple(images[0].shape)
    location = np.full(shape, np.nan, np.float32)
    scale = np.full(shape, np.nan, np.float32)
    count = np.zeros(shape, np.int32)
    for start in range(0, shape[0], SLAB):
        rows = slice(start, min(start + SLAB, shape[0]))
        stack = np.stack([np.asarray(i[rows], np.float32) for i in images])
        valid = np.stack([np.asarray(m[rows]) > 0 for m in masks])
        stack[~valid] = np.nan
        count[rows] = valid.sum(axis=0)
        if valid.any():
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: voxels outside every brain
                centre = np.nanmedian(stack, axis=0)
                spread = np.nanmedian(np.abs(stack - centre), axis=0) * MAD_TO_SIGMA
            location[rows], scale[rows] = centre, spread
    return location, scale, count


def bounding_box(region: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """Slices of the smallest box holding ``region`` (grown by ``margin`` voxels, clipped to the array)."""
    if not region.any():
        return tuple(slice(0, n) for n in region.shape)
    box = []
    for axis, n in enumerate(region.shape):
        present = np.flatnonzero(region.any(axis=tuple(a for a in range(region.ndim) if a != axis)))
        box.append(slice(max(0, int(present[0]) - margin), min(n, int(present[-1]) + 1 + margin)))
    return tuple(box)


def masked_smooth(values: np.ndarray, weight: np.ndarray, sigma: float, fill: float) -> np.ndarray:
    """Gaussian smoothing by normalised convolution over ``weight`` voxels; ``fill`` where no weight reaches.

    With ``sigma`` 0 the values are kept where ``weight`` is set and ``fill`` elsewhere.
    """
    from scipy import ndimage

    w = weight.astype(np.float64)
    v = np.where(weight, np.nan_to_num(values.astype(np.float64)), 0.0)
    if sigma > 0:
        numerator = ndimage.gaussian_filter(v * w, sigma, mode="constant")
        denominator = ndimage.gaussian_filter(w, sigma, mode="constant")
        with np.errstate(all="ignore"):
            return np.where(denominator > 1e-3, numerator / np.maximum(denominator, 1e-12), fill)
    return np.where(weight, v, fill)
