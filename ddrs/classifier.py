"""The data-dependent smoothed classifier, online: sigma (or expert) + CERTIFY + memory.

Each query x is answered by
  1. a noise level for x: sigma_x from a sigma search around sigma0 (core/sigma.py; `selector`
     names it: "certified" picks by the radius CERTIFY would give at this classifier's N and
     alpha, "ascent" is the paper's gradient ascent, "grid" the surrogate-scored grid); or,
     with experts, the expert (and its sigma) the certified selector over experts picks
     (core/route.py);
  2. (c, R) = CERTIFY(x, sigma_x) with that model (core/smooth.py), or with a router, the dual
     certificate (route.DualSmoothing);
  3. the memory rule (memory/rule.py), which makes the answers of a classifier whose sigma (or
     expert) depends on x certifiable: no two stored balls of different classes intersect.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from ddrs.core.cascade import Cascade
from ddrs.core.experts import Experts, as_experts
from ddrs.core.families import GAUSSIAN, Family, family_of
from ddrs.core.route import (
    ROUTE_RULES,
    DualSmoothing,
    ExpertCertifier,
    Router,
    check_route_rule,
    route_by_certified_radius,
)
from ddrs.core.sampling import CPU_BATCH
from ddrs.core.sigma import DEFAULT_SAMPLES, SEARCHES, check_search_options
from ddrs.core.smooth import DEFAULTS
from ddrs.core.validate import canonical_input
from ddrs.errors import InputError
from ddrs.memory import Answer, CertificationMemory

QUERY_KINDS = ("certify", "predict")


@dataclass
class DataDependentSmoothClassifier:
    """Online data-dependent smoothing with a certification memory (Alfarra et al., 2022).

    Stateful and order-dependent by design: every answer is stored in `memory` and later
    answers are kept consistent with it. `model`: one model, whose sigma per input comes from
    `selector` (None: every input gets sigma0), or `Experts`, among which the certified
    selector over experts (`route_rule`, `search["samples"]` votes each) routes each input,
    or a `router` certifies the route (dual smoothing: `router_n` samples, `router_share` of
    alpha).
    """

    model: nn.Module | Experts
    num_classes: int
    memory: CertificationMemory | None  # None: stateless (a fixed sigma, a router, a cascade)
    sigma0: float | None = None
    n0: int = DEFAULTS.n0
    n: int = DEFAULTS.n
    alpha: float = DEFAULTS.alpha
    batch: int | None = None  # samples per forward pass; None: automatic
    seed: int = 0
    selector: str | None = "certified"
    search: dict = field(default_factory=dict)  # the selector's options (sigma.SEARCHES)
    router: Router | None = None
    router_n: int | None = None  # the router's N; None: n
    router_share: float = 0.5
    route_rule: str = ROUTE_RULES[0]
    cascade: float | None = None  # experts: the multi-scale cascade at this threshold p0
    amp: str | None = None  # CUDA: autocast every base classifier (experts and router)
    compile: bool = False  # torch.compile every base classifier
    radius: float | None = None  # only "certified at this radius?" (a sequential test)
    family: Family | str = GAUSSIAN  # the noise and the norm of the radius (core/families.py)

    def __post_init__(self):
        self.experts = as_experts(self.model)
        self.family = family_of(self.family)
        if self.memory is not None and self.memory.norm != self.family.norm:
            raise InputError(
                f"the memory holds {self.memory.norm.upper()} balls and this classifier "
                f"certifies {self.family.norm.upper()} radii: use a memory of its norm"
            )
        check_route_rule(self.route_rule)
        if self.radius is not None and (self.router is not None or self.cascade is not None):
            raise InputError("--radius certifies one model or experts, not a router or cascade")
        if self.router is not None and self.experts.is_model:
            raise InputError("a router routes among experts; give Experts as the model")
        if self.experts.is_model:
            if self.selector == "certified":  # score candidates at the N and alpha used below
                self.search = {"n": self.n, "alpha": self.alpha} | self.search
            elif self.selector == "ascent" and not self.search:  # the authors' settings
                self.search = {"iterations": 100, "lr": 1e-4, "samples": 1}
            if self.selector is not None:
                check_search_options(self.selector, self.search)
        if self.memory is None and not self.is_stateless:
            raise InputError(
                "a classifier whose sigma or expert depends on the input needs a memory to "
                "be certifiable; give one, or a fixed sigma, a router or a cascade"
            )
        engine = {
            "seed": self.seed,
            "amp": self.amp,
            "compile": self.compile,
            "family": self.family,
        }
        self.certifier = ExpertCertifier(self.experts, self.num_classes, **engine)
        self.cascader = None
        if self.cascade is not None:
            if self.experts.is_model or self.router is not None:
                raise InputError("the cascade runs among experts, without a router")
            self.cascader = Cascade(self.experts, self.num_classes, self.cascade, **engine)
        self.dual = None
        if self.router is not None:
            self.dual = DualSmoothing(self.router, self.experts, self.num_classes, **engine)
            self.router_n = self.router_n or self.n

    @property
    def is_stateless(self) -> bool:
        """Certifiable without a memory: one model at a fixed sigma, a router that certifies
        the route (dual smoothing), or the cascade; its answers do not depend on the order."""
        fixed = self.experts.is_model and self.selector is None
        return fixed or self.router is not None or self.cascade is not None

    def routes_for(self, x: Tensor, keys: list[int]) -> tuple[list[int], Tensor]:
        """Each input's expert (index) and sigma (B,): with experts, the certified selector
        over them; with one model, the selector's sigma (or sigma0 without one)."""
        batch = self.batch or CPU_BATCH
        if not self.experts.is_model:
            samples = self.search.get("samples", DEFAULT_SAMPLES["certified"])
            found = route_by_certified_radius(
                self.experts,
                x,
                samples=samples,
                n=self.n,
                alpha=self.alpha,
                rule=self.route_rule,
                seed=self.seed,
                keys=keys,
                batch=batch,
                family=self.family,
            )
            return found.expert.tolist(), found.sigma
        if self.selector is None:
            return [0] * x.shape[0], torch.full((x.shape[0],), float(self.sigma0))
        found = SEARCHES[self.selector](
            self.experts[0].model,
            x,
            self.sigma0,
            seed=self.seed,
            keys=keys,
            batch=batch,
            family=self.family,
            **self.search,
        )
        return [0] * x.shape[0], found.sigma.detach().float().cpu()

    def certify(self, x: Tensor, key: int = 0) -> Answer:
        """Certify x (C, H, W); `key` names its noise streams (e.g. its dataset index)."""
        return self.answer_batch(x.unsqueeze(0), ["certify"], [key])[0]

    def predict(self, x: Tensor, key: int = 0) -> Answer:
        """PREDICT x; the answer is stored in the memory as a ball of radius 0."""
        return self.answer_batch(x.unsqueeze(0), ["predict"], [key])[0]

    def answer_batch(self, x: Tensor, kinds: list[str], keys: list[int]) -> list[Answer]:
        """Answer B queries (x: (B, C, H, W), each "certify" or "predict") as if they came one
        at a time in this order: an exact repeat of a stored input gets its stored answer
        without sampling; for the others the routing and the Monte Carlo sampling run at once
        (the noise is keyed, so batching changes nothing), then the memory resolves and stores
        each answer in turn."""
        if len(kinds) != x.shape[0] or len(keys) != x.shape[0]:
            raise InputError(f"{x.shape[0]} inputs need as many kinds and keys")
        unknown = sorted(set(kinds) - set(QUERY_KINDS))
        if unknown:
            raise InputError(f"unknown query kind(s) {unknown}; use {QUERY_KINDS}")
        shape = None if self.memory is None else self.memory.input_shape
        x = torch.stack([canonical_input(xi, shape) for xi in x])
        answers: dict[int, Answer] = {}
        for i in range(x.shape[0] if self.memory is not None else 0):
            repeat = self.memory.repeat_answer(x[i])
            if repeat is not None:
                answers[i] = replace(repeat, expert=self.experts.name_at(repeat.sigma))
        mc: dict[int, tuple[int, float, int, float]] = {}  # class, radius, expert, sigma
        for kind in QUERY_KINDS:
            rows = [i for i, k in enumerate(kinds) if k == kind and i not in answers]
            if rows:
                mc.update(zip(rows, self._monte_carlo(kind, x[rows], [keys[i] for i in rows])))
        for i in range(x.shape[0]):  # in arrival order: a later query may repeat an earlier
            if i not in answers:
                answers[i] = self._resolve(x[i], *mc[i], keys[i])
        return [answers[i] for i in range(x.shape[0])]

    def _monte_carlo(self, kind: str, x: Tensor, keys: list[int]) -> list[tuple]:
        """(class, radius, expert, sigma) of each input before the memory."""
        if self.cascader is not None:
            found = self.cascader.certify_batch(
                x, n0=self.n0, n=self.n, alpha=self.alpha, batch=self.batch, keys=keys
            )
            return [
                (c.predict, c.radius if kind == "certify" else 0.0, c.expert, c.sigma)
                for c in found
            ]
        if self.dual is not None:
            if kind == "certify":
                found = self.dual.certify_batch(
                    x,
                    n0=self.n0,
                    n=self.n,
                    router_n=self.router_n,
                    alpha=self.alpha,
                    router_share=self.router_share,
                    batch=self.batch,
                    keys=keys,
                )
                return [(c.predict, c.radius, c.expert, c.sigma) for c in found]
            found = self.dual.predict_batch(
                x,
                n=self.n,
                router_n=self.router_n,
                alpha=self.alpha,
                router_share=self.router_share,
                batch=self.batch,
                keys=keys,
            )
            return [(c, 0.0, k, s) for c, k, s in found]
        expert, sigma = self.routes_for(x, keys)
        if kind == "certify":
            found = self.certifier.certify_batch(
                x, expert, sigma, self.n0, self.n, self.alpha, self.batch, keys,
                radius=self.radius,
            )  # fmt: skip
            answers = [(c.predict, c.radius) for c in found]
        else:
            found = self.certifier.predict_batch(
                x, expert, sigma, self.n, self.alpha, self.batch, keys
            )
            answers = [(c, 0.0) for c in found]
        return [(c, r, k, float(s)) for (c, r), k, s in zip(answers, expert, sigma.tolist())]

    def _resolve(self, x, predict, radius, expert, sigma, key) -> Answer:
        name = self.experts[expert].name if expert >= 0 else ""
        if self.memory is None:  # stateless: the certificate as it is, stored nowhere
            return Answer(predict, radius, sigma, False, False, predict, radius, expert=name)
        answer = self.memory.resolve_and_store(x, predict, radius, sigma=sigma, idx=key)
        if answer.repeat:  # of an earlier query of this batch
            return replace(answer, expert=self.experts.name_at(answer.sigma))
        return replace(answer, expert=name)
