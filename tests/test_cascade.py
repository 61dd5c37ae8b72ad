"""The multi-scale cascade on a closed form: linear experts along one direction, so the exact
smoothed probabilities, the cascade's class everywhere, and the true robust radius at any
input are known. False certificates stay within alpha; without the larger levels' guard
(ii) they do not."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from conftest import LinearBinary
from ddrs.core.cascade import Cascade, check_p0
from ddrs.core.experts import Expert
from ddrs.core.smooth import ABSTAIN
from ddrs.errors import InputError

P0 = 0.6
W = torch.tensor([1.0, -1.0] * 8) / 4.0  # unit norm: the margin is w . x + b


def experts(biases=(0.10, -0.23)):
    """Two levels along w: sigma 0.5 and 0.12, their hyperplanes apart, so that near the small
    level's boundary the large level turns confident in the other class."""
    large, small = biases
    return [
        Expert("s0.5", "", 0.5, LinearBinary(W, large)),
        Expert("s0.12", "", 0.12, LinearBinary(W, small)),
    ]


def truth(t: np.ndarray, biases, sigmas=(0.5, 0.12), p0=P0):
    """The cascade's class at margin coordinate t (x = 0.5 + t w), exactly."""
    out = np.full(t.shape, ABSTAIN)
    done = np.zeros(t.shape, bool)
    for b, s in zip(biases, sigmas):
        p1 = norm.cdf((t + b) / s)
        for c, p in ((1, p1), (0, 1 - p1)):
            hit = ~done & (p > p0)
            out[hit], done[hit] = c, True
    return out


def true_radius(t: float, c: int, biases, sigmas=(0.5, 0.12), p0=P0) -> float:
    """How far from t the cascade keeps class c (its class only changes at breakpoints)."""
    z = norm.ppf(p0)
    points = np.sort([s * sign * z - b for b, s in zip(biases, sigmas) for sign in (1, -1)])
    grid = np.concatenate([points - 1e-9, points + 1e-9])
    changes = grid[truth(grid, biases, sigmas, p0) != c]
    return float(np.min(np.abs(changes - t))) if len(changes) else math.inf


@pytest.fixture(scope="module")
def closed_form():
    biases = (0.10, -0.23)
    t = np.linspace(-0.6, 0.6, 400)
    x = (0.5 + torch.tensor(t, dtype=torch.float32)[:, None] * W).view(-1, 1, 4, 4)
    return experts(biases), biases, t, x


def _violations(found, t, biases) -> int:
    bad = 0
    for c, ti in zip(found, t):
        if c.predict != ABSTAIN and (
            c.predict != truth(np.array([ti]), biases)[0]
            or c.radius > true_radius(ti, c.predict, biases)
        ):
            bad += 1
    return bad


def test_cascade_certificates_are_true_but_at_the_alpha_rate(closed_form):
    members, biases, t, x = closed_form
    alpha = 0.05
    cascade = Cascade(members, 2, P0, seed=0)
    found = cascade.certify_batch(x, n0=20, n=400, alpha=alpha, keys=list(range(len(x))))
    answered = [c for c in found if c.predict != ABSTAIN]
    assert len(answered) > 0.5 * len(found) and max(c.radius for c in answered) > 0.1
    assert {c.expert for c in answered} == {0, 1}  # both levels answer somewhere
    bound = alpha * len(x) + 3 * np.sqrt(len(x) * alpha * (1 - alpha))
    assert _violations(found, t, biases) <= bound
    # the guard matters: the small level's certificates alone would be false far more often
    unguarded = cascade.certify_batch(
        x, n0=20, n=400, alpha=alpha, keys=list(range(len(x))), guard=False
    )
    assert sum(c.guard_radius < c.level_radius for c in found if c.predict != ABSTAIN) > 20
    assert _violations(unguarded, t, biases) > 3 * bound


def test_an_input_confident_at_the_largest_sigma_costs_one_level(closed_form):
    members, _, _, x = closed_form
    found = Cascade(members, 2, P0).certify_batch(
        x, n0=20, n=400, alpha=0.01, keys=list(range(len(x)))
    )
    first = [c for c in found if c.expert == 0]
    assert first and all(c.levels == 1 and math.isinf(c.guard_radius) for c in first)
    assert all(c.levels == 2 for c in found if c.expert == 1)


def test_cascade_results_do_not_depend_on_the_batch(closed_form):
    members, _, _, x = closed_form
    cascade = Cascade(members, 2, P0, seed=3)
    keys = list(range(50, 90))
    whole = cascade.certify_batch(x[:40], n0=20, n=300, alpha=0.05, batch=64, keys=keys)
    parts = [
        c
        for lo in range(0, 40, 7)
        for c in cascade.certify_batch(
            x[:40][lo : lo + 7], n0=20, n=300, alpha=0.05, batch=500, keys=keys[lo : lo + 7]
        )
    ]
    assert [(c.predict, c.radius, c.expert) for c in whole] == [
        (c.predict, c.radius, c.expert) for c in parts
    ]


@pytest.mark.parametrize("p0", [0.4, 1.0, float("nan"), True, "0.6"])
def test_a_bad_threshold_is_refused(p0):
    with pytest.raises(InputError, match="--cascade P0"):
        check_p0(p0)


def test_every_threshold_from_one_draw_equals_the_cascade_at_each(closed_form):
    members, _, _, x = closed_form
    cascade = Cascade(members, 2, P0, seed=3)
    keys = list(range(len(x)))
    at = cascade.certify_thresholds(x, (0.55, 0.8), n0=20, n=300, alpha=0.05, keys=keys)
    for p0 in (0.55, 0.8):
        alone = Cascade(members, 2, p0, seed=3).certify_batch(
            x, n0=20, n=300, alpha=0.05, keys=keys
        )
        assert at[p0] == alone
    assert at[0.55] != at[0.8]  # the threshold matters on these inputs
