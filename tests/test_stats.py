"""Statistics against closed forms: Clopper-Pearson, the binomial test, and certificates of a
linear classifier, whose smoothed probabilities and exact radius are known."""

import numpy as np
import pytest
import torch
from scipy.stats import beta, binom, binomtest, norm

from ddrs.core.smooth import ABSTAIN, Smooth
from ddrs.core.stats import clopper_pearson_lower, radius_from_p_lower, two_sided_binomial_pvalue
from ddrs.errors import InputError


@pytest.mark.parametrize(
    "k,n,alpha",
    [(0, 10, 0.05), (1, 10, 0.05), (10, 10, 0.001), (9990, 10000, 0.001), (500, 1000, 0.01)],
)
def test_clopper_pearson_matches_beta_quantile(k, n, alpha):
    expected = 0.0 if k == 0 else beta.ppf(alpha, k, n - k + 1)
    assert clopper_pearson_lower(k, n, alpha) == pytest.approx(expected, abs=1e-12)


def test_clopper_pearson_is_vectorised_and_below_the_estimate():
    k = np.array([0, 5, 50, 99, 100])
    bounds = clopper_pearson_lower(k, 100, 0.01)
    assert bounds.shape == (5,)
    assert np.all(bounds <= k / 100) and bounds[0] == 0.0
    assert np.all(np.diff(bounds) > 0)


def test_clopper_pearson_covers_the_true_proportion_at_least_one_minus_alpha():
    rng = np.random.default_rng(0)
    p, n, alpha, trials = 0.9, 200, 0.05, 4000
    bounds = clopper_pearson_lower(rng.binomial(n, p, size=trials), n, alpha)
    misses = int(np.sum(bounds > p))
    assert misses <= binom.ppf(1 - 1e-6, trials, alpha)


def test_binomial_pvalue_matches_scipy():
    assert two_sided_binomial_pvalue(60, 40) == pytest.approx(binomtest(60, 100, 0.5).pvalue)
    assert two_sided_binomial_pvalue(0, 0) == 1.0


def test_radius_is_sigma_times_inverse_normal():
    assert radius_from_p_lower(0.5, 0.25) == pytest.approx(0.0)
    assert radius_from_p_lower(0.99, 0.5) == pytest.approx(0.5 * norm.ppf(0.99))


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, float("nan"), 2])
def test_alpha_outside_unit_interval_is_rejected(alpha):
    with pytest.raises(InputError, match="alpha"):
        clopper_pearson_lower(5, 10, alpha)


def _inputs(count: int, seed: int) -> torch.Tensor:
    return torch.rand(count, 1, 4, 4, generator=torch.Generator().manual_seed(seed))


def test_certified_radius_exceeds_the_true_radius_at_most_alpha_often(linear_model):
    """CERTIFY's guarantee: P(certified radius > exact radius, or a wrong class) <= alpha."""
    alpha, sigma, count = 0.05, 0.25, 400
    x = _inputs(count, 1)
    margin = linear_model.margin(x)
    true_class = (margin > 0).long()
    certs = Smooth(linear_model, 2, seed=7).certify_batch(x, sigma, n0=50, n=500, alpha=alpha)
    violations = sum(
        c.predict != ABSTAIN and (c.predict != int(t) or c.radius > abs(float(m)))
        for c, t, m in zip(certs, true_class, margin)
    )
    assert violations <= binom.ppf(1 - 1e-4, count, alpha)
    # not vacuous: confident inputs get radii close to their exact radius
    certified = [
        c.radius / abs(float(m))
        for c, m in zip(certs, margin)
        if c.predict != ABSTAIN and abs(float(m)) < 2 * sigma
    ]
    assert len(certified) > count / 4 and np.median(certified) > 0.6


def test_predict_returns_the_smoothed_class_or_abstains(linear_model):
    """PREDICT errs (returns the wrong class) with probability at most alpha per input."""
    alpha, sigma, count = 0.05, 0.5, 300
    x = _inputs(count, 2)
    margin = linear_model.margin(x)
    answers = Smooth(linear_model, 2, seed=3).predict_batch(x, sigma, n=200, alpha=alpha)
    wrong = sum(a != ABSTAIN and a != int(m > 0) for a, m in zip(answers, margin))
    assert wrong <= binom.ppf(1 - 1e-4, count, alpha)
    # inputs far from the boundary are (almost) never abstained on
    p_true = norm.cdf(margin.abs().numpy() / sigma)
    far = p_true > 0.8
    abstain_far = np.mean([a == ABSTAIN for a, f in zip(answers, far) if f])
    assert abstain_far < 0.1
    # and near-boundary inputs abstain often, as a two-sided test at level alpha must
    near = p_true < 0.53
    if near.sum() >= 10:
        assert np.mean([a == ABSTAIN for a, f in zip(answers, near) if f]) > 0.5


# -- input-specific sample size --------------------------------------------------------------


def test_input_specific_sample_size_ladder():
    from ddrs.core.stats import input_specific_sample_size as size

    assert size(0.5, 0.25, 10_000, 0.001, 0.01) == 0  # predicted to abstain: no samples
    assert size(0.999, 0.25, 10_000, 0.001, 0.0) == 10_000  # no tolerance: the full N
    sizes = [size(0.95, 0.25, 100_000, 0.001, t) for t in (0.0, 0.005, 0.02, 0.1, 10.0)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == 100_000
    assert sizes[-1] == 100_000 // 2**9  # the ladder stops at n_min = 100: 195
    # the chosen size's predicted radius is within the tolerance of the full one
    from ddrs.core.stats import predicted_certified_radius as radius

    m = size(0.95, 0.25, 100_000, 0.001, 0.02)
    assert radius(0.95, 0.25, m, 0.001) >= radius(0.95, 0.25, 100_000, 0.001) - 0.02
    assert radius(0.95, 0.25, m // 2, 0.001) < radius(0.95, 0.25, 100_000, 0.001) - 0.02


def test_adaptive_certificates_keep_the_guarantee_and_save_samples(linear_model):
    """The same guarantee as CERTIFY on the closed-form linear classifier, with fewer samples:
    the pilot that picks each input's N is independent of the estimation samples."""
    alpha, sigma, count, n = 0.05, 0.25, 400, 2000
    x = _inputs(count, 3)
    margin = linear_model.margin(x)
    true_class = (margin > 0).long()
    smooth = Smooth(linear_model, 2, seed=11)
    certs = smooth.certify_batch_adaptive(
        x, sigma, n0=50, n=n, alpha=alpha, pilot=200, tolerance=0.02, keys=list(range(count))
    )
    violations = sum(
        c.predict != ABSTAIN and (c.predict != int(t) or c.radius > abs(float(m)))
        for c, t, m in zip(certs, true_class, margin)
    )
    assert violations <= binom.ppf(1 - 1e-4, count, alpha)
    used = np.array([c.n for c in certs])
    assert used.max() <= n and used.mean() < 0.6 * n  # samples saved
    full = smooth.certify_batch(x, sigma, n0=50, n=n, alpha=alpha, keys=list(range(count)))
    ratio = [a.radius / b.radius for a, b in zip(certs, full) if a.radius > 0 and b.radius > 0]
    assert len(ratio) > count / 4 and np.median(ratio) > 0.9  # radii close to the full N's
    early = [c for c in certs if c.n == 0]
    assert all(c.predict == ABSTAIN for c in early)
