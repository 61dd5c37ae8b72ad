"""Memory-enhanced certification: keep data-dependent certificates mutually consistent.

A smoothed classifier whose sigma depends on the input is not certifiable by Cohen's argument
alone, because sigma changes inside the ball certified at x. The memory-enhanced classifier keeps
an ordered memory of everything it certified, entries (x_j, c_j, R_j), and answers consistently
with it. For a new input x with Monte Carlo certificate (c, R) (c = -1 abstains, then R = 0):

* d_j = ||x - x_j||_2 (float64, over the exact float32 inputs).
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

Hence no two balls of different classes share an interior point, so every input strictly inside a
stored ball j has d_j - R_j < 0 and is answered c_j (j* is then a ball containing x, of the same
class as every other ball containing it). An abstention is stored with radius 0 and only points
strictly inside a ball count, so no ball ever swallows an abstained input. Float64 rounding can
break the invariant by a few ulps; `check` therefore allows an overlap of TOLERANCE * (1 + R_i +
R_j), far above the rounding error of a float64 norm and far below any meaningful radius.

Storage is SQLite in WAL journal mode with synchronous=FULL: every committed entry survives a
crash or power loss (an answer already given must never be forgotten; the fsync per entry is
negligible next to Monte Carlo certification), and a killed writer leaves no partial row. The
distance scan and the insert run in one ``BEGIN IMMEDIATE`` transaction, so concurrent writers on
the same file are serialised. Each query costs O(N * D) reads and flops: all distances are
computed directly in float64, chunk by chunk, from an in-RAM copy of the inputs while it fits in
``cache_bytes`` (1 GiB by default), otherwise straight from the database.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ddrs.checks import number, optional_integer, positive
from ddrs.errors import InputError, MemoryStoreError

SCHEMA_VERSION = 2  # 2: a checksum per entry (a version-1 memory is upgraded when opened)
TOLERANCE = 1e-9  # relative overlap allowed by `check`: overlap <= TOLERANCE * (1 + R_i + R_j)
ABSTAIN = -1
CHUNK_BYTES = 64 << 20  # float32 inputs read per chunk (5,461 CIFAR rows, 111 ImageNet rows)
DISTANCE_BLOCK_BYTES = 32 << 20  # float64 temporaries per distance sub-block
_CHECK_BLOCK = 1024  # pairwise block side in `check`: a few [block, block] float64 matrices

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value NOT NULL);
CREATE TABLE entries (
    ord INTEGER PRIMARY KEY,
    idx INTEGER,
    x BLOB NOT NULL,
    sqnorm REAL NOT NULL,
    predict INTEGER NOT NULL,
    radius REAL NOT NULL,
    sigma REAL NOT NULL,
    mc_predict INTEGER NOT NULL,
    mc_radius REAL NOT NULL,
    changed INTEGER NOT NULL,
    shrunk INTEGER NOT NULL,
    created REAL NOT NULL,
    checksum TEXT NOT NULL
);
"""


def entry_checksum(order: int, x_bytes: bytes, predict: int, radius: float) -> str:
    """sha256 of what an entry certifies: its order, stored input bytes, class and radius."""
    digest = hashlib.sha256(f"{int(order)}|{int(predict)}|{float(radius)!r}|".encode())
    digest.update(x_bytes)
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class Resolution:
    """The memory-resolved answer for one input."""

    predict: int  # the memory-resolved class (-1 = abstain)
    radius: float  # the memory-resolved radius (pixel units, L2)
    mc_predict: int  # the Monte Carlo certificate's class as given
    mc_radius: float
    changed: bool  # the memory changed the class (x inside another class's ball)
    shrunk: bool  # the class kept, radius reduced
    repeat: bool  # exact repeat of a stored input: stored answer returned (changed/shrunk False)
    entry: int  # the order (0-based) of the entry that now holds this input
    sigma: float | None = None  # the sigma of that entry's certificate (None: not looked up)


