"""Noise families against cases with a known answer.

* L1, uniform noise: a classifier that thresholds one coordinate has an exact smoothed
  probability under U[-lambda, lambda]^d, clip((x_1 - t + lambda) / (2 lambda), 0, 1), and an
  exact L1 robustness radius |x_1 - t|; certificates must be wrong at most alpha of the time.
* The discrete Gaussian: its sampler's law is the rounded Gaussian's, and it is what makes
  smoothing sound in floating point: a classifier that reads the rounding of x + sigma e gets a
  false float certificate (an input within the certified radius is classified otherwise),
  and none with discrete sampling.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import binom, chisquare, norm
from torch import nn

from ddrs.core.families import DISCRETE, GAUSSIAN, UNIFORM, noise_family
from ddrs.core.lattice import SLACK, RoundedGaussian, draw_uniform, lattice_levels
from ddrs.core.noise import STREAM_ESTIMATION, noise_for
from ddrs.core.sampling import sample_counts
from ddrs.core.sigma import certified_sigma_search, grid_sigma_search, sigma_search
from ddrs.core.smooth import ABSTAIN, Smooth
from ddrs.core.stats import largest_radius
from ddrs.errors import InputError

THRESHOLD = 0.5


class FirstCoordinate(nn.Module):
    """Class 1 where x_1 > THRESHOLD: under U[-l, l]^d noise P(class 1) = clip((x_1 - t + l) /
    (2 l), 0, 1) exactly, and the smoothed classifier's exact L1 (and L2) radius is |x_1 - t|."""

    def forward(self, x):
        z = 100 * (x.flatten(1)[:, 0] - THRESHOLD)  # sharp logits: soft votes near hard ones
        return torch.stack([-z, z], dim=1)


def test_l1_certificates_of_uniform_noise_are_wrong_at_most_alpha_of_the_time():
    alpha, lam, count, n = 0.05, 0.5, 600, 1000
    g = torch.Generator().manual_seed(3)
    x = torch.rand(count, 1, 2, 2, generator=g)
    margin = x.flatten(1)[:, 0] - THRESHOLD
    smooth = Smooth(FirstCoordinate(), 2, seed=5, family=UNIFORM)
    certs = smooth.certify_batch(x, lam, 50, n, alpha)
    wrong = [
        c.predict != ABSTAIN and (c.predict != int(m > 0) or c.radius > abs(float(m)))
        for c, m in zip(certs, margin)
    ]
    assert sum(wrong) <= binom.ppf(1 - 1e-4, count, alpha)
    certified = [c for c in certs if c.predict != ABSTAIN]
    assert len(certified) > count / 2
    # the L1 radius is tight here: close to the exact radius where the estimate is sharp
    exact = 2 * lam * (np.clip((margin.abs().numpy() + lam) / (2 * lam), 0, 1) - 0.5)
    ratio = [c.radius / e for c, e in zip(certs, exact) if c.predict != ABSTAIN and e > 0.1]
    assert np.median(ratio) > 0.85
    # the L2 (Gaussian) formula on the same votes overstates the radius: the test can fail
    gaussian = [lam * norm.ppf(c.p_lower) for c in certified]
    exact_certified = [abs(float(margin[i])) for i, c in enumerate(certs) if c.predict != ABSTAIN]
    overstated = sum(r > e for r, e in zip(gaussian, exact_certified))
    assert overstated > binom.ppf(1 - 1e-4, count, alpha)


def test_the_families_radii_and_their_inverses():
    p = np.array([0.6, 0.9, 0.999])
    assert np.allclose(UNIFORM.radius(p, 0.5), 2 * 0.5 * (p - 0.5))
    assert np.allclose(GAUSSIAN.radius(p, 0.25), 0.25 * norm.ppf(p))
    assert np.allclose(DISCRETE.radius(p, 0.25), 0.25 * norm.ppf(p - SLACK))
    for family in (GAUSSIAN, UNIFORM, DISCRETE):
        r = family.radius(p, 0.3)
        assert np.allclose(family.p_needed(r, 0.3), p)
    # N samples reach at most 2 lambda (alpha^(1/N) - 1/2) in L1
    assert largest_radius(0.5, 1000, 0.001, UNIFORM) == pytest.approx(
        2 * 0.5 * (0.001 ** (1 / 1000) - 0.5)
    )


