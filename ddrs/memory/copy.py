"""Copying a memory from one store to another (SQLite <-> PostgreSQL), every checksum
verified on reading and on the copy read back."""

from __future__ import annotations

from ddrs.errors import MemoryStoreError
from ddrs.memory.certification import CertificationMemory, open_store
from ddrs.memory.store import ENTRY_COLUMNS, bad_checksums, shown_location


def copy_memory(source: str, destination: str, chunk: int = 2048) -> int:
    """Copy every entry and the meta of the memory at `source` into a new memory at
    `destination` (either store), checksums verified on reading and on the copy read back;
    returns the number of entries. The destination must hold no memory yet."""
    with CertificationMemory.open_existing(source, cache_bytes=0) as src:
        meta = src.store.meta()
        target = open_store(destination)
        try:
            if target.exists():
                raise MemoryStoreError(f"{shown_location(destination)} already holds a memory; "
                                       "copy into a new one")  # fmt: skip
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
                raise MemoryStoreError(f"copied {copied} entries, {shown_location(destination)} "
                                       f"holds {written}")  # fmt: skip
        finally:
            target.close()
    return copied


def _verify(rows: list[tuple], location: str) -> None:
    """Rows in ENTRY_COLUMNS order: every checksum must match."""
    bad = bad_checksums([(row[0], row[2], row[4], row[5], row[12]) for row in rows])
    if bad:
        raise MemoryStoreError(f"{shown_location(location)}: entry {bad[0]} does not match its "
                               f"checksum ({len(bad)} in this chunk); nothing more is copied")
