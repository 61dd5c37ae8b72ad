"""The certification memory: the rule (rule.py) over a store (store.py: SQLite or PostgreSQL),
with an exact in-RAM index (index.py) that keeps queries fast as the memory grows.

`CertificationMemory(location, fingerprint, input_shape)` opens (or creates) the memory at a
file path, ":memory:", or a postgresql:// URL. Each `resolve_and_store` is one serialised
transaction of the store: catch up with the entries other clients committed since the last
look, find an exact repeat (hash), find the entries that could conflict (the index's exact
lower bounds), apply the rule to them, insert the answer, commit (durably). A memory records
the model's fingerprint, the input shape and the norm of its balls (L2, or L1 for uniform
noise), and refuses another model, shape or norm in one line.
Tools that read a whole memory (check, stats) are in tools.py, copying in copy.py.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator

import torch
from torch import Tensor

from ddrs.core.checks import optional_integer, positive
from ddrs.errors import MemoryStoreError
from ddrs.memory.codec import CHECKED, decode, entry_row, verify
from ddrs.memory.index import Index
from ddrs.memory.rule import (
    ABSTAIN,
    TOLERANCE,
    Answer,
    as_input,
    check_certificate,
    distances,
    find_repeat,
    norm_order,
    resolve,
)
from ddrs.memory.sqlite import SQLiteStore
from ddrs.memory.store import (
    SCHEMA_VERSION,
    Store,
    bad_checksums,
    is_url,
    new_meta,
    norm_of,
    shown_location,
)
from ddrs.memory.tools import intersecting_pairs, memory_stats

CHUNK_BYTES = 64 << 20  # float32 inputs read per chunk (5,461 CIFAR rows, 111 ImageNet rows)


def open_store(location: str, *, must_exist: bool = False) -> Store:
    """The store at `location`: a postgresql:// URL or an SQLite path (":memory:" in RAM)."""
    location = str(location)
    if not is_url(location):
        return SQLiteStore(location, must_exist=must_exist)
    try:
        from ddrs.memory.postgres import PostgresStore
    except ImportError:
        raise MemoryStoreError(
            "a postgresql:// memory needs psycopg: pip install 'ddrs[postgres]'"
        ) from None
    return PostgresStore(location)


