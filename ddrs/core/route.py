"""Routing each input to the expert that certifies it best, soundly, in two ways.

1. **The certified selector over experts** (sound through the memory). For each input, every
   expert (model j at its sigma s_j) votes on the same `samples` noise draws e_1..e_m from the
   selection stream (x + s_j e_i: common random numbers); with f_j the top class's share,
   the score is the radius CERTIFY would give at the certification's N and alpha,
   `predicted_certified_radius(f_j, s_j, N, alpha)`. The best score wins, ties to the smaller
   sigma (then the earlier expert). Rule "agree" only lets an expert win whose top class is
   the smallest-sigma expert's (a large sigma that changes the class is distrusted);
   "agree:P" does so only where the smallest sigma is confident, its top-class share at
   least P (elsewhere the largest radius wins, as with "radius"). The
   chosen expert then certifies the input with fresh noise, independent of the selection, so
   its certificate holds; the classifier as a whole (its expert depends on x) is made
   certifiable by the memory, as for a per-input sigma.

2. **Dual randomized smoothing** (Sun, Mao & Vechev, ICLR 2026), no memory needed. A router
   network r maps x to an expert index; it is smoothed too (its own sigma_r), so that
   g_r(x) = argmax_k P(r(x + sigma_r e) = k), and certified by CERTIFY: (k, R_route). Expert
   k's smoothed classifier g_k is certified: (c, R_cls). The classifier is
   h(x) = g_{g_r(x)}(x), and the answer is c with radius min(R_route, R_cls), abstaining if
   either abstains. Soundness (docs/METHODS.md): with probability >= 1 - alpha_r the router's
   certificate is right, so g_r = k on the ball of radius R_route and h = g_k there; given
   that k (a fixed function of x, not of the noise), with probability >= 1 - alpha_c expert
   k's certificate is right, g_k = c on the ball of radius R_cls. By the union bound both hold
   with probability >= 1 - alpha_r - alpha_c, and then h = c on the ball of radius
   min(R_route, R_cls). alpha is split: alpha_r = share x alpha, alpha_c = the rest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ddrs.core.checks import check_alpha, integer, probability
from ddrs.core.experts import Expert
from ddrs.core.families import GAUSSIAN, Family, family_of
from ddrs.core.noise import STREAM_ROUTER, block_seed
from ddrs.core.sigma import hard_votes, input_chunks
from ddrs.core.smooth import ABSTAIN, DEFAULTS, Certificate, Smooth, check_inputs
from ddrs.core.stats import predicted_certified_radius
from ddrs.core.torchutil import frozen_eval, model_device
from ddrs.errors import InputError

ROUTE_RULES = ("radius", "agree")
ROUTE_RULE_HELP = (
    "radius (the largest predicted radius wins), agree (only an expert whose top class is "
    "the smallest sigma's may win) or agree:P (agree only where the smallest sigma's "
    "top-class share is at least P, e.g. agree:0.8)"
)


def check_route_rule(rule: str) -> tuple[str, float]:
    """(rule, confidence) of a route rule's text: "radius", "agree" or "agree:P"
    (confidence P in [0, 1); plain "agree" is "agree:0")."""
    name, _, value = str(rule).partition(":")
    confidence = 0.0
    if value and name == "agree":
        try:
            confidence = float(value)
        except ValueError:
            confidence = math.nan
    if name not in ROUTE_RULES or (value and name != "agree") or not 0 <= confidence < 1:
        raise InputError(
            f"unknown route rule {rule!r}; use radius, agree or agree:P with P in [0, 1)"
        )
    return name, confidence


@dataclass(frozen=True)
class Routing:
    """Each input's expert (index into the experts), its sigma, the winning score, and every
    expert's score (B, E)."""

    expert: Tensor
    sigma: Tensor
    score: Tensor
    scores: Tensor


