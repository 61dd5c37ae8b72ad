"""Sigma search on models where the best sigma is known or easy to bound."""

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

from conftest import LinearBinary
from ddrs.core.sigma import (
    certified_sigma_search,
    grid_sigma_search,
    optimize_sigma,
    sigma_search,
    surrogate_radius,
)
from ddrs.core.stats import clopper_pearson_lower, predicted_certified_radius
from ddrs.errors import InputError
from ddrs.models import build_model


def _confident_linear(margin: float) -> tuple[LinearBinary, torch.Tensor]:
    """A sharp linear classifier and an input at L2 distance `margin` from its boundary."""
    w = torch.zeros(16)
    w[0] = 1.0
    model = LinearBinary(w, b=-(0.5 - margin), scale=200.0)  # x[0] = 0.5 -> margin
    x = torch.full((1, 1, 4, 4), 0.5)
    return model, x


def test_ascent_grows_sigma_while_the_clamp_binds_and_raises_the_surrogate():
    # pA = Phi(margin / s) is clamped at 0.98 for s < margin / 2.054: there R(s) = 2.054 s,
    # so the best sigma is at least margin / 2.054 ~ 0.146 for margin 0.3.
    model, x = _confident_linear(0.3)
    found = sigma_search(model, x, 0.05, iterations=60, lr=5e-3, samples=64, seed=0)
    assert found.sigma.item() > 0.05 + 0.1
    assert found.radius_after.item() > found.radius_before.item()
    assert found.sigma.item() < 0.3 * 1.5  # ... and it does not run away past the boundary


def test_surrogate_of_a_sharp_linear_classifier_is_its_margin_once_unclamped():
    model, x = _confident_linear(0.2)
    noise = torch.randn(1, 4096, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    r = surrogate_radius(model, x, torch.tensor([0.4]), noise)
    assert r.item() == pytest.approx(0.2, rel=0.1)


def test_weights_frozen_and_modes_restored():
    torch.manual_seed(0)
    model = build_model("cnn", 10, (1, 8, 8), (0.3,), (0.4,))
    model.train()
    model[1].eval()  # a mixed state must come back exactly as it was
    modes = [m.training for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimize_sigma(model, torch.rand(3, 1, 8, 8), 0.25, iterations=3, lr=1e-2, samples=2)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_batchnorm_statistics_untouched():
    torch.manual_seed(0)
    model = build_model("cifar_resnet20", 10, (3, 8, 8), (0.5,) * 3, (0.25,) * 3).train()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    optimize_sigma(model, torch.rand(2, 3, 8, 8), 0.25, iterations=2, lr=1e-2)
    assert all(torch.equal(stats[k], model.state_dict()[k]) for k in stats)


def test_reproducible_and_independent_of_batching():
    torch.manual_seed(0)
    model = build_model("cnn", 10, (1, 8, 8), (0.3,), (0.4,))
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    options = {"iterations": 5, "lr": 1e-2, "samples": 4, "seed": 3, "keys": list(range(6))}
    a = optimize_sigma(model, x, 0.25, batch=256, **options)
    b = optimize_sigma(model, x, 0.25, batch=8, **options)  # 2 inputs per chunk
    assert torch.equal(a, b)
    c = optimize_sigma(model, x, 0.25, batch=256, **(options | {"seed": 4}))
    assert not torch.equal(a, c)


def test_bounds_are_enforced():
    model, x = _confident_linear(0.3)
    found = optimize_sigma(model, x, 0.05, iterations=50, lr=1e-1, samples=8, max_sigma=0.07)
    assert found.item() <= torch.tensor(0.07).item()  # the bound, in float32
    low = optimize_sigma(model, x, 0.0005, iterations=0, min_sigma=0.01)
    assert low.item() == pytest.approx(0.01)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"iterations": -1}, "iterations"),
        ({"samples": 0}, "samples"),
        ({"lr": -1.0}, "lr"),
        ({"clamp": (0.9, 0.1)}, "clamp"),
        ({"min_sigma": 0.0}, "min_sigma"),
        ({"max_sigma": 1e-4}, "max_sigma"),
    ],
)
def test_bad_search_settings(kwargs, message):
    with pytest.raises(InputError, match=message):
        optimize_sigma(nn.Flatten(), torch.rand(1, 1, 2, 2), 0.25, **kwargs)


