"""GMM/PCA contrast augmentation (Meyer et al. 2021, modified by Novikov).

Each training subject's brain intensities are modelled as a K-class Gaussian mixture
(K = 3 for T1: CSF < GM < WM), ``theta = (mu_1..K, sigma^2_1..K)``. A PCA over the
training set's theta vectors (matrix ``A``) gives the directions in which subjects
(scanners) really differ; a new contrast is drawn as
``A dtheta ~ U(-sigma(A theta), +sigma(A theta))`` per principal component,
``dtheta = A^-1 (A dtheta)``, ``theta' = theta + dtheta``, and every brain voxel moves
with its soft class membership::

    x' = sum_k p(C=k | x) * ((x - mu_k) / sigma_k * sigma'_k + mu'_k)

Statistics are computed once per subject (:func:`fit_tissue_gmm`), so patches are
transformed exactly as their whole image would be.

Usage (one tissue model per training subject, one augmenter per training set)::

    tissues = [fit_tissue_gmm(v.image, v.mask, seed=i) for i, v in enumerate(volumes)]
    augmenter = ContrastAugmenter().fit([t.theta for t in tissues])
    patches = augmenter.augment(patches, masks, tissues[i], rng)   # patches of subject i
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from uadct.errors import UadctError
from uadct.preprocess.intensity import TISSUE_SDS_PER_UNIT
from uadct.preprocess.tissue import tissue_statistics

log = logging.getLogger(__name__)

_QUANTILE_POINTS = 1001  # quantiles of the subject's brain intensities kept for re-normalisation
_MAX_REDRAWS = 50  # rejection rounds before a row falls back to dtheta = 0


@dataclass(frozen=True)
class TissueModel:
    """One subject's K-class intensity mixture under its brain mask.

    ``means``, ``variances``, ``weights``: ``(K,)`` float64, sorted by mean (CSF < GM < WM
    for T1), in the subject's (normalised) intensity units. ``quantiles``: ``(1001,)``
    quantiles 0..100 % of the brain intensities; they stand in for the whole image when
    the augmented image's percentiles (or mean and std) are needed.
    """

    means: np.ndarray
    variances: np.ndarray
    weights: np.ndarray
    quantiles: np.ndarray

    @property
    def theta(self) -> np.ndarray:
        """``(2K,)`` = ``(mu_1..K, sigma^2_1..K)``, the vector the PCA is fitted on."""
        return np.concatenate([self.means, self.variances])

    @property
    def n_classes(self) -> int:
        return int(self.means.shape[0])

    def to_dict(self) -> dict[str, list[float]]:
        """Plain lists (JSON), the inverse of :meth:`from_dict`."""
        return {name: getattr(self, name).tolist() for name in ("means", "variances", "weights", "quantiles")}

    @classmethod
    def from_dict(cls, data: dict[str, list[float]]) -> "TissueModel":
        return cls(**{name: np.asarray(data[name], dtype=np.float64) for name in ("means", "variances", "weights", "quantiles")})


def fit_tissue_gmm(
    image: np.ndarray,
    mask: np.ndarray,
    n_classes: int = 3,
    seed: int = 0,
    max_voxels: int = 2_000_000,
    bins: int = 4096,
    max_iter: int = 1000,
) -> TissueModel:
    """Fit a 1D Gaussian mixture to the intensities of ``image`` under ``mask``.

    ``image``, ``mask``: arrays of the same shape (e.g. ``(D, H, W)`` float32; mask > 0
    is brain). EM runs on a ``bins``-bin histogram of the brain intensities (all of
    them, or ``max_voxels`` drawn with ``seed`` when there are more), which makes a
    240x240x155 subject take ~0.2 s; scikit-learn's ``GaussianMixture`` needed ~5 s on
    a 200k-voxel subsample here, and the bin width (range / 4096) is far below any
    tissue's spread. EM starts from the 1/(2K), 3/(2K), ... quantiles (no random start)
    and from the centres of K equal slices of the 2nd..98th percentile range (the first
    start fails when one class holds most voxels), keeps the higher likelihood, and
    stops when the log-likelihood per voxel changes by less than 1e-10.
    Components are returned sorted by mean.
    """
    image = np.asarray(image)
    mask = np.asarray(mask)
    if image.shape != mask.shape:
        raise UadctError(f"image shape {image.shape} and mask shape {mask.shape} differ; expected the same grid")
    if n_classes < 1:
        raise UadctError(f"n_classes must be at least 1, got {n_classes}")
    inside = image[mask > 0].astype(np.float64)
    inside = inside[np.isfinite(inside)]
    if inside.size < 20 * n_classes:
        raise UadctError(f"only {inside.size} finite brain voxels under the mask; need at least {20 * n_classes} to fit {n_classes} tissue classes")
    if inside.size > max_voxels:
        inside = inside[np.random.default_rng(seed).choice(inside.size, max_voxels, replace=False)]
    spread = float(np.std(inside))
    if not spread > 0:
        raise UadctError("the brain has constant intensity under the mask: cannot fit tissue classes")
    quantiles = np.quantile(inside, np.linspace(0.0, 1.0, _QUANTILE_POINTS))
    counts, edges = np.histogram(inside, bins=bins)
    keep = counts > 0
    centres, counts = (0.5 * (edges[:-1] + edges[1:]))[keep], counts[keep].astype(np.float64)
    starts = (
        quantiles[np.round((np.arange(n_classes) + 0.5) / n_classes * (_QUANTILE_POINTS - 1)).astype(int)],
        np.linspace(quantiles[20], quantiles[-21], 2 * n_classes + 1)[1::2],
    )
    best = None
    for start in starts:
        fitted = _histogram_em(centres, counts, start.copy(), (spread / n_classes) ** 2, 1e-6 * spread**2, max_iter)
        if best is None or fitted[3] > best[3]:
            best = fitted
    means, variances, weights, _ = best
    order = np.argsort(means)
    return TissueModel(means=means[order], variances=variances[order], weights=weights[order], quantiles=quantiles)


@dataclass
class ContrastAugmenter:
    """PCA over the training set's tissue parameters; draws and applies new contrasts.

    Hyper-parameters:

    ``min_spread_fraction``: with few subjects the PCA is degenerate (N subjects span at
    most N - 1 of the 2K directions; one subject spans none), so before the PCA a
    diagonal term ``(min_spread_fraction * |mean theta_i|)^2`` is added to the sample
    covariance of the thetas. Every parameter then varies by at least about this fraction
    of its size (2 % of each class mean and of each class variance by default); with
    many subjects the measured spread dominates. 0 turns it off (pure PCA).

    ``min_variance_ratio``: guard that keeps variances positive. A draw is accepted only
    if every ``sigma'^2_k >= min_variance_ratio * sigma^2_k`` and the class means stay in
    their order (``mu'_1 < mu'_2 < ...``, so CSF stays darker than GM than WM). Rejected
    rows are redrawn up to 50 times, then left unchanged (``dtheta = 0``). Redrawing keeps
    every accepted theta inside the uniform box of the method instead of piling draws
    on a clipping boundary.

    Training range: a draw is also accepted only if each of its PCA coordinates
    ``A (theta' - mean)`` lies within the range the training subjects span on that axis
    (``low_``..``high_``, widened to at least ``+-sigma(A theta)`` around the mean where
    the subjects span less, e.g. a single subject). The method's box
    ``theta +- sigma(A theta)`` is centred on each subject, so without this bound a
    subject at the edge of the training distribution is pushed beyond it; with it,
    augmented contrasts stay within what the training scanners produced (the spec:
    tissue order kept, intensities within the training distribution's spread).

    ``zscore`` / ``noise_background``: the method's last steps (z-score the brain voxels
    with the augmented image's own mean and std, fill the background with Gaussian noise
    of std ``noise_std``). Both are off by default because the rest of uadct trains
    and scores on percentile-normalised images (brain 5th percentile -> 0, 95th -> 1)
    with background exactly 0: a model trained on z-scored patches with noisy
    background would see a different intensity scale and background at scoring time.
    By default the augmented image is therefore re-normalised the way preprocessing
    normalised the original: its brain ``percentiles`` map to 0 and 1, and voxels
    outside the mask are left as they are (0 in prepared data). With ``normalization``
    ``"tissue"`` the augmented image's normal-tissue median maps to 0.5 and 4 robust SDs
    to one unit, as tissue normalisation did (computed on the transformed quantiles). Both normalisations use
    the whole image's statistics (from the subject's stored quantiles passed through the
    same transform), never the patch's own, as the method precomputes them per image.

    One theta' is drawn per patch: each patch looks like a patch of an independently
    augmented copy of its subject.
    """

    min_spread_fraction: float = 0.02
    min_variance_ratio: float = 0.1
    zscore: bool = False
    noise_background: bool = False
    noise_std: float = 1.0
    percentiles: tuple[float, float] = (5.0, 95.0)
    normalization: str = "percentile"  # how preprocessing normalised: "tissue" re-normalises the tissue peak to 1 instead
    mean_: np.ndarray | None = field(default=None, repr=False)
    components_: np.ndarray | None = field(default=None, repr=False)
    half_widths_: np.ndarray | None = field(default=None, repr=False)
    low_: np.ndarray | None = field(default=None, repr=False)
    high_: np.ndarray | None = field(default=None, repr=False)

    def fit(self, thetas: Sequence[np.ndarray]) -> "ContrastAugmenter":
        """PCA over ``thetas``, a sequence of ``(2K,)`` vectors (one per training subject).

        Stores ``mean_`` ``(2K,)``, ``components_`` ``(2K, 2K)`` (rows: principal axes,
        i.e. the matrix ``A``; orthonormal, so ``A^-1 = A.T``) and ``half_widths_``
        ``(2K,)`` = ``sigma(A theta)``, the std of the training thetas along each axis,
        and ``low_``, ``high_`` ``(2K,)``, the accepted range of each PCA coordinate.
        """
        if not 0 <= self.min_spread_fraction:
            raise UadctError(f"min_spread_fraction must be >= 0, got {self.min_spread_fraction}")
        if not 0 < self.min_variance_ratio < 1:
            raise UadctError(f"min_variance_ratio must be in (0, 1), got {self.min_variance_ratio}")
        if len(thetas) == 0:
            raise UadctError("no tissue parameters to fit the contrast augmentation on; expected one theta per training subject")
        matrix = np.asarray([np.asarray(t, dtype=np.float64) for t in thetas])
        if matrix.ndim != 2 or matrix.shape[1] % 2 or not np.all(np.isfinite(matrix)):
            raise UadctError(f"expected finite theta vectors (mu_1..K, sigma^2_1..K) of one even length, got an array of shape {matrix.shape}")
        mean = matrix.mean(axis=0)
        centred = matrix - mean
        covariance = centred.T @ centred / max(1, len(matrix) - 1)
        covariance += np.diag((self.min_spread_fraction * np.abs(mean)) ** 2)
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        order = np.argsort(eigenvalues)[::-1]
        self.mean_ = mean
        self.components_ = eigenvectors[:, order].T
        self.half_widths_ = np.sqrt(np.clip(eigenvalues[order], 0.0, None))
        coordinates = centred @ self.components_.T
        self.low_ = np.minimum(coordinates.min(axis=0), -self.half_widths_)
        self.high_ = np.maximum(coordinates.max(axis=0), self.half_widths_)
        if len(matrix) <= matrix.shape[1]:
            log.info("contrast PCA on %d subjects for %d parameters: spread floor of %.3g of each parameter applies", len(matrix), matrix.shape[1], self.min_spread_fraction)
        return self

    def sample_thetas(self, tissue: TissueModel, count: int, rng: np.random.Generator) -> np.ndarray:
        """``(count, 2K)`` augmented parameter vectors ``theta' = theta + dtheta`` for ``tissue``."""
        if self.components_ is None or self.half_widths_ is None or self.low_ is None or self.high_ is None:
            raise UadctError("ContrastAugmenter is not fitted; call fit(thetas) on the training subjects first")
        theta = tissue.theta
        if theta.shape[0] != self.components_.shape[0]:
            raise UadctError(f"the tissue model has {theta.shape[0]} parameters but the augmenter was fitted on {self.components_.shape[0]}")
        k = tissue.n_classes
        shifts = np.zeros((count, theta.shape[0]))
        pending = np.arange(count)
        for _ in range(_MAX_REDRAWS):
            if pending.size == 0:
                break
            scores = rng.uniform(-1.0, 1.0, (pending.size, theta.shape[0])) * self.half_widths_
            drawn = scores @ self.components_
            candidate = theta + drawn
            ok = np.all(candidate[:, k:] >= self.min_variance_ratio * theta[k:], axis=1)
            ok &= np.all(np.diff(candidate[:, :k], axis=1) > 0, axis=1)
            coordinates = (candidate - self.mean_) @ self.components_.T
            ok &= np.all((coordinates >= self.low_) & (coordinates <= self.high_), axis=1)
            shifts[pending[ok]] = drawn[ok]
            pending = pending[~ok]
        if pending.size:
            log.debug("%d contrast draws rejected %d times; left unchanged", pending.size, _MAX_REDRAWS)
        return theta + shifts

    def augment(self, patches: np.ndarray, masks: np.ndarray, tissue: TissueModel, rng: np.random.Generator) -> np.ndarray:
        """Contrast-augment patches of ONE subject (the one ``tissue`` was fitted on).

        ``patches``, ``masks``: ``(B, 1, P, P)`` or ``(B, 1, P, P, P)``; mask > 0.5 is
        brain. Returns a new float32 array of the same shape; inputs are not modified.
        All randomness comes from ``rng``.
        """
        patches = np.asarray(patches)
        masks = np.asarray(masks)
        if patches.shape != masks.shape or patches.ndim not in (4, 5) or patches.shape[1] != 1:
            raise UadctError(f"expected patches and masks of one shape (B, 1, P, P) or (B, 1, P, P, P), got {patches.shape} and {masks.shape}")
        return self.apply_thetas(patches, masks, tissue, self.sample_thetas(tissue, patches.shape[0], rng), rng)

    def apply_thetas(
        self, patches: np.ndarray, masks: np.ndarray, tissue: TissueModel, thetas: np.ndarray, rng: np.random.Generator | None = None
    ) -> np.ndarray:
        """Transform patches of ONE subject to the contrasts ``thetas`` ``(B, 2K)`` (from :meth:`sample_thetas`).

        Drawing and applying are separate so the training sampler can draw a whole
        global batch's contrasts and transform only the rows one process trains on.
        ``rng`` is needed only for ``noise_background``.
        """
        patches = np.asarray(patches)
        masks = np.asarray(masks)
        if patches.shape != masks.shape or patches.ndim not in (4, 5) or patches.shape[1] != 1:
            raise UadctError(f"expected patches and masks of one shape (B, 1, P, P) or (B, 1, P, P, P), got {patches.shape} and {masks.shape}")
        count = patches.shape[0]
        k = tissue.n_classes
        new = np.asarray(thetas, dtype=np.float64).reshape(count, 2 * k)
        new_means, new_sds = new[:, :k], np.sqrt(new[:, k:])
        flat = patches.reshape(count, -1).astype(np.float64)
        moved = _transform(flat, tissue, new_means, new_sds)
        reference = _transform(tissue.quantiles, tissue, new_means, new_sds)
        if self.zscore:
            offset = reference.mean(axis=1, keepdims=True)
            scale = reference.std(axis=1, keepdims=True)
        elif self.normalization == "tissue":  # as preprocessing: normal-tissue median -> 0.5, 4 robust SDs -> one unit
            stats = [tissue_statistics(row, np.ones(row.shape)) for row in reference]
            scale = TISSUE_SDS_PER_UNIT * np.array([[st["tissue_sd"]] for st in stats])
            offset = np.array([[st["tissue_median"]] for st in stats]) - 0.5 * scale
        else:
            low, high = np.percentile(reference, self.percentiles, axis=1, keepdims=True)
            offset, scale = low, high - low
        moved = (moved - offset) / np.maximum(scale, 1e-12)
        inside = masks.reshape(count, -1) > 0.5
        if self.noise_background:
            if rng is None:
                raise UadctError("noise_background needs a random generator; pass rng")
            outside = rng.normal(0.0, self.noise_std, flat.shape)
        else:
            outside = flat
        return np.where(inside, moved, outside).astype(np.float32).reshape(patches.shape)


