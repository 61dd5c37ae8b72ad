"""Architectures, input normalisation (build.py), checkpoints and model identity
(checkpoint.py)."""

from ddrs.models.build import ARCH_NAMES, NormalizeLayer, build_model, is_convolutional
from ddrs.models.checkpoint import (
    LoadedCheckpoint,
    guard_input_shape,
    load_checkpoint,
    load_model,
    load_user_model,
    model_fingerprint,
    recorded_meta,
    save_checkpoint,
)

__all__ = [
    "ARCH_NAMES",
    "LoadedCheckpoint",
    "NormalizeLayer",
    "build_model",
    "guard_input_shape",
    "is_convolutional",
    "load_checkpoint",
    "load_model",
    "load_user_model",
    "model_fingerprint",
    "recorded_meta",
    "save_checkpoint",
]
