"""The SQLite store: one file (or ":memory:"), WAL journal, synchronous=FULL (every committed
entry survives a crash or power loss), check-and-insert serialised by `BEGIN IMMEDIATE`
(writers in other processes wait for the lock, up to 10 minutes)."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from ddrs.errors import MemoryStoreError
from ddrs.memory.store import ENTRY_COLUMNS, META_KEYS, Store, column_list, entry_checksum

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


class SQLiteStore(Store):
    def __init__(self, path: str, *, must_exist: bool = False) -> None:
        self.location = path
        in_ram = path == ":memory:" or path.startswith("file::memory:")
        if not in_ram and must_exist and not os.path.exists(path):
            raise MemoryStoreError(f"certification memory {path!r} does not exist")
        if not in_ram:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        try:
            # autocommit mode, transactions explicit; writers wait up to 10 min for the lock
            self.conn = sqlite3.connect(path, timeout=600, isolation_level=None)
        except sqlite3.Error as e:
            raise MemoryStoreError(f"cannot open certification memory {path!r}: {e}") from e
        try:
            with self.errors():
                result = [row[0] for row in self.conn.execute("PRAGMA quick_check")]
                if result != ["ok"]:
                    raise MemoryStoreError(
                        f"certification memory {path!r} is corrupt: {'; '.join(result)}"
                    )
                self.conn.execute("PRAGMA journal_mode=WAL")  # a file only; RAM keeps its own
                self.conn.execute("PRAGMA synchronous=FULL")
                self.next_key: int | None = None
        except BaseException:
            self.conn.close()
            raise

    @contextmanager
    def errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as e:
            raise MemoryStoreError(
                f"certification memory {self.location!r}: {e} (is it corrupt, not a memory, or "
                "locked by another process for too long?)"
            ) from e

    def _tables(self) -> set[str]:
        rows = self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {row[0] for row in rows}

    def exists(self) -> bool:
        with self.errors():
            tables = self._tables()
        if tables and {"meta", "entries"} - tables:
            raise MemoryStoreError(
                f"{self.location!r} is not a certification memory (missing tables: "
                f"{sorted({'meta', 'entries'} - tables)})"
            )
        return bool(tables)

    def create(self, meta: dict) -> None:
        with self.serialised():
            if self._tables():  # another process may have just created it
                return
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self.conn.execute(statement)
            self.conn.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())

    def meta(self) -> dict:
        with self.errors():
            meta = dict(self.conn.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("schema_version") == 1:
                with self.serialised():
                    self._upgrade_from_1()
                meta = dict(self.conn.execute("SELECT key, value FROM meta").fetchall())
        missing = set(META_KEYS) - set(meta)
        if missing:
            raise MemoryStoreError(
                f"{self.location!r} has an incomplete meta table (missing {sorted(missing)})"
            )
        return meta

    def _upgrade_from_1(self) -> None:
        """Schema 1 -> 2: add each entry's checksum, computed from its stored content."""
        if dict(self.conn.execute("SELECT key, value FROM meta")).get("schema_version") != 1:
            return  # another process upgraded it meanwhile
        self.conn.execute("ALTER TABLE entries ADD COLUMN checksum TEXT NOT NULL DEFAULT ''")
        for rows in self.rows(("x", "predict", "radius"), 0, None, 4096):
            self.conn.executemany(
                "UPDATE entries SET checksum = ? WHERE ord = ?",
                [(entry_checksum(o, x, c, r), o) for o, x, c, r in rows],
            )
        self.conn.execute("UPDATE meta SET value = 2 WHERE key = 'schema_version'")

    @contextmanager
    def serialised(self) -> Iterator[None]:
        with self.errors():
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    def rows(
        self, columns: tuple[str, ...], start: int, stop: int | None, chunk: int
    ) -> Iterator[list]:
        stop = (1 << 62) if stop is None else stop
        columns = column_list(columns)
        while True:
            with self.errors():
                rows = self.conn.execute(
                    f"SELECT ord, {columns} FROM entries WHERE ord >= ? AND ord < ? "
                    "ORDER BY ord LIMIT ?",
                    (start, stop, chunk),
                ).fetchall()
            if not rows:
                return
            yield rows
            start = rows[-1][0] + 1

    def insert(self, row: tuple) -> None:
        placeholders = ", ".join("?" * len(ENTRY_COLUMNS))
        self.conn.execute(f"INSERT INTO entries VALUES ({placeholders})", row)

    def add_repeat(self) -> None:
        self.conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'repeats'")

    def _scalar(self, query: str) -> object:
        with self.errors():
            return self.conn.execute(query).fetchone()[0]

    def _all(self, query: str) -> list[tuple]:
        with self.errors():
            return self.conn.execute(query).fetchall()

    def allocate_keys(self, count: int) -> list[int]:
        """Numbers after the largest stored idx, counted on in this process (one serving
        process per SQLite memory)."""
        if self.next_key is None:
            self.next_key = int(self._scalar("SELECT COALESCE(MAX(idx) + 1, 0) FROM entries"))
        keys = list(range(self.next_key, self.next_key + count))
        self.next_key += count
        return keys

    def close(self) -> None:
        self.conn.close()
