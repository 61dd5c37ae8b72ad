"""Data-dependent sigma: per-input noise levels that maximise a surrogate of the radius.

Alfarra, Bibi, Torr & Ghanem (UAI 2022), Section 3: for an input x,

    R(s) = s/2 * (Phi^-1(psi_A(s)) - Phi^-1(psi_B(s))),
    psi(s) = 1/n sum_i softmax(f(x + s e_i)),   e_i ~ N(0, I),

with A, B the two largest entries of psi (re-chosen every step; the label is never used),
both clamped to [0.02, 0.98] before Phi^-1. Plain gradient ascent s <- s + lr dR/ds for K
steps from s_0, the noise reparametrised so that the gradient flows into s. Defaults are the
authors' (lr 1e-4, K 100, n 1).

Besides the paper's ascent, two forward-only searches pick among log-spaced candidates:
`grid_sigma_search` scores them by the same surrogate, and `certified_sigma_search` by the
radius CERTIFY itself would give (hard votes, Clopper-Pearson at the certification's N and
alpha), which is what the certified accuracy counts. `SEARCHES` names them all.

Soundness note: every search uses its own noise stream, independent of the Monte Carlo noise
that later certifies x with the chosen sigma, so CERTIFY's guarantee holds for that sigma.
The resulting classifier (sigma depends on x) is made certifiable by the memory (ddrs/memory).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ddrs.core.checks import check_alpha, integer, number, positive
from ddrs.core.families import GAUSSIAN, Family, family_of
from ddrs.core.noise import STREAM_SIGMA_SEARCH, block_seed
from ddrs.core.smooth import DEFAULTS, check_inputs
from ddrs.core.stats import predicted_certified_radius
from ddrs.core.torchutil import frozen_eval, model_device
from ddrs.errors import InputError

MIN_SIGMA = 1e-3  # lower bound on any optimised sigma (pixel units): keeps s > 0
DEFAULT_CLAMP = (0.02, 0.98)


@dataclass(frozen=True)
class SigmaSearch:
    """Result of a sigma search: the chosen sigmas and the surrogate radius before / after."""

    sigma: Tensor
    radius_before: Tensor
    radius_after: Tensor


def surrogate_radius(
    model: nn.Module,
    x: Tensor,
    sigma: Tensor,
    noise: Tensor,
    clamp=DEFAULT_CLAMP,
    family: Family = GAUSSIAN,
) -> Tensor:
    """R(sigma) for each input. x (B, *shape), sigma (B,), noise (B, n, *shape) -> (B,).
    Another family: its surrogate (L1, uniform noise: lambda (psi_A - psi_B))."""
    batch, n = noise.shape[:2]
    scale = sigma.view(batch, 1, *([1] * (x.dim() - 1)))
    noisy = (x.unsqueeze(1) + scale * noise).flatten(0, 1)
    psi = torch.softmax(model(noisy), dim=1).view(batch, n, -1).mean(dim=1)
    top2 = psi.topk(2, dim=1).values.clamp(*clamp)
    return family.surrogate(sigma, top2[:, 0], top2[:, 1])


class PerInputNoise:
    """One generator per input, so each input's noise is the same however inputs are batched.
    Standard noise of the family (the discrete family searches with the Gaussian it rounds:
    a search only chooses sigma, on noise of its own)."""

    def __init__(self, keys: Sequence[int], seed: int, device, family: Family = GAUSSIAN):
        self.family = family
        self.generators = []
        for key in keys:
            g = torch.Generator(device=device)
            g.manual_seed(block_seed(seed, STREAM_SIGMA_SEARCH, int(key), 0))
            self.generators.append(g)
        self.device = device

    def draw(self, n: int, shape) -> Tensor:
        out = torch.empty(len(self.generators), n, *shape, device=self.device)
        for row, g in zip(out, self.generators):
            self.family.standard(row, g)
        return out


def _check_search_args(iterations, lr, samples, clamp, min_sigma, max_sigma) -> None:
    integer("iterations", iterations, minimum=0)
    integer("samples", samples)
    number("lr", lr, minimum=0)
    if not 0 < clamp[0] < clamp[1] < 1:
        raise InputError(f"clamp must satisfy 0 < low < high < 1, got {clamp!r}")
    positive("min_sigma", min_sigma)
    if max_sigma is not None and not max_sigma > min_sigma:
        raise InputError(f"max_sigma must exceed min_sigma, got {max_sigma!r}")


def _search_keys(x: Tensor, keys: Sequence[int] | None) -> list[int]:
    """One noise key per input (default: positions); each input's noise depends on its key."""
    keys = list(range(x.shape[0])) if keys is None else list(keys)
    if len(keys) != x.shape[0]:
        raise InputError(f"got {len(keys)} keys for {x.shape[0]} inputs")
    return keys


