"""The multi-scale cascade (Jeong & Shin, "Multi-scale Diffusion Denoised Smoothing",
NeurIPS 2023): memory-free, order-free routing among experts with no router to train.

The classifier. Experts are smoothed at sigma_1 > sigma_2 > ... > sigma_K (largest first);
p_j(c; x) is expert j's smoothed probability of class c. For a threshold p0 >= 1/2, the
cascade h(x) is the class c of the first level k (from the largest sigma down) whose smoothed
classifier is confident, p_k(c; x) > p0; it abstains when no level is.

The certificate. h(x + d) = c for every ||d|| < R when (i) level k stays confident in c and
(ii) every larger level j < k gives no class other than c a probability above p0 (a larger
level that becomes confident in c itself answers c too). x -> sigma Phi^-1(p(c; x)) is
1-Lipschitz for every class (Salman et al., 2019, Lemma 2), so with pA_lower <= p_k(c; x) and
upper bounds u_j(c') >= p_j(c'; x),
    R_k = sigma_k (Phi^-1(pA_lower) - Phi^-1(p0))                                 (i)
    R_j = sigma_j (Phi^-1(p0) - Phi^-1(max_{c' != c} u_j(c')))   for every j < k    (ii)
    R   = min(R_k, min_{j<k} R_j),  abstaining when R <= 0.
This is the paper's radius (its Theorem on cascaded smoothing; their code bounds the other
classes at each larger level the same way, `off_class_upper_radius`).

The statistics. Every level draws CERTIFY's samples (n0 to select its class, n to estimate)
on its own expert's keyed noise, and computes, at alpha_l = alpha / K (K levels, whichever
are visited), one lower bound for its selected class (alpha_l / 2) and an upper bound for
every class (alpha_l / (2 C), Bonferroni over the C classes). With probability >= 1 - alpha
every bound of every level holds (union bound); then whichever level answers, its certificate
is true. Which level answers depends on the samples, but the event "all bounds hold" does
not, so the stopping rule costs nothing. (The paper's code gives stage s the level alpha /
(s + 1), whose sum over stages exceeds alpha; we split alpha evenly instead.)

Levels are visited only as far as needed: an input confident at the largest sigma costs one
certification.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm
from torch import Tensor

from ddrs.core.checks import check_alpha
from ddrs.core.experts import Expert
from ddrs.core.families import GAUSSIAN, Family, family_of
from ddrs.core.smooth import ABSTAIN, Smooth
from ddrs.core.stats import clopper_pearson_lower, clopper_pearson_upper
from ddrs.errors import InputError


def check_p0(p0) -> float:
    """The cascade's confidence threshold: a probability in [1/2, 1)."""
    if not isinstance(p0, (int, float)) or isinstance(p0, bool) or not 0.5 <= p0 < 1:
        raise InputError(f"--cascade P0 must be a probability in [0.5, 1), got {p0!r}")
    return float(p0)


@dataclass(frozen=True)
class LevelVotes:
    """One level's samples for one input: the class chosen on n0 samples, and the counts
    (C,) of the n estimation samples."""

    sigma: float
    selected: int
    counts: np.ndarray


@dataclass(frozen=True)
class CascadeCertificate:
    """The cascade's answer for one input: class (or ABSTAIN) and radius; `expert` the
    answering level's expert (-1: none answered), `level_radius` R_k, `guard_radius` the
    smallest R_j of the larger levels (inf when none), `levels` how many levels sampled."""

    predict: int
    radius: float
    expert: int
    sigma: float
    level_radius: float
    guard_radius: float
    levels: int


def level_bounds(level: LevelVotes, alpha_level: float) -> tuple[float, np.ndarray]:
    """(lower bound of the selected class's probability, upper bounds of every class's), all
    holding together with probability >= 1 - alpha_level."""
    n, classes = int(level.counts.sum()), len(level.counts)
    lower = float(clopper_pearson_lower(level.counts[level.selected], n, alpha_level / 2))
    uppers = clopper_pearson_upper(level.counts, n, alpha_level / (2 * classes))
    return lower, np.asarray(uppers)


def cascade_certificate(
    levels: Sequence[LevelVotes],
    order: Sequence[int],
    p0: float,
    alpha: float,
    total_levels: int,
    *,
    guard: bool = True,
) -> CascadeCertificate | None:
    """The certificate from the levels sampled so far (`levels[i]` is expert `order[i]`,
    largest sigma first), or None when none of them is confident yet and more remain.
    `guard=False` drops condition (ii) (for the tests: it is what makes the cascade sound)."""
    alpha_level = check_alpha(alpha) / total_levels
    threshold = norm.ppf(p0)
    uppers_above: list[tuple[float, np.ndarray]] = []
    for i, level in enumerate(levels):
        lower, uppers = level_bounds(level, alpha_level)
        if lower > p0:
            c = level.selected
            level_radius = level.sigma * (float(norm.ppf(lower)) - threshold)
            guard_radius = math.inf
            for sigma, above in uppers_above:
                others = np.delete(above, c)
                guard_radius = min(guard_radius, sigma * (threshold - norm.ppf(others.max())))
            radius = min(level_radius, guard_radius) if guard else level_radius
            if radius <= 0:
                return CascadeCertificate(
                    ABSTAIN, 0.0, order[i], level.sigma, level_radius, guard_radius, i + 1
                )
            return CascadeCertificate(
                c, float(radius), order[i], level.sigma, level_radius, guard_radius, i + 1
            )
        uppers_above.append((level.sigma, uppers))
    if len(levels) < total_levels:
        return None
    last = levels[-1].sigma if levels else math.nan
    return CascadeCertificate(ABSTAIN, 0.0, -1, last, 0.0, math.inf, len(levels))


