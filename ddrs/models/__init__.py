"""Architectures, input normalisation (build.py), checkpoints and model identity
(checkpoint.py), denoisers (denoiser.py) and ONNX models (onnx.py)."""

from ddrs.models.build import ARCH_NAMES, NormalizeLayer, build_model
from ddrs.models.checkpoint import (
    LoadedCheckpoint,
    guard_input_shape,
    load_checkpoint,
    load_model,
    load_user_model,
    recorded_meta,
    save_checkpoint,
)
from ddrs.models.denoiser import (
    DENOISER_ARCHS,
    Denoised,
    build_denoiser,
    load_denoiser,
    with_denoiser,
)
from ddrs.models.identity import memory_fingerprint, model_fingerprint

__all__ = [
    "ARCH_NAMES",
    "DENOISER_ARCHS",
    "Denoised",
    "build_denoiser",
    "load_denoiser",
    "with_denoiser",
    "LoadedCheckpoint",
    "NormalizeLayer",
    "build_model",
    "guard_input_shape",
    "load_checkpoint",
    "load_model",
    "load_user_model",
    "memory_fingerprint",
    "model_fingerprint",
    "recorded_meta",
    "save_checkpoint",
]
