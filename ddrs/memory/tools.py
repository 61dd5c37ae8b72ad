"""Tools that read a whole memory: its statistics and the invariant check. They take an open
`CertificationMemory` (certification.py); copying a memory is in copy.py."""

from __future__ import annotations

import numpy as np

from ddrs.memory.rule import ABSTAIN, TOLERANCE, violations

CHECK_BLOCK = 1024  # pairwise block side in `check`: a few [block, block] float64 matrices


def memory_stats(memory, bins: int = 10) -> dict:
    """Summary counts; the radius histogram is over the non-abstained entries."""
    rows = memory.store.outcomes()
    repeats = memory.store.repeats()
    table = np.array(rows, dtype=np.float64).reshape(-1, 5)
    c, r, sigma, changed, shrunk = table.T
    classes, counts = np.unique(c[c >= 0].astype(np.int64), return_counts=True)
    certified = r[c >= 0]
    top = float(certified.max()) if len(certified) else 0.0
    hist, edges = np.histogram(certified, bins=bins, range=(0.0, top or 1.0))
    summary = {"min": None, "median": None, "max": None}
    if len(sigma):
        summary = {"min": sigma.min(), "median": np.median(sigma), "max": sigma.max()}
    return {
        "entries": len(rows),
        "classes": {int(k): int(v) for k, v in zip(classes, counts, strict=True)},
        "abstentions": int((c == ABSTAIN).sum()),
        "changed": int(changed.sum()),
        "shrunk": int(shrunk.sum()),
        "repeats": repeats,
        "radius_histogram": {"edges": edges.tolist(), "counts": hist.tolist()},
        "sigma": {k: None if v is None else float(v) for k, v in summary.items()},
        "fingerprint": memory.fingerprint,
        "input_shape": list(memory.input_shape),
        "norm": memory.norm,
    }


def intersecting_pairs(memory, tol: float = TOLERANCE) -> list[tuple]:
    """All pairs (i, j, overlap), i < j by order, of different classes whose balls overlap by
    more than tol * (1 + R_i + R_j), overlap = R_i + R_j - d_ij. Blockwise: at most two
    blocks of inputs in RAM at a time; O(N^2 D) flops."""
    block = min(memory.chunk_size, CHECK_BLOCK)
    stop = memory.store.next_order()
    bad: list[tuple] = []
    for a in memory.chunks(0, stop, block):
        for b in memory.chunks(int(a[3][0]), stop, block):
            bad += violations(a, b, tol, memory.norm)
    return sorted(bad)
