"""clip-compress: compress CLIP models by distillation and weight inheritance."""

__version__ = "0.1.0"
