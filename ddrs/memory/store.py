"""Where a memory's entries live: the store interface, and `open_store`, which picks SQLite
(a file path, or ":memory:") or PostgreSQL (a postgresql:// URL).

Every store holds the same two tables: `meta` (schema version, fingerprint, input shape,
repeats) and `entries`, one row per answer in insertion order (`ord`, 0-based):

    ord idx x sqnorm predict radius sigma mc_predict mc_radius changed shrunk created checksum

`x` is the input's float32 little-endian bytes; `checksum` the sha256 of what the entry
certifies (its order, bytes, class and radius), verified when entries are read. A check and
its insert run in one *serialised* transaction (`Store.serialised`): every client of a store,
in every process and on every machine, runs its check-and-insert alone, and an insert is
durable when the transaction ends.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import AbstractContextManager
from urllib.parse import urlsplit, urlunsplit

from ddrs.errors import MemoryStoreError

SCHEMA_VERSION = 2  # 2: a checksum per entry (a version-1 SQLite memory is upgraded on opening)
ENTRY_COLUMNS = (
    "ord",
    "idx",
    "x",
    "sqnorm",
    "predict",
    "radius",
    "sigma",
    "mc_predict",
    "mc_radius",
    "changed",
    "shrunk",
    "created",
    "checksum",
)
META_KEYS = ("schema_version", "fingerprint", "input_shape", "repeats")


def new_meta(fingerprint: str, input_shape, created: float, norm: str = "l2") -> dict:
    """The meta rows of a new memory (`norm`: its balls', "l2" or "l1")."""
    return {
        "schema_version": SCHEMA_VERSION,
        "fingerprint": fingerprint,
        "input_shape": json.dumps(list(input_shape)),
        "norm": norm,
        "created": created,
        "repeats": 0,
    }


def norm_of(meta: dict) -> str:
    """A memory's norm; memories made before norms were recorded hold L2 balls."""
    return str(meta.get("norm", "l2"))


def entry_checksum(order: int, x_bytes: bytes, predict: int, radius: float) -> str:
    """sha256 of what an entry certifies: its order, stored input bytes, class and radius."""
    digest = hashlib.sha256(f"{int(order)}|{int(predict)}|{float(radius)!r}|".encode())
    digest.update(bytes(x_bytes))
    return digest.hexdigest()[:32]


def bad_checksums(rows: list[tuple]) -> list[int]:
    """Orders of the rows (ord, x, predict, radius, checksum) whose checksum does not match."""
    return [o for o, x, c, r, k in rows if entry_checksum(o, x, c, r) != k]


class Store:
    """The interface every store implements (SQLiteStore, PostgresStore)."""

    location: str

    def exists(self) -> bool:
        """True if the store holds a memory's tables."""
        raise NotImplementedError

    def create(self, meta: dict) -> None:
        """Create the tables and the meta rows (serialised: a concurrent creator is harmless)."""
        raise NotImplementedError

    def meta(self) -> dict:
        raise NotImplementedError

    def serialised(self) -> AbstractContextManager[None]:
        """The check-and-insert transaction: alone among every client of the store; committed
        durably at the end, rolled back on an error."""
        raise NotImplementedError

    def rows(
        self, columns: tuple[str, ...], start: int, stop: int | None, chunk: int
    ) -> Iterator[list]:
        """Pages of (ord, *columns) rows with start <= ord < stop, in order; `columns` are
        names of ENTRY_COLUMNS."""
        raise NotImplementedError

    def insert(self, row: tuple) -> None:
        """Append one entry (ENTRY_COLUMNS order); inside `serialised`."""
        raise NotImplementedError

    def add_repeat(self) -> None:
        """Count an exact repeat answered from the memory; inside `serialised`."""
        raise NotImplementedError

    def _scalar(self, query: str) -> object:
        """The one value of a read-only query of the shared SQL below (tables `entries`,
        `meta`), in this store's dialect."""
        raise NotImplementedError

    def _all(self, query: str) -> list[tuple]:
        raise NotImplementedError

    # -- what the memory and its tools read, by name
    def count(self) -> int:
        """The number of entries."""
        return int(self._scalar("SELECT COUNT(*) FROM entries"))

    def next_order(self) -> int:
        """The order the next entry gets (one more than the last)."""
        return int(self._scalar("SELECT COALESCE(MAX(ord) + 1, 0) FROM entries"))

    def repeats(self) -> int:
        """Exact repeats answered from the memory so far."""
        return int(self._scalar("SELECT value FROM meta WHERE key = 'repeats'"))

    def outcomes(self) -> list[tuple]:
        """(predict, radius, sigma, changed, shrunk) of every entry."""
        return self._all("SELECT predict, radius, sigma, changed, shrunk FROM entries")

    def answers_by_idx(self) -> list[tuple]:
        """(idx, predict, radius) of the entries stored with a dataset index."""
        return self._all("SELECT idx, predict, radius FROM entries WHERE idx IS NOT NULL")

    def allocate_keys(self, count: int) -> list[int]:
        """`count` query numbers (noise keys) no other client of this store gets."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def column_list(columns: tuple[str, ...]) -> str:
    """The SQL list of entry columns, every name checked against ENTRY_COLUMNS."""
    unknown = [c for c in columns if c not in ENTRY_COLUMNS]
    if unknown:
        raise ValueError(f"not entry columns: {unknown}")
    return ", ".join(columns)


def is_url(location: str) -> bool:
    return str(location).startswith(("postgresql://", "postgres://"))


def shown_location(location: str) -> str:
    """A memory's location as it may be shown anywhere (logs, pages, results, errors): a URL
    without its password, in the user part or in the query (password=, sslpassword=)."""
    location = str(location)
    if not is_url(location):
        return location
    parts = urlsplit(location)
    netloc = parts.netloc
    if "@" in netloc:
        credentials, host = netloc.rsplit("@", 1)
        netloc = f"{credentials.split(':', 1)[0]}@{host}"
    query = "&".join(
        pair
        for pair in parts.query.split("&")
        if pair and pair.split("=", 1)[0].lower() not in ("password", "sslpassword")
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _secret_of(location: str) -> str | None:
    parts = urlsplit(str(location))
    return parts.password or None if is_url(location) else None


class MemoryUnavailable(MemoryStoreError):
    """The memory's database cannot be reached now (e.g. it restarts); nothing was stored."""


def unavailable(location: str, error: Exception) -> MemoryStoreError:
    detail = str(error)
    secret = _secret_of(location)
    if secret:  # drivers do not echo it, but a message must never carry it
        detail = detail.replace(secret, "***")
    return MemoryUnavailable(
        f"certification memory {shown_location(location)}: the database cannot be reached "
        f"({detail}); retry when it is back"
    )
