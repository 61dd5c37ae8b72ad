"""Denoised smoothing (Salman, Sun, Yang, Kapoor & Kolter, NeurIPS 2020): a denoiser D in front
of a classifier f that was never trained under noise; f(D(x + e)) is smoothed and Cohen et
al.'s certificate holds for the composed classifier unchanged.

`Denoised(denoiser, classifier)` is that composition, a model like any other: every command
runs it, and its fingerprint covers both parts (models/identity.py). The denoiser that
`ddrs train-denoiser` trains is models/dncnn.py's; `load_denoiser` reads ours, your own
module (package.module:factory), TorchScript or ONNX.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ddrs.core.experts import Expert, Experts
from ddrs.errors import CheckpointError, InputError
from ddrs.models.checkpoint import is_own_model, load_checkpoint, load_user_model
from ddrs.models.dncnn import DENOISER_ARCHS, DnCNN, build_denoiser

__all__ = [
    "DENOISER_ARCHS",
    "Denoised",
    "DnCNN",
    "build_denoiser",
    "load_denoiser",
    "with_denoiser",
]


class Denoised(nn.Module):
    """classifier(denoiser(x)): the base classifier of denoised smoothing."""

    def __init__(self, denoiser: nn.Module, classifier: nn.Module, source: str = ""):
        super().__init__()
        self.denoiser = denoiser
        self.classifier = classifier
        self.source = source  # where the denoiser came from, for settings and messages

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.denoiser(x))


def load_denoiser(spec: str, input_shape, device: str | torch.device = "cpu") -> nn.Module:
    """A denoiser for inputs of `input_shape`: a `ddrs train-denoiser` checkpoint, your own
    (package.module:factory, a TorchScript file) or an ONNX file; checked by one probe pass to
    map an input to an image of the same shape. In eval mode, on `device`."""
    if not is_own_model(spec):
        loaded = load_checkpoint(spec)
        if loaded.meta.get("kind") != "denoiser":
            raise CheckpointError(
                f"--denoiser {spec} is a classifier checkpoint, not a denoiser; train one "
                "with `ddrs train-denoiser --classifier ...`, or pass this file as --checkpoint"
            )
        model = loaded.model
    else:  # ONNX, TorchScript, or package.module:factory
        model = load_user_model(spec)
    model = model.to(device).eval()
    shape = tuple(int(s) for s in input_shape)
    try:
        with torch.inference_mode():
            out = model(torch.zeros(1, *shape, device=device))
    except (RuntimeError, ValueError, TypeError, InputError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"the denoiser {spec} fails on one input of shape {shape} ({first}); is it the "
            "denoiser for these inputs?"
        ) from None
    if tuple(out.shape) != (1, *shape):
        raise CheckpointError(
            f"the denoiser {spec} maps a {shape} input to shape {tuple(out.shape[1:])}; a "
            "denoiser returns an image of its input's shape (a classifier goes in --checkpoint "
            "or --model)"
        )
    return model


def with_denoiser(experts: Experts, denoiser: nn.Module, source: str) -> Experts:
    """Every expert's model behind `denoiser` (one composition per distinct model)."""
    composed: dict[int, Denoised] = {}
    members = []
    for e in experts:
        if id(e.model) not in composed:
            composed[id(e.model)] = Denoised(denoiser, e.model, source).eval()
        members.append(Expert(e.name, e.source, e.sigma, composed[id(e.model)]))
    return Experts(tuple(members))
