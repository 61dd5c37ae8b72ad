"""The data-dependent smoothed classifier, online: sigma search + CERTIFY + memory.

Each query x is answered by
  1. sigma_x = a sigma search from sigma0 (sigma.py; `selector` names it: "certified" picks
     by the radius CERTIFY would give at this classifier's N and alpha, "ascent" is the
     paper's gradient ascent, "grid" the surrogate-scored grid),
  2. (c, R) = CERTIFY(x, sigma_x) (smooth.py),
  3. the memory rule (memory.py), which makes the answers of a classifier whose sigma
     depends on x certifiable: no two stored balls of different classes intersect.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ddrs.errors import InputError
from ddrs.memory import CertificationMemory
from ddrs.models import model_fingerprint
from ddrs.sampling import CPU_BATCH
from ddrs.sigma import SEARCHES, check_search_options
from ddrs.smooth import Smooth


def memory_fingerprint(model: nn.Module, dataset: str, input_shape) -> str:
    """Identity of 'this model with this preprocessing', which a memory belongs to."""
    text = f"{model_fingerprint(model)}|{dataset}|{tuple(input_shape)}"
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Answer:
    predict: int
    radius: float
    sigma: float  # the sigma that certified `radius` (for a repeat: the stored entry's)
    changed: bool  # the memory changed the Monte Carlo class
    shrunk: bool  # the memory shrank the Monte Carlo radius
    mc_predict: int
    mc_radius: float
    repeat: bool = False  # an exact repeat of a stored input: its stored answer
    entry: int = -1  # the memory entry holding this answer


QUERY_KINDS = ("certify", "predict")


@dataclass
class DataDependentSmoothClassifier:
    """Online data-dependent smoothing with a certification memory (Alfarra et al., 2022).

    Stateful and order-dependent by design: every answer is stored in `memory` and later
    answers are kept consistent with it. `selector` None: no search, every input gets sigma0.
    """

    model: nn.Module
    num_classes: int
    memory: CertificationMemory
    sigma0: float
    n0: int = 100
    n: int = 100_000
    alpha: float = 0.001
    batch: int | None = None  # samples per forward pass; None: automatic
    seed: int = 0
    selector: str | None = "certified"
    search: dict = field(default_factory=dict)  # the selector's options (sigma.SEARCHES)

    def __post_init__(self):
        if self.selector == "certified":  # score candidates at the N and alpha used below
            self.search = {"n": self.n, "alpha": self.alpha} | self.search
        elif self.selector == "ascent" and not self.search:  # the authors' settings
            self.search = {"iterations": 100, "lr": 1e-4, "samples": 1}
        if self.selector is not None:
            check_search_options(self.selector, self.search)
        self.smooth = Smooth(self.model, self.num_classes, seed=self.seed)

    def sigmas_for(self, x: Tensor, keys: list[int]) -> Tensor:
        """Each input's sigma (B,): the selector's choice, or sigma0 without one."""
        if self.selector is None:
            return torch.full((x.shape[0],), float(self.sigma0))
        found = SEARCHES[self.selector](
            self.model,
            x,
            self.sigma0,
            seed=self.seed,
            keys=keys,
            batch=self.batch or CPU_BATCH,
            **self.search,
        )
        return found.sigma.detach().float().cpu()

    def sigma_for(self, x: Tensor, key: int) -> float:
        return float(self.sigmas_for(x.unsqueeze(0), [key])[0])

    def certify(self, x: Tensor, key: int = 0) -> Answer:
        """Certify x (C, H, W); `key` names its noise streams (e.g. its dataset index)."""
        return self.answer_batch(x.unsqueeze(0), ["certify"], [key])[0]

    def predict(self, x: Tensor, key: int = 0) -> Answer:
        """PREDICT x; the answer is stored in the memory as a ball of radius 0."""
        return self.answer_batch(x.unsqueeze(0), ["predict"], [key])[0]

    def answer_batch(self, x: Tensor, kinds: list[str], keys: list[int]) -> list[Answer]:
        """Answer B queries (x: (B, C, H, W), each "certify" or "predict") as if they came one
        at a time in this order: the sigma search and the Monte Carlo sampling run for all of
        them at once (the noise is keyed, so batching changes nothing), then the memory
        resolves and stores each answer in turn."""
        if len(kinds) != x.shape[0] or len(keys) != x.shape[0]:
            raise InputError(f"{x.shape[0]} inputs need as many kinds and keys")
        unknown = sorted(set(kinds) - set(QUERY_KINDS))
        if unknown:
            raise InputError(f"unknown query kind(s) {unknown}; use {QUERY_KINDS}")
        sigmas = self.sigmas_for(x, keys)
        mc: dict[int, tuple[int, float]] = {}
        for kind in QUERY_KINDS:
            rows = [i for i, k in enumerate(kinds) if k == kind]
            if not rows:
                continue
            row_keys = [keys[i] for i in rows]
            if kind == "certify":
                found = self.smooth.certify_batch(
                    x[rows], sigmas[rows], self.n0, self.n, self.alpha, self.batch, row_keys
                )
                answers = [(c.predict, c.radius) for c in found]
            else:
                found = self.smooth.predict_batch(
                    x[rows], sigmas[rows], self.n, self.alpha, self.batch, row_keys
                )
                answers = [(c, 0.0) for c in found]
            mc.update(zip(rows, answers))
        return [
            self._resolve(x[i], *mc[i], float(sigmas[i]), keys[i]) for i in range(x.shape[0])
        ]

    def _resolve(self, x, predict, radius, sigma, key) -> Answer:
        r = self.memory.resolve_and_store(x, predict, radius, sigma=sigma, idx=key)
        return Answer(
            r.predict, r.radius, r.sigma, r.changed, r.shrunk, predict, radius, r.repeat, r.entry
        )
