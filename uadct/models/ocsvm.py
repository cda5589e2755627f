"""One-class SVM with an RBF kernel on (average-pooled) patch vectors: the papers' baseline.

``fit_statistics`` fits scikit-learn's ``OneClassSVM`` on at most ``max_fit_patches``
training patches (the solver is O(n^2) in memory and time), then keeps only tensors:
support vectors, dual coefficients, intercept and gamma. Scoring evaluates the
decision function in torch, ``f(x) = sum_i a_i exp(-gamma ||x - s_i||^2) + b``, and the
anomaly score is ``-f(x)`` (positive outside the learned support). Patches are used as
given (background is already zero after preprocessing), so fitting and scoring see the
same vectors whether or not masks are passed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from uadct.errors import UadctError
from uadct.models.base import ModelConfig, NonTrainableModel


@dataclasses.dataclass
class OCSVMConfig(ModelConfig):
    """One-class SVM settings (scikit-learn's names and defaults where they exist)."""

    nu: float = 0.1  # upper bound on the fraction of training outliers
    gamma: float | str = "scale"  # RBF width; "scale" = 1 / (features * variance of the fit data)
    pool_size: int = 8  # average-pool each patch to this many voxels per side (>= patch_size: no pooling)
    max_fit_patches: int = 2000  # at most this many training patches fit the SVM (O(n^2) solver)
    seed: int = 0  # which patches are kept when there are more than max_fit_patches


class OneClassSVMModel(NonTrainableModel):
    name = "ocsvm"
    summary = "one-class SVM (RBF) on pooled patch vectors; patch score = minus the decision function"
    outputs = ("scalar",)
    Config = OCSVMConfig

    def __init__(self, config: OCSVMConfig) -> None:
        if not 0 < config.nu <= 1:
            raise UadctError(f"ocsvm: nu must be in (0, 1], got {config.nu}")
        if isinstance(config.gamma, str) and config.gamma not in ("scale", "auto"):
            raise UadctError(f"ocsvm: gamma must be a positive number, 'scale' or 'auto', got {config.gamma!r}")
        side = min(config.pool_size, config.patch_size)
        if side < 1 or config.patch_size % side:
            raise UadctError(f"ocsvm: pool_size {config.pool_size} must divide the patch size {config.patch_size}")
        super().__init__(config)
        self.pool_factor = config.patch_size // side
        features = side**config.dims
        self.register_buffer("support_vectors", torch.zeros(0, features))
        self.register_buffer("dual_coefficients", torch.zeros(0))
        self.register_buffer("intercept", torch.tensor(0.0))
        self.register_buffer("gamma", torch.tensor(0.0))

    def features(self, patches: torch.Tensor) -> torch.Tensor:
        """``(B, 1, *patch) -> (B, features)``: average-pooled and flattened."""
        if self.pool_factor > 1:
            pool = F.avg_pool2d if self.config.dims == 2 else F.avg_pool3d
            patches = pool(patches, self.pool_factor)
        return patches.flatten(1)

    def fit_statistics(self, patches: torch.Tensor, masks: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """Fit the SVM on at most ``max_fit_patches`` of ``(N, 1, *patch)`` patches (masks unused)."""
        from sklearn.svm import OneClassSVM

        if len(patches) > self.config.max_fit_patches:
            generator = torch.Generator().manual_seed(self.config.seed)
            keep = torch.randperm(len(patches), generator=generator)[: self.config.max_fit_patches]
            patches = patches[keep.to(patches.device)]
        vectors = self.features(patches.float()).cpu().double().numpy()
        svm = OneClassSVM(kernel="rbf", nu=self.config.nu, gamma=self.config.gamma).fit(vectors)
        device = self.support_vectors.device
        self.support_vectors = torch.as_tensor(svm.support_vectors_, dtype=torch.float32, device=device)
        self.dual_coefficients = torch.as_tensor(svm.dual_coef_[0], dtype=torch.float32, device=device)
        self.intercept.fill_(float(svm.intercept_[0]))
        self.gamma.fill_(float(svm._gamma))
        self.fitted.fill_(True)

    def decision_function(self, patches: torch.Tensor) -> torch.Tensor:
        """scikit-learn's ``decision_function``, ``(B, 1, *patch) -> (B,)``: positive inside the support.

        Computed in float64 (float32 on Apple MPS, which lacks it) so it matches the
        reference to ~1e-6 even with thousands of support vectors.
        """
        self._require_fitted()
        dtype = torch.float32 if patches.device.type == "mps" else torch.float64
        vectors = self.features(patches).to(dtype)
        support = self.support_vectors.to(dtype)
        squared = vectors.square().sum(1, keepdim=True) + support.square().sum(1) - 2 * vectors @ support.T
        kernel = torch.exp(-self.gamma.to(dtype) * squared.clamp_min(0.0))
        return kernel @ self.dual_coefficients.to(dtype) + self.intercept.to(dtype)

    def score_patches(
        self, patches: torch.Tensor, masks: torch.Tensor | None = None, positions: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``"scalar"`` ``(B,)`` float32: minus the decision function (higher = more anomalous)."""
        return {"scalar": (-self.decision_function(patches)).to(patches.dtype)}

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # The number of support vectors is only known after fitting: take the stored shapes.
        for name in ("support_vectors", "dual_coefficients"):
            stored = state_dict.get(prefix + name)
            if isinstance(stored, torch.Tensor):
                current = getattr(self, name)
                setattr(self, name, torch.empty(stored.shape, dtype=current.dtype, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
