"""Copying a memory from one store to another (SQLite <-> PostgreSQL), every checksum
verified on reading and on the copy read back."""

from __future__ import annotations

from ddrs.errors import MemoryStoreError
from ddrs.memory.certification import CertificationMemory, open_store
from ddrs.memory.codec import Entry, verify
from ddrs.memory.store import ENTRY_COLUMNS, shown_location


def _checked(entry: Entry) -> tuple:
    """An entry as `codec.verify` reads it: (ord, x, predict, radius, checksum)."""
    return entry.ord, entry.x, entry.predict, entry.radius, entry.checksum


def copy_memory(source: str, destination: str, chunk: int = 2048) -> int:
    """Copy every entry and the meta of the memory at `source` into a new memory at
    `destination` (either store), checksums verified on reading and on the copy read back;
    returns the number of entries. The destination must hold no memory yet."""
    with CertificationMemory.open_existing(source, cache_bytes=0) as src:
        meta = src.store.meta()
        target = open_store(destination)
        try:
            if target.exists():
                raise MemoryStoreError(
                    f"{shown_location(destination)} already holds a memory; copy into a new one"
                )
            target.create({k: meta[k] for k in meta if k != "next_key"})
            copied = 0
            for rows in src.store.rows(ENTRY_COLUMNS[1:], 0, None, chunk):
                entries = [Entry(*row) for row in rows]
                verify([_checked(e) for e in entries], source)
                with target.serialised():
                    for entry in entries:
                        target.insert(entry)
                copied += len(rows)
            written = 0
            for back in target.rows(ENTRY_COLUMNS[1:], 0, None, chunk):
                verify([_checked(Entry(*row)) for row in back], destination)
                written += len(back)
            if written != copied:
                raise MemoryStoreError(
                    f"copied {copied} entries, {shown_location(destination)} holds {written}"
                )
        finally:
            target.close()
    return copied
