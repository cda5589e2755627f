"""Training data: prepared subjects as memory-mapped arrays, and counter-seeded patch batches.

Subjects are split into training and validation sets by subject (never by patch). Each
epoch draws ``patches_per_epoch`` random patches with at most ``max_background`` of their
voxels outside the brain mask (optionally flipped and contrast-augmented,
:mod:`uadct.augment`). Volumes are memory-mapped from the prepared folders' array cache
(:meth:`uadct.preprocess.prepared.PreparedFolder.cached_arrays`) and patches are cut in
DataLoader worker processes (``workers``). Batch ``(epoch, step)`` is drawn with a
generator seeded by ``(seed, epoch, step)`` only, so the patches never depend on the
number of workers, on timing, or on where a run was resumed.

Naming: ``starts`` are the integer first voxels ``(z, y, x)`` of patches; the models'
``positions`` argument takes the float patch ``centres``
(:func:`uadct.patches.patch_centres`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import SimpleITK as sitk
import torch

from uadct.augment import ContrastAugmenter, TissueModel
from uadct.errors import UadctError
from uadct.io import read_mask
from uadct.patches import PatchSpec, extract_patches, valid_training_starts
from uadct.preprocess.prepared import PreparedFolder, PreparedSubject


@dataclass
class SubjectVolume:
    """A prepared subject's arrays ``(D, H, W)`` and the starts ``(N, 3)`` of its valid training patches.

    ``image`` (float32) and ``mask`` (uint8 or float32, > 0 is brain) are usually
    read-only memory maps of ``<subject>/cache/*.npy``; ``cache`` is that folder, so a
    volume sent to a worker process is re-opened there instead of being copied.
    ``tissue``: the subject's tissue model when contrast augmentation is on.
    ``covariates``: ``(K,)`` float32; when every volume has them, the sampler's draws carry a
    fourth array, each patch's subject's covariates ``(count, K)``.
    """

    subject: str
    image: np.ndarray
    mask: np.ndarray
    starts: np.ndarray
    cache: Path | None = None
    tissue: TissueModel | None = None
    covariates: np.ndarray | None = None  # the subject's encoded covariates (uadct.covariates), when the run has them

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.cache is not None:
            state["image"] = state["mask"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.cache is not None:
            self.image = np.load(self.cache / "image.npy", mmap_mode="r")
            self.mask = np.load(self.cache / "mask.npy", mmap_mode="r")


class PatchSampler:
    """Draws random training patches (with masks and starts) from several subjects.

    Batches are counter-based: batch ``(epoch, step)`` is drawn with a generator seeded by
    ``(seed, epoch, step)`` alone, so it is the same whichever process draws it, in
    whatever order, with any number of DataLoader workers, after a resume, and the
    ``world_size`` processes of a torchrun job draw disjoint slices of one global batch
    (each process computes the cheap random choices for the whole batch and cuts and
    augments only its own rows). :meth:`sample` draws from one sequential stream
    instead (validation and statistics sets).
    """

    def __init__(
        self,
        volumes: list[SubjectVolume],
        spec: PatchSpec,
        seed: int = 0,
        flip: bool = False,
        augmenter: ContrastAugmenter | None = None,
    ) -> None:
        usable = [v for v in volumes if len(v.starts)]
        if not usable:
            raise UadctError("no subject has a patch with enough brain in it; check the masks and the patch size")
        if augmenter is not None and any(v.tissue is None for v in usable):
            raise UadctError("contrast augmentation needs every training subject's tissue model")
        self.volumes = usable
        self.spec = spec
        self.flip = flip
        self.augmenter = augmenter
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        with_covariates = [v.covariates is not None for v in usable]
        self.covariates = np.stack([v.covariates for v in usable]).astype(np.float32) if all(with_covariates) else None

    def sample(self, count: int) -> tuple[np.ndarray, ...]:
        """``count`` patches and masks ``(count, 1, *patch)`` float32 and their starts ``(count, 3)`` int64
        (and the patches' subjects' covariates ``(count, K)`` when the volumes have them)."""
        return self._draw(count, self.rng, slice(0, count))

    def batch(self, epoch: int, step: int, count: int, rank: int = 0, world_size: int = 1) -> tuple[np.ndarray, ...]:
        """Process ``rank``'s rows of the global batch ``(epoch, step)`` of ``count`` patches (see :meth:`sample`)."""
        if count % world_size:
            raise UadctError(f"batch size {count} is not divisible by the {world_size} training processes")
        share = count // world_size
        rng = np.random.default_rng([self.seed, epoch, step])
        return self._draw(count, rng, slice(rank * share, (rank + 1) * share))

    def _draw(self, count: int, rng: np.random.Generator, rows: slice) -> tuple[np.ndarray, ...]:
        which = rng.integers(0, len(self.volumes), count)
        picks = np.empty((count, 3), np.int64)
        for index in np.unique(which):
            members = np.flatnonzero(which == index)
            volume = self.volumes[index]
            picks[members] = volume.starts[rng.integers(0, len(volume.starts), len(members))]
        flipped = rng.random(count) < 0.5 if self.flip else np.zeros(count, bool)
        thetas: dict[int, np.ndarray] = {}  # drawn last: switching augmentations keeps the patches
        if self.augmenter is not None:
            for index in np.unique(which):
                tissue = self.volumes[index].tissue
                assert tissue is not None
                thetas[int(index)] = self.augmenter.sample_thetas(tissue, int(np.sum(which == index)), rng)
        own = np.arange(count)[rows]
        images = np.empty((len(own),) + self.spec.tensor_shape, np.float32)
        masks = np.empty_like(images)
        for index in np.unique(which[own]):
            members = np.flatnonzero(which == index)  # the subject's rows in the global batch
            local = np.flatnonzero(which[own] == index)  # ... and in this process's share
            volume = self.volumes[index]
            images[local, 0] = extract_patches(volume.image, picks[own[local]], self.spec)
            masks[local, 0] = extract_patches(volume.mask, picks[own[local]], self.spec)
            if self.augmenter is not None:
                assert volume.tissue is not None
                drawn = thetas[int(index)][np.searchsorted(members, own[local])]
                images[local] = self.augmenter.apply_thetas(images[local], masks[local], volume.tissue, drawn)
        starts = picks[own]
        mirror = flipped[own]
        if mirror.any():
            images[mirror] = images[mirror][..., ::-1]
            masks[mirror] = masks[mirror][..., ::-1]
            # a mirrored patch shows the mirrored place of the (atlas-centred) brain
            width = self.volumes[0].image.shape[2]
            starts[mirror, 2] = width - self.spec.shape[2] - starts[mirror, 2]
        if self.covariates is not None:
            return images, masks, starts, self.covariates[which[own]]
        return images, masks, starts


class _EpochBatches(torch.utils.data.Dataset):
    """Item ``i``: this process's share of batch ``(epoch, first_step + i)``, as tensors."""

    def __init__(self, sampler: PatchSampler, epoch: int, first_step: int, steps: int, batch_size: int, rank: int, world_size: int) -> None:
        self.sampler, self.epoch, self.first_step, self.steps = sampler, epoch, first_step, steps
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __len__(self) -> int:
        return self.steps - self.first_step

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        drawn = self.sampler.batch(self.epoch, self.first_step + index, self.batch_size, self.rank, self.world_size)
        return tuple(torch.from_numpy(array) for array in drawn)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers only cut patches (numpy); leave the cores to the training step


def default_workers(device: torch.device, processes_per_node: int = 1) -> int:
    """Sampling worker processes when not given: ``min(4, cpus - 1)`` per training process
    on CUDA, 0 (sampling in the training process) on CPU/MPS, where the training step
    itself already uses every core and extra processes would only compete with it."""
    if device.type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cpus // max(1, processes_per_node) - 1))


def epoch_batches(
    sampler: PatchSampler, epoch: int, first_step: int, steps: int, batch_size: int, workers: int,
    rank: int = 0, world_size: int = 1, pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The batches of one epoch from step ``first_step``: ``(images, masks, starts)`` tensors.

    With ``workers`` > 0 they are cut in DataLoader worker processes (volumes shared
    through their memory maps). The content does not depend on ``workers``: every batch
    is keyed by ``(seed, epoch, step)`` (see :class:`PatchSampler`).
    """
    dataset = _EpochBatches(sampler, epoch, first_step, steps, batch_size, rank, world_size)
    if workers <= 0:
        for index in range(len(dataset)):
            yield dataset[index]
        return
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=workers, worker_init_fn=_worker_init,
        prefetch_factor=4, pin_memory=pin_memory, generator=torch.Generator().manual_seed(0),
    )
    yield from loader


def load_volumes(
    subject_dirs: list[Path],
    spec: PatchSpec,
    max_background: float,
    exclude_labels: str | Path | None = None,
    tissue_models: bool = False,
) -> tuple[list[SubjectVolume], dict[str, Any]]:
    """Read prepared subjects (memory-mapped from their array cache); all must share
    preprocessing parameters and atlas.

    With ``exclude_labels``, a subject that has ``<subject>.nii.gz`` there (a lesion mask
    on its own scan's grid) contributes only patches that do not overlap the lesion.
    ``tissue_models``: also fit (or read from the cache) each subject's tissue model for
    contrast augmentation.
    """
    volumes: list[SubjectVolume] = []
    reference: dict[str, Any] | None = None
    for path in subject_dirs:
        folder = PreparedFolder(path)
        signature = folder.signature
        if reference is None:
            reference = signature
        elif signature != reference:
            raise UadctError(f"{folder.path}: preprocessed with other parameters or atlas than {subject_dirs[0]}; preprocess all subjects alike")
        image, mask, cache, tissue = folder.cached_arrays(tissue_models)
        lesion = None
        if exclude_labels:
            lesion = _lesion_on_atlas_grid(folder.load(), exclude_labels)
        starts = valid_training_starts(np.asarray(mask), spec, max_background, exclude=lesion)
        volumes.append(SubjectVolume(folder.subject, image, mask, starts, cache, tissue))
    assert reference is not None
    return volumes, reference


def _lesion_on_atlas_grid(prepared: PreparedSubject, labels_dir: str | Path) -> np.ndarray | None:
    """A subject's lesion mask carried onto the atlas grid (any partial overlap counts)."""
    candidates = [Path(labels_dir) / f"{prepared.subject}{suffix}" for suffix in (".nii.gz", ".nii")]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        return None
    label = read_mask(path, reference=prepared.native_reference)
    warped = sitk.Resample(sitk.Cast(label, sitk.sitkFloat32), prepared.image, prepared.atlas_to_subject,
                           sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(warped) > 0


def split_subjects(subjects: list[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Split by subject: at least one in each set when there are two or more."""
    if len(subjects) < 2:
        raise UadctError(f"need at least 2 prepared subjects to train with a validation split, found {len(subjects)}")
    order = np.random.default_rng(seed).permutation(len(subjects))
    n_val = min(len(subjects) - 1, max(1, int(round(fraction * len(subjects)))))
    val = sorted(subjects[i] for i in order[:n_val])
    train = sorted(subjects[i] for i in order[n_val:])
    return train, val

