"""Training methods: each loss on a tiny batch, its settings, and short digits runs."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm
from torch import nn

from ddrs.errors import InputError
from ddrs.models import build_model
from ddrs.train.loop import TrainConfig, train
from ddrs.train.methods import build_method, method_names, noise_like
from ddrs.train.methods.consistency import Consistency, consistency_terms
from ddrs.train.methods.macer import Macer
from ddrs.train.methods.smoothadv import (
    SmoothAdv,
    ddn_attack,
    pgd_attack,
    smoothed_log_probs,
)

CLASSES = 10
LOSS_CASES = [
    ("gaussian", {}),
    ("smoothadv", {"m": 2}),
    ("smoothadv", {"attack": "ddn", "m": 2, "steps": 3}),
    ("macer", {"k": 4}),
    ("consistency", {"m": 3}),
]


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("cnn", CLASSES, (1, 8, 8), (0.3,), (0.4,))


def tiny_batch(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a busy 2-core machine, spinning OpenMP threads cost 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ConstantModel(nn.Module):
    """Ignores its input: every noisy copy gets the same logits."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.linspace(-1.0, 1.0, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(len(x), CLASSES)


class Recorder(nn.Module):
    """Wraps a model and keeps the inputs of its train-mode forward passes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen.append(x.detach().clone())
        return self.model(x)


# -- every method ----------------------------------------------------------------------------
def test_registry_lists_all_methods():
    assert set(method_names()) == {"gaussian", "smoothadv", "macer", "consistency"}


@pytest.mark.parametrize("name,settings", LOSS_CASES)
def test_loss_is_finite_and_reaches_every_parameter(name, settings):
    model = tiny_model()
    x, y = tiny_batch()
    sigma = torch.linspace(0.1, 0.5, len(x))  # data-dependent: one sigma per input
    result = build_method(name, **settings).loss(model, x, y, sigma, epoch=0)
    assert result.loss.dim() == 0 and torch.isfinite(result.loss)
    assert result.noisy_logits.shape == (len(x), CLASSES)
    assert not result.noisy_logits.requires_grad
    assert all(math.isfinite(v) for v in result.terms.values())
    result.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert all(float(g.abs().sum()) > 0 for g in grads)
    assert model.training and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name,settings", LOSS_CASES)
def test_settings_round_trip(name, settings):
    method = build_method(name, **settings)
    assert build_method(name, **method.settings()).settings() == method.settings()


@pytest.mark.parametrize(
    "name,settings",
    [
        ("smoothadv", {"eps": -0.1}),
        ("smoothadv", {"eps": float("nan")}),
        ("smoothadv", {"eps": "big"}),
        ("smoothadv", {"steps": 0}),
        ("smoothadv", {"steps": 1.5}),
        ("smoothadv", {"m": 0}),
        ("smoothadv", {"warmup": 0}),
        ("smoothadv", {"attack": "fgsm"}),
        ("smoothadv", {"attack": 3}),
        ("macer", {"k": 0}),
        ("macer", {"k": True}),
        ("macer", {"lbd": -1}),
        ("macer", {"lbd": float("inf")}),
        ("macer", {"gamma": -0.5}),
        ("macer", {"beta": 0}),
        ("macer", {"beta": -2.0}),
        ("macer", {"warmup": -1}),
        ("macer", {"warmup": 1.5}),
        ("consistency", {"m": 0}),
        ("consistency", {"lbd": -10}),
        ("consistency", {"eta": -0.5}),
        ("consistency", {"m": 2.0}),
    ],
)
def test_bad_settings_are_rejected(name, settings):
    with pytest.raises(InputError):
        build_method(name, **settings)


def test_trainer_validation_rejects_bad_method_settings(tmp_path):
    with pytest.raises(InputError, match="k"):
        TrainConfig(
            dataset="digits",
            arch="cnn",
            out=str(tmp_path),
            method="macer",
            method_settings={"k": 0},
        )


def test_defaults_are_the_published_ones():
    assert SmoothAdv().settings() == {
        "eps": 0.25,
        "steps": 2,
        "m": 1,
        "warmup": 10,
        "attack": "pgd",
    }
    assert Macer().settings() == {"k": 16, "lbd": 12.0, "gamma": 8.0, "beta": 16.0, "warmup": 0}
    assert Consistency().settings() == {"m": 2, "lbd": 10.0, "eta": 0.5}
    assert build_method("smoothadv", attack="DDN").attack == "ddn"


# -- SmoothAdv -------------------------------------------------------------------------------
def test_smoothadv_eps_warmup():
    method = SmoothAdv(eps=0.5, warmup=10)
    assert [method.eps_at(e) for e in (0, 4, 9, 30)] == pytest.approx([0.05, 0.25, 0.5, 0.5])
    assert SmoothAdv(eps=0.5, warmup=1).eps_at(0) == 0.5


@pytest.mark.parametrize("attack", [pgd_attack, ddn_attack])
def test_attacks_stay_in_the_ball_and_raise_the_smoothed_loss(attack):
    model = tiny_model().eval()
    x, y = tiny_batch(16)
    noise = 0.25 * torch.randn(16, 4, 1, 8, 8)
    eps = 1.0
    delta = attack(model, x, y, noise, eps, 5)
    assert bool((delta.flatten(1).norm(dim=1) <= eps + 1e-5).all())
    assert bool(((x + delta >= 0) & (x + delta <= 1)).all())
    with torch.no_grad():
        before = F.nll_loss(smoothed_log_probs(model, x, noise), y, reduction="none")
        after = F.nll_loss(smoothed_log_probs(model, x + delta, noise), y, reduction="none")
    assert after.mean() > before.mean()


def test_smoothadv_trains_on_copies_within_eps_of_the_noisy_inputs():
    model = Recorder(tiny_model())
    x, y = tiny_batch()
    sigma = torch.linspace(0.1, 0.5, len(x))
    method = SmoothAdv(eps=0.5, steps=3, m=2, warmup=1)
    torch.manual_seed(7)
    method.loss(model, x, y, sigma, epoch=0)
    torch.manual_seed(7)  # the noise is the loss's first draw: redraw it
    copies = x.repeat_interleave(2, dim=0)
    noisy = copies + noise_like(copies, sigma.repeat_interleave(2))
    (trained,) = model.seen
    delta = (trained - noisy).flatten(1).norm(dim=1)
    assert bool((delta <= 0.5 + 1e-5).all()) and bool((delta > 0).any())
    # both copies of an input share one delta
    shift = (trained - noisy).view(len(x), 2, -1)
    assert torch.allclose(shift[:, 0], shift[:, 1], atol=1e-6)


def test_smoothadv_without_eps_is_gaussian_augmentation_on_m_copies():
    model = Recorder(tiny_model())
    x, y = tiny_batch()
    sigma = torch.full((len(x),), 0.25)
    torch.manual_seed(3)
    SmoothAdv(eps=0.0, m=2).loss(model, x, y, sigma, epoch=0)
    torch.manual_seed(3)
    copies = x.repeat_interleave(2, dim=0)
    assert torch.allclose(model.seen[0], copies + noise_like(copies, sigma.repeat_interleave(2)))


# -- MACER -----------------------------------------------------------------------------------
def _smoothed_labels(logits: torch.Tensor, beta: float = 16.0) -> torch.Tensor:
    """The beta-tempered smoothed classifier's predictions, which MACER calls correct."""
    return torch.softmax(beta * logits, dim=2).mean(dim=1).argmax(dim=1)


