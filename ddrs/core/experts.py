"""Experts: a set of (model, sigma) pairs, e.g. models trained at sigma 0.12, 0.25 and 0.5,
each smoothed at its own sigma, or one model at several sigmas. How experts are given and
loaded (`--expert`, experts files) is in models/experts.py."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ddrs.errors import InputError


@dataclass(frozen=True)
class Expert:
    """A base classifier smoothed at its own sigma."""

    name: str
    source: str
    sigma: float
    model: nn.Module


@dataclass(frozen=True)
class Experts:
    """A set of experts, in the order given (which a router's classes follow)."""

    members: tuple[Expert, ...]

    @classmethod
    def of_model(cls, model: nn.Module) -> Experts:
        """One model whose sigma comes per input (fixed, from a file, or searched): the one
        expert of every input. Everything that runs a model runs experts; this is one."""
        return cls((Expert("", "", math.nan, model),))

    @property
    def is_model(self) -> bool:
        """One model with a sigma per input, rather than experts at their own sigmas."""
        return len(self.members) == 1 and math.isnan(self.members[0].sigma)

    def __len__(self) -> int:
        return len(self.members)

    def __iter__(self):
        return iter(self.members)

    def __getitem__(self, k: int) -> Expert:
        return self.members[k]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.members)

    def index(self, name: str) -> int:
        """The position of the expert called `name`."""
        if name not in self.names:
            raise InputError(f"no expert is called {name!r}; the experts are {list(self.names)}")
        return self.names.index(name)

    def name_at(self, sigma: float) -> str:
        """The name of the one expert at `sigma` (a stored answer records its sigma), or ""
        when none or several are."""
        names = [e.name for e in self.members if e.sigma == sigma]
        return names[0] if len(names) == 1 else ""

    def describe(self) -> list[list]:
        """[[name, sigma], ...], for settings and service descriptions."""
        return [[e.name, e.sigma] for e in self.members]


def as_experts(model: nn.Module | Experts) -> Experts:
    """Experts as they are; one model as the one expert of every input."""
    return model if isinstance(model, Experts) else Experts.of_model(model)