def expert_scores(
    experts: Sequence[Expert],
    x: Tensor,
    *,
    samples: int,
    n: int,
    alpha: float,
    seed: int = 0,
    keys: Sequence[int] | None = None,
    batch: int = 256,
    with_votes: bool = False,
    family: Family | str = GAUSSIAN,
) -> tuple[np.ndarray, ...]:
    """(top-class share, top class, predicted CERTIFY radius), each (B, E): every expert's
    hard votes on the same `samples` noise draws per input (selection stream). `with_votes`:
    also the vote counts (B, E, C). `family`: the noise, and the norm of the radius."""
    check_inputs(x, 1.0)
    family = family_of(family)
    samples, batch = integer("samples", samples), integer("batch", batch)
    integer("n (the certification's N)", n)
    check_alpha(alpha)
    keys = list(range(x.shape[0])) if keys is None else [int(k) for k in keys]
    if len(keys) != x.shape[0]:
        raise InputError(f"got {len(keys)} keys for {x.shape[0]} inputs")
    count, width = x.shape[0], len(experts)
    share, top = np.zeros((count, width)), np.zeros((count, width), dtype=np.int64)
    all_votes: np.ndarray | None = None
    sigmas = np.array([e.sigma for e in experts], dtype=np.float64)
    by_model: dict[int, list[int]] = {}
    for j, e in enumerate(experts):
        by_model.setdefault(id(e.model), []).append(j)
    device = model_device(experts[0].model)
    for lo, xs, chunk_noise in input_chunks(x, keys, samples * width, batch, seed, device, family):
        noise = chunk_noise.draw(samples, xs.shape[1:])
        for columns in by_model.values():
            model = experts[columns[0]].model
            candidates = torch.tensor(sigmas[columns], dtype=torch.float32, device=device)
            with frozen_eval(model), torch.inference_mode():
                votes = hard_votes(model, xs, candidates.expand(len(xs), -1), noise, batch)
            best = votes.max(dim=2)
            share[lo : lo + len(xs), columns] = (best.values / samples).cpu().numpy()
            top[lo : lo + len(xs), columns] = best.indices.cpu().numpy()
            if with_votes:
                if all_votes is None:
                    all_votes = np.zeros((count, width, votes.shape[2]))
                all_votes[lo : lo + len(xs), columns] = votes.cpu().numpy()
    radius = predicted_certified_radius(share, sigmas[None, :], n, alpha, family)
    return (share, top, radius, all_votes) if with_votes else (share, top, radius)


def route_by_certified_radius(
    experts: Sequence[Expert],
    x: Tensor,
    *,
    samples: int = 64,
    n: int = DEFAULTS.n,
    alpha: float = DEFAULTS.alpha,
    rule: str = ROUTE_RULES[0],
    seed: int = 0,
    keys: Sequence[int] | None = None,
    batch: int = 256,
    family: Family | str = GAUSSIAN,
) -> Routing:
    """The certified selector over experts (see the module's docstring); `n`, `alpha`: those
    of the certification that follows."""
    rule, confidence = check_route_rule(rule)
    share, top, scores = expert_scores(
        experts,
        x,
        samples=samples,
        n=n,
        alpha=alpha,
        seed=seed,
        keys=keys,
        batch=batch,
        family=family,
    )
    order = sorted(range(len(experts)), key=lambda j: (experts[j].sigma, j))
    ranked = scores[:, order]
    if rule == "agree":  # only experts whose top class is the smallest sigma's may win
        confident = share[:, order[:1]] >= confidence
        agree = top[:, order] == top[:, order[:1]]
        ranked = np.where(agree | ~confident, ranked, -1.0)
    best = np.asarray(order)[np.argmax(ranked, axis=1)]  # first maximum: the smaller sigma
    rows = np.arange(len(best))
    return Routing(
        expert=torch.from_numpy(best),
        sigma=torch.tensor([experts[j].sigma for j in best], dtype=torch.float32),
        score=torch.from_numpy(scores[rows, best]).float(),
        scores=torch.from_numpy(scores).float(),
    )


