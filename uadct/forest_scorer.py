"""The features + random forest scorer (``uadct train --scorer forest``; Novikov's last stage).

After the network is trained, healthy training patches and the same patches with one
synthetic anomaly each (the generator of the synthetic-anomaly model,
:func:`uadct.models.synthetic_anomaly.blend_synthetic_anomalies`, every patch corrupted)
are encoded into latent features (the model's ``encode_features``: CAE/VAE codes, the GAN
encoders', the DAE's and the U-Net models' (``dae-unet``, ``synthetic-anomaly``) pooled
bottlenecks, the SSAE's band codes), the subject covariates
appended when the run has them (:mod:`uadct.covariates`), and a random forest (or
histogram gradient boosting) learns healthy (0) against anomalous (1).

At score time a patch's score is the forest's anomaly probability: the ``"scalar"`` output
of :class:`ForestScoredModel`, spread over the patch's voxels by the sliding window's
overlap averaging like every per-patch score (so a voxel's value is the mean probability
of the patches that cover it). The network's own voxel map stays available as the
``"voxel"`` output (``uadct score --output voxel``). The forest travels in the
checkpoint's ``extra["forest"]`` as arrays (:mod:`uadct.forest`), never pickled;
:func:`attach_forest` wraps a loaded model with it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from uadct.errors import UadctError
from uadct.forest import FOREST_MODELS, TreeEnsemble, ensemble_from_sklearn, fit_ensemble

log = logging.getLogger(__name__)

EXTRA_KEY = "forest"  # checkpoint extra state: TreeEnsemble.to_state() plus "covariates" (features appended)
METADATA_KEY = "forest"  # checkpoint metadata: what the forest was fitted on
SCORERS = ("model", "forest")
FEATURE_BATCH = 256


@dataclass
class ForestSettings:
    """``model``: random-forest or gradient-boosting; ``trees``; ``patches``: healthy patches (and as many anomalous)."""

    model: str = "random-forest"
    trees: int = 100
    patches: int = 4096
    seed: int = 0


def has_encoder(model: Any) -> bool:
    return callable(getattr(model, "encode_features", None))


def require_encoder(model: Any) -> None:
    """A one-line error for a model without latent features."""
    if not has_encoder(model):
        from uadct.models import MODEL_REGISTRY

        able = sorted(n for n, c in MODEL_REGISTRY.items() if callable(getattr(c, "encode_features", None)))
        raise UadctError(f"--scorer forest needs a model with an encoder; {getattr(model, 'name', '?')!r} has none "
                         f"(models with one: {', '.join(able)})")


class ForestScoredModel(nn.Module):
    """A trained model whose patch score is a tree ensemble's anomaly probability on its latent features.

    Scores: ``"scalar"`` = ``"forest"`` = the probability ``(B,)``; the model's own outputs
    (``"voxel"`` and its named scores) are kept. ``covariates`` ``(B, K)`` are appended to
    the features when the forest was fitted with them, and passed on to a model conditioned on them.
    """

    def __init__(self, model: nn.Module, ensemble: TreeEnsemble, covariate_features: int = 0) -> None:
        super().__init__()
        require_encoder(model)
        self.scored_model = model
        self.ensemble = ensemble
        self.forest_covariates = int(covariate_features)
        self.outputs = ("scalar",) + tuple(o for o in getattr(model, "outputs", ()) if o != "scalar")

    @property
    def name(self) -> str:
        return self.scored_model.name

    @property
    def config(self) -> Any:
        return self.scored_model.config

    def config_dict(self) -> dict[str, Any]:
        return self.scored_model.config_dict()

    @property
    def uses_positions(self) -> bool:
        return bool(getattr(self.scored_model, "uses_positions", False))

    @property
    def covariate_features(self) -> int:
        return max(self.forest_covariates, int(getattr(self.scored_model, "covariate_features", 0)))

    @property
    def uses_covariates(self) -> bool:
        return self.covariate_features > 0

    def features(self, patches: torch.Tensor, covariates: torch.Tensor | None = None) -> np.ndarray:
        """``(B, F)`` float32: the latent code, and the covariates when the forest uses them."""
        code = self.scored_model.encode_features(patches).float()
        if self.forest_covariates:
            if covariates is None or tuple(covariates.shape) != (len(patches), self.forest_covariates):
                raise UadctError(f"forest scorer: fitted with {self.forest_covariates} covariate features, so covariates "
                                 "must be given (--covariates or --age/--sex)")
            code = torch.cat([code, covariates.to(code)], dim=1)
        return code.detach().cpu().numpy()

    def score_patches(self, patches: torch.Tensor, masks: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                      covariates: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        options: dict[str, Any] = {"positions": positions}
        if getattr(self.scored_model, "uses_covariates", False):
            options["covariates"] = covariates
        scores = dict(self.scored_model.score_patches(patches, masks, **options))
        probability = torch.from_numpy(self.ensemble.probability(self.features(patches, covariates))).to(patches.device, torch.float32)
        scores["forest"] = scores["scalar"] = probability
        return scores


def attach_forest(model: nn.Module, extra_state: dict[str, Any]) -> nn.Module:
    """``model`` wrapped with the forest of a checkpoint's extra state, or unchanged when it has none."""
    state = (extra_state or {}).get(EXTRA_KEY)
    if not state:
        return model
    return ForestScoredModel(model, TreeEnsemble.from_state(state), int(state.get("covariates", 0)))


