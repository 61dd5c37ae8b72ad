"""Noise families: which noise smooths the base classifier, and in which norm the certified
radius is. Each input x_i is smoothed at its own scale s_i (sigma or lambda, pixel units):

    gaussian  L2  x + s e, e ~ N(0, I)                 R = s Phi^-1(pA_lower)
              (Cohen, Rosenfeld & Kolter, ICML 2019, Theorem 1 with pB = 1 - pA)
    uniform   L1  x + s e, e ~ U[-1, 1]^d (half-width   R = 2 s (pA_lower - 1/2)
              lambda = s)                               (Yang et al., "Randomized Smoothing of
                                                        All Shapes and Sizes", ICML 2020)
    discrete  L2  the Gaussian rounded to the 1/255     R = s Phi^-1(pA_lower)
              lattice of 8-bit images, sampled exactly  (Voracek & Hein, ICLR 2023)

The discrete family is sound in floating point: for x on the lattice, x + round(s e) equals
round(x + s e), so smoothing f with it is smoothing f o round with the exact Gaussian, and
every noisy input is a lattice point computed without rounding (core/lattice.py). The float
families add floating-point noise, whose rounding a classifier can read (docs/METHODS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import norm as normal
from torch import Tensor

from ddrs.core.lattice import SLACK
from ddrs.errors import InputError

NORMS = ("l2", "l1")
NOISES = ("float", "discrete")


@dataclass(frozen=True)
class Family:
    """A noise family: its name, the norm of its radius, and its name for the scale s."""

    name: str
    norm: str
    scale: str  # "sigma" or "lambda", for messages

    @property
    def discrete(self) -> bool:
        return self.name == "discrete"

    def radius(self, p_lower, s):
        """The certified radius of a class whose probability is at least p_lower (>= 1/2)."""
        p, s = np.asarray(p_lower, dtype=np.float64), np.asarray(s, dtype=np.float64)
        if self.discrete:  # the sampled law's distance to the exact one (lattice.py)
            p = p - SLACK
        if self.norm == "l1":
            out = 2.0 * s * (p - 0.5)
        else:
            out = s * normal.ppf(p)
        return float(out) if out.ndim == 0 else out

    def p_needed(self, radius, s):
        """The class probability that certifies `radius` at scale s (the inverse of radius)."""
        r, s = np.asarray(radius, dtype=np.float64), np.asarray(s, dtype=np.float64)
        slack = SLACK if self.discrete else 0.0
        if self.norm == "l1":
            return 0.5 + r / (2.0 * s) + slack
        return normal.cdf(r / s) + slack

    def surrogate(self, s: Tensor, p_a: Tensor, p_b: Tensor) -> Tensor:
        """A differentiable radius from soft class probabilities pA > pB (the sigma searches):
        s/2 (Phi^-1(pA) - Phi^-1(pB)) for L2, s (pA - pB) for L1."""
        if self.norm == "l1":
            return s * (p_a - p_b)
        return s / 2 * (normal_icdf(p_a) - normal_icdf(p_b))

    def standard(self, out: Tensor, generator: torch.Generator) -> Tensor:
        """Fill `out` with standard noise of a float family (N(0, 1) or U[-1, 1]); the
        discrete family's searches draw its Gaussian."""
        if self.norm == "l1":
            return out.uniform_(-1.0, 1.0, generator=generator)
        return torch.randn(out.shape, generator=generator, out=out)


def normal_icdf(p: Tensor) -> Tensor:
    """Phi^-1, differentiable."""
    return math.sqrt(2.0) * torch.erfinv(2.0 * p - 1.0)


GAUSSIAN = Family("gaussian", "l2", "sigma")
UNIFORM = Family("uniform", "l1", "lambda")
DISCRETE = Family("discrete", "l2", "sigma")
FAMILIES = {f.name: f for f in (GAUSSIAN, UNIFORM, DISCRETE)}


def noise_family(norm: str = "l2", noise: str = "float") -> Family:
    """The family of `--norm` and `--noise`; other combinations in one line."""
    if norm not in NORMS:
        raise InputError(f"unknown --norm {norm!r}; choose l2 (Gaussian) or l1 (uniform noise)")
    if noise not in NOISES:
        raise InputError(f"unknown --noise {noise!r}; choose float or discrete")
    if noise == "discrete":
        if norm != "l2":
            raise InputError(
                "--noise discrete samples the Gaussian of --norm l2; with --norm l1 use "
                "--noise float"
            )
        return DISCRETE
    return UNIFORM if norm == "l1" else GAUSSIAN


def family_of(family: Family | str | None) -> Family:
    """A family given by itself or by name (None: gaussian)."""
    if family is None:
        return GAUSSIAN
    if isinstance(family, Family):
        return family
    if family not in FAMILIES:
        raise InputError(f"unknown noise family {family!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[family]