def _macer_reference(logits, y, sigma, gamma, beta):
    """The paper's robustness term, term by term, with scipy's Phi^-1 in float64."""
    probs = torch.softmax(beta * logits.double(), dim=2).mean(dim=1)
    total = 0.0
    for i in range(len(y)):
        top = probs[i].argsort(descending=True)
        if top[0] != y[i]:
            continue
        margin = norm.ppf(float(probs[i, top[0]])) - norm.ppf(float(probs[i, top[1]]))
        if margin <= gamma:
            total += float(sigma[i]) / 2 * (gamma - margin)
    return total / len(y)


def test_macer_robustness_matches_the_paper_and_is_positive_near_the_boundary():
    torch.manual_seed(0)
    logits = 0.05 * torch.randn(6, 4, CLASSES)
    y = _smoothed_labels(logits)  # all correctly classified, small margins
    sigma = torch.linspace(0.1, 0.6, 6)
    method = Macer(gamma=8.0, beta=16.0)
    value = float(method.robustness(logits, y, sigma))
    assert value > 0
    assert value == pytest.approx(_macer_reference(logits, y, sigma, 8.0, 16.0), rel=1e-4)
    # each input's term uses its own sigma
    assert float(method.robustness(logits, y, 2 * sigma)) == pytest.approx(2 * value, rel=1e-5)