# ----------------------------------------------------------------------------- the pure rule


def _check_certificate(predict: int, radius: float) -> tuple[int, float]:
    if int(predict) != predict or predict < ABSTAIN:
        raise InputError(f"predict must be an integer class >= -1, got {predict!r}")
    radius = number("radius", float(radius), minimum=0)
    if predict == ABSTAIN and radius != 0:
        raise InputError(f"an abstention (predict=-1) must have radius 0, got {radius!r}")
    return int(predict), radius


def _as_input(
    x: Tensor, shape: tuple[int, ...] | None = None, pixel_range: tuple[float, float] | None = None
) -> Tensor:
    """Validate one input and return it flattened as float32 on the CPU (as it is stored)."""
    if not isinstance(x, Tensor):
        raise InputError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise InputError(f"x has shape {tuple(x.shape)}, the memory expects {tuple(shape)}")
    x = x.detach().to("cpu", torch.float32).reshape(-1)
    if not torch.isfinite(x).all():
        raise InputError("x contains NaN or infinite values")
    if pixel_range is not None and x.numel():
        low, high = pixel_range
        if x.min() < low or x.max() > high:
            raise InputError(
                f"x must be an un-normalised image in [{low:g}, {high:g}], got values in "
                f"[{x.min().item():.3g}, {x.max().item():.3g}] (normalisation belongs inside "
                "the model)"
            )
    return x


