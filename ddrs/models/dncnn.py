"""The denoiser `ddrs train-denoiser` trains: DnCNN (Zhang, Zuo, Chen, Meng & Zhang, 2017), the
architecture of Salman et al.'s denoised smoothing."""

from __future__ import annotations

from torch import Tensor, nn

from ddrs.errors import InputError

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
