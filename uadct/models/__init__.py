"""Anomaly models, found by name through the registry.

Every module in this package is imported here, so a model registers itself just by
living in a file of its own (``uadct/models/<name>.py``) and subclassing
:class:`AnomalyModel` with a ``name``.
"""

import importlib
import pkgutil

from uadct.models.base import MODEL_REGISTRY, AnomalyModel, ModelConfig, available_models, build_model, model_class, patch_models

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["MODEL_REGISTRY", "AnomalyModel", "ModelConfig", "available_models", "build_model", "model_class", "patch_models"]