def _memberships(values: np.ndarray, tissue: TissueModel) -> tuple[np.ndarray, np.ndarray]:
    """``p(k|x)`` and ``p(k|x) (x - mu_k) / sigma_k``, each ``(K,) + values.shape``.

    They depend only on the subject's own mixture, so the transform to any new
    parameters is linear in them (see :func:`_transform`). Classes come first so the
    sums over them run over contiguous slices (several times faster than over a last
    axis of length K).
    """
    shape = (-1,) + (1,) * values.ndim
    sds = np.sqrt(tissue.variances)
    standard = (values[None] - tissue.means.reshape(shape)) / sds.reshape(shape)
    log_post = (np.log(tissue.weights) - np.log(sds)).reshape(shape) - 0.5 * standard**2
    log_post -= np.maximum.reduce(log_post, axis=0)
    post = np.exp(log_post)
    post /= np.add.reduce(post, axis=0)
    return post, post * standard


def _transform(values: np.ndarray, tissue: TissueModel, new_means: np.ndarray, new_sds: np.ndarray) -> np.ndarray:
    """``x' = sum_k p(k|x) ((x - mu_k)/sigma_k sigma'_k + mu'_k)`` row by row.

    ``values`` ``(B, V)``, or ``(V,)`` shared by all rows; ``new_means``, ``new_sds``
    ``(B, K)``. Posteriors use the subject's own mixture (weights, means, variances).
    Returns ``(B, V)``.
    """
    post, scaled = _memberships(values, tissue)
    if values.ndim == 1:
        return new_sds @ scaled + new_means @ post
    moved = np.zeros(values.shape)
    for k in range(post.shape[0]):
        moved += scaled[k] * new_sds[:, k : k + 1] + post[k] * new_means[:, k : k + 1]
    return moved


