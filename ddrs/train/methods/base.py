"""What every training method is: `loss(model, x, y, sigma, epoch) -> BatchLoss`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class BatchLoss:
    loss: Tensor  # scalar to minimise
    noisy_logits: Tensor  # (B, C) logits on one noisy copy per input, for accuracy
    terms: dict[str, float] = field(default_factory=dict)  # named parts of the loss, for the log


class Method:
    """Base class. `settings` are the method's hyper-parameters, recorded in checkpoints."""

    name = "method"
    norm = "l2"  # the training noise: "l2" Gaussian, or "l1" uniform of half-width sigma

    def settings(self) -> dict:
        return {}

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, sigma: Tensor, epoch: int) -> BatchLoss:
        raise NotImplementedError


def noise_like(x: Tensor, sigma: Tensor, norm: str = "l2") -> Tensor:
    """sigma_i * e for each row of x, e ~ N(0, I) from torch's global generator (norm "l1":
    e ~ U[-1, 1]^d, uniform noise of half-width sigma_i)."""
    e = torch.rand_like(x) * 2 - 1 if norm == "l1" else torch.randn_like(x)
    return sigma.view(-1, *([1] * (x.dim() - 1))) * e
