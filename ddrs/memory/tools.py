"""Tools that read a whole memory: statistics, the invariant check, and copying a memory from
one store to another (SQLite <-> PostgreSQL) with every checksum verified."""

from __future__ import annotations

import numpy as np

from ddrs.errors import MemoryStoreError
from ddrs.memory import CertificationMemory, open_store
from ddrs.memory.rule import ABSTAIN, TOLERANCE, violations
from ddrs.memory.store import ENTRY_COLUMNS, bad_checksums, describe

CHECK_BLOCK = 1024  # pairwise block side in `check`: a few [block, block] float64 matrices


def memory_stats(memory: CertificationMemory, bins: int = 10) -> dict:
    """Summary counts; the radius histogram is over the non-abstained entries."""
    rows = memory.store.all_rows("SELECT predict, radius, sigma, changed, shrunk FROM entries")
    repeats = int(memory.store.scalar("SELECT value FROM meta WHERE key = 'repeats'"))
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
    }


def intersecting_pairs(memory: CertificationMemory, tol: float = TOLERANCE) -> list[tuple]:
    """All pairs (i, j, overlap), i < j by order, of different classes whose balls overlap by
    more than tol * (1 + R_i + R_j), overlap = R_i + R_j - d_ij. Blockwise: at most two
    blocks of inputs in RAM at a time; O(N^2 D) flops."""
    block = min(memory.chunk_size, CHECK_BLOCK)
    stop = int(memory.store.scalar("SELECT COALESCE(MAX(ord) + 1, 0) FROM entries"))
    bad: list[tuple] = []
    for rows_a in memory.store.rows("x, predict, radius", 0, stop, block):
        a = memory._decode(rows_a)
        for rows_b in memory.store.rows("x, predict, radius", int(a[3][0]), stop, block):
            bad += violations(a, memory._decode(rows_b), tol)
    return sorted(bad)


def copy_memory(source: str, destination: str, chunk: int = 2048) -> int:
    """Copy every entry and the meta of the memory at `source` into a new memory at
    `destination` (either store), checksums verified on reading and on the copy read back;
    returns the number of entries. The destination must hold no memory yet."""
    with CertificationMemory.open_existing(source, cache_bytes=0) as src:
        meta = src.store.meta()
        target = open_store(destination)
        try:
            if target.exists():
                raise MemoryStoreError(f"{describe(destination)} already holds a memory; copy "
                                       "into a new one")  # fmt: skip
            target.create({k: meta[k] for k in meta if k != "next_key"})
            copied = 0
            columns = ", ".join(ENTRY_COLUMNS[1:])
            for rows in src.store.rows(columns, 0, None, chunk):
                _verify(rows, source)
                with target.serialised():
                    for row in rows:
                        target.insert(tuple(bytes(v) if isinstance(v, memoryview) else v
                                            for v in row))  # fmt: skip
                copied += len(rows)
            written = sum(len(r) for r in target.rows("x", 0, None, chunk))
            for back in target.rows(columns, 0, None, chunk):
                _verify(back, destination)
            if written != copied:
                raise MemoryStoreError(f"copied {copied} entries, {describe(destination)} "
                                       f"holds {written}")  # fmt: skip
        finally:
            target.close()
    return copied


def _verify(rows: list[tuple], location: str) -> None:
    """Rows in ENTRY_COLUMNS order: every checksum must match."""
    bad = bad_checksums([(row[0], row[2], row[4], row[5], row[12]) for row in rows])
    if bad:
        raise MemoryStoreError(f"{describe(location)}: entry {bad[0]} does not match its "
                               f"checksum ({len(bad)} in this chunk); nothing more is copied")
