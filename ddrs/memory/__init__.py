"""The certification memory: the rule (rule.py) over a store (store.py: SQLite or PostgreSQL),
with an exact in-RAM index (index.py) that keeps queries fast as the memory grows;
`CertificationMemory` (certification.py) puts them together. tools.py: statistics and the
invariant check; copy.py: a memory from one store to another."""

from ddrs.memory.certification import CertificationMemory, open_store
from ddrs.memory.copy import copy_memory
from ddrs.memory.rule import ABSTAIN, TOLERANCE, Answer, resolve
from ddrs.memory.store import MemoryUnavailable, entry_checksum

__all__ = [
    "ABSTAIN",
    "TOLERANCE",
    "Answer",
    "CertificationMemory",
    "MemoryUnavailable",
    "copy_memory",
    "entry_checksum",
    "open_store",
    "resolve",
]