def _distances(x: Tensor, xs: Tensor) -> Tensor:
    """Float64 L2 distances from a flat float32 input to each row of xs [k, D].

    Computed over sub-blocks of rows so that the float64 temporaries stay near
    DISTANCE_BLOCK_BYTES whatever the chunk size (exact float64 either way).
    """
    rows = max(1, DISTANCE_BLOCK_BYTES // (8 * max(1, xs.shape[1])))
    x64 = x.double()
    out = torch.empty(xs.shape[0], dtype=torch.float64)
    for i in range(0, xs.shape[0], rows):
        out[i : i + rows] = (xs[i : i + rows].double() - x64).norm(dim=1)
    return out


def _repeat_in(x: Tensor, xs: Tensor, d: Tensor) -> int | None:
    """Row of xs bitwise equal to x (candidates are rows at distance 0), or None."""
    for j in torch.nonzero(d == 0).flatten().tolist():
        if torch.equal(xs[j].view(torch.int32), x.view(torch.int32)):
            return j
    return None


def _conflict_margins(predict: int, radius: float, d: Tensor, c: Tensor, r: Tensor) -> Tensor:
    """d_j - R_j for the conflicting entries (other class, intersecting ball), +inf elsewhere."""
    conflict = (c != predict) & (d < r + radius)
    return torch.where(conflict, d - r, torch.full_like(d, math.inf))


def _adjust(predict: int, radius: float, margin: float, c_star: int) -> tuple[int, float]:
    """Apply the rule for the best conflict j*, whose margin is d_j* - R_j*."""
    if margin < 0:  # x lies strictly inside ball j*: take its class, keep inside it
        return c_star, -margin
    # Shrink so the balls no longer intersect; margin < radius, min() only guards rounding.
    return predict, min(radius, margin)


def resolve(
    x: Tensor,
    predict: int,
    radius: float,
    stored_x: Tensor,
    stored_c: Tensor,
    stored_r: Tensor,
) -> tuple[int, float, int | None]:
    """Resolve the certificate (predict, radius) of x against an in-RAM memory.

    stored_x is [N, *x.shape] (inputs are compared as float32, as the memory stores them),
    stored_c [N] the classes and stored_r [N] the radii, in insertion order. Returns the resolved
    (class, radius, j): j is the stored entry that decided the answer (the conflict j*, or the
    stored copy of an exact repeat, whose answer is returned), None when x is kept as given.
    """
    predict, radius = _check_certificate(predict, radius)
    xf = _as_input(x)
    if math.prod(stored_x.shape[1:]) != xf.numel():
        shapes = f"{tuple(stored_x.shape[1:])} and {tuple(x.shape)}"
        raise InputError(f"stored inputs and x have different sizes: {shapes}")
    xs = stored_x.detach().to("cpu", torch.float32).reshape(len(stored_x), xf.numel())
    c = stored_c.detach().cpu().long().reshape(-1)
    r = stored_r.detach().cpu().double().reshape(-1)
    if len(xs) == 0:
        return predict, radius, None
    d = _distances(xf, xs)
    j = _repeat_in(xf, xs, d)
    if j is not None:
        return int(c[j]), float(r[j]), j
    margins = _conflict_margins(predict, radius, d, c, r)
    j = int(torch.argmin(margins))  # the first minimum: ties go to the earliest stored
    if math.isinf(margins[j]):
        return predict, radius, None
    new_c, new_r = _adjust(predict, radius, float(margins[j]), int(c[j]))
    return new_c, new_r, j


# ----------------------------------------------------------------------------- the store


class _Cache:
    """In-RAM, append-only copy of the (x, c, r, order) columns, mirroring the entries table."""

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.x = torch.empty(0, dim, dtype=torch.float32)
        self.c = torch.empty(0, dtype=torch.long)
        self.r = torch.empty(0, dtype=torch.float64)
        self.order = torch.empty(0, dtype=torch.long)

    def nbytes(self, rows: int) -> int:
        return rows * (self.x.shape[1] * 4 + 24)

    def append(self, x: Tensor, c: Tensor, r: Tensor, order: Tensor) -> None:
        need = self.n + len(x)
        if need > len(self.x):  # grow geometrically so appending one row is amortised O(D)
            cap = max(need, 2 * len(self.x), 64)
            self.x = _grown(self.x, cap)
            self.c, self.r, self.order = (_grown(t, cap) for t in (self.c, self.r, self.order))
        for buf, rows in ((self.x, x), (self.c, c), (self.r, r), (self.order, order)):
            buf[self.n : need] = rows
        self.n = need

    def chunks(self, size: int) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
        for s in range(0, self.n, size):
            e = min(s + size, self.n)
            yield self.x[s:e], self.c[s:e], self.r[s:e], self.order[s:e]


def _grown(t: Tensor, cap: int) -> Tensor:
    out = torch.empty((cap, *t.shape[1:]), dtype=t.dtype)
    out[: len(t)] = t
    return out


class CertificationMemory:
    """A persistent, ordered certification memory in a SQLite file (":memory:" allowed).

    Entries are append-only; ``order`` is 0-based insertion order. The file records the model's
    fingerprint and the input shape, and refuses to be used with another model or shape.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fingerprint: str,
        input_shape: tuple[int, ...],
        *,
        create: bool = True,
        chunk_size: int | None = None,
        cache_bytes: int = 1 << 30,
        pixel_range: tuple[float, float] | None = (0.0, 1.0),
    ) -> None:
        optional_integer("chunk_size", chunk_size)
        self.path = os.fspath(path)
        self.fingerprint = str(fingerprint)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.dim = math.prod(self.input_shape)
        # rows read per chunk: by default CHUNK_BYTES of float32 inputs, whatever their size
        self.chunk_size = int(chunk_size or max(1, CHUNK_BYTES // (4 * self.dim)))
        self.cache_bytes = int(cache_bytes)
        self.pixel_range = pixel_range  # inputs outside it are refused (None: any values)
        self._cache: _Cache | None = _Cache(self.dim) if cache_bytes > 0 else None
        in_ram = self.path == ":memory:" or self.path.startswith("file::memory:")
        if not in_ram and not create and not os.path.exists(self.path):
            raise MemoryStoreError(f"certification memory {self.path!r} does not exist")
        if not in_ram and create:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._conn = _connect(self.path)
        try:
            self._open(create)
        except BaseException:
            self._conn.close()
            raise

    @classmethod
    def open_existing(cls, path: str | os.PathLike, **kwargs) -> CertificationMemory:
        """Open an existing memory with the fingerprint and shape it records (for tools)."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise MemoryStoreError(f"certification memory {path!r} does not exist")
        conn = _connect(path)
        try:
            with _db_errors(path):
                _quick_check(conn, path)
                _require_tables(conn, path)
                meta = _read_meta(conn, path)
        finally:
            conn.close()
        shape = tuple(json.loads(meta["input_shape"]))
        return cls(path, meta["fingerprint"], shape, create=False, **kwargs)

    # -- opening

    def _open(self, create: bool) -> None:
        with _db_errors(self.path):
            _quick_check(self._conn, self.path)
            # WAL needs a file; an in-RAM database keeps its own journal mode.
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            if not _table_names(self._conn):
                if not create:
                    raise MemoryStoreError(f"{self.path!r} is an empty database, not a memory")
                with self._transaction("IMMEDIATE"):
                    if not _table_names(self._conn):  # another process may have just created it
                        self._initialise()
            _require_tables(self._conn, self.path)
            if _read_meta(self._conn, self.path).get("schema_version") == 1:
                with self._transaction("IMMEDIATE"):
                    self._upgrade_from_1()
            self._check_meta(_read_meta(self._conn, self.path))

    def _initialise(self) -> None:
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                self._conn.execute(statement)
        meta = {
            "schema_version": SCHEMA_VERSION,
            "fingerprint": self.fingerprint,
            "input_shape": json.dumps(list(self.input_shape)),
            "created": time.time(),
            "repeats": 0,
        }
        self._conn.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())

    def _upgrade_from_1(self) -> None:
        """Schema 1 -> 2: add each entry's checksum, computed from its stored content."""
        if _read_meta(self._conn, self.path).get("schema_version") != 1:
            return  # another process upgraded it meanwhile
        self._conn.execute("ALTER TABLE entries ADD COLUMN checksum TEXT NOT NULL DEFAULT ''")
        for rows in self._rows("x, predict, radius", 0, None, self.chunk_size):
            self._conn.executemany(
                "UPDATE entries SET checksum = ? WHERE ord = ?",
                [(entry_checksum(o, x, c, r), o) for o, x, c, r in rows],
            )
        self._conn.execute("UPDATE meta SET value = 2 WHERE key = 'schema_version'")

    def _check_meta(self, meta: dict) -> None:
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise MemoryStoreError(
                f"{self.path!r} has memory schema {meta.get('schema_version')!r}, "
                f"this version of ddrs reads schema {SCHEMA_VERSION}"
            )
        if meta["fingerprint"] != self.fingerprint:
            raise MemoryStoreError(
                f"memory {self.path!r} belongs to another model/preprocessing "
                f"(fingerprint {meta['fingerprint']!r}, expected {self.fingerprint!r}); "
                "use a new memory file for this model"
            )
        shape = tuple(json.loads(meta["input_shape"]))
        if shape != self.input_shape:
            raise MemoryStoreError(
                f"memory {self.path!r} holds inputs of shape {shape}, not {self.input_shape}"
            )

    # -- the rule on the store

    def resolve_and_store(
        self,
        x: Tensor,
        predict: int,
        radius: float,
        *,
        sigma: float,
        idx: int | None = None,
    ) -> Resolution:
        """Resolve x's certificate against the memory and store the answer, atomically."""
        predict, radius = _check_certificate(predict, radius)
        xf = _as_input(x, self.input_shape, self.pixel_range)
        sigma = positive("sigma", sigma)
        with _db_errors(self.path), self._transaction("IMMEDIATE"):
            best: tuple[float, int] | None = None  # (margin, class) of the best conflict so far
            for xs, c, r, order in self._scan():
                d = _distances(xf, xs)
                j = _repeat_in(xf, xs, d)
                if j is not None:
                    return self._repeat(int(c[j]), float(r[j]), int(order[j]), predict, radius)
                margins = _conflict_margins(predict, radius, d, c, r)
                j = int(torch.argmin(margins))
                if best is None or margins[j] < best[0]:  # strict: ties keep the earlier entry
                    best = (float(margins[j]), int(c[j]))
            new_c, new_r = predict, radius
            if best is not None and not math.isinf(best[0]):
                new_c, new_r = _adjust(predict, radius, best[0], best[1])
            res = Resolution(
                predict=new_c,
                radius=new_r,
                mc_predict=predict,
                mc_radius=radius,
                changed=new_c != predict,
                shrunk=new_c == predict and new_r < radius,
                repeat=False,
                entry=self._next_order(),
                sigma=sigma,
            )
            self._insert(xf, res, sigma, idx)
            return res

    def _repeat(self, c: int, r: float, order: int, predict: int, radius: float) -> Resolution:
        self._conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'repeats'")
        stored_sigma = self._conn.execute(
            "SELECT sigma FROM entries WHERE ord = ?", (order,)
        ).fetchone()[0]
        return Resolution(
            predict=c,
            radius=r,
            mc_predict=predict,
            mc_radius=radius,
            changed=False,
            shrunk=False,
            repeat=True,
            entry=order,
            sigma=float(stored_sigma),
        )

    def _next_order(self) -> int:
        return self._conn.execute("SELECT COALESCE(MAX(ord) + 1, 0) FROM entries").fetchone()[0]

    def _insert(self, xf: Tensor, res: Resolution, sigma: float, idx: int | None) -> None:
        x_bytes = xf.numpy().astype("<f4", copy=False).tobytes()
        self._conn.execute(
            "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                res.entry,
                None if idx is None else int(idx),
                x_bytes,
                float(xf.double().square().sum()),
                res.predict,
                res.radius,
                sigma,
                res.mc_predict,
                res.mc_radius,
                int(res.changed),
                int(res.shrunk),
                time.time(),
                entry_checksum(res.entry, x_bytes, res.predict, res.radius),
            ),
        )

    def _scan(self) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """(x [k, D], c, r, order) chunks of the whole memory; call inside a transaction."""
        if self._cache is not None:
            self._sync_cache()
        if self._cache is not None:
            yield from self._cache.chunks(self.chunk_size)
        else:
            for rows in self._rows("x, predict, radius", 0, None, self.chunk_size):
                yield self._decode(rows)

    def _sync_cache(self) -> None:
        """Append the rows other writers (or this one) added since the last sync."""
        cache = self._cache
        start = int(cache.order[cache.n - 1]) + 1 if cache.n else 0
        for rows in self._rows("x, predict, radius, checksum", start, None, self.chunk_size):
            if cache.nbytes(cache.n + len(rows)) > self.cache_bytes:
                self._cache = None  # too large for RAM: scan the database instead
                return
            bad = _bad_checksums(rows)
            if bad:
                raise MemoryStoreError(
                    f"certification memory {self.path!r}: entry {bad[0]} does not match its "
                    f"checksum ({len(bad)} such entries in this chunk): the file was changed "
                    "outside ddrs. Restore it from a backup; `ddrs memory check` lists them all"
                )
            cache.append(*self._decode(rows))

    def _decode(self, rows: list[tuple]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Rows (ord, x, predict, radius) -> (x [k, D] float32, c, r, order) tensors."""
        blobs = [row[1] for row in rows]
        if any(len(b) != self.dim * 4 for b in blobs):
            raise MemoryStoreError(f"{self.path!r} holds an input of the wrong size (corrupt)")
        x = np.frombuffer(bytearray(b"".join(blobs)), dtype="<f4").reshape(len(rows), self.dim)
        return (
            torch.from_numpy(x.astype(np.float32, copy=False)),
            torch.tensor([row[2] for row in rows], dtype=torch.long),
            torch.tensor([row[3] for row in rows], dtype=torch.float64),
            torch.tensor([row[0] for row in rows], dtype=torch.long),
        )

    def _rows(
        self, columns: str, start: int, stop: int | None, chunk: int
    ) -> Iterator[list[tuple]]:
        """Pages of (ord, *columns) rows with start <= ord < stop, in order."""
        stop = (1 << 62) if stop is None else stop
        while True:
            rows = self._conn.execute(
                f"SELECT ord, {columns} FROM entries WHERE ord >= ? AND ord < ? "
                "ORDER BY ord LIMIT ?",
                (start, stop, chunk),
            ).fetchall()
            if not rows:
                return
            yield rows
            start = rows[-1][0] + 1

    @contextmanager
    def _transaction(self, mode: str = "") -> Iterator[None]:
        self._conn.execute(f"BEGIN {mode}")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    # -- reading

    def __len__(self) -> int:
        with _db_errors(self.path):
            return self._conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0]

    def entries(
        self, chunk_size: int | None = None
    ) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]]:
        """Chunks (x [k, *shape] float32, c, r, sigma, order, idx) in insertion order.

        c and order are int64, r and sigma float64; idx is int64 with -1 where none was given.
        """
        chunk = chunk_size or self.chunk_size
        with _db_errors(self.path):
            for rows in self._rows("x, predict, radius, sigma, idx", 0, None, chunk):
                x, c, r, order = self._decode(rows)
                sigma = torch.tensor([row[4] for row in rows], dtype=torch.float64)
                idx = torch.tensor([-1 if row[5] is None else row[5] for row in rows]).long()
                yield x.reshape(len(rows), *self.input_shape), c, r, sigma, order, idx

    def stats(self, bins: int = 10) -> dict:
        """Summary counts; the radius histogram is over the non-abstained entries."""
        with _db_errors(self.path):
            cols = self._conn.execute(
                "SELECT predict, radius, sigma, changed, shrunk FROM entries"
            ).fetchall()
            repeats = self._conn.execute("SELECT value FROM meta WHERE key = 'repeats'")
            repeats = int(repeats.fetchone()[0])
        table = np.array(cols, dtype=np.float64).reshape(-1, 5)
        c, r, sigma, changed, shrunk = table.T
        classes, counts = np.unique(c[c >= 0].astype(np.int64), return_counts=True)
        certified = r[c >= 0]
        top = float(certified.max()) if len(certified) else 0.0
        hist, edges = np.histogram(certified, bins=bins, range=(0.0, top or 1.0))
        sigma_summary = {"min": None, "median": None, "max": None}
        if len(sigma):
            sigma_summary = {"min": sigma.min(), "median": np.median(sigma), "max": sigma.max()}
        return {
            "entries": len(cols),
            "classes": {int(k): int(v) for k, v in zip(classes, counts, strict=True)},
            "abstentions": int((c == ABSTAIN).sum()),
            "changed": int(changed.sum()),
            "shrunk": int(shrunk.sum()),
            "repeats": repeats,
            "radius_histogram": {"edges": edges.tolist(), "counts": hist.tolist()},
            "sigma": {k: None if v is None else float(v) for k, v in sigma_summary.items()},
            "fingerprint": self.fingerprint,
            "input_shape": list(self.input_shape),
        }

    def corrupt_entries(self) -> list[int]:
        """Orders of the entries whose stored content no longer matches their checksum."""
        bad: list[int] = []
        with _db_errors(self.path):
            for rows in self._rows("x, predict, radius, checksum", 0, None, self.chunk_size):
                bad += _bad_checksums(rows)
        return bad

    def next_idx(self) -> int:
        """One more than the largest stored idx (0 for none): where an online classifier's
        query numbering continues after a restart."""
        with _db_errors(self.path):
            row = self._conn.execute("SELECT COALESCE(MAX(idx) + 1, 0) FROM entries").fetchone()
        return int(row[0])

    def answers_by_idx(self) -> dict[int, tuple[int, float]]:
        """{idx: (predict, radius)} of the entries stored with a dataset index."""
        with _db_errors(self.path):
            rows = self._conn.execute(
                "SELECT idx, predict, radius FROM entries WHERE idx IS NOT NULL"
            ).fetchall()
        return {int(i): (int(c), float(r)) for i, c, r in rows}

    def check(self, tol: float = TOLERANCE) -> list[tuple[int, int, float]]:
        """All pairs (i, j, overlap), i < j by order, of different classes whose balls overlap
        by more than tol * (1 + R_i + R_j), where overlap = R_i + R_j - d_ij. Blockwise: at most
        two blocks of inputs in RAM at a time; O(N^2 D) flops."""
        block = min(self.chunk_size, _CHECK_BLOCK)
        bad: list[tuple[int, int, float]] = []
        with _db_errors(self.path):
            stop = self._next_order()  # entries appended meanwhile are left for the next check
            for rows_a in self._rows("x, predict, radius", 0, stop, block):
                xa, ca, ra, oa = self._decode(rows_a)
                for rows_b in self._rows("x, predict, radius", int(oa[0]), stop, block):
                    bad += _violations((xa, ca, ra, oa), self._decode(rows_b), tol)
        return sorted(bad)

    # -- lifetime

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> CertificationMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _violations(a: tuple, b: tuple, tol: float) -> list[tuple[int, int, float]]:
    (xa, ca, ra, oa), (xb, cb, rb, ob) = a, b
    d = torch.cdist(xa.double(), xb.double(), compute_mode="donot_use_mm_for_euclid_dist")
    reach = ra[:, None] + rb[None, :]
    overlap = reach - d
    pairs = (ca[:, None] != cb[None, :]) & (oa[:, None] < ob[None, :])
    i, j = torch.nonzero(pairs & (overlap > tol * (1 + reach)), as_tuple=True)
    return [(int(oa[p]), int(ob[q]), float(overlap[p, q])) for p, q in zip(i, j, strict=True)]


# ----------------------------------------------------------------------------- SQLite helpers


def _connect(path: str) -> sqlite3.Connection:
    try:
        # Autocommit mode; transactions are explicit. Writers wait up to 10 min for the lock.
        return sqlite3.connect(path, timeout=600, isolation_level=None)
    except sqlite3.Error as e:
        raise MemoryStoreError(f"cannot open certification memory {path!r}: {e}") from e


@contextmanager
def _db_errors(path: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as e:
        raise MemoryStoreError(
            f"certification memory {path!r}: {e} (is it corrupt, not a memory, or locked by "
            "another process for too long?)"
        ) from e


def _bad_checksums(rows: list[tuple]) -> list[int]:
    """Orders of the rows (ord, x, predict, radius, checksum) whose checksum does not match."""
    return [o for o, x, c, r, k in rows if entry_checksum(o, x, c, r) != k]


def _quick_check(conn: sqlite3.Connection, path: str) -> None:
    result = [row[0] for row in conn.execute("PRAGMA quick_check").fetchall()]
    if result != ["ok"]:
        raise MemoryStoreError(f"certification memory {path!r} is corrupt: {'; '.join(result)}")


def _table_names(conn: sqlite3.Connection) -> set[str]:
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {row[0] for row in rows}


def _require_tables(conn: sqlite3.Connection, path: str) -> None:
    missing = {"meta", "entries"} - _table_names(conn)
    if missing:
        raise MemoryStoreError(
            f"{path!r} is not a certification memory (missing tables: {sorted(missing)})"
        )


def _read_meta(conn: sqlite3.Connection, path: str) -> dict:
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    missing = {"schema_version", "fingerprint", "input_shape", "repeats"} - set(meta)
    if missing:
        raise MemoryStoreError(f"{path!r} has an incomplete meta table (missing {sorted(missing)})")
    return meta
