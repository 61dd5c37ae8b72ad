"""The checks every layer shares: one home for "an integer >= 1", "a finite number >= x",
"a probability in (0, 1)" and "a noise level > 0". Each returns the value as a plain Python
number or raises InputError naming the setting, so that every caller says the same thing."""

from __future__ import annotations

import math
import numbers

from ddrs.errors import InputError


def integer(name: str, value, minimum: int = 1) -> int:
    """`value` as an int if it is an integer (numpy integers too, not bool) >= minimum."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def number(name: str, value, minimum: float | None = None) -> float:
    """`value` as a float if it is a finite real number (not bool), >= minimum if given."""
    if (
        not isinstance(value, numbers.Real)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or (minimum is not None and value < minimum)
    ):
        bound = "" if minimum is None else f" >= {minimum:g}"
        raise InputError(f"{name} must be a finite number{bound}, got {value!r}")
    return float(value)


def positive(name: str, value) -> float:
    """A noise level or scale: a finite number > 0."""
    if (
        not isinstance(value, numbers.Real)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise InputError(f"{name} must be finite and > 0, got {value!r}")
    return float(value)


def probability(name: str, value) -> float:
    """A failure probability: a number strictly between 0 and 1."""
    if (
        not isinstance(value, numbers.Real)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not 0 < value < 1
    ):
        raise InputError(f"{name} must be in (0, 1), got {value!r}")
    return float(value)


def check_alpha(alpha) -> float:
    """The failure probability alpha of CERTIFY / PREDICT."""
    return probability("alpha", alpha)


def optional_integer(name: str, value, minimum: int = 1) -> int | None:
    return None if value is None else integer(name, value, minimum)