def input_chunks(
    x: Tensor,
    keys: Sequence[int],
    per_input: int,
    batch: int,
    seed: int,
    device,
    family: Family = GAUSSIAN,
) -> Iterator[tuple[int, Tensor, PerInputNoise]]:
    """The skeleton every search shares: the inputs `batch // per_input` at a time (a forward
    pass of at most `batch` samples when each input needs `per_input`), each chunk on the
    model's device with its inputs' noise (keyed, so the result does not depend on `batch`).
    Yields (first position, chunk, noise)."""
    step = max(1, batch // per_input)
    for lo in range(0, x.shape[0], step):
        yield (
            lo,
            x[lo : lo + step].to(device, torch.float32),
            PerInputNoise(keys[lo : lo + step], seed, device, family),
        )


def _joined(parts: list[SigmaSearch]) -> SigmaSearch:
    """The per-chunk results of a search as one, on the CPU."""
    return SigmaSearch(
        *(
            torch.cat([getattr(p, name) for p in parts]).cpu()
            for name in ("sigma", "radius_before", "radius_after")
        )
    )


def _ascend(
    model, x, sigma0, noise, iterations, lr, samples, clamp, low, high, measure: bool, family
) -> SigmaSearch:
    shape = x.shape[1:]
    sigma = sigma0.clone()

    def measured() -> Tensor:  # surrogate on fresh noise, for the record only
        if not measure:
            return torch.full_like(sigma, math.nan)
        with torch.no_grad():
            return surrogate_radius(model, x, sigma, noise.draw(samples, shape), clamp, family)

    before = measured()
    for _ in range(iterations):
        sigma.requires_grad_(True)
        radius = surrogate_radius(model, x, sigma, noise.draw(samples, shape), clamp, family)
        (grad,) = torch.autograd.grad(radius.sum(), sigma)
        sigma = (sigma.detach() + lr * grad).clamp(low, high)
    return SigmaSearch(sigma.detach(), before, measured())


def sigma_search(
    model: nn.Module,
    x: Tensor,
    sigma0: Tensor | float,
    *,
    iterations: int = 100,
    lr: float = 1e-4,
    samples: int = 1,
    clamp: tuple[float, float] = DEFAULT_CLAMP,
    min_sigma: float = MIN_SIGMA,
    max_sigma: float | None = None,
    seed: int = 0,
    keys: Sequence[int] | None = None,
    batch: int = 256,
    measure: bool = True,
    family: Family | str = GAUSSIAN,
) -> SigmaSearch:
    """The paper's gradient ascent on R(sigma), for every row of x at once.

    x: (B, *shape) in [0, 1]; sigma0: scalar or (B,) start values (the training sigma, or a
    warm start). Sigma is kept in [min_sigma, max_sigma]. Inputs are processed `batch // samples`
    at a time. The model is used in eval mode with frozen weights; its state is restored.
    `measure` also evaluates the surrogate before and after on fresh noise (NaN otherwise).
    `family`: the noise and its surrogate (core/families.py); sigma is its scale.
    """
    sigma0 = check_inputs(x, sigma0)
    _check_search_args(iterations, lr, samples, clamp, min_sigma, max_sigma)
    iterations, samples, batch = int(iterations), int(samples), integer("batch", batch)
    device = model_device(model)
    keys = _search_keys(x, keys)
    high = math.inf if max_sigma is None else max_sigma
    family = family_of(family)
    parts = []
    with frozen_eval(model):
        for lo, xs, noise in input_chunks(x, keys, samples, batch, seed, device, family):
            s0 = sigma0[lo : lo + len(xs)].to(device).clamp(min_sigma, high)
            parts.append(
                _ascend(
                    model,
                    xs,
                    s0,
                    noise,
                    iterations,
                    lr,
                    samples,
                    clamp,
                    min_sigma,
                    high,
                    measure,
                    family,
                )
            )
    return _joined(parts)


def optimize_sigma(model: nn.Module, x: Tensor, sigma0: Tensor | float, **options) -> Tensor:
    """Per-input sigmas (B,) maximising the surrogate radius; options as in `sigma_search`."""
    return sigma_search(model, x, sigma0, **options).sigma


def grid_sigma_search(
    model: nn.Module,
    x: Tensor,
    sigma0: Tensor | float,
    *,
    grid: int = 12,
    spread: tuple[float, float] = (0.5, 2.0),
    samples: int = 8,
    clamp: tuple[float, float] = DEFAULT_CLAMP,
    min_sigma: float = MIN_SIGMA,
    max_sigma: float | None = None,
    seed: int = 0,
    keys: Sequence[int] | None = None,
    batch: int = 256,
    family: Family | str = GAUSSIAN,
) -> SigmaSearch:
    """A forward-only search: the best of sigma0 and `grid` log-spaced sigmas in sigma0 * spread.

    Every candidate is scored by the same surrogate R(s) on the *same* `samples` noise draws
    (common random numbers), so candidates are compared without the noise of independent
    estimates; no backward pass is needed. Cost: (grid + 1) * samples forward passes per
    input. radius_before / radius_after are the scores of sigma0 and of the chosen sigma.
    """
    sigma0 = check_inputs(x, sigma0)
    _check_search_args(0, 0.0, samples, clamp, min_sigma, max_sigma)
    samples, batch, grid = int(samples), integer("batch", batch), integer("grid", grid)
    if not 0 < spread[0] <= 1 <= spread[1]:
        raise InputError(f"spread must satisfy 0 < low <= 1 <= high, got {spread}")
    device = model_device(model)
    keys = _search_keys(x, keys)
    high = math.inf if max_sigma is None else max_sigma
    factors = torch.logspace(math.log10(spread[0]), math.log10(spread[1]), grid, device=device)
    factors = torch.cat([torch.ones(1, device=device), factors])  # sigma0 itself competes too
    grid = factors.numel()
    family = family_of(family)
    parts = []
    with frozen_eval(model), torch.no_grad():
        for lo, xs, chunk_noise in input_chunks(
            x, keys, samples * grid, batch, seed, device, family
        ):
            count = xs.shape[0]
            noise = chunk_noise.draw(samples, xs.shape[1:])
            s0 = sigma0[lo : lo + count].to(device)
            candidates = (s0[:, None] * factors[None, :]).clamp(min_sigma, high)  # (B, G)
            scores = surrogate_radius(
                model,
                xs.repeat_interleave(grid, 0),
                candidates.flatten(),
                noise.repeat_interleave(grid, 0),
                clamp,
                family,
            ).view(count, grid)
            best = scores.argmax(dim=1, keepdim=True)
            chosen = candidates.gather(1, best).squeeze(1)
            parts.append(SigmaSearch(chosen, scores[:, 0], scores.gather(1, best).squeeze(1)))
    return _joined(parts)


def _candidates(sigma0: Tensor, grid: int, spread, sigma_range) -> Tensor:
    """(B, grid) ascending candidate sigmas: sigma0 * log-spaced factors, or one absolute range."""
    low, high = sigma_range if sigma_range is not None else spread
    points = torch.logspace(math.log10(low), math.log10(high), grid, dtype=torch.float64)
    if sigma_range is not None:
        return points.float().expand(sigma0.numel(), grid).clone()
    return (sigma0.double()[:, None] * points[None, :]).float()


def _check_certified_args(grid, spread, sigma_range, samples, n, alpha) -> None:
    integer("grid", grid)
    if sigma_range is not None:
        if not 0 < sigma_range[0] <= sigma_range[1] or not math.isfinite(sigma_range[1]):
            raise InputError(f"sigma range must satisfy 0 < low <= high, got {sigma_range!r}")
    elif not 0 < spread[0] <= spread[1] or not math.isfinite(spread[1]):
        raise InputError(f"spread must satisfy 0 < low <= high, got {spread!r}")
    integer("samples", samples)
    integer("n (the certification's N)", n)
    check_alpha(alpha)


def hard_votes(model, x: Tensor, candidates: Tensor, noise: Tensor, batch: int) -> Tensor:
    """Vote counts (B, G, C) of f(x_i + s_ig e_ij) over the samples j, the same e_ij at every
    candidate s_ig (common random numbers); C is the model's number of classes.

    The B * G * m noisy inputs are built `batch` at a time (flat order: input, candidate,
    sample), so memory stays O(batch) however many candidates and samples there are.
    """
    count, grid = candidates.shape
    samples = noise.shape[1]
    total = count * grid * samples
    predictions = torch.empty(total, dtype=torch.int64, device=x.device)
    classes = 1
    for lo in range(0, total, batch):
        flat = torch.arange(lo, min(lo + batch, total), device=x.device)
        i, g, j = flat // (grid * samples), (flat // samples) % grid, flat % samples
        scale = candidates[i, g].view(-1, *([1] * (x.dim() - 1)))
        logits = model(x[i] + scale * noise[i, j])
        classes = logits.shape[1]
        predictions[lo : lo + len(flat)] = logits.argmax(dim=1)
    predictions = predictions.view(count * grid, samples)
    votes = torch.zeros(count * grid, classes, device=x.device)
    votes.scatter_add_(1, predictions, torch.ones_like(predictions, dtype=votes.dtype))
    return votes.view(count, grid, classes)


def certified_sigma_search(
    model: nn.Module,
    x: Tensor,
    sigma0: Tensor | float,
    *,
    grid: int = 9,
    spread: tuple[float, float] = (0.5, 2.0),
    sigma_range: tuple[float, float] | None = None,
    samples: int = 64,
    n: int = DEFAULTS.n,
    alpha: float = DEFAULTS.alpha,
    seed: int = 0,
    keys: Sequence[int] | None = None,
    batch: int = 256,
    family: Family | str = GAUSSIAN,
) -> SigmaSearch:
    """Pick each input's sigma by the radius CERTIFY would give it (forward passes only).

    Candidates: `grid` log-spaced sigmas in sigma0 * [spread] (or in the absolute
    `sigma_range`, the same for every input). For each candidate, the base classifier's hard
    votes on `samples` noisy copies x + s e_j, the e_j drawn once per input from the
    sigma-search noise stream and shared by all candidates (common random numbers, so the
    candidates are compared on the same noise). With f the top class's share of the votes,
    the score is `predicted_certified_radius(f, s, n, alpha)`:
    s * Phi^-1(Beta^-1(alpha; f N, N(1 - f) + 1)), or 0 where CERTIFY would abstain.
    The highest score wins, ties to the smaller sigma. `n` and `alpha` should be those of the
    certification that follows. radius_before / radius_after are the scores of the candidate
    nearest sigma0 (in log scale) and of the chosen one.

    Sound to certify with: the selection noise is independent of CERTIFY's noise, so each
    certificate holds for the sigma chosen; the memory makes the whole classifier certifiable.
    Another `family`: its noise and its radius of pA_lower (L1: lambda per input).
    """
    sigma0 = check_inputs(x, sigma0)
    _check_certified_args(grid, spread, sigma_range, samples, n, alpha)
    grid, samples, n, alpha = int(grid), int(samples), int(n), float(alpha)
    batch = integer("batch", batch)
    device = model_device(model)
    keys = _search_keys(x, keys)
    candidates = _candidates(sigma0, grid, spread, sigma_range)
    nearest = (candidates.log() - sigma0.log()[:, None]).abs().argmin(dim=1)
    family = family_of(family)
    parts = []
    with frozen_eval(model), torch.inference_mode():
        for lo, xs, chunk_noise in input_chunks(
            x, keys, samples * grid, batch, seed, device, family
        ):
            noise = chunk_noise.draw(samples, xs.shape[1:])
            sigmas = candidates[lo : lo + len(xs)]
            votes = hard_votes(model, xs, sigmas.to(device), noise, batch)
            frequency = (votes.max(dim=2).values / samples).cpu()
            scores = predicted_certified_radius(frequency.numpy(), sigmas.numpy(), n, alpha, family)
            best = np.argmax(scores, axis=1)  # the first maximum: ties go to the smaller sigma
            rows = np.arange(len(best))
            before = scores[rows, nearest[lo : lo + len(xs)].numpy()]
            parts.append(
                SigmaSearch(
                    sigmas[rows, best],
                    torch.from_numpy(before).float(),
                    torch.from_numpy(scores[rows, best]).float(),
                )
            )
    return _joined(parts)


SEARCHES = {
    "ascent": sigma_search,
    "grid": grid_sigma_search,
    "certified": certified_sigma_search,
}
DEFAULT_SAMPLES = {"ascent": 1, "grid": 8, "certified": 64}
DEFAULT_GRID = {"grid": 12, "certified": 9}


def check_search_options(search: str, options: dict) -> None:
    """Reject an unknown search or bad settings before any work (or any file) starts."""
    if search not in SEARCHES:
        raise InputError(f"unknown sigma search {search!r}; choose one of {sorted(SEARCHES)}")
    o = {"samples": DEFAULT_SAMPLES[search]} | options
    if search == "certified":
        _check_certified_args(
            o.get("grid", DEFAULT_GRID[search]),
            o.get("spread", (0.5, 2.0)),
            o.get("sigma_range"),
            o["samples"],
            o.get("n", DEFAULTS.n),
            o.get("alpha", DEFAULTS.alpha),
        )
        return
    _check_search_args(
        o.get("iterations", 0),
        o.get("lr", 0.0),
        o["samples"],
        o.get("clamp", DEFAULT_CLAMP),
        o.get("min_sigma", MIN_SIGMA),
        o.get("max_sigma"),
    )
