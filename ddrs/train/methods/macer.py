"""MACER (Zhai et al., ICLR 2020): maximise the certified radius directly.

With k noisy copies x + sigma e_j of each input and z_j = f(x + sigma e_j):

    classification = -log( 1/k sum_j softmax(z_j) )_y
    robustness     = sigma/2 * max(0, gamma - (Phi^-1(p_A) - Phi^-1(p_B))),
                     p = 1/k sum_j softmax(beta z_j),  p_A = p_y,  p_B = max_{c != y} p_c,

    loss = 1/B sum_i classification_i + lbd * 1/B sum_{i in R} robustness_i .

As in the authors' code, gamma bounds the margin Phi^-1(p_A) - Phi^-1(p_B) (not the radius),
sigma/2 multiplies outside the hinge, and R holds the inputs that the beta-tempered smoothed
classifier gets right and whose margin is finite and <= gamma (the others add nothing but
still count in B). Their code does not clamp p: a margin that is infinite (p_A rounds to 1 or
p_B to 0) lies beyond any gamma and is left out the same way. With per-sample sigma, each
input's robustness term uses its own sigma_i.

`warmup` (ours, default 0): the first `warmup` epochs train on the classification term alone.
From random weights the robustness term can collapse a small model to one class (seen on
CIFAR-10 with a small CNN); a few epochs of plain noisy training first avoid that.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddrs.core.checks import integer, number, positive
from ddrs.core.families import normal_icdf
from ddrs.train.methods.base import BatchLoss, Method, noise_like


class Macer(Method):
    name = "macer"

    def __init__(
        self,
        *,
        k: int = 16,
        lbd: float = 12.0,
        gamma: float = 8.0,
        beta: float = 16.0,
        warmup: int = 0,
    ):
        self.k = integer("macer setting k", k)
        self.lbd = number("macer setting lbd", lbd, minimum=0)
        self.gamma = number("macer setting gamma", gamma, minimum=0)
        self.beta = positive("macer setting beta", beta)
        self.warmup = integer("macer setting warmup", warmup, minimum=0)

    def settings(self) -> dict:
        return {
            "k": self.k,
            "lbd": self.lbd,
            "gamma": self.gamma,
            "beta": self.beta,
            "warmup": self.warmup,
        }

    def robustness(self, logits: Tensor, y: Tensor, sigma: Tensor) -> Tensor:
        """1/B sum over R of sigma_i/2 (gamma - margin_i); logits (B, k, C), sigma (B,)."""
        probs = torch.softmax(self.beta * logits, dim=2).mean(dim=1)
        top2 = probs.topk(2, dim=1)
        p_a, p_b = top2.values.unbind(dim=1)
        with torch.no_grad():
            margin = normal_icdf(p_a) - normal_icdf(p_b)
            inside = (top2.indices[:, 0] == y) & torch.isfinite(margin) & (margin <= self.gamma)
        # recomputed on R only, so no infinite Phi^-1 enters the backward pass
        margin = normal_icdf(p_a[inside]) - normal_icdf(p_b[inside])
        return (sigma[inside] / 2 * (self.gamma - margin)).sum() / len(y)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, sigma: Tensor, epoch: int) -> BatchLoss:
        batch, k = len(x), self.k
        copies = x.repeat_interleave(k, dim=0)
        logits = model(copies + noise_like(copies, sigma.repeat_interleave(k))).view(batch, k, -1)
        log_smoothed = torch.logsumexp(F.log_softmax(logits, dim=2), dim=1) - math.log(k)
        classification = F.nll_loss(log_smoothed, y)
        robustness = self.robustness(logits, y, sigma)
        lbd = 0.0 if epoch < self.warmup else self.lbd
        loss = classification + lbd * robustness
        terms = {"ce": classification.item(), "robust": robustness.item()}
        return BatchLoss(loss, logits.detach()[:, 0], terms)
