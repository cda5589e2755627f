"""Anomaly models, found by name through the registry."""

from uadct.models.base import MODEL_REGISTRY, AnomalyModel, ModelConfig, available_models, build_model, model_class
from uadct.models import cae  # noqa: F401  (registers the model)

__all__ = ["MODEL_REGISTRY", "AnomalyModel", "ModelConfig", "available_models", "build_model", "model_class"]
