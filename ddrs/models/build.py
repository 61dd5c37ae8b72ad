"""Building a model: the architectures by name, behind the input normalisation layer.

Every model built here is `nn.Sequential(NormalizeLayer(mean, std), net)`: it takes un-normalised
[0, 1] images and its state dict keys are "1.<net keys>", the layout of the field's published
checkpoints (Cohen et al., SmoothAdv, MACER, Consistency).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ddrs.errors import InputError
from ddrs.models.cifar_resnet import cifar_resnet, cifar_resnet18
from ddrs.models.cnn import CNN
from ddrs.models.resnet50 import resnet50

ARCH_NAMES = ("cnn", "cnn_small", "cifar_resnet20", "cifar_resnet110", "cifar_resnet18", "resnet50")


class NormalizeLayer(nn.Module):
    """(x - mean) / std per channel. mean/std are non-persistent buffers: they follow .to() but
    add no state dict keys, like the parameter-free normalize layer of published checkpoints."""

    def __init__(self, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor):
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() != std_t.numel() or mean_t.numel() == 0:
            raise InputError(f"mean and std need the same non-zero length, got {mean} and {std}")
        if not bool((std_t > 0).all()):
            raise InputError(f"std must be positive, got {std}")
        self.register_buffer("mean", mean_t.view(-1, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(-1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def _make_net(arch: str, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    channels = input_shape[0]
    if arch == "cnn":
        return CNN(num_classes, input_shape)
    if arch == "cnn_small":
        # Half the width: ~4.5x the CIFAR throughput on 2 CPU cores (the CIFAR-10 study's model).
        return CNN(num_classes, input_shape, width=16)
    if arch == "cifar_resnet20":
        return cifar_resnet(20, num_classes, channels)
    if arch == "cifar_resnet110":
        return cifar_resnet(110, num_classes, channels)
    if arch == "cifar_resnet18":
        return cifar_resnet18(num_classes, channels)
    if arch == "resnet50":
        return resnet50(num_classes, channels)
    raise InputError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCH_NAMES)}")


def build_model(
    arch: str,
    num_classes: int,
    input_shape: tuple[int, int, int],
    mean: Sequence[float] | Tensor,
    std: Sequence[float] | Tensor,
) -> nn.Sequential:
    """Sequential(NormalizeLayer(mean, std), net) mapping [0, 1] images to logits."""
    if arch not in ARCH_NAMES:
        raise InputError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCH_NAMES)}")
    if int(num_classes) != num_classes or num_classes < 2:
        raise InputError(f"num_classes must be an integer >= 2, got {num_classes}")
    shape = tuple(input_shape)
    if len(shape) != 3 or any(int(s) != s or s < 1 for s in shape):
        raise InputError(
            f"the built-in architectures take C x H x W images, and these inputs have shape "
            f"{tuple(input_shape)}; use your own model (--model package.module:factory)"
        )
    normalize = NormalizeLayer(mean, std)
    if normalize.mean.numel() != shape[0]:
        raise InputError(f"mean/std have {normalize.mean.numel()} channels, input has {shape[0]}")
    net = _make_net(arch, int(num_classes), tuple(int(s) for s in shape))
    return nn.Sequential(normalize, net)