def _histogram_em(
    centres: np.ndarray, counts: np.ndarray, means: np.ndarray, variance: float, floor: float, max_iter: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """EM for a 1D mixture on histogram bins; returns means, variances, weights, log-likelihood per voxel."""
    n_classes = means.shape[0]
    total = counts.sum()
    variances = np.full(n_classes, variance)
    weights = np.full(n_classes, 1.0 / n_classes)
    previous = likelihood = -np.inf
    for _ in range(max_iter):
        log_joint = np.log(weights + 1e-300) - 0.5 * np.log(2 * np.pi * variances) - 0.5 * (centres[:, None] - means) ** 2 / variances
        top = log_joint.max(axis=1, keepdims=True)
        log_norm = top + np.log(np.exp(log_joint - top).sum(axis=1, keepdims=True))
        likelihood = float(counts @ log_norm[:, 0]) / total
        if abs(likelihood - previous) < 1e-10:
            break
        previous = likelihood
        responsibilities = np.exp(log_joint - log_norm) * counts[:, None]
        mass = responsibilities.sum(axis=0) + 1e-300
        weights = mass / total
        means = responsibilities.T @ centres / mass
        variances = (responsibilities * (centres[:, None] - means) ** 2).sum(axis=0) / mass + floor
    return means, variances, weights, likelihood
