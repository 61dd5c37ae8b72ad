"""Denoised smoothing (Salman, Sun, Yang, Kapoor & Kolter, NeurIPS 2020): a denoiser D in front
of a classifier f that was never trained under noise; f(D(x + e)) is smoothed and Cohen et
al.'s certificate holds for the composed classifier unchanged.

`Denoised(denoiser, classifier)` is that composition, a model like any other: every command
runs it, and its fingerprint covers both parts (models/identity.py). `DnCNN` is the
denoiser `ddrs train-denoiser` trains (Zhang et al. 2017, the architecture of Salman et al.);
`load_denoiser` reads ours, your own module (package.module:factory), TorchScript or ONNX.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ddrs.core.experts import Expert, Experts
from ddrs.errors import CheckpointError, InputError

# name: (depth, width). "dncnn" is Salman et al.'s denoiser (17 layers of 64 channels);
# "dncnn_small" (5 layers of 16 channels) about doubles the cost of the CIFAR-10 studies'
# cnn_small, for CPU-scale studies.
DENOISER_ARCHS = {"dncnn": (17, 64), "dncnn_small": (5, 16)}


class DnCNN(nn.Module):
    """Residual denoiser: D(z) = z - net(z), net a stack of 3x3 convolutions (batch norm in
    the middle layers), predicting the noise of z."""

    def __init__(self, channels: int, depth: int = 17, width: int = 64):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [
                nn.Conv2d(width, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
        layers.append(nn.Conv2d(width, channels, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return z - self.net(z)


def build_denoiser(arch: str, input_shape) -> nn.Module:
    """A fresh denoiser of `arch` (see DENOISER_ARCHS) for C x H x W images."""
    if arch not in DENOISER_ARCHS:
        raise InputError(
            f"unknown denoiser architecture {arch!r}; choose one of {', '.join(DENOISER_ARCHS)}"
        )
    shape = tuple(input_shape)
    if len(shape) != 3:
        raise InputError(f"a DnCNN denoiser takes C x H x W images, not inputs of shape {shape}")
    depth, width = DENOISER_ARCHS[arch]
    return DnCNN(int(shape[0]), depth, width)


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
    from ddrs.models.checkpoint import is_torchscript, load_checkpoint, load_user_model

    path = Path(spec)
    if path.suffix.lower() == ".onnx" or (path.is_file() and not is_torchscript(spec)):
        if path.suffix.lower() == ".onnx":
            model = load_user_model(spec)
        else:
            loaded = load_checkpoint(path)
            if loaded.meta.get("kind") != "denoiser":
                raise CheckpointError(
                    f"--denoiser {spec} is a classifier checkpoint, not a denoiser; train one "
                    "with `ddrs train-denoiser --classifier ...`, or pass this file as --checkpoint"
                )
            model = loaded.model
    else:
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
