"""Identity: which model (weights and preprocessing) a result or a memory belongs to."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from ddrs.core.experts import Experts
from ddrs.models.build import NormalizeLayer
from ddrs.models.checkpoint import _unwrap
from ddrs.models.denoiser import Denoised
from ddrs.models.engines import EngineModel


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over sorted state dict (names, dtypes, shapes, bytes) and the normalisation, if any.

    Identifies "this model + its preprocessing", e.g. to tie a certification memory to a model.
    A denoised classifier's covers both parts: another denoiser is another model. A bf16 or
    int8 engine's covers the precision and the file it runs (models/engines.py).
    """
    model = _unwrap(model)
    if isinstance(model, EngineModel):  # fp32: the same function; bf16, int8: another model
        if model.precision == "fp32":
            return model_fingerprint(model.base)
        parts = f"{model.precision}|{model.engine}|{model.identity}|{model_fingerprint(model.base)}"
        return hashlib.sha256(parts.encode()).hexdigest()
    if isinstance(model, Denoised):
        parts = (
            f"denoised|{model_fingerprint(model.denoiser)}|{model_fingerprint(model.classifier)}"
        )
        return hashlib.sha256(parts.encode()).hexdigest()
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    first = model[0] if isinstance(model, nn.Sequential) and len(model) else None
    if isinstance(first, NormalizeLayer):
        mean, std = first.mean.flatten().tolist(), first.std.flatten().tolist()
        digest.update(f"normalize|{mean}|{std}".encode())
    return digest.hexdigest()


def memory_fingerprint(model: nn.Module | Experts, dataset: str, input_shape) -> str:
    """Identity of 'this model with this preprocessing on these inputs', or of 'these experts
    at these sigmas on these inputs' (the memory of routed answers is not the memory of any
    one model), which a memory belongs to."""
    if isinstance(model, Experts) and not model.is_model:
        parts = [f"{e.name}|{model_fingerprint(e.model)}|{e.sigma!r}" for e in model]
        text = "experts|" + "|".join(parts) + f"|{dataset}|{tuple(input_shape)}"
        return hashlib.sha256(text.encode()).hexdigest()
    if isinstance(model, Experts):
        model = model[0].model
    text = f"{model_fingerprint(model)}|{dataset}|{tuple(input_shape)}"
    return hashlib.sha256(text.encode()).hexdigest()
