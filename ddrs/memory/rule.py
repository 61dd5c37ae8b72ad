"""The memory rule: keep data-dependent certificates mutually consistent (pure functions).

A smoothed classifier whose sigma depends on the input is not certifiable by Cohen's argument
alone, because sigma changes inside the ball certified at x. The memory-enhanced classifier
keeps an ordered memory of everything it certified, entries (x_j, c_j, R_j), and answers
consistently with it. For a new input x with Monte Carlo certificate (c, R) (c = -1 abstains,
then R = 0):

* d_j = ||x - x_j|| (float64, over the exact float32 inputs), in the memory's norm: L2, or L1
  for certificates of uniform noise. The proof below needs only the triangle inequality.
* An exact repeat (bitwise-equal input) returns the stored answer and stores nothing.
* Conflicts D = {j : c_j != c and d_j < R_j + R}; abstention (-1) is a class of its own.
* No conflict: store (x, c, R). Otherwise j* = argmin_D (d_j - R_j) (ties: earliest stored)
  and r = d_j* - R_j*. If r < 0, x lies strictly inside ball j*: c <- c_j*, R <- R_j* - d_j*.
  Else R <- r. Store the adjusted (x, c, R).

Invariant: balls of different classes never intersect, d_ij >= R_i + R_j. Proof that storing
(x, c', R') preserves it, for every stored k with c_k != c':

* no conflict: d_k >= R_k + R by definition of D.
* r >= 0 (c' = c, R' = r < R because j* is in D): for k in D, d_k - R_k >= r = R' (j* is the
  argmin); for k not in D, d_k >= R_k + R > R_k + R'.
* r < 0 (c' = c_j*, R' = R_j* - d_j*): the stored pair (j*, k) satisfies d_j*k >= R_j* + R_k,
  so by the triangle inequality d_k >= d_j*k - d_j* >= R_j* + R_k - d_j* = R_k + R'.

Hence no two balls of different classes share an interior point, so every input strictly
inside a stored ball j has d_j - R_j < 0 and is answered c_j. An abstention is stored with
radius 0 and only points strictly inside a ball count, so no ball ever swallows an abstained
input. Float64 rounding can break the invariant by a few ulps; `violations` therefore allows an
overlap of TOLERANCE * (1 + R_i + R_j), far above the rounding error of a float64 norm and far
below any meaningful radius.

Only the entries that could conflict matter: an entry of the same class, or one whose ball
cannot reach x's (d_j >= R_j + R, known from a lower bound on d_j), changes nothing. So the
rule is given the *candidates*, the entries an exact index could not rule out (index.py);
`resolve` applied to all entries and to the candidates gives the same answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ddrs.core.checks import number
from ddrs.core.validate import canonical_input
from ddrs.errors import InputError

TOLERANCE = 1e-9  # relative overlap allowed by `violations`: overlap <= TOLERANCE*(1 + R_i + R_j)
ABSTAIN = -1
DISTANCE_BLOCK_BYTES = 32 << 20  # float64 temporaries per distance sub-block


@dataclass(frozen=True)
class Answer:
    """An answer of the memory-based classifier: what the memory made of a Monte Carlo
    certificate (mc_predict, mc_radius), as stored and sent."""

    predict: int  # the class (-1 = abstain)
    radius: float  # the certified radius (in the memory's norm, pixel units)
    sigma: float  # the sigma that certified `radius` (for a repeat: the stored entry's)
    changed: bool  # the memory changed the Monte Carlo class (x inside another class's ball)
    shrunk: bool  # the memory shrank the Monte Carlo radius
    mc_predict: int  # the Monte Carlo certificate (for a repeat: the stored entry's)
    mc_radius: float
    repeat: bool = False  # an exact repeat of a stored input: its stored answer
    entry: int = -1  # the order (0-based) of the entry holding this answer
    expert: str = ""  # the expert that answered (a classifier of experts; "" otherwise)


def check_certificate(predict: int, radius: float) -> tuple[int, float]:
    if int(predict) != predict or predict < ABSTAIN:
        raise InputError(f"predict must be an integer class >= -1, got {predict!r}")
    radius = number("radius", float(radius), minimum=0)
    if predict == ABSTAIN and radius != 0:
        raise InputError(f"an abstention (predict=-1) must have radius 0, got {radius!r}")
    return int(predict), radius


def as_input(
    x: Tensor, shape: tuple[int, ...] | None = None, pixel_range: tuple[float, float] | None = None
) -> Tensor:
    """One input as it is stored: checked and canonical (core.validate), flattened."""
    return canonical_input(x, shape, pixel_range).reshape(-1)


NORM_ORDER = {"l2": 2, "l1": 1}


def norm_order(norm: str) -> int:
    """p of an Lp norm's name ("l2", "l1")."""
    if norm not in NORM_ORDER:
        raise InputError(f"unknown norm {norm!r}; choose one of {sorted(NORM_ORDER)}")
    return NORM_ORDER[norm]