def encode_all(model: nn.Module, patches: torch.Tensor, covariates: np.ndarray | None, device: torch.device) -> np.ndarray:
    """Latent features of ``patches`` ``(N, 1, *patch)`` in eval mode, batch by batch, covariates appended."""
    model.eval()
    parts = []
    with torch.no_grad():
        for start in range(0, len(patches), FEATURE_BATCH):
            parts.append(model.encode_features(patches[start : start + FEATURE_BATCH].to(device)).float().cpu().numpy())
    features = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    if covariates is not None:
        features = np.concatenate([features, np.asarray(covariates, np.float32)], axis=1)
    return features


def anomalous_copies(images: torch.Tensor, masks: torch.Tensor, seed: int) -> torch.Tensor:
    """Every patch with one synthetic anomaly (the synthetic-anomaly model's generator, no clean share)."""
    from uadct.models.synthetic_anomaly import SyntheticAnomalyConfig, blend_synthetic_anomalies

    config = SyntheticAnomalyConfig(patch_size=images.shape[-1], dims=images.dim() - 2, clean_fraction=0.0)
    generator = torch.Generator(device=images.device).manual_seed(seed)
    corrupted, _ = blend_synthetic_anomalies(images, masks, config, generator)
    return corrupted


def labelled_features(model: nn.Module, images: np.ndarray, masks: np.ndarray, covariates: np.ndarray | None,
                      device: torch.device, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features of the healthy patches (label 0) and of their anomalous copies (label 1)."""
    healthy = torch.from_numpy(np.ascontiguousarray(images, np.float32))
    mask = torch.from_numpy(np.ascontiguousarray(masks, np.float32))
    anomalous = anomalous_copies(healthy, mask, seed)
    features = np.concatenate([encode_all(model, healthy, covariates, device), encode_all(model, anomalous, covariates, device)])
    labels = np.concatenate([np.zeros(len(healthy), np.int64), np.ones(len(anomalous), np.int64)])
    return features, labels


def fit_forest_scorer(model: nn.Module, train: tuple[np.ndarray, ...], validation: tuple[np.ndarray, ...],
                      settings: ForestSettings, device: torch.device,
                      covariate_names: list[str] | None = None) -> tuple[ForestScoredModel, dict[str, Any], dict[str, Any]]:
    """Fit the forest on training patches ``(images, masks, starts[, covariates])`` and measure it on validation ones.

    Returns the wrapped model, the checkpoint extra state and the metadata record
    (ensemble, trees, feature count and names, patch counts, validation AUROC).
    """
    from uadct.metrics import auroc as area_under_roc

    require_encoder(model)
    if settings.model not in FOREST_MODELS:
        raise UadctError(f"unknown forest model {settings.model!r}; expected one of {', '.join(FOREST_MODELS)}")
    covariates = train[3] if len(train) > 3 else None
    features, labels = labelled_features(model, train[0], train[1], covariates, device, settings.seed)
    estimator = fit_ensemble(features, labels, settings.model, settings.trees, settings.seed)
    ensemble = ensemble_from_sklearn(estimator)
    covariate_count = 0 if covariates is None else int(np.asarray(covariates).shape[1])
    scored = ForestScoredModel(model, ensemble, covariate_count)
    val_features, val_labels = labelled_features(model, validation[0], validation[1], validation[3] if len(validation) > 3 else None,
                                                 device, settings.seed + 1)
    auroc = float(area_under_roc(ensemble.probability(val_features), val_labels.astype(bool))) if len(val_labels) else None
    log.info("forest scorer: %s of %d trees on %d features; validation AUROC (healthy vs synthetic) %s",
             settings.model, ensemble.trees, features.shape[1], auroc)
    extra = {EXTRA_KEY: {**ensemble.to_state(), "covariates": covariate_count}}
    record = {"model": settings.model, "trees": ensemble.trees, "features": int(features.shape[1]),
              "covariate_features": list(covariate_names or []) if covariate_count else [],
              "healthy_patches": int(len(train[0])), "anomalous_patches": int(len(train[0])),
              "validation_auroc_synthetic": auroc}
    return scored, extra, record