def test_macer_hinge_is_zero_when_every_margin_exceeds_gamma():
    torch.manual_seed(0)
    logits = 0.05 * torch.randn(6, 4, CLASSES)
    y = _smoothed_labels(logits)
    sigma = torch.full((6,), 0.25)
    assert float(Macer(gamma=0.0).robustness(logits, y, sigma)) == 0.0
    confident = torch.zeros(6, 4, CLASSES)
    confident[torch.arange(6), :, y] = 1.0  # beta 16: margin ~10 > 8
    assert float(Macer().robustness(confident, y, sigma)) == 0.0
    confident[torch.arange(6), :, y] = 100.0  # p_A rounds to 1: infinite margin, left out
    assert float(Macer().robustness(confident, y, sigma)) == 0.0


def test_macer_ignores_misclassified_inputs():
    torch.manual_seed(0)
    logits = 0.05 * torch.randn(6, 4, CLASSES)
    wrong = (_smoothed_labels(logits) + 1) % CLASSES
    assert float(Macer().robustness(logits, wrong, torch.full((6,), 0.25))) == 0.0


def test_macer_classification_loss_is_ce_of_the_averaged_softmax():
    model = ConstantModel()
    x, y = tiny_batch()
    result = Macer(k=3, lbd=0.0).loss(model, x, y, torch.full((len(x),), 0.25), epoch=0)
    expected = F.cross_entropy(model.bias.detach().expand(len(x), CLASSES), y)
    assert result.terms["ce"] == pytest.approx(float(expected), rel=1e-5)
    assert result.loss.item() == pytest.approx(float(expected), rel=1e-5)


def test_macer_warmup_epochs_train_on_the_classification_term_only():
    model = ConstantModel()
    x, _ = tiny_batch()
    y = torch.full((len(x),), CLASSES - 1)  # the constant model's top class: every margin counts
    sigma = torch.full((len(x),), 0.25)
    method = Macer(k=2, lbd=3.0, warmup=2)
    during = method.loss(model, x, y, sigma, epoch=1)
    after = method.loss(model, x, y, sigma, epoch=2)
    assert during.terms["robust"] > 0
    assert during.loss.item() == pytest.approx(during.terms["ce"], rel=1e-6)
    expected = after.terms["ce"] + 3.0 * after.terms["robust"]
    assert after.loss.item() == pytest.approx(expected, rel=1e-6)


# -- Consistency -----------------------------------------------------------------------------
def test_consistency_kl_vanishes_for_identical_copies():
    model = ConstantModel()
    x, y = tiny_batch()
    result = Consistency(m=3).loss(model, x, y, torch.full((len(x),), 0.5), epoch=0)
    p = torch.softmax(model.bias.detach(), dim=0)
    assert result.terms["kl"] == pytest.approx(0.0, abs=1e-7)
    assert result.terms["entropy"] == pytest.approx(float(-(p * p.log()).sum()), rel=1e-5)


def test_consistency_kl_is_kl_of_the_mean_from_each_copy():
    torch.manual_seed(0)
    logits = torch.randn(5, 3, CLASSES, dtype=torch.float64)
    kl, entropy = consistency_terms(logits)
    p = torch.softmax(logits, dim=2)
    p_bar = p.mean(dim=1, keepdim=True)
    expected = (p_bar * (p_bar.log() - p.log())).sum(dim=2).mean()
    assert float(kl) == pytest.approx(float(expected), rel=1e-9) and float(kl) > 0
    assert float(entropy) == pytest.approx(float(-(p_bar * p_bar.log()).sum(2).mean()))


# -- short digits runs -----------------------------------------------------------------------
def _final_clean_accuracy(out: Path) -> float:
    with open(out / "log.csv") as f:
        return float(list(csv.DictReader(f))[-1]["test_clean_acc"])


RUNS = [
    ("gaussian", {}, False),
    ("smoothadv", {"steps": 1, "warmup": 2}, False),
    ("macer", {"k": 2, "lbd": 1.0}, False),
    ("consistency", {"m": 2}, False),
    ("gaussian", {}, True),
    ("macer", {"k": 2, "lbd": 1.0}, True),
]


@pytest.mark.slow
@pytest.mark.parametrize("method,settings,data_dependent", RUNS)
def test_short_digits_run_learns(tmp_path, method, settings, data_dependent):
    config = TrainConfig(
        dataset="digits",
        arch="cnn",
        out=str(tmp_path),
        method=method,
        method_settings=settings,
        lr=0.05,
        batch=64,
        epochs=5,
        train_subset=640,
        eval_max=None,
        progress=False,
        data_dependent=data_dependent,
        dd_iterations=2,
        dd_samples=4,
    )
    train(config)
    assert _final_clean_accuracy(tmp_path) > 0.5  # chance is 0.1