def test_uniform_noise_is_uniform_on_the_cube_and_keyed():
    e = noise_for(
        [0, 1], 4096, (8,), seed=1, stream=STREAM_ESTIMATION, device="cpu", family=UNIFORM
    )
    assert e.min() >= -1 and e.max() <= 1
    assert abs(float(e.mean())) < 0.02 and float(e.var()) == pytest.approx(1 / 3, rel=0.05)
    again = noise_for([1], 4096, (8,), 1, STREAM_ESTIMATION, "cpu", family=UNIFORM)
    assert torch.equal(e[1], again[0])


def near_and_far() -> torch.Tensor:
    """Two inputs, at L1 distance 0.45 and 0.06 from the threshold."""
    x = torch.full((2, 1, 2, 2), 0.5)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 0.95, 0.56
    return x


@pytest.mark.parametrize("search", [grid_sigma_search, certified_sigma_search])
def test_the_forward_searches_choose_a_lambda_per_input_under_l1(search):
    """The input far from the threshold gets a larger lambda than the one near it."""
    options = {"sigma_range": (0.05, 2.0), "grid": 12, "n": 1000, "alpha": 0.001}
    options = options if search is certified_sigma_search else {"spread": (0.1, 10.0)}
    found = search(FirstCoordinate(), near_and_far(), 0.2, family=UNIFORM, **options)
    assert found.sigma[0] > found.sigma[1]


def test_the_ascent_climbs_the_l1_surrogate():
    """From a lambda below both margins, where the surrogate lambda (psi_A - psi_B) grows with
    lambda, the ascent raises lambda and the surrogate for each input."""
    found = sigma_search(
        FirstCoordinate(), near_and_far(), 0.02, family=UNIFORM, iterations=30, lr=0.01, samples=8
    )
    assert (found.sigma > 0.04).all()
    assert (found.radius_after > found.radius_before).all()


# ------------------------------------------------------------------ the discrete Gaussian


@pytest.mark.parametrize("sigma", [0.01, 0.12])
def test_the_lattice_sampler_draws_the_rounded_gaussian(sigma):
    g = torch.Generator().manual_seed(0)
    u = draw_uniform(torch.empty(400_000, dtype=torch.int64), g)
    k = RoundedGaussian(sigma, "cpu").offsets(u).long()
    scale = 255 * sigma
    values = np.arange(int(k.min()), int(k.max()) + 1)
    expected = norm.cdf((values + 0.5) / scale) - norm.cdf((values - 0.5) / scale)
    observed = np.array([(k == v).sum().item() for v in values])
    keep = expected * len(k) > 20  # pool the tails
    f_obs = np.append(observed[keep], observed[~keep].sum())
    f_exp = np.append(expected[keep], 1 - expected[keep].sum()) * len(k)
    assert chisquare(f_obs, f_exp).pvalue > 1e-4
    # a Gaussian not rounded, or rounded at another scale, is told apart
    wrong = np.append((norm.cdf((values[keep] + 0.5) / (1.1 * scale))
                       - norm.cdf((values[keep] - 0.5) / (1.1 * scale))), 0) * len(k)  # fmt: skip
    wrong[-1] = len(k) - wrong[:-1].sum()
    assert chisquare(f_obs, wrong).pvalue < 1e-6


@pytest.mark.parametrize("sigma", [0.003, 0.25, 1.0])
def test_the_bucket_lookup_gives_searchsorteds_answer_everywhere(sigma):
    """Including at, just below and just above every threshold, and at both ends."""
    rounded = RoundedGaussian(sigma, "cpu")
    t = rounded.thresholds
    g = torch.Generator().manual_seed(1)
    u = torch.cat([t, t - 1, t + 1, torch.tensor([0, 2**62 - 1]),
                   draw_uniform(torch.empty(100_000, dtype=torch.int64), g)])  # fmt: skip
    u = u.clamp(0, 2**62 - 1)
    expected = (torch.searchsorted(t, u, right=True) - rounded.m).float()
    assert torch.equal(rounded.offsets(u), expected)


