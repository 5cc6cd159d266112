"""Model registry (timm-style): ``@register_model`` names a constructor; ``create_model`` builds it
with the input shape and class count of the dataset."""

from sparse_core.models.registry import available_models, create_model, register_model

# Importing the modules registers their models.
from sparse_core.models import resnet_cifar, small, vgg, wrn  # noqa: E402,F401

__all__ = ["available_models", "create_model", "register_model"]