class Cascade:
    """Certify (or predict) each input with the cascade over `experts` at threshold p0: the
    levels are the experts from the largest sigma down; each input samples only the levels it
    needs (all inputs of a level in one engine call)."""

    def __init__(
        self,
        experts: Sequence[Expert],
        num_classes: int,
        p0: float,
        *,
        seed: int = 0,
        amp: str | None = None,
        compile: bool = False,
        family: Family | str = GAUSSIAN,
    ):
        if family_of(family) is not GAUSSIAN:
            raise InputError(
                "the cascade certifies L2 radii with float Gaussian noise: it takes neither "
                "--norm l1 nor --noise discrete"
            )
        self.experts, self.p0 = list(experts), check_p0(p0)
        if any(math.isnan(e.sigma) for e in self.experts):
            raise InputError(
                "the cascade runs experts at their own sigmas: give --expert "
                "SOURCE:SIGMA (or --experts)"
            )
        self.order = sorted(range(len(self.experts)), key=lambda j: (-self.experts[j].sigma, j))
        smooths: dict[int, Smooth] = {}
        for e in self.experts:
            if id(e.model) not in smooths:
                smooths[id(e.model)] = Smooth(
                    e.model, num_classes, seed=seed, amp=amp, compile=compile
                )
        self.smooth = [smooths[id(e.model)] for e in self.experts]

    def batch_size(self, batch: int | None, input_shape) -> int:
        return self.smooth[0].batch_size(batch, input_shape)

    def certify_batch(
        self,
        x: Tensor,
        *,
        n0: int,
        n: int,
        alpha: float,
        batch: int | None = None,
        keys: Sequence[int],
        guard: bool = True,
    ) -> list[CascadeCertificate]:
        """The cascade's certificate of each input (see the module's docstring)."""
        if len(keys) != x.shape[0]:
            raise InputError(f"got {len(keys)} keys for {x.shape[0]} inputs")
        votes: list[list[LevelVotes]] = [[] for _ in range(x.shape[0])]
        found: list[CascadeCertificate | None] = [None] * x.shape[0]
        for k in self.order:
            todo = [i for i in range(x.shape[0]) if found[i] is None]
            if not todo:
                break
            sigma = self.experts[k].sigma
            selected, counts = self.smooth[k].votes(
                x[todo], sigma, n0, n, batch, [keys[i] for i in todo]
            )
            for row, i in enumerate(todo):
                votes[i].append(LevelVotes(sigma, int(selected[row]), counts[row].numpy()))
                found[i] = cascade_certificate(
                    votes[i],
                    self.order[: len(votes[i])],
                    self.p0,
                    alpha,
                    len(self.order),
                    guard=guard,
                )
        return found

    def certify_thresholds(
        self,
        x: Tensor,
        thresholds: Sequence[float],
        *,
        n0: int,
        n: int,
        alpha: float,
        batch: int | None = None,
        keys: Sequence[int],
    ) -> dict[float, list[CascadeCertificate]]:
        """{p0: each input's certificate at p0}, from one draw of every level's samples: to
        choose p0 on held-out images at the cost of K certifications. Equal to certify_batch
        at each p0, since a level's samples depend only on its input's noise key."""
        if len(keys) != x.shape[0]:
            raise InputError(f"got {len(keys)} keys for {x.shape[0]} inputs")
        drawn = [
            self.smooth[k].votes(x, self.experts[k].sigma, n0, n, batch, keys) for k in self.order
        ]
        levels = [
            [
                LevelVotes(self.experts[k].sigma, int(selected[i]), counts[i].numpy())
                for k, (selected, counts) in zip(self.order, drawn)
            ]
            for i in range(x.shape[0])
        ]
        total = len(self.order)
        return {
            p0: [cascade_certificate(v, self.order, check_p0(p0), alpha, total) for v in levels]
            for p0 in thresholds
        }

    def predict_batch(
        self,
        x: Tensor,
        *,
        n: int,
        alpha: float,
        batch: int | None = None,
        keys: Sequence[int],
        n0: int = 100,
    ) -> list[tuple[int, int, float]]:
        """The cascade's class at x, (class or ABSTAIN, expert or -1, sigma): the certificate
        at radius 0 (a class only when it holds at x itself)."""
        found = self.certify_batch(x, n0=n0, n=n, alpha=alpha, batch=batch, keys=keys)
        return [(c.predict, c.expert, c.sigma) for c in found]
