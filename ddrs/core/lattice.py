"""The Gaussian rounded to the 1/255 lattice, sampled exactly (Voracek & Hein, ICLR 2023).

An 8-bit image x has values k/255. Its noisy copies are (k + K)/255, with each K an integer
drawn from the rounded Gaussian, P(K <= j) = Phi((j + 1/2) / (255 sigma)): then x + K/255 is
round(x + sigma e) for e ~ N(0, I), so the smoothed classifier is f o round smoothed by the
exact Gaussian, and Cohen's certificate sigma Phi^-1(pA_lower) holds for it. Every noisy input
is an integer divided by 255 in float32, a function of that integer alone: no rounding of the
noise is left for a classifier to read.

K is drawn by comparing a uniform integer u in [0, 2^62) with integer thresholds T_j, the
cdf times 2^62 rounded to the nearest integer, computed with 128-bit arithmetic (mpmath) over
|j| <= TAIL * 255 sigma + 1 (the mass beyond is below 2^-66). Each threshold is within 2^-63
of the exact cdf, so one coordinate's law is within (number of thresholds + 2) 2^-63 of the
rounded Gaussian in total variation, and one noisy input's within d times that. With
sigma <= MAX_SIGMA and d <= MAX_DIM this is below SLACK, which the certificate subtracts from
pA_lower (a deterministic correction: the probability under the sampled law is at most SLACK
above the one under the exact law).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ddrs.errors import InputError

LEVELS = 255
BITS = 62
TAIL = 9.5
MAX_SIGMA = 4.0
MAX_DIM = 1 << 24
SLACK = 1e-7  # >= MAX_DIM * (2 * (TAIL * 255 * MAX_SIGMA + 2) + 2) * 2^-63 (3.7e-8)


def check_sigma(sigma: float) -> None:
    if not 0 < sigma <= MAX_SIGMA:
        raise InputError(
            f"--noise discrete takes sigma in (0, {MAX_SIGMA:g}], got {sigma:g}: use --noise float"
        )


def check_dim(dim: int) -> None:
    if dim > MAX_DIM:
        raise InputError(
            f"--noise discrete takes inputs of at most {MAX_DIM} values, got {dim}: use "
            "--noise float"
        )


def lattice_levels(x: Tensor) -> Tensor:
    """The 8-bit levels k of inputs whose every value is k/255 (as float32 k/255 is), as float32
    integers; anything else is refused in one line."""
    levels = torch.round(x.float() * LEVELS)
    if not torch.equal(levels / LEVELS, x.float()) or levels.min() < 0 or levels.max() > LEVELS:
        raise InputError(
            "--noise discrete needs 8-bit images (every value k/255, k = 0..255, as the image "
            "loaders give them); these inputs are not: use --noise float"
        )
    return levels


@functools.lru_cache(maxsize=256)
def _thresholds(sigma: float) -> tuple[int, Tensor]:
    """(m, T): T[i] = round(2^BITS Phi((i - m + 1/2) / (255 sigma))) for i = 0..2m-1."""
    import mpmath

    check_sigma(sigma)
    with mpmath.workprec(128):
        scale = mpmath.mpf(sigma) * LEVELS
        m = math.ceil(TAIL * LEVELS * sigma) + 1
        top = mpmath.mpf(2) ** BITS
        upper = [  # Phi at j + 1/2 for j = 0..m-1; the lower half by symmetry
            int(mpmath.nint(mpmath.ncdf((j + mpmath.mpf(0.5)) / scale) * top)) for j in range(m)
        ]
    lower = [(1 << BITS) - t for t in reversed(upper)]
    return m, torch.tensor(lower + upper, dtype=torch.int64)


BUCKET_BITS = 16  # the lookup's buckets: the top 16 of the uniform integer's 62 bits


@functools.lru_cache(maxsize=64)
def _buckets(sigma: float) -> tuple[Tensor, Tensor, Tensor]:
    """A lookup that gives searchsorted's answer with one comparison: for each bucket of
    uniform integers [b 2^46, (b + 1) 2^46), the count of thresholds <= its start, the first
    threshold above its start, and whether a second threshold lies inside it (then the
    bucket's integers are searched, a few in the tails)."""
    _, thresholds = _thresholds(sigma)
    starts = torch.arange(1 << BUCKET_BITS, dtype=torch.int64) << (BITS - BUCKET_BITS)
    below = torch.searchsorted(thresholds, starts, right=True)
    padded = torch.cat([thresholds, torch.tensor([1 << BITS, 1 << BITS])])
    ends = starts + (1 << (BITS - BUCKET_BITS))
    return below, padded[below], padded[below + 1] < ends


class RoundedGaussian:
    """Integer offsets K of the rounded Gaussian at one sigma, from uniform integers."""

    def __init__(self, sigma: float, device) -> None:
        self.m, thresholds = _thresholds(float(sigma))
        self.thresholds = thresholds.to(device)
        below, self.next, self.crowded = (t.to(device) for t in _buckets(float(sigma)))
        self.first = (below - self.m).float()  # K at each bucket's start

    def offsets(self, uniform: Tensor) -> Tensor:
        """K for each uniform integer in [0, 2^BITS), as float32: the number of thresholds at
        or below it, less m (what searchsorted gives, by the bucket lookup)."""
        bucket = uniform >> (BITS - BUCKET_BITS)
        offsets = torch.take(self.first, bucket)
        offsets += uniform >= torch.take(self.next, bucket)
        crowded = torch.take(self.crowded, bucket)
        if crowded.any():
            above = torch.searchsorted(self.thresholds, uniform[crowded], right=True)
            offsets[crowded] = (above - self.m).float()
        return offsets


def draw_uniform(out: Tensor, generator: torch.Generator) -> Tensor:
    """Fill an int64 tensor with uniform integers in [0, 2^BITS)."""
    return out.random_(0, 1 << BITS, generator=generator)