def test_bad_sigma0():
    with pytest.raises(InputError, match="sigma"):
        optimize_sigma(nn.Flatten(), torch.rand(1, 1, 2, 2), -0.1)


def test_grid_search_finds_the_best_sigma_of_a_linear_classifier():
    model, x = _confident_linear(0.3)  # best sigma >= 0.3 / 2.054 ~ 0.146 (see above)
    found = grid_sigma_search(model, x, 0.05, grid=12, spread=(0.5, 8.0), samples=64)
    assert 0.146 * 0.8 < found.sigma.item() < 0.45
    assert found.radius_after.item() > found.radius_before.item()


def test_grid_search_never_scores_below_its_start_and_is_batch_invariant():
    torch.manual_seed(0)
    model = build_model("cnn", 10, (1, 8, 8), (0.3,), (0.4,))
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    a = grid_sigma_search(model, x, 0.25, grid=6, samples=4, seed=1, keys=list(range(5)))
    b = grid_sigma_search(model, x, 0.25, grid=6, samples=4, seed=1, keys=list(range(5)), batch=28)
    assert torch.equal(a.sigma, b.sigma)
    assert (a.radius_after >= a.radius_before).all()
    assert ((a.sigma >= 0.125 - 1e-6) & (a.sigma <= 0.5 + 1e-6)).all()


# -- the certified selector ---------------------------------------------------------------


def _exact_scores(margin: float, candidates, n: int, alpha: float):
    """CERTIFY's radius at each candidate if the top-class share were the exact pA = Phi(m/s)."""
    s = np.asarray(candidates, dtype=np.float64)
    return predicted_certified_radius(norm.cdf(margin / s), s, n, alpha)


def test_predicted_radius_matches_certify_formula_on_integer_counts():
    # 9,990 of 10,000 votes: CERTIFY's bound is clopper_pearson_lower(9990, 10000, alpha)
    bound = clopper_pearson_lower(9990, 10_000, 0.001)
    expected = 0.3 * norm.ppf(bound)
    assert predicted_certified_radius(0.999, 0.3, 10_000, 0.001) == pytest.approx(expected)
    assert predicted_certified_radius(0.5, 0.3, 10_000, 0.001) == 0.0  # abstains
    assert predicted_certified_radius(0.0, 0.3, 10_000, 0.001) == 0.0


@pytest.mark.parametrize("margin,n", [(0.15, 10_000), (0.3, 1_000), (0.6, 10_000)])
def test_certified_search_picks_the_exactly_best_candidate_of_a_linear_classifier(margin, n):
    # For the sharp linear classifier pA(s) = Phi(margin / s) exactly. CERTIFY's radius is
    # capped at s * Phi^-1(alpha^(1/N)) for small s and eaten by the Clopper-Pearson penalty
    # for large s; in between it is nearly flat. Candidates margin * (1/8, 1, 8) have a clear
    # winner (the middle one), clear also against the noise of 16,384 votes (the score's
    # noise grows with s, as R = s Phi^-1(f) is steep where f is near 1/2); the search must
    # find it ...
    model, x = _confident_linear(margin)
    alpha = 0.001
    found = certified_sigma_search(
        model,
        x,
        margin,
        grid=3,
        spread=(0.125, 8.0),
        samples=16384,
        n=n,
        alpha=alpha,
        batch=65536,
    )
    candidates = margin * np.array([0.125, 1.0, 8.0])
    exact = _exact_scores(margin, candidates, n, alpha)
    assert np.argmax(exact) == 1 and exact[1] > 1.3 * np.sort(exact)[-2]
    assert found.sigma.item() == pytest.approx(candidates[1], rel=1e-5)
    assert found.radius_after.item() == pytest.approx(exact[1], rel=0.05)  # 16,384 votes
    # ... and on a fine grid over the flat top, its pick is within 1% of the exact best.
    fine = certified_sigma_search(
        model,
        x,
        margin,
        grid=13,
        spread=(0.125, 8.0),
        samples=16384,
        n=n,
        alpha=alpha,
        batch=65536,
    )
    grid = margin * np.logspace(np.log10(0.125), np.log10(8.0), 13)
    exact = _exact_scores(margin, grid, n, alpha)
    picked = exact[np.argmin(np.abs(grid - fine.sigma.item()))]
    assert picked >= 0.99 * exact.max()


