"""Model families, one file each, reached through a registry (timm-style)."""

from edgecloud.nets.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
