"""Training methods: each is the loss on one batch, given each input's own sigma.

A method is a small object with `loss(model, x, y, sigma, epoch) -> BatchLoss` (base.py). The
loop owns everything else (data, optimiser, sigma buffer, logging, checkpoints).
"""

from __future__ import annotations

import inspect

from ddrs.errors import InputError
from ddrs.train.methods.base import BatchLoss, Method, noise_like
from ddrs.train.methods.consistency import Consistency
from ddrs.train.methods.gaussian import GaussianAugmentation
from ddrs.train.methods.macer import Macer
from ddrs.train.methods.smoothadv import SmoothAdv

__all__ = ["BatchLoss", "Method", "build_method", "method_names", "noise_like"]

METHODS: dict[str, type[Method]] = {
    "gaussian": GaussianAugmentation,
    "smoothadv": SmoothAdv,
    "macer": Macer,
    "consistency": Consistency,
}


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def build_method(name: str, **settings) -> Method:
    """The method called `name`, with its hyper-parameters (unknown name -> InputError)."""
    if name not in METHODS:
        raise InputError(f"unknown training method {name!r}; choose one of {sorted(METHODS)}")
    accepted = set(inspect.signature(METHODS[name]).parameters)
    unknown = sorted(set(settings) - accepted)
    if unknown:
        raise InputError(
            f"{name} has no setting {', '.join(unknown)}; "
            f"its settings are {', '.join(sorted(accepted)) or 'none'}"
        )
    return METHODS[name](**settings)
