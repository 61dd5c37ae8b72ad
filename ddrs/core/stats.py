"""The statistics of randomized smoothing: pure functions of vote counts.

All bounds are exact (Clopper-Pearson), as in Cohen, Rosenfeld & Kolter (2019).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import beta, binomtest

from ddrs.core.checks import check_alpha
from ddrs.core.families import GAUSSIAN, Family
from ddrs.errors import InputError


def clopper_pearson_lower(successes, trials, alpha: float):
    """One-sided (1 - alpha) lower confidence bound on a binomial proportion.

    P(p >= bound) >= 1 - alpha. Equal to the lower end of the two-sided 1 - 2 alpha
    Clopper-Pearson interval (what Cohen et al. compute with `proportion_confint(...,
    alpha=2 * alpha, method="beta")`). Accepts scalars or arrays; 0 successes give 0.
    """
    check_alpha(alpha)
    k = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    if np.any(n < 1) or np.any(k < 0) or np.any(k > n):
        raise InputError("need 0 <= successes <= trials and trials >= 1")
    with np.errstate(invalid="ignore"):
        bound = beta.ppf(alpha, k, n - k + 1)
    bound = np.where(k == 0, 0.0, bound)
    return float(bound) if bound.ndim == 0 else bound


def clopper_pearson_upper(successes, trials, alpha: float):
    """One-sided (1 - alpha) upper confidence bound on a binomial proportion:
    P(p <= bound) >= 1 - alpha; n successes of n give 1. Scalars or arrays."""
    check_alpha(alpha)
    k = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    if np.any(n < 1) or np.any(k < 0) or np.any(k > n):
        raise InputError("need 0 <= successes <= trials and trials >= 1")
    with np.errstate(invalid="ignore"):
        bound = beta.ppf(1 - alpha, k + 1, n - k)
    bound = np.where(k == n, 1.0, bound)
    return float(bound) if bound.ndim == 0 else bound


def two_sided_binomial_pvalue(count_a: int, count_b: int) -> float:
    """p-value of H0: P(A) = P(B), given the counts of the top two classes (PREDICT's test)."""
    if count_a + count_b == 0:
        return 1.0
    return float(binomtest(int(count_a), int(count_a + count_b), 0.5).pvalue)


def radius_from_p_lower(p_lower, sigma, family: Family = GAUSSIAN):
    """Certified radius: L2 sigma * Phi^-1(pA_lower) (Cohen et al., Theorem 1 with pB = 1 - pA),
    or the family's (families.py)."""
    return family.radius(p_lower, sigma)


def predicted_certified_radius(
    frequency, sigma, n: int, alpha: float, family: Family = GAUSSIAN
) -> np.ndarray:
    """The radius CERTIFY would return if the top class got `frequency` of its N votes.

        pA_lower = Beta^-1(alpha; f N, N (1 - f) + 1)     (Clopper-Pearson, f N votes of N)
        R        = sigma * Phi^-1(pA_lower)  if pA_lower >= 1/2,  else 0 (CERTIFY abstains)

    f N need not be an integer (the beta quantile is continuous in it); f = 0 gives 0.
    Arrays broadcast; pixel units like sigma. Another family: its radius of pA_lower.
    """
    f = np.asarray(frequency, dtype=np.float64)
    s = np.asarray(sigma, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        p_lower = beta.ppf(alpha, f * n, n * (1.0 - f) + 1.0)
    p_lower = np.where(f > 0, p_lower, 0.0)
    radius = np.maximum(family.radius(np.maximum(p_lower, 0.5), s), 0.0)
    return np.where(p_lower >= 0.5, radius, 0.0)


def input_specific_sample_size(
    frequency: float,
    sigma: float,
    n: int,
    alpha: float,
    tolerance: float,
    n_min: int = 100,
    family: Family = GAUSSIAN,
) -> int:
    """How many estimation samples an input needs (Chen et al., AAAI 2022, in spirit).

    With `frequency` the selected class's share of an independent pilot, the radius CERTIFY
    is predicted to give at size m is `predicted_certified_radius(frequency, sigma, m, alpha)`.
    Returns the smallest m on the ladder n, n/2, n/4, ... (not below n_min) whose predicted
    radius is within `tolerance` of the one predicted at n; 0 when the prediction at n is to
    abstain (the input is not worth sampling).
    """
    full = float(predicted_certified_radius(frequency, sigma, n, alpha, family))
    if full <= 0:
        return 0
    best, m = n, n
    while m // 2 >= n_min:
        m //= 2
        if float(predicted_certified_radius(frequency, sigma, m, alpha, family)) < full - tolerance:
            break
        best = m
    return best


FIRST_LOOK = 100  # a test at a radius looks at 100, 200, 400, ... samples, and at N


def radius_looks(n: int) -> list[int]:
    """When a test at a radius looks at its votes: after FIRST_LOOK samples, then each time
    their number doubles, and at n."""
    looks, m = [], min(FIRST_LOOK, n)
    while m < n:
        looks.append(m)
        m *= 2
    return [*looks, n]


def look_alpha(alpha: float, looks: list[int]) -> float:
    """Each look's share of alpha: a union bound over the looks, so the chance that any look
    certifies an input that is not robust at the radius is at most alpha, whichever look the
    test stops at (Voracek, NeurIPS 2024: confidence sequences by a union bound over
    doubling times)."""
    return alpha / len(looks)


def radius_decision(count, trials, p_needed, alpha_look: float) -> np.ndarray:
    """A look's verdict on H0 "pA < p_needed": +1 certified (Clopper-Pearson's lower bound at
    alpha_look reaches p_needed), -1 refuted (its upper bound is below), 0 look again."""
    lower = clopper_pearson_lower(count, trials, alpha_look)
    upper = clopper_pearson_upper(count, trials, alpha_look)
    return np.where(lower >= p_needed, 1, np.where(upper < p_needed, -1, 0))


def largest_radius(sigma, n: int, alpha: float, family: Family = GAUSSIAN):
    """The largest radius N samples at failure probability alpha can certify: every vote for
    the class gives pA_lower = alpha^(1/N), so R = sigma * Phi^-1(alpha^(1/N)) (L2); 0 when
    that is below 1/2 (such an N certifies nothing)."""
    p = alpha ** (1.0 / n)
    return family.radius(p, sigma) if p > 0.5 else 0.0 * sigma


def check_radius_reach(
    radius: float, sigma: float | None, n: int, alpha: float, family: Family = GAUSSIAN
) -> None:
    """A radius to certify at (`--radius`) must be positive and, at a known sigma, within what
    n samples at alpha split over the looks can ever certify."""
    if not math.isfinite(radius) or radius <= 0:
        raise InputError(f"--radius must be a positive number, got {radius}")
    if sigma is None:
        return
    reach = largest_radius(sigma, n, look_alpha(alpha, radius_looks(n)), family)
    if radius >= reach:
        raise InputError(
            f"--radius {radius:g} cannot be certified at sigma {sigma:g} with --n {n} and "
            f"--alpha {alpha:g} (at most {reach:.3f}): raise --n or sigma, or lower the radius"
        )
