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

from torch import Tensor, nn

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
    sigma: float
    changed: bool  # the memory changed the Monte Carlo class
    shrunk: bool  # the memory shrank the Monte Carlo radius
    mc_predict: int
    mc_radius: float


@dataclass
class DataDependentSmoothClassifier:
    """Online data-dependent smoothing with a certification memory (Alfarra et al., 2022).

    Stateful and order-dependent by design: every answer is stored in `memory` and later
    answers are kept consistent with it.
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
    selector: str = "certified"
    search: dict = field(default_factory=dict)  # the selector's options (sigma.SEARCHES)

    def __post_init__(self):
        if self.selector == "certified":  # score candidates at the N and alpha used below
            self.search = {"n": self.n, "alpha": self.alpha} | self.search
        elif self.selector == "ascent" and not self.search:  # the authors' settings
            self.search = {"iterations": 100, "lr": 1e-4, "samples": 1}
        check_search_options(self.selector, self.search)
        self.smooth = Smooth(self.model, self.num_classes, seed=self.seed)

    def sigma_for(self, x: Tensor, key: int) -> float:
        found = SEARCHES[self.selector](
            self.model,
            x.unsqueeze(0),
            self.sigma0,
            seed=self.seed,
            keys=[key],
            batch=self.batch or CPU_BATCH,
            **self.search,
        )
        return float(found.sigma[0])

    def certify(self, x: Tensor, key: int = 0) -> Answer:
        """Certify x (C, H, W); `key` names its noise streams (e.g. its dataset index)."""
        sigma = self.sigma_for(x, key)
        cert = self.smooth.certify(x, sigma, self.n0, self.n, self.alpha, self.batch, key=key)
        return self._resolve(x, cert.predict, cert.radius, sigma, key)

    def predict(self, x: Tensor, key: int = 0) -> Answer:
        """PREDICT x; the answer is stored in the memory as a ball of radius 0."""
        sigma = self.sigma_for(x, key)
        predict = self.smooth.predict(x, sigma, self.n, self.alpha, self.batch, key=key)
        return self._resolve(x, predict, 0.0, sigma, key)

    def _resolve(self, x, predict, radius, sigma, key) -> Answer:
        r = self.memory.resolve_and_store(x, predict, radius, sigma=sigma, idx=key)
        return Answer(r.predict, r.radius, sigma, r.changed, r.shrunk, predict, radius)