class ExpertCertifier:
    """CERTIFY / PREDICT each input with its own expert (one Smooth per distinct model), in
    groups, with the input's noise keys: the result does not depend on how inputs are
    grouped or batched."""

    def __init__(
        self,
        experts: Sequence[Expert],
        num_classes: int,
        *,
        seed: int = 0,
        amp: str | None = None,
        compile: bool = False,
        family: Family | str = GAUSSIAN,
    ):
        self.experts = list(experts)
        smooths: dict[int, Smooth] = {}
        for e in self.experts:
            if id(e.model) not in smooths:
                smooths[id(e.model)] = Smooth(
                    e.model, num_classes, seed=seed, amp=amp, compile=compile, family=family
                )
        self.smooth = [smooths[id(e.model)] for e in self.experts]

    def batch_size(self, batch: int | None, input_shape) -> int:
        return self.smooth[0].batch_size(batch, input_shape)

    def _groups(self, expert: Sequence[int]):
        for k in sorted(set(int(j) for j in expert)):
            yield k, [i for i, j in enumerate(expert) if int(j) == k]

    def certify_batch(
        self,
        x: Tensor,
        expert: Sequence[int],
        sigma: Tensor,
        n0: int,
        n: int,
        alpha: float,
        batch: int | None,
        keys: Sequence[int],
        pilot: int = 0,
        tolerance: float = 0.0,
        radius: float | None = None,
    ) -> list[Certificate]:
        """Input i certified by expert[i] at sigma[i] (its expert's, or one chosen for it);
        with `radius`, only whether it is certified at that radius (a sequential test)."""
        found: list[Certificate | None] = [None] * x.shape[0]
        for k, rows in self._groups(expert):
            smooth, group_keys = self.smooth[k], [keys[i] for i in rows]
            if radius is not None:
                certs = smooth.certify_batch_at_radius(
                    x[rows], sigma[rows], n0, n, alpha, radius, batch, group_keys
                )
            elif pilot:
                certs = smooth.certify_batch_adaptive(
                    x[rows], sigma[rows], n0, n, alpha, pilot, tolerance, batch, group_keys
                )
            else:
                certs = smooth.certify_batch(x[rows], sigma[rows], n0, n, alpha, batch, group_keys)
            for i, cert in zip(rows, certs):
                found[i] = cert
        return found

    def predict_batch(
        self,
        x: Tensor,
        expert: Sequence[int],
        sigma: Tensor,
        n: int,
        alpha: float,
        batch: int | None,
        keys: Sequence[int],
    ) -> list[int]:
        found = [ABSTAIN] * x.shape[0]
        for k, rows in self._groups(expert):
            answers = self.smooth[k].predict_batch(
                x[rows], sigma[rows], n, alpha, batch, [keys[i] for i in rows]
            )
            for i, answer in zip(rows, answers):
                found[i] = answer
        return found


# -- dual randomized smoothing ------------------------------------------------------------------
@dataclass(frozen=True)
class Router:
    """A router network: logits over the experts it was trained for (`expert_names`, in its
    class order), smoothed at its own `sigma`."""

    model: torch.nn.Module
    sigma: float
    expert_names: tuple[str, ...]


@dataclass(frozen=True)
class RoutedCertificate:
    """The dual certificate of one input: class c (or ABSTAIN) with radius
    min(route_radius, expert_radius); `expert` the certified route (-1: the router
    abstained), `sigma` its expert's (the router's without a route), `certificate` the
    expert's own CERTIFY answer (None without a route)."""

    predict: int
    radius: float
    expert: int
    route_radius: float
    expert_radius: float
    sigma: float
    certificate: Certificate | None


def router_seed(seed: int) -> int:
    """The router's noise is its own: a seed derived from the run's."""
    return block_seed(seed, STREAM_ROUTER, 0, 0) % (2**62)


def alpha_split(alpha: float, router_share: float) -> tuple[float, float]:
    """(alpha_r, alpha_c): the router's and the expert's failure probabilities."""
    alpha = check_alpha(alpha)
    share = probability("router alpha share", router_share)
    return alpha * share, alpha * (1 - share)


