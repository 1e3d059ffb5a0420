"""Models: open_clip towers, converted attention, loading and export, parameter reports."""

from compress.models.attention import HeadAttention, convert_attention, is_converted
from compress.models.factory import (
    ModelLoadError,
    build_from_config,
    get_model_config,
    list_shipped_configs,
    load_model,
    load_with_transforms,
)

__all__ = [
    "HeadAttention",
    "ModelLoadError",
    "build_from_config",
    "convert_attention",
    "get_model_config",
    "is_converted",
    "list_shipped_configs",
    "load_model",
    "load_with_transforms",
]
