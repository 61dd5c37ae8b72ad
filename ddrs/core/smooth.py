"""CERTIFY and PREDICT (Cohen, Rosenfeld & Kolter, 2019), with a sigma per input.

Each input x_i is smoothed with its own noise level sigma_i:
    g(x_i) = argmax_c P(f(x_i + sigma_i * e) = c),  e ~ N(0, I),
and everything else follows the paper's pseudocode. Sigma and radii are L2, in the pixel
units of the un-normalised input (values in [0, 1]); another noise family (families.py: L1
with uniform noise, or the discrete Gaussian) changes the noise and the radius formula only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ddrs.core.checks import check_alpha, integer, number
from ddrs.core.families import GAUSSIAN, Family, family_of
from ddrs.core.noise import STREAM_ESTIMATION, STREAM_PILOT, STREAM_PREDICTION, STREAM_SELECTION
from ddrs.core.sampling import auto_batch_size, sample_counts
from ddrs.core.stats import (
    clopper_pearson_lower,
    input_specific_sample_size,
    look_alpha,
    radius_decision,
    radius_from_p_lower,
    radius_looks,
    two_sided_binomial_pvalue,
)
from ddrs.core.torchutil import is_convolutional
from ddrs.core.validate import check_pixels
from ddrs.errors import InputError

ABSTAIN = -1


@dataclass(frozen=True)
class CertifySettings:
    """CERTIFY's and PREDICT's sample sizes and failure probability, with the field's usual
    values (Cohen et al.'s CIFAR-10 and ImageNet runs): N0 100, N 100,000, alpha 0.001. The one
    home of these defaults: every signature and every command line option takes them here."""

    n0: int = 100
    n: int = 100_000
    alpha: float = 0.001


DEFAULTS = CertifySettings()


@dataclass(frozen=True)
class Certificate:
    """CERTIFY's answer for one input: class (or ABSTAIN) and certified radius (L2, or the
    family's norm)."""

    predict: int
    radius: float
    p_lower: float
    count: int  # nA: votes for the selected class cA among the n estimation samples
    n: int
    sigma: float
    selected: int = ABSTAIN  # cA, chosen on the n0 selection samples (even when abstaining)
    top2: tuple[int, int] = (0, 0)  # the two largest vote counts among the n samples


def certificate_from_counts(
    cA: int, nA: int, n: int, alpha: float, sigma: float, top2=(0, 0), family: Family = GAUSSIAN
) -> Certificate:
    """CERTIFY's last lines: from the selected class cA and its nA of n estimation votes, the
    class (or ABSTAIN) and radius sigma * Phi^-1(pABar) (or `family`'s radius of pABar). Used
    by `recertify` on saved counts. n = 0 (an input-specific run that abstained on its pilot)
    abstains."""
    top2 = (int(top2[0]), int(top2[1]))
    if n == 0:
        return Certificate(ABSTAIN, 0.0, 0.0, 0, 0, sigma, cA, top2)
    pABar = float(clopper_pearson_lower(nA, n, alpha))
    if pABar < 0.5:
        return Certificate(ABSTAIN, 0.0, pABar, nA, n, sigma, cA, top2)
    radius = float(radius_from_p_lower(pABar, sigma, family))
    if radius <= 0:  # pABar within the discrete family's slack of 1/2
        return Certificate(ABSTAIN, 0.0, pABar, nA, n, sigma, cA, top2)
    return Certificate(cA, radius, pABar, nA, n, sigma, cA, top2)


def check_inputs(x: Tensor, sigma, expected_dims: int | None = None) -> Tensor:
    """Validate a batch of inputs and their sigmas; return sigma as a float tensor (B,)."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise InputError("inputs must be a floating-point torch.Tensor")
    if expected_dims is not None and x.dim() != expected_dims:
        raise InputError(f"inputs must have {expected_dims} dimensions, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise InputError("inputs are empty")
    check_pixels(x)
    sigma = torch.as_tensor(sigma, dtype=torch.float32).flatten().cpu()
    if sigma.numel() == 1:
        sigma = sigma.expand(x.shape[0]).clone()
    if sigma.numel() != x.shape[0]:
        raise InputError(f"got {sigma.numel()} sigmas for {x.shape[0]} inputs")
    if not torch.isfinite(sigma).all() or (sigma <= 0).any():
        raise InputError(f"sigma must be finite and > 0, got min {sigma.min().item():.4g}")
    return sigma


class Smooth:
    """A smoothed classifier g around a base classifier f (logits from [0, 1] inputs).

    `seed` fixes all Monte Carlo noise. `keys` (one integer per input, e.g. dataset indices)
    name each input's noise stream; without keys, inputs are numbered in call order.
    `family` (core/families.py): the noise and the norm of the radius; sigma is its scale
    (lambda for uniform noise). Default: Gaussian, L2.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        *,
        seed: int = 0,
        amp: str | None = None,
        compile: bool = False,
        family: Family | str = GAUSSIAN,
    ):
        if num_classes < 2:
            raise InputError("num_classes must be >= 2")
        if is_convolutional(model):
            model.to(memory_format=torch.channels_last)
        self.model = torch.compile(model) if compile else model
        self.num_classes, self.seed, self.amp = int(num_classes), int(seed), amp
        self.family = family_of(family)
        self._next_key = 0
        self._auto_batch: int | None = None

    def _keys(self, count: int, keys: Sequence[int] | None) -> list[int]:
        if keys is not None:
            if len(keys) != count:
                raise InputError(f"got {len(keys)} keys for {count} inputs")
            return [int(k) for k in keys]
        first, self._next_key = self._next_key, self._next_key + count
        return list(range(first, first + count))

    def _batch(self, batch: int | None, x: Tensor) -> int:
        return self.batch_size(batch, tuple(x.shape[1:]))

    def batch_size(self, batch: int | None, input_shape: Sequence[int]) -> int:
        """The given batch size, or the automatic one (measured once per Smooth)."""
        if batch is None:
            if self._auto_batch is None:
                self._auto_batch = auto_batch_size(self.model, tuple(input_shape))
            return self._auto_batch
        return integer("batch", batch)

    def _counts(self, x, sigma, num, batch, stream, keys, first: int = 0) -> Tensor:
        return sample_counts(
            self.model,
            x,
            sigma,
            num,
            self.num_classes,
            batch=batch,
            seed=self.seed,
            stream=stream,
            keys=keys,
            amp=self.amp,
            first=first,
            family=self.family,
        )

    def _votes(self, x, sigma, n0, n, batch, keys) -> tuple[Tensor, Tensor]:
        """CERTIFY's sampling: the class cA chosen on n0 selection samples, and the vote counts
        (B, C) of n independent estimation samples."""
        cA = self._counts(x, sigma, n0, batch, STREAM_SELECTION, keys).argmax(dim=1)
        return cA, self._counts(x, sigma, n, batch, STREAM_ESTIMATION, keys)

    def votes(
        self,
        x: Tensor,
        sigma: Tensor | float,
        n0: int,
        n: int,
        batch: int | None = None,
        keys: Sequence[int] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """CERTIFY's samples without its conclusion: (cA (B,), counts (B, C)); methods built
        on CERTIFY's estimates (the cascade) draw them here, on the same noise."""
        sigma, n0, n, _, batch, keys = self._checked(x, sigma, n0, n, 0.5, batch, keys)
        return self._votes(x, sigma, n0, n, batch, keys)

    def _checked(self, x, sigma, n0, n, alpha, batch, keys):
        """CERTIFY's arguments checked and normalised: (per-input sigmas, n0, n, alpha, batch
        size, noise keys)."""
        sigma = check_inputs(x, sigma)
        n0, n, alpha = integer("n0", n0), integer("n", n), check_alpha(alpha)
        return sigma, n0, n, alpha, self._batch(batch, x), self._keys(x.shape[0], keys)

    def certify_batch(
        self,
        x: Tensor,
        sigma: Tensor | float,
        n0: int,
        n: int,
        alpha: float,
        batch: int | None = None,
        keys: Sequence[int] | None = None,
    ) -> list[Certificate]:
        """CERTIFY each row of x (B, *shape) with its own sigma.

        With probability >= 1 - alpha (per input, over the noise), a returned class cA with
        radius R satisfies g(x + d) = cA for every ||d||_2 < R. Abstains (ABSTAIN, 0) when the
        lower bound pA_lower is below 1/2.
        """
        sigma, n0, n, alpha, batch, keys = self._checked(x, sigma, n0, n, alpha, batch, keys)
        cA, counts = self._votes(x, sigma, n0, n, batch, keys)
        nA = counts.gather(1, cA[:, None]).squeeze(1)
        top2 = counts.topk(2, dim=1).values.tolist()
        return [
            certificate_from_counts(
                int(cA[i]), int(nA[i]), n, alpha, float(sigma[i]), top2[i], self.family
            )
            for i in range(x.shape[0])
        ]

    def certify_batch_adaptive(
        self,
        x: Tensor,
        sigma: Tensor | float,
        n0: int,
        n: int,
        alpha: float,
        pilot: int,
        tolerance: float,
        batch: int | None = None,
        keys: Sequence[int] | None = None,
    ) -> list[Certificate]:
        """CERTIFY with an input-specific number of estimation samples (at most n).

        After selecting cA on n0 samples, a pilot of `pilot` samples from its own noise
        stream estimates cA's frequency; each input then gets the smallest N on the ladder
        n, n/2, n/4, ... whose predicted radius is within `tolerance` of the one predicted at
        n (`stats.input_specific_sample_size`), or abstains at once when the pilot predicts
        an abstention at n. The estimation uses N fresh samples, independent of the pilot
        and the selection, so the guarantee is CERTIFY's: with probability >= 1 - alpha per
        input, the returned class is g's on the whole ball. `Certificate.n` is each N.
        """
        pilot = integer("pilot", pilot)
        tolerance = number("radius tolerance", tolerance, minimum=0)
        sigma, n0, n, alpha, batch, keys = self._checked(x, sigma, n0, n, alpha, batch, keys)
        cA = self._counts(x, sigma, n0, batch, STREAM_SELECTION, keys).argmax(dim=1)
        pilot_counts = self._counts(x, sigma, pilot, batch, STREAM_PILOT, keys)
        frequency = (pilot_counts.gather(1, cA[:, None]).squeeze(1) / pilot).tolist()
        sizes = [
            input_specific_sample_size(f, float(s), n, alpha, tolerance, family=self.family)
            for f, s in zip(frequency, sigma.tolist())
        ]
        certificates: list[Certificate | None] = [None] * x.shape[0]
        for size in sorted(set(sizes)):
            rows = [i for i, m in enumerate(sizes) if m == size]
            if size == 0:  # the pilot predicts an abstention: no estimation samples spent
                for i in rows:
                    s_i = float(sigma[i])
                    certificates[i] = certificate_from_counts(int(cA[i]), 0, 0, alpha, s_i)
                continue
            group = torch.tensor(rows)
            counts = self._counts(
                x[group], sigma[group], size, batch, STREAM_ESTIMATION, [keys[i] for i in rows]
            )
            top2 = counts.topk(2, dim=1).values.tolist()
            for k, i in enumerate(rows):
                nA = int(counts[k, cA[i]])
                certificates[i] = certificate_from_counts(
                    int(cA[i]), nA, size, alpha, float(sigma[i]), top2[k], self.family
                )
        return certificates

    def certify_batch_at_radius(
        self,
        x: Tensor,
        sigma: Tensor | float,
        n0: int,
        n: int,
        alpha: float,
        radius: float,
        batch: int | None = None,
        keys: Sequence[int] | None = None,
    ) -> list[Certificate]:
        """Is each input certified at `radius`? A sequential test that stops each input as
        soon as it is decided, after at most n estimation samples.

        cA is selected on n0 samples, as in CERTIFY. The estimation samples are looked at
        after 100, 200, 400, ... of them and at n (`stats.radius_looks`); each look tests
        pA >= Phi(radius / sigma) with Clopper-Pearson at alpha / (number of looks), a union
        bound that holds whichever look the test stops at. With probability >= 1 - alpha per
        input, an input answered (cA, radius) has g(x + d) = cA for every ||d||_2 < radius.
        Undecided after n samples, or refuted earlier: (ABSTAIN, 0). `Certificate.n` is the
        number of estimation samples drawn.
        """
        sigma, n0, n, alpha, batch, keys = self._checked(x, sigma, n0, n, alpha, batch, keys)
        radius = number("radius", radius, minimum=0)
        cA = self._counts(x, sigma, n0, batch, STREAM_SELECTION, keys).argmax(dim=1)
        looks = radius_looks(n)
        alpha_look = look_alpha(alpha, looks)
        p_needed = self.family.p_needed(radius, sigma.double().numpy())
        counts = torch.zeros(x.shape[0], self.num_classes, dtype=torch.int64)
        drawn = np.zeros(x.shape[0], dtype=np.int64)
        verdict = np.zeros(x.shape[0], dtype=np.int64)
        for previous, look in zip([0, *looks], looks):
            rows = np.flatnonzero(verdict == 0).tolist()
            if not rows:
                break
            group = torch.tensor(rows)
            counts[group] += self._counts(
                x[group], sigma[group], look - previous, batch, STREAM_ESTIMATION,
                [keys[i] for i in rows], first=previous,
            )  # fmt: skip
            drawn[rows] = look
            nA = counts[group].gather(1, cA[group, None]).squeeze(1).numpy()
            verdict[rows] = radius_decision(nA, look, p_needed[rows], alpha_look)
        certificates = []
        for i in range(x.shape[0]):
            nA, top2 = int(counts[i, cA[i]]), tuple(counts[i].topk(2).values.tolist())
            certified = verdict[i] == 1
            certificates.append(
                Certificate(
                    int(cA[i]) if certified else ABSTAIN,
                    float(radius) if certified else 0.0,
                    float(clopper_pearson_lower(nA, int(drawn[i]), alpha_look)),
                    nA,
                    int(drawn[i]),
                    float(sigma[i]),
                    int(cA[i]),
                    top2,
                )
            )
        return certificates

    def certify(
        self,
        x: Tensor,
        sigma: float,
        n0: int,
        n: int,
        alpha: float,
        batch: int | None = None,
        key: int | None = None,
    ) -> Certificate:
        """CERTIFY one input x (C, H, W); see `certify_batch`."""
        keys = None if key is None else [key]
        return self.certify_batch(x.unsqueeze(0), sigma, n0, n, alpha, batch, keys)[0]

    def predict_batch(
        self,
        x: Tensor,
        sigma: Tensor | float,
        n: int,
        alpha: float,
        batch: int | None = None,
        keys: Sequence[int] | None = None,
    ) -> list[int]:
        """PREDICT each row of x: returns g(x) or ABSTAIN.

        The probability of returning a class other than g(x) is at most alpha (per input).
        """
        sigma = check_inputs(x, sigma)
        n = integer("n", n)
        alpha = check_alpha(alpha)
        batch = self._batch(batch, x)
        keys = self._keys(x.shape[0], keys)
        counts = self._counts(x, sigma, n, batch, STREAM_PREDICTION, keys)
        top2_counts, top2_classes = counts.topk(2, dim=1)
        answers = []
        for (nA, nB), (cA, _) in zip(top2_counts.tolist(), top2_classes.tolist()):
            significant = two_sided_binomial_pvalue(nA, nB) <= alpha
            answers.append(cA if significant else ABSTAIN)
        return answers

    def predict(
        self,
        x: Tensor,
        sigma: float,
        n: int,
        alpha: float,
        batch: int | None = None,
        key: int | None = None,
    ) -> int:
        """PREDICT one input x (C, H, W); see `predict_batch`."""
        keys = None if key is None else [key]
        return self.predict_batch(x.unsqueeze(0), sigma, n, alpha, batch, keys)[0]
