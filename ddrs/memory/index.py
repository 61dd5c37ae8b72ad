"""An exact index over the stored entries, in RAM: which entries could conflict with a query.

An entry j can change the answer for x (certificate (c, R)) only if c_j != c and
d(x, x_j) < R + R_j (rule.py). Every stored distance is bounded from below without being
computed, by the triangle inequality:

    d(x, x_j) >= | ||x|| - ||x_j|| |                          (the norms)
    d(x, x_j) >= | d(x, p) - d(x_j, p) |   for each pivot p   (a few stored inputs)

so an entry whose bound reaches R + R_j is skipped, and only the others (the candidates) get
an exact distance. Nothing is approximate: a skipped entry provably cannot conflict (the
bounds are lowered by a rounding margin far above float64's error). Entries are also kept
sorted by norm, so the candidates' norms are found by binary search in a shell
[||x|| - R - max R_j, ||x|| + R + max R_j] instead of a scan; exact repeats (bitwise-equal
inputs) are found by hashing the stored bytes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ddrs.memory.rule import norm_order

PIVOTS = 8  # the first stored inputs serve as pivots
ROUNDING = 1e-9  # relative margin subtracted from every lower bound


def _grown(t: Tensor, cap: int) -> Tensor:
    out = torch.empty((cap, *t.shape[1:]), dtype=t.dtype)
    out[: len(t)] = t
    return out


class Index:
    """The in-RAM copy of the entries (x, class, radius, sigma, order), append-only, with the
    norms, the distances to the pivots and the hashes that make queries cheap; every norm and
    distance in the memory's norm ("l2" or "l1": the bounds need only the triangle
    inequality)."""

    def __init__(self, dim: int, pivots: int = PIVOTS, norm: str = "l2") -> None:
        self.n, self.dim, self.max_pivots = 0, dim, pivots
        self.p = norm_order(norm)
        self.x = torch.empty(0, dim, dtype=torch.float32)
        self.c = torch.empty(0, dtype=torch.long)
        self.r = torch.empty(0, dtype=torch.float64)
        self.sigma = torch.empty(0, dtype=torch.float64)
        self.order = torch.empty(0, dtype=torch.long)
        self.norm = torch.empty(0, dtype=torch.float64)
        self.to_pivot = torch.empty(0, pivots, dtype=torch.float64)
        self.pivots: list[Tensor] = []
        self.by_hash: dict[int, list[int]] = {}
        self.sorted_pos = torch.empty(0, dtype=torch.long)  # positions sorted by norm
        self.sorted_norm = torch.empty(0, dtype=torch.float64)
        self.unsorted: list[int] = []  # positions appended since the last sort
        self.max_radius = 0.0

    @property
    def last_order(self) -> int:
        return int(self.order[self.n - 1]) if self.n else -1

    def nbytes(self, rows: int) -> int:
        return rows * (self.dim * 4 + 40 + 8 * self.max_pivots)

    def append(self, x: Tensor, c: Tensor, r: Tensor, sigma: Tensor, order: Tensor) -> None:
        """Add entries (rows in insertion order)."""
        need = self.n + len(x)
        if need > len(self.x):  # grow geometrically so that appending one row is amortised O(D)
            cap = max(need, 2 * len(self.x), 64)
            for name in ("x", "c", "r", "sigma", "order", "norm", "to_pivot"):
                setattr(self, name, _grown(getattr(self, name), cap))
        start = self.n
        for buf, rows in (
            (self.x, x),
            (self.c, c),
            (self.r, r),
            (self.sigma, sigma),
            (self.order, order),
        ):
            buf[start:need] = rows
        self.norm[start:need] = x.double().norm(p=self.p, dim=1)
        for k in range(len(x)):
            if len(self.pivots) < self.max_pivots:
                self.pivots.append(x[k].clone())
        self.to_pivot[start:need] = self._pivot_distances(x)
        for k in range(len(x)):
            self.by_hash.setdefault(hash(x[k].numpy().tobytes()), []).append(start + k)
        self.n = need
        self.max_radius = max(self.max_radius, float(r.max()) if len(r) else 0.0)
        self.unsorted.extend(range(start, need))
        if len(self.unsorted) > max(1024, int(math.sqrt(self.n))):
            self._sort()

    def _pivot_distances(self, x: Tensor) -> Tensor:
        """(k, PIVOTS) distances from rows of x to each pivot; NaN where the pivot came after
        the row was stored (no bound from it)."""
        out = torch.full((len(x), self.max_pivots), math.nan, dtype=torch.float64)
        for p, pivot in enumerate(self.pivots):
            out[:, p] = (x.double() - pivot.double()).norm(p=self.p, dim=1)
        return out

    def _sort(self) -> None:
        positions = torch.arange(self.n)
        norms = self.norm[: self.n]
        order = torch.argsort(norms, stable=True)
        self.sorted_pos, self.sorted_norm = positions[order], norms[order]
        self.unsorted = []

    def repeat_of(self, x: Tensor) -> int | None:
        """The position of the entry bitwise equal to x, or None."""
        for pos in self.by_hash.get(hash(x.numpy().tobytes()), []):
            if torch.equal(self.x[pos].view(torch.int32), x.view(torch.int32)):
                return pos
        return None

    def candidates(self, x: Tensor, predict: int, radius: float) -> Tensor:
        """Positions (ascending: insertion order) of the entries that might conflict with x's
        certificate (predict, radius): another class, and no lower bound on the distance
        reaching radius + R_j."""
        q_norm = float(x.double().norm(p=self.p))
        reach = radius + self.max_radius
        margin = ROUNDING * (1.0 + q_norm + reach)
        lo = int(
            torch.searchsorted(
                self.sorted_norm, torch.tensor(q_norm - reach - margin, dtype=torch.float64)
            )
        )
        hi = int(
            torch.searchsorted(
                self.sorted_norm,
                torch.tensor(q_norm + reach + margin, dtype=torch.float64),
                right=True,
            )
        )
        rows = torch.cat([self.sorted_pos[lo:hi], torch.tensor(self.unsorted, dtype=torch.long)])
        rows = rows[self.c[rows] != predict]
        if len(rows) == 0:
            return rows
        bound = (self.norm[rows] - q_norm).abs()
        if self.pivots:
            to_pivot = torch.stack([(x.double() - p.double()).norm(p=self.p) for p in self.pivots])
            differences = (self.to_pivot[rows, : len(self.pivots)] - to_pivot).abs()
            bound = torch.maximum(bound, torch.nan_to_num(differences, nan=0.0).max(dim=1).values)
        keep = bound - margin < radius + self.r[rows]
        return torch.sort(rows[keep]).values
