"""SmoothAdv (Salman et al., NeurIPS 2019): adversarial training of the smoothed classifier.

Each input x gets m noise vectors sigma e_1..e_m, held fixed while an L2 attack finds the
delta, ||delta||_2 <= eps, that maximises the cross-entropy of the soft smoothed classifier

    L(delta) = -log( 1/m sum_j softmax(f(x + delta + sigma e_j)) )_y ,

with the model in eval mode and its weights frozen. The model is then trained with
cross-entropy on the m copies x + delta + sigma e_j. eps grows linearly over the first
`warmup` epochs: eps_t = min(eps, (t + 1) eps / warmup).

Defaults are the authors' released CIFAR-10 runs (PGD_2steps jobs: --epsilon 64 / 256,
--num-steps 2, --warmup 10, --num-noise-vec 1); see docs/METHODS.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from ddrs.core.checks import integer, number
from ddrs.core.torchutil import frozen_eval
from ddrs.errors import InputError
from ddrs.train.methods.base import BatchLoss, Method, noise_like

ATTACKS = ("pgd", "ddn")
DDN_GAMMA = 0.05  # DDN's norm update factor (their --gamma-DDN default)
DDN_MIN_LR = 0.01  # end of DDN's cosine step-size schedule


def smoothed_log_probs(model: nn.Module, x: Tensor, noise: Tensor) -> Tensor:
    """log(1/m sum_j softmax(f(x + noise_j))): x (B, *shape), noise (B, m, *shape) -> (B, C)."""
    batch, m = noise.shape[:2]
    logits = model((x.unsqueeze(1) + noise).flatten(0, 1)).view(batch, m, -1)
    return torch.logsumexp(F.log_softmax(logits, dim=2), dim=1) - math.log(m)


def _unit(g: Tensor) -> Tensor:
    """Each row scaled to L2 norm 1; a zero row becomes a random direction, as in their code."""
    norms = g.flatten(1).norm(dim=1)
    if bool((norms == 0).any()):
        g = torch.where((norms == 0).view(-1, *[1] * (g.dim() - 1)), torch.randn_like(g), g)
        norms = g.flatten(1).norm(dim=1)
    return g / norms.view(-1, *[1] * (g.dim() - 1))


def _project(x: Tensor, delta: Tensor, eps: float) -> Tensor:
    """Keep x + delta in [0, 1], then ||delta||_2 <= eps (shrinking keeps it in [0, 1])."""
    delta = (x + delta).clamp(0, 1) - x
    return delta.renorm(p=2, dim=0, maxnorm=eps)


def pgd_attack(
    model: nn.Module, x: Tensor, y: Tensor, noise: Tensor, eps: float, steps: int
) -> Tensor:
    """SmoothAdv-PGD: `steps` normalised-gradient ascent steps of size 2 eps / steps from 0."""
    delta = torch.zeros_like(x)
    step = 2 * eps / steps
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.nll_loss(smoothed_log_probs(model, x + delta, noise), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, delta)
        delta = _project(x, delta.detach() + step * _unit(grad), eps)
    return delta


def ddn_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    noise: Tensor,
    eps: float,
    steps: int,
    gamma: float = DDN_GAMMA,
) -> Tensor:
    """SmoothAdv-DDN (Rony et al. 2019 on the smoothed classifier).

    Unit gradient steps with a cosine step size (1 -> 0.01), then the perturbation is rescaled
    to a norm that shrinks by (1 - gamma) while the input is misclassified and grows by
    (1 + gamma) otherwise, starting at eps. Returns the smallest misclassifying delta seen
    (zero where none was found), shrunk to ||delta|| <= eps.
    """
    shape = (-1, *[1] * (x.dim() - 1))
    worst = torch.maximum(x, 1 - x).flatten(1).norm(dim=1)
    norm = torch.full_like(worst, eps)
    best_l2, best = worst.clone(), torch.zeros_like(x)
    delta = torch.zeros_like(x)
    for i in range(steps):
        # their scheduler steps before the update, so step i uses the schedule's value at i + 1
        lr = DDN_MIN_LR + (1 - DDN_MIN_LR) * (1 + math.cos(math.pi * (i + 1) / steps)) / 2
        delta.requires_grad_(True)
        log_probs = smoothed_log_probs(model, x + delta, noise)
        (grad,) = torch.autograd.grad(F.nll_loss(log_probs, y, reduction="sum"), delta)
        delta = delta.detach()
        is_adv = log_probs.argmax(1) != y
        l2 = delta.flatten(1).norm(dim=1)
        better = is_adv & (l2 < best_l2)
        best_l2 = torch.where(better, l2, best_l2)
        best = torch.where(better.view(shape), delta, best)
        delta = delta + lr * _unit(grad)
        norm = torch.minimum(norm * torch.where(is_adv, 1 - gamma, 1 + gamma), worst)
        delta = delta * (norm / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).view(shape)
        delta = (x + delta).clamp(0, 1) - x
    return best.renorm(p=2, dim=0, maxnorm=eps)


class SmoothAdv(Method):
    name = "smoothadv"

    def __init__(
        self,
        *,
        eps: float = 0.25,
        steps: int = 2,
        m: int = 1,
        warmup: int = 10,
        attack: str = "pgd",
    ):
        if not isinstance(attack, str) or attack.lower() not in ATTACKS:
            raise InputError(f"smoothadv setting attack must be one of {ATTACKS}, got {attack!r}")
        self.eps, self.attack = number("smoothadv setting eps", eps, minimum=0), attack.lower()
        self.steps = integer("smoothadv setting steps", steps)
        self.m = integer("smoothadv setting m", m)
        self.warmup = integer("smoothadv setting warmup", warmup)

    def settings(self) -> dict:
        return {
            "eps": self.eps,
            "steps": self.steps,
            "m": self.m,
            "warmup": self.warmup,
            "attack": self.attack,
        }

    def eps_at(self, epoch: int) -> float:
        return min(self.eps, (epoch + 1) * self.eps / self.warmup)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, noise: Tensor, eps: float) -> Tensor:
        """The attack's delta for inputs x under the fixed noise (B, m, *shape)."""
        if eps == 0:
            return torch.zeros_like(x)
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module  # no gradient sync is wanted for the attack's passes
        attack = pgd_attack if self.attack == "pgd" else ddn_attack
        with frozen_eval(model):
            return attack(model, x, y, noise, eps, self.steps)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, sigma: Tensor, epoch: int) -> BatchLoss:
        batch, m = len(x), self.m
        copies = x.repeat_interleave(m, dim=0)
        noise = noise_like(copies, sigma.repeat_interleave(m)).view(batch, m, *x.shape[1:])
        eps = self.eps_at(epoch)
        delta = self.perturb(model, x, y, noise, eps)
        logits = model(((x + delta).unsqueeze(1) + noise).flatten(0, 1))
        loss = F.cross_entropy(logits, y.repeat_interleave(m))
        noisy_logits = logits.detach().view(batch, m, -1)[:, 0]
        return BatchLoss(loss, noisy_logits, {"ce": loss.item(), "eps": eps})
