"""The PostgreSQL store (psycopg 3): one memory shared by every client of a database, e.g.
several `ddrs serve` replicas behind a load balancer.

Check-and-insert is serialised by a transaction-scoped advisory lock
(`pg_advisory_xact_lock`): each client's transaction waits for the lock, reads the entries
committed since its last look (catching up its in-RAM index), resolves, inserts, and commits;
the lock is released at the commit. Why not SERIALIZABLE with retry: the check reads every
entry that could conflict, so under SERIALIZABLE any two concurrent inserts would conflict
and one would be retried, redoing its catch-up and resolution; the lock does in order what
the retries would do by trial, and a client never computes an answer it must throw away.
The commit returns once the entry is in the write-ahead log on disk (synchronous_commit on),
so an answer is sent only after it is durable. Lost connections (a database restart) are
reported as `MemoryUnavailable`; the next use reconnects.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from ddrs.errors import MemoryStoreError
from ddrs.memory.store import (
    ENTRY_COLUMNS,
    META_KEYS,
    Store,
    column_list,
    shown_location,
    unavailable,
)

LOCK_KEY = 0x64647273  # "ddrs": the advisory lock of the check-and-insert
_SCHEMA = """
CREATE TABLE ddrs_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE ddrs_entries (
    ord BIGINT PRIMARY KEY,
    idx BIGINT,
    x BYTEA NOT NULL,
    sqnorm DOUBLE PRECISION NOT NULL,
    predict INTEGER NOT NULL,
    radius DOUBLE PRECISION NOT NULL,
    sigma DOUBLE PRECISION NOT NULL,
    mc_predict INTEGER NOT NULL,
    mc_radius DOUBLE PRECISION NOT NULL,
    changed INTEGER NOT NULL,
    shrunk INTEGER NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    checksum TEXT NOT NULL
);
CREATE INDEX ddrs_entries_idx ON ddrs_entries (idx);
"""
INTEGER_META = ("schema_version", "repeats", "next_key")


class PostgresStore(Store):
    def __init__(self, url: str) -> None:
        self.location = url
        self.conn: psycopg.Connection | None = None
        self._connect()

    def _connect(self) -> psycopg.Connection:
        if self.conn is not None and not self.conn.closed and not self.conn.broken:
            return self.conn
        try:
            self.conn = psycopg.connect(self.location, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as e:
            self.conn = None
            raise unavailable(self.location, e) from None
        return self.conn

    @contextmanager
    def errors(self) -> Iterator[None]:
        try:
            yield
        except psycopg.OperationalError as e:
            if self.conn is not None:
                self.conn.close()
            raise unavailable(self.location, e) from None
        except psycopg.Error as e:
            raise MemoryStoreError(
                f"certification memory {shown_location(self.location)}: {e}".strip()
            ) from None

    def _sql(self, query: str) -> str:
        """The shared SQL with this store's table names and placeholders."""
        return (
            query.replace("FROM entries", "FROM ddrs_entries")
            .replace("FROM meta", "FROM ddrs_meta")
            .replace("?", "%s")
        )

    def exists(self) -> bool:
        with self.errors():
            found = (
                self._connect()
                .execute(
                    "SELECT COUNT(*) FROM information_schema.tables WHERE table_name IN "
                    "('ddrs_meta', 'ddrs_entries') AND table_schema = current_schema()"
                )
                .fetchone()[0]
            )
        if found == 1:
            raise MemoryStoreError(
                f"{shown_location(self.location)} holds a broken memory (one of "
                "its two tables is missing)"
            )
        return found == 2

    def create(self, meta: dict) -> None:
        with self.errors(), self._connect().transaction():
            self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            if self.conn.execute("SELECT to_regclass('ddrs_meta')").fetchone()[0] is not None:
                return  # another client has just created it
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self.conn.execute(statement)
            with self.conn.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO ddrs_meta VALUES (%s, %s)", [(k, str(v)) for k, v in meta.items()]
                )

    def meta(self) -> dict:
        with self.errors():
            rows = self._connect().execute("SELECT key, value FROM ddrs_meta").fetchall()
        meta: dict = dict(rows)
        for key in INTEGER_META:
            if key in meta:
                meta[key] = int(meta[key])
        missing = set(META_KEYS) - set(meta)
        if missing:
            raise MemoryStoreError(
                f"{shown_location(self.location)} has an incomplete meta table "
                f"(missing {sorted(missing)})"
            )
        return meta

    @contextmanager
    def serialised(self) -> Iterator[None]:
        with self.errors(), self._connect().transaction():
            self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            yield

    def rows(
        self, columns: tuple[str, ...], start: int, stop: int | None, chunk: int
    ) -> Iterator[list]:
        stop = (1 << 62) if stop is None else stop
        columns = column_list(columns)
        while True:
            with self.errors():
                rows = (
                    self._connect()
                    .execute(
                        f"SELECT ord, {columns} FROM ddrs_entries WHERE ord >= %s AND ord < %s "
                        "ORDER BY ord LIMIT %s",
                        (start, stop, chunk),
                    )
                    .fetchall()
                )
            if not rows:
                return
            yield [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row) for row in rows]
            start = rows[-1][0] + 1

    def insert(self, row: tuple) -> None:
        placeholders = ", ".join(["%s"] * len(ENTRY_COLUMNS))
        self.conn.execute(f"INSERT INTO ddrs_entries VALUES ({placeholders})", row)

    def add_repeat(self) -> None:
        self.conn.execute(
            "UPDATE ddrs_meta SET value = (value::bigint + 1)::text WHERE key = 'repeats'"
        )

    def _scalar(self, query: str) -> object:
        with self.errors():
            return self._connect().execute(self._sql(query)).fetchone()[0]

    def _all(self, query: str) -> list[tuple]:
        with self.errors():
            return self._connect().execute(self._sql(query)).fetchall()

    def allocate_keys(self, count: int) -> list[int]:
        """Numbers no other client gets: after every stored idx and every number handed out
        before (kept in the meta table, under the lock)."""
        with self.serialised():
            stored = self.conn.execute(
                "SELECT COALESCE(MAX(idx) + 1, 0) FROM ddrs_entries"
            ).fetchone()[0]
            given = self.conn.execute(
                "SELECT value FROM ddrs_meta WHERE key = 'next_key'"
            ).fetchone()
            first = max(int(stored), int(given[0]) if given else 0)
            self.conn.execute(
                "INSERT INTO ddrs_meta VALUES ('next_key', %s) ON CONFLICT (key) DO UPDATE "
                "SET value = EXCLUDED.value",
                (str(first + count),),
            )
        return list(range(first, first + count))

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
