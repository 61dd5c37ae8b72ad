"""The one check of inputs: every layer (the engine, the memory, the service) validates and
canonicalises inputs here, so that each says the same thing and stores the same bytes."""

from __future__ import annotations

import torch
from torch import Tensor

from ddrs.errors import InputError

PIXELS = (0.0, 1.0)  # un-normalised images: normalisation is a layer inside the model


def check_pixels(x: Tensor, pixel_range: tuple[float, float] | None = PIXELS) -> None:
    """x holds finite values in `pixel_range` (None: any finite values)."""
    if not bool(torch.isfinite(x).all()):
        raise InputError(
            "the input holds NaN or infinite values (or numbers too large for float32)"
        )
    if pixel_range is not None and x.numel():
        low, high = pixel_range
        least, most = float(x.min()), float(x.max())
        if least < low or most > high:
            raise InputError(
                f"input values must lie in [{low:g}, {high:g}] (un-normalised pixels; "
                f"normalisation belongs inside the model); got [{least:.3g}, {most:.3g}]"
            )


def canonical_input(
    x: Tensor,
    shape: tuple[int, ...] | None = None,
    pixel_range: tuple[float, float] | None = PIXELS,
) -> Tensor:
    """One input, checked (a floating-point tensor of `shape`, finite, in `pixel_range`) and
    canonical: float32, contiguous, on the CPU, with -0.0 made 0.0, so that equal pixel values
    always have equal bytes (the memory finds repeats and computes checksums on the bytes)."""
    if not isinstance(x, Tensor):
        raise InputError(f"the input must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputError(f"the input must be a floating-point tensor, got dtype {x.dtype}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise InputError(f"the input has shape {tuple(x.shape)}; this model takes {tuple(shape)}")
    x = x.detach().to("cpu", torch.float32)
    check_pixels(x, pixel_range)
    return (x + 0.0).contiguous()  # IEEE: -0.0 + 0.0 == +0.0; every other value unchanged
