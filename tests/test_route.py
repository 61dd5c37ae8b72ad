"""Routing among experts: the dual-smoothing certificate on a closed-form case, the certified
selector over experts, and the results independent of batching."""

import numpy as np
import pytest
import torch

from conftest import LinearBinary
from ddrs.core.experts import Expert, Experts
from ddrs.core.route import (
    DualSmoothing,
    Router,
    check_route_rule,
    expert_scores,
    route_by_certified_radius,
)
from ddrs.core.smooth import ABSTAIN


def _hyperplane(seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, generator=g)
    return w, -float(w.sum()) / 2 + 0.3 * float(torch.randn(1, generator=g))


def _margin(w, b, x):
    return (x.flatten(1) @ w + b) / w.norm()


@pytest.fixture(scope="module")
def closed_form():
    """A linear router between two linear experts that always disagree (g_1 = not g_0), so
    h(x) = g_0(x) XOR g_r(x) and a certificate (c, R) at x is true exactly when
    c = h(x) and R <= min(|m_0(x)|, |m_r(x)|), m the signed distances to the hyperplanes."""
    w0, b0 = _hyperplane(1)
    wr, br = _hyperplane(2)
    experts = Experts(
        (Expert("a", "", 0.12, LinearBinary(w0, b0)), Expert("b", "", 0.5, LinearBinary(-w0, -b0)))
    )
    router = Router(LinearBinary(wr, br), 0.25, ("a", "b"))
    x = torch.rand(400, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    m0, mr = _margin(w0, b0, x), _margin(wr, br, x)
    truth = ((m0 > 0) ^ (mr > 0)).long()
    reach = torch.minimum(m0.abs(), mr.abs())
    return experts, router, x, truth, reach


def _violations(predict, radius, truth, reach) -> int:
    claimed = predict != ABSTAIN
    wrong = (predict != truth) | (radius > reach)
    return int((claimed & wrong).sum())


def test_dual_certificates_are_true_but_at_the_alpha_rate(closed_form):
    experts, router, x, truth, reach = closed_form
    alpha = 0.2
    found = DualSmoothing(router, experts, 2, seed=0).certify_batch(
        x, n0=20, n=300, router_n=300, alpha=alpha, keys=list(range(len(x)))
    )
    predict = torch.tensor([c.predict for c in found])
    radius = torch.tensor([c.radius for c in found], dtype=torch.float64)
    assert (predict != ABSTAIN).float().mean() > 0.5 and radius.max() > 0.2  # not vacuous
    violations = _violations(predict, radius, truth, reach)
    assert violations <= alpha * len(x) + 3 * np.sqrt(len(x) * alpha * (1 - alpha))
    # the min matters: the router's radius caps many answers, and the larger of the two
    # radii would be false far more often than alpha allows
    route = torch.tensor([c.route_radius for c in found], dtype=torch.float64)
    expert = torch.tensor([c.expert_radius for c in found], dtype=torch.float64)
    assert ((route < expert) & (predict != ABSTAIN)).sum() > 50
    too_large = _violations(predict, torch.maximum(route, expert), truth, reach)
    assert too_large > 2 * alpha * len(x)


def test_dual_certificates_do_not_depend_on_the_batch_or_the_group(closed_form):
    experts, router, x, _, _ = closed_form
    dual = DualSmoothing(router, experts, 2, seed=5)
    keys = list(range(100, 140))
    whole = dual.certify_batch(x[:40], n0=20, n=200, router_n=150, alpha=0.01, batch=64, keys=keys)
    parts = [
        c
        for lo in range(0, 40, 7)
        for c in dual.certify_batch(
            x[:40][lo : lo + 7],
            n0=20,
            n=200,
            router_n=150,
            alpha=0.01,
            batch=500,
            keys=keys[lo : lo + 7],
        )
    ]
    assert [(c.predict, c.radius, c.expert) for c in whole] == [
        (c.predict, c.radius, c.expert) for c in parts
    ]


def test_a_router_for_other_experts_is_refused(closed_form):
    experts, router, _, _, _ = closed_form
    from ddrs.errors import InputError

    with pytest.raises(InputError, match="trained for experts"):
        DualSmoothing(Router(router.model, 0.25, ("b", "a")), experts, 2)


def test_the_certified_selector_picks_the_expert_with_the_largest_predicted_radius():
    """Far from its hyperplane every expert votes one class unanimously, so the predicted
    radius grows with sigma and the largest sigma wins; the 'agree' rule refuses an expert
    whose class differs from the smallest sigma's, and ties go to the smaller sigma."""
    w, b = _hyperplane(1)
    model = LinearBinary(w, b)
    flipped = LinearBinary(-w, -b)
    x = torch.rand(30, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    far = _margin(w, b, x).abs() > 1.5  # farther than any sigma here reaches in 64 votes
    same = Experts(tuple(Expert(f"s{s}", "", s, model) for s in (0.5, 0.1, 0.25)))
    routed = route_by_certified_radius(same, x, samples=64, n=1000, alpha=0.001)
    assert torch.all(routed.expert[far] == 0) and torch.all(routed.sigma[far] == 0.5)
    mixed = Experts((Expert("small", "", 0.1, model), Expert("big", "", 0.5, flipped)))
    radius = route_by_certified_radius(mixed, x, samples=64, n=1000, alpha=0.001)
    agree = route_by_certified_radius(mixed, x, samples=64, n=1000, alpha=0.001, rule="agree")
    assert torch.all(radius.expert[far] == 1) and torch.all(agree.expert[far] == 0)
    twins = Experts((Expert("second", "", 0.25, model), Expert("first", "", 0.25, model)))
    tie = route_by_certified_radius(twins, x, samples=64, n=1000, alpha=0.001)
    assert torch.all(tie.expert == 0)  # equal sigmas, equal votes: the earlier expert


def test_routing_does_not_depend_on_the_batch(closed_form):
    experts, _, x, _, _ = closed_form
    keys = list(range(50))
    a = route_by_certified_radius(
        experts, x[:50], samples=16, n=500, alpha=0.01, batch=32, keys=keys
    )
    b = route_by_certified_radius(
        experts, x[:50], samples=16, n=500, alpha=0.01, batch=4096, keys=keys
    )
    assert torch.equal(a.expert, b.expert) and torch.equal(a.score, b.score)


def test_agree_at_a_confidence_only_binds_where_the_smallest_sigma_is_confident():
    """'agree:P' is 'agree' where the smallest sigma's top-class share is at least P and
    'radius' elsewhere; near the small expert's hyperplane the two rules differ."""
    w, b = _hyperplane(1)
    model, flipped = LinearBinary(w, b), LinearBinary(-w, -b)
    mixed = Experts((Expert("small", "", 0.1, model), Expert("big", "", 0.5, flipped)))
    x = torch.rand(400, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    settings = {"samples": 64, "n": 1000, "alpha": 0.001}
    share, _, _ = expert_scores(mixed, x, **settings)
    confident = torch.from_numpy(share[:, 0] >= 0.9)
    routes = {
        rule: route_by_certified_radius(mixed, x, rule=rule, **settings).expert
        for rule in ("radius", "agree", "agree:0.9")
    }
    assert torch.equal(routes["agree:0.9"][confident], routes["agree"][confident])
    assert torch.equal(routes["agree:0.9"][~confident], routes["radius"][~confident])
    assert (routes["agree"] != routes["radius"])[~confident].any()  # the threshold matters


@pytest.mark.parametrize("rule", ["agree:1", "agree:x", "radius:0.5", "largest"])
def test_a_bad_route_rule_is_one_line(rule):
    from ddrs.errors import InputError

    with pytest.raises(InputError, match="use radius, agree or agree:P"):
        check_route_rule(rule)