def test_certified_search_ties_go_to_the_smaller_sigma():
    # A constant classifier: every candidate gets all votes, so s * Phi^-1(alpha^(1/N))
    # grows with s, and with one absolute candidate range the largest must win; with
    # a classifier that is always wrong-and-split (half/half) every score is 0: smallest wins.
    class Constant(nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = torch.tensor(logits)

        def forward(self, z):
            return self.logits.expand(z.shape[0], -1)

    x = torch.rand(3, 1, 4, 4)
    found = certified_sigma_search(Constant([0.0, 1.0]), x, 0.25, sigma_range=(0.1, 0.4), grid=4)
    assert torch.allclose(found.sigma, torch.full((3,), 0.4))

    class Split(nn.Module):
        def forward(self, z):  # class = sign of the first noise coordinate: p = 1/2
            return torch.stack([z.flatten(1)[:, 0] - x[0].flatten()[0], torch.zeros(len(z))], 1)

    found = certified_sigma_search(Split(), x[:1], 0.25, sigma_range=(0.1, 0.4), grid=4)
    assert found.sigma.item() == pytest.approx(0.1)
    assert found.radius_after.item() == 0.0


def test_certified_search_is_deterministic_and_independent_of_batching_and_company():
    torch.manual_seed(0)
    model = build_model("cnn", 10, (1, 8, 8), (0.3,), (0.4,))
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    keys = [10, 11, 12, 13, 14, 15]
    options = {"grid": 5, "samples": 16, "n": 1000, "alpha": 0.01, "seed": 3}
    a = certified_sigma_search(model, x, 0.25, keys=keys, batch=4096, **options)
    b = certified_sigma_search(model, x, 0.25, keys=keys, batch=7, **options)
    assert torch.equal(a.sigma, b.sigma) and torch.equal(a.radius_after, b.radius_after)
    alone = certified_sigma_search(model, x[2:3], 0.25, keys=keys[2:3], **options)
    assert alone.sigma.item() == a.sigma[2].item()  # other inputs in the call change nothing
    again = certified_sigma_search(model, x, 0.25, keys=keys, batch=4096, **options)
    assert torch.equal(a.sigma, again.sigma)
    other_seed = certified_sigma_search(model, x, 0.25, keys=keys, **(options | {"seed": 4}))
    assert not torch.equal(a.radius_after, other_seed.radius_after)
    assert (a.radius_after >= a.radius_before).all()
    grid = 0.25 * np.logspace(np.log10(0.5), np.log10(2.0), 5)
    assert all(np.isclose(grid, s, rtol=1e-5).any() for s in a.sigma.tolist())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"grid": 0}, "grid"),
        ({"samples": 0}, "samples"),
        ({"n": 0}, "n "),
        ({"alpha": 1.5}, "alpha"),
        ({"spread": (2.0, 0.5)}, "spread"),
        ({"sigma_range": (0.0, 0.5)}, "range"),
        ({"batch": 0}, "batch"),
    ],
)
def test_bad_certified_search_settings(kwargs, message):
    with pytest.raises(InputError, match=message):
        certified_sigma_search(nn.Flatten(), torch.rand(1, 1, 2, 2), 0.25, **kwargs)
