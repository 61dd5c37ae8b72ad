"""Gaussian data augmentation (Cohen, Rosenfeld & Kolter, 2019): cross-entropy on f(x + s e);
with `norm` "l1", on uniform noise of half-width s (for L1 certificates, Yang et al. 2020)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ddrs.train.methods.base import BatchLoss, Method, noise_like


class GaussianAugmentation(Method):
    name = "gaussian"

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, sigma: Tensor, epoch: int) -> BatchLoss:
        logits = model(x + noise_like(x, sigma, self.norm))
        loss = F.cross_entropy(logits, y)
        return BatchLoss(loss, logits.detach(), {"ce": loss.item()})