class DualSmoothing:
    """Memory-free routing: the smoothed router certifies a route, the routed expert certifies
    a class; the answer holds on the smaller ball (see the module's docstring)."""

    def __init__(
        self,
        router: Router,
        experts: Sequence[Expert],
        num_classes: int,
        *,
        seed: int = 0,
        amp: str | None = None,
        compile: bool = False,
        family: Family | str = GAUSSIAN,
    ):
        names = tuple(e.name for e in experts)
        if tuple(router.expert_names) != names:
            raise InputError(
                f"the router was trained for experts {list(router.expert_names)}, in that "
                f"order; got {list(names)} (give the same experts, in its order)"
            )
        self.router, self.experts = router, list(experts)
        engine = {"amp": amp, "compile": compile, "family": family}
        self.route_smooth = Smooth(router.model, len(names), seed=router_seed(seed), **engine)
        self.certifier = ExpertCertifier(experts, num_classes, seed=seed, **engine)

    def batch_size(self, batch: int | None, input_shape) -> int:
        return self.certifier.batch_size(batch, input_shape)

    def certify_batch(
        self,
        x: Tensor,
        *,
        n0: int,
        n: int,
        router_n: int,
        alpha: float,
        router_share: float = 0.5,
        batch: int | None = None,
        keys: Sequence[int],
    ) -> list[RoutedCertificate]:
        alpha_r, alpha_c = alpha_split(alpha, router_share)
        routes = self.route_smooth.certify_batch(
            x, self.router.sigma, n0, router_n, alpha_r, batch, keys
        )
        routed = [i for i, r in enumerate(routes) if r.predict != ABSTAIN]
        certs: list[Certificate | None] = [None] * x.shape[0]
        if routed:
            expert = [routes[i].predict for i in routed]
            sigma = torch.tensor([self.experts[k].sigma for k in expert], dtype=torch.float32)
            found = self.certifier.certify_batch(
                x[routed], expert, sigma, n0, n, alpha_c, batch, [keys[i] for i in routed]
            )
            for i, cert in zip(routed, found):
                certs[i] = cert
        answers = []
        for route, cert in zip(routes, certs):
            if cert is None:
                answers.append(
                    RoutedCertificate(ABSTAIN, 0.0, -1, 0.0, 0.0, self.router.sigma, None)
                )
                continue
            abstain = cert.predict == ABSTAIN
            radius = 0.0 if abstain else min(route.radius, cert.radius)
            answers.append(
                RoutedCertificate(
                    cert.predict,
                    radius,
                    route.predict,
                    route.radius,
                    cert.radius,
                    cert.sigma,
                    cert,
                )
            )
        return answers

    def predict_batch(
        self,
        x: Tensor,
        *,
        n: int,
        router_n: int,
        alpha: float,
        router_share: float = 0.5,
        batch: int | None = None,
        keys: Sequence[int],
    ) -> list[tuple[int, int, float]]:
        """PREDICT through the router: (class or ABSTAIN, expert or -1, sigma) per input. The
        probability of a class other than h(x) is at most alpha (alpha_r + alpha_c)."""
        alpha_r, alpha_c = alpha_split(alpha, router_share)
        routes = self.route_smooth.predict_batch(
            x, self.router.sigma, router_n, alpha_r, batch, keys
        )
        answers = [(ABSTAIN, -1, self.router.sigma)] * x.shape[0]
        routed = [i for i, k in enumerate(routes) if k != ABSTAIN]
        if routed:
            expert = [routes[i] for i in routed]
            sigma = torch.tensor([self.experts[k].sigma for k in expert], dtype=torch.float32)
            found = self.certifier.predict_batch(
                x[routed], expert, sigma, n, alpha_c, batch, [keys[i] for i in routed]
            )
            for i, k, c in zip(routed, expert, found):
                answers[i] = (c, k, self.experts[k].sigma)
        return answers