class CertificationMemory:
    """A persistent, ordered certification memory. Entries are append-only; `order` is 0-based
    insertion order. `cache_bytes`: the in-RAM index's budget (beyond it, queries scan the
    store); `pixel_range`: inputs outside it are refused (None: any values)."""

    def __init__(
        self,
        location: str | os.PathLike,
        fingerprint: str,
        input_shape: tuple[int, ...],
        *,
        create: bool = True,
        chunk_size: int | None = None,
        cache_bytes: int = 1 << 30,
        pixel_range: tuple[float, float] | None = (0.0, 1.0),
        norm: str = "l2",
    ) -> None:
        optional_integer("chunk_size", chunk_size)
        norm_order(norm)
        self.norm = norm
        self.path = os.fspath(location)
        self.fingerprint = str(fingerprint)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.dim = math.prod(self.input_shape)
        self.chunk_size = int(chunk_size or max(1, CHUNK_BYTES // (4 * self.dim)))
        self.cache_bytes = int(cache_bytes)
        self.pixel_range = pixel_range
        self.index: Index | None = Index(self.dim, norm=norm) if cache_bytes > 0 else None
        self.store = open_store(self.path, must_exist=not create)
        try:
            if not self.store.exists():
                if not create:
                    raise MemoryStoreError(
                        f"{shown_location(self.path)!r} is an empty database, not a memory"
                    )
                self.store.create(
                    new_meta(self.fingerprint, self.input_shape, time.time(), self.norm)
                )
            self._check_meta(self.store.meta())
        except BaseException:
            self.store.close()
            raise

    @classmethod
    def open_existing(cls, location: str | os.PathLike, **kwargs) -> CertificationMemory:
        """Open an existing memory with the fingerprint and shape it records (for tools)."""
        store = open_store(os.fspath(location), must_exist=True)
        try:
            if not store.exists():
                raise MemoryStoreError(
                    f"{shown_location(os.fspath(location))!r} is an empty database, not a memory"
                )
            meta = store.meta()
        finally:
            store.close()
        shape = tuple(json.loads(meta["input_shape"]))
        kwargs = {"norm": norm_of(meta), **kwargs}
        return cls(location, meta["fingerprint"], shape, create=False, **kwargs)

    def _check_meta(self, meta: dict) -> None:
        where = shown_location(self.path)
        if int(meta.get("schema_version", -1)) != SCHEMA_VERSION:
            raise MemoryStoreError(
                f"{where!r} has memory schema {meta.get('schema_version')!r}, this version of "
                f"ddrs reads schema {SCHEMA_VERSION}"
            )
        if meta["fingerprint"] != self.fingerprint:
            raise MemoryStoreError(
                f"memory {where!r} belongs to another model/preprocessing (fingerprint "
                f"{meta['fingerprint']!r}, expected {self.fingerprint!r}); use a new memory for "
                "this model"
            )
        shape = tuple(json.loads(meta["input_shape"]))
        if shape != self.input_shape:
            raise MemoryStoreError(
                f"memory {where!r} holds inputs of shape {shape}, not {self.input_shape}"
            )
        if norm_of(meta) != self.norm:
            raise MemoryStoreError(
                f"memory {where!r} holds {norm_of(meta).upper()} balls, and these certificates "
                f"are {self.norm.upper()} radii: use --norm {norm_of(meta)}, or a new memory"
            )

    # -- the rule on the store

    def resolve_and_store(
        self, x: Tensor, predict: int, radius: float, *, sigma: float, idx: int | None = None
    ) -> Answer:
        """Resolve x's Monte Carlo certificate against the memory and store the answer, in one
        serialised transaction."""
        predict, radius = check_certificate(predict, radius)
        xf = as_input(x, self.input_shape, self.pixel_range)
        sigma = positive("sigma", sigma)
        self._catch_up()  # most of it before taking the lock, so that others wait less
        with self.store.serialised():
            self._catch_up()  # what others committed meanwhile
            if self.index is not None:
                repeat = self.index.repeat_of(xf)
                if repeat is not None:
                    return self._repeat(int(self.index.order[repeat]))
                rows = self.index.candidates(xf, predict, radius)
                found = (self.index.x[rows], self.index.c[rows], self.index.r[rows])
            else:
                repeat, found = self._scan_store(xf, predict, radius)
                if repeat is not None:
                    return self._repeat(repeat)
            new_c, new_r, _ = resolve(xf, predict, radius, *found, norm=self.norm)
            answer = Answer(
                new_c,
                new_r,
                sigma,
                new_c != predict,
                new_c == predict and new_r < radius,
                predict,
                radius,
                entry=self._next_order(),
            )
            self._insert(xf, answer, idx)
            return answer

    def repeat_answer(self, x: Tensor) -> Answer | None:
        """The stored answer if x is an exact repeat of a stored input, else None; nothing is
        sampled or stored. Entries never change once committed, so a repeat found here, outside
        the lock, is the answer `resolve_and_store` would give."""
        xf = as_input(x, self.input_shape, self.pixel_range)
        self._catch_up()
        if self.index is not None:
            position = self.index.repeat_of(xf)
            order = None if position is None else int(self.index.order[position])
        else:
            order = self._scan_store(xf, ABSTAIN, 0.0)[0]
        if order is None:
            return None
        with self.store.serialised():
            return self._repeat(order)

    def _catch_up(self) -> None:
        """Add the entries committed since the index's last one (by any client), checksums
        verified; drop the index if it outgrows its budget."""
        if self.index is None:
            return
        for rows in self.store.rows(
            (*CHECKED, "sigma"), self.index.last_order + 1, None, self.chunk_size
        ):
            if self.index.nbytes(self.index.n + len(rows)) > self.cache_bytes:
                self.index = None  # too large for RAM: scan the store instead
                return
            verify(rows, self.path)
            x, c, r, order = decode(rows, self.dim, self.path)
            sigma = torch.tensor([row[5] for row in rows], dtype=torch.float64)
            self.index.append(x, c, r, sigma, order)

    def _scan_store(self, xf: Tensor, predict: int, radius: float):
        """Without an index: the exact repeat's order, or the candidates, from a scan of the
        store (entries of other classes, exact distances)."""
        kept = []
        for rows in self.store.rows(CHECKED, 0, None, self.chunk_size):
            verify(rows, self.path)
            x, c, r, order = decode(rows, self.dim, self.path)
            repeat = find_repeat(xf, x)
            if repeat is not None:
                return int(order[repeat]), None
            keep = (c != predict) & (distances(xf, x, self.norm) < r + radius)
            kept.append((x[keep], c[keep], r[keep]))
        if not kept:
            return None, (
                torch.empty(0, self.dim),
                torch.empty(0, dtype=torch.long),
                torch.empty(0, dtype=torch.float64),
            )
        return None, tuple(torch.cat(parts) for parts in zip(*kept))

    def _repeat(self, order: int) -> Answer:
        """The stored answer of entry `order`, as it was given (its Monte Carlo certificate and
        what the memory did to it), counted as a repeat (inside `serialised`)."""
        self.store.add_repeat()
        rows = next(
            self.store.rows(
                ("predict", "radius", "sigma", "mc_predict", "mc_radius", "changed", "shrunk"),
                order,
                order + 1,
                1,
            )
        )
        _, c, r, sigma, mc_c, mc_r, changed, shrunk = rows[0]
        return Answer(
            int(c),
            float(r),
            float(sigma),
            bool(changed),
            bool(shrunk),
            int(mc_c),
            float(mc_r),
            repeat=True,
            entry=order,
        )

    def _next_order(self) -> int:
        if self.index is not None:
            return self.index.last_order + 1
        return self.store.next_order()

    def _insert(self, xf: Tensor, answer: Answer, idx: int | None) -> None:
        self.store.insert(entry_row(xf, answer, idx))

    # -- reading

    def __len__(self) -> int:
        return self.store.count()

    def entries(
        self, chunk_size: int | None = None
    ) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]]:
        """Chunks (x [k, *shape] float32, c, r, sigma, order, idx) in insertion order; c and
        order int64, r and sigma float64, idx int64 with -1 where none was given."""
        for rows in self.store.rows(
            ("x", "predict", "radius", "sigma", "idx"), 0, None, chunk_size or self.chunk_size
        ):
            x, c, r, order = decode(rows, self.dim, self.path)
            sigma = torch.tensor([row[4] for row in rows], dtype=torch.float64)
            idx = torch.tensor([-1 if row[5] is None else row[5] for row in rows]).long()
            yield x.reshape(len(rows), *self.input_shape), c, r, sigma, order, idx

    def stats(self, bins: int = 10) -> dict:
        return memory_stats(self, bins)

    def check(self, tol: float = TOLERANCE) -> list[tuple[int, int, float]]:
        return intersecting_pairs(self, tol)

    def corrupt_entries(self) -> list[int]:
        """Orders of the entries whose stored content no longer matches their checksum."""
        bad: list[int] = []
        for rows in self.store.rows(CHECKED, 0, None, self.chunk_size):
            bad += bad_checksums(rows)
        return bad

    def chunks(self, start: int = 0, stop: int | None = None, size: int | None = None):
        """Decoded chunks (x [k, D], c, r, order) of the entries start <= order < stop."""
        for rows in self.store.rows(
            ("x", "predict", "radius"), start, stop, size or self.chunk_size
        ):
            yield decode(rows, self.dim, self.path)

    def allocate_keys(self, count: int) -> list[int]:
        """Query numbers (noise keys) that no other client of this memory gets."""
        return self.store.allocate_keys(count)

    def answers_by_idx(self) -> dict[int, tuple[int, float]]:
        """{idx: (predict, radius)} of the entries stored with a dataset index."""
        return {int(i): (int(c), float(r)) for i, c, r in self.store.answers_by_idx()}

    # -- lifetime

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> CertificationMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