def distances(x: Tensor, xs: Tensor, norm: str = "l2") -> Tensor:
    """Float64 distances (L2, or L1) from a flat float32 input to each row of xs [k, D],
    computed over sub-blocks so that the float64 temporaries stay near DISTANCE_BLOCK_BYTES."""
    p = norm_order(norm)
    rows = max(1, DISTANCE_BLOCK_BYTES // (8 * max(1, xs.shape[1])))
    x64 = x.double()
    out = torch.empty(xs.shape[0], dtype=torch.float64)
    for i in range(0, xs.shape[0], rows):
        out[i : i + rows] = (xs[i : i + rows].double() - x64).norm(p=p, dim=1)
    return out


def find_repeat(x: Tensor, xs: Tensor) -> int | None:
    """Row of xs bitwise equal to x, or None (reference: a scan; the index hashes)."""
    if len(xs) == 0:
        return None
    x, xs = x.reshape(-1).float(), xs.reshape(len(xs), -1).float()
    d = distances(x, xs)
    for j in torch.nonzero(d == 0).flatten().tolist():
        if torch.equal(xs[j].view(torch.int32), x.view(torch.int32)):
            return j
    return None


def resolve(
    x: Tensor, predict: int, radius: float, xs: Tensor, c: Tensor, r: Tensor, norm: str = "l2"
) -> tuple[int, float, int | None]:
    """The rule for the certificate (predict, radius) of the flat float32 input x against
    entries xs [k, D], classes c [k] and radii r [k] in insertion order (all entries, or the
    candidates an exact index kept). Returns (class, radius, j): j the row that decided the
    answer (the conflict j*), None when x keeps its certificate. Exact repeats are found
    before (`find_repeat`). `norm`: the balls' ("l2" or "l1")."""
    if len(xs) == 0:
        return predict, radius, None
    d = distances(x.reshape(-1).float(), xs.reshape(len(xs), -1).float(), norm)
    c, r = c.long().reshape(-1), r.double().reshape(-1)
    conflict = (c != predict) & (d < r + radius)
    margins = torch.where(conflict, d - r, torch.full_like(d, math.inf))
    j = int(torch.argmin(margins))  # the first minimum: ties go to the earliest stored
    if math.isinf(margins[j]):
        return predict, radius, None
    margin = float(margins[j])
    if margin < 0:  # x lies strictly inside ball j*: take its class, keep inside it
        return int(c[j]), -margin, j
    # shrink so that the balls no longer intersect; margin < radius, min() only guards rounding
    return predict, min(radius, margin), j


def violations(
    a: tuple, b: tuple, tol: float = TOLERANCE, norm: str = "l2"
) -> list[tuple[int, int, float]]:
    """Pairs (i, j, overlap), i < j by order, of entries of blocks a and b (x, c, r, order) of
    different classes whose balls (in `norm`) overlap by more than tol * (1 + R_i + R_j)."""
    (xa, ca, ra, oa), (xb, cb, rb, ob) = a, b
    d = torch.cdist(
        xa.double(),
        xb.double(),
        p=float(norm_order(norm)),
        compute_mode="donot_use_mm_for_euclid_dist",
    )
    reach = ra[:, None] + rb[None, :]
    overlap = reach - d
    pairs = (ca[:, None] != cb[None, :]) & (oa[:, None] < ob[None, :])
    i, j = torch.nonzero(pairs & (overlap > tol * (1 + reach)), as_tuple=True)
    return [(int(oa[p]), int(ob[q]), float(overlap[p, q])) for p, q in zip(i, j, strict=True)]
