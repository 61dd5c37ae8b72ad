"""Consistency regularisation (Jeong & Shin, NeurIPS 2020).

With m noisy copies x + sigma e_j, p_j = softmax(f(x + sigma e_j)) and p_bar = 1/m sum_j p_j:

    loss = 1/m sum_j CE(f(x + sigma e_j), y)
         + lbd * 1/m sum_j KL(p_bar || p_j)
         + eta * H(p_bar)

averaged over the batch. The KL direction (target p_bar, gradients flowing through both
sides) and the entropy term are those of the authors' `consistency_loss` (loss='default').
With per-sample sigma, each input's copies use its own sigma_i.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ddrs.core.checks import integer, number
from ddrs.train.methods.base import BatchLoss, Method, noise_like


def consistency_terms(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Mean KL(p_bar || p_j) and mean entropy H(p_bar) for logits (B, m, C)."""
    log_p = F.log_softmax(logits, dim=2)
    p_bar = log_p.exp().mean(dim=1, keepdim=True)
    kl = F.kl_div(log_p, p_bar.expand_as(log_p), reduction="none").sum(dim=2).mean()
    entropy = -(p_bar * p_bar.clamp_min(1e-20).log()).sum(dim=2).mean()
    return kl, entropy


class Consistency(Method):
    name = "consistency"

    def __init__(self, *, m: int = 2, lbd: float = 10.0, eta: float = 0.5):
        self.m = integer("consistency setting m", m)
        self.lbd = number("consistency setting lbd", lbd, minimum=0)
        self.eta = number("consistency setting eta", eta, minimum=0)

    def settings(self) -> dict:
        return {"m": self.m, "lbd": self.lbd, "eta": self.eta}

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, sigma: Tensor, epoch: int) -> BatchLoss:
        batch, m = len(x), self.m
        copies = x.repeat_interleave(m, dim=0)
        logits = model(copies + noise_like(copies, sigma.repeat_interleave(m)))
        ce = F.cross_entropy(logits, y.repeat_interleave(m, dim=0))
        kl, entropy = consistency_terms(logits.view(batch, m, -1))
        loss = ce + self.lbd * kl + self.eta * entropy
        terms = {"ce": ce.item(), "kl": kl.item(), "entropy": entropy.item()}
        return BatchLoss(loss, logits.detach().view(batch, m, -1)[:, 0], terms)