class LatticeRecorder(nn.Module):
    """Records what the classifier is given."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, z):
        self.seen.append(z.detach().clone())
        return torch.stack([z.flatten(1).mean(1), -z.flatten(1).mean(1)], dim=1)


def test_discrete_noise_gives_the_classifier_lattice_points_only_and_refuses_other_inputs():
    x = torch.randint(0, 256, (3, 1, 4, 4)).float() / 255
    model = LatticeRecorder()
    sample_counts(model, x, torch.tensor([0.1, 0.25, 0.5]), 300, 2, batch=128, family=DISCRETE)
    z = torch.cat(model.seen)
    assert torch.equal(torch.round(z * 255) / 255, z)  # every value an integer over 255
    assert (z < 0).any() and (z > 1).any()  # the noise is not clipped to the image
    with pytest.raises(InputError, match="8-bit images"):
        lattice_levels(torch.full((1, 4), 0.3))
    with pytest.raises(InputError, match="8-bit images"):
        Smooth(model, 2, family=DISCRETE).certify(torch.full((1, 4, 4), 0.3), 0.25, 10, 100, 0.01)
    with pytest.raises(InputError, match="--norm l1 use --noise float"):
        noise_family("l1", "discrete")


class RoundingReader(nn.Module):
    """Class 1 iff every value is a multiple of 2^-25. A real number almost never is, so with
    exact arithmetic the smoothed classifier is class 0 everywhere. In float32, x + s e with
    x >= 1/2 and s a power of two always is (the sum lands on a grid of 2^-25 or coarser),
    while x just below 1/2 lets the sum fall into finer binades: the classifier reads the
    rounding of the noisy input (the kind of classifier Voracek & Hein, ICLR 2023, build)."""

    def forward(self, z):
        scaled = z.flatten(1) * 2.0**25
        on_grid = (scaled == scaled.round()).all(dim=1)
        return torch.stack([(~on_grid).float(), on_grid.float()], dim=1)


def test_float_noise_certifies_a_radius_that_an_adversarial_example_breaks_discrete_does_not():
    sigma, n0, n, alpha = 0.25, 100, 1000, 0.001
    x = torch.full((3, 32, 32), 128.0) / 255  # an 8-bit image, every pixel 128
    adversarial = torch.full((3, 32, 32), 127.0) / 255  # every pixel one level darker
    distance = float((x - adversarial).norm())  # sqrt(3072) / 255 = 0.217

    floating = Smooth(RoundingReader(), 2, seed=0, family=GAUSSIAN)
    cert = floating.certify(x, sigma, n0, n, alpha)
    assert cert.predict == 1 and cert.radius > 2 * distance  # certified far beyond x'
    assert floating.predict(adversarial, sigma, n, alpha) == 0  # yet x' is class 0: false

    discrete = Smooth(RoundingReader(), 2, seed=0, family=DISCRETE)
    cert = discrete.certify(x, sigma, n0, n, alpha)
    other = discrete.predict(adversarial, sigma, n, alpha)
    assert not (cert.predict != ABSTAIN and cert.radius > distance and other != cert.predict)
    assert (cert.predict, other) == (0, 0)  # the classifier's real answer, at both points


def test_training_noise_of_the_l1_norm_is_uniform_of_half_width_sigma():
    from ddrs.train.methods import noise_like

    x, sigma = torch.zeros(4000, 8), torch.full((4000,), 0.3)
    e = noise_like(x, sigma, "l1")
    assert e.abs().max() <= 0.3 and float(e.var()) == pytest.approx(0.09 / 3, rel=0.05)
    assert noise_like(x, sigma).abs().max() > 0.3  # the Gaussian is not bounded
