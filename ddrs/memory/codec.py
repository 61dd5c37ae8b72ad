"""How an entry is stored and read back: the input as float32 little-endian bytes, the row in
ENTRY_COLUMNS order with its squared norm and checksum, and rows decoded into tensors with
every checksum and size checked."""

from __future__ import annotations

import time
from collections import namedtuple

import numpy as np
import torch
from torch import Tensor

from ddrs.errors import MemoryStoreError
from ddrs.memory.rule import Answer
from ddrs.memory.store import ENTRY_COLUMNS, bad_checksums, entry_checksum, shown_location

Entry = namedtuple("Entry", ENTRY_COLUMNS)
CHECKED = ("x", "predict", "radius", "checksum")  # what a checksum covers, and the checksum


def entry_row(xf: Tensor, answer: Answer, idx: int | None) -> tuple:
    """The stored row (ENTRY_COLUMNS order) of an answer for the flat canonical input xf."""
    x_bytes = xf.numpy().astype("<f4", copy=False).tobytes()
    return Entry(
        answer.entry,
        None if idx is None else int(idx),
        x_bytes,
        float(xf.double().square().sum()),
        answer.predict,
        answer.radius,
        answer.sigma,
        answer.mc_predict,
        answer.mc_radius,
        int(answer.changed),
        int(answer.shrunk),
        time.time(),
        entry_checksum(answer.entry, x_bytes, answer.predict, answer.radius),
    )


def verify(rows: list[tuple], location: str) -> None:
    """Rows (ord, x, predict, radius, checksum, ...): every checksum must match."""
    bad = bad_checksums([row[:5] for row in rows])
    if bad:
        raise MemoryStoreError(
            f"certification memory {shown_location(location)!r}: entry {bad[0]} does not "
            f"match its checksum ({len(bad)} such entries in this chunk): it was changed "
            "outside ddrs. Restore it from a backup; `ddrs memory check` lists them all"
        )


def decode(rows: list[tuple], dim: int, location: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rows (ord, x, predict, radius, ...) -> (x [k, D] float32, c, r, order) tensors."""
    blobs = [bytes(row[1]) for row in rows]
    if any(len(b) != dim * 4 for b in blobs):
        raise MemoryStoreError(
            f"{shown_location(location)!r} holds an input of the wrong size (corrupt)"
        )
    x = np.frombuffer(bytearray(b"".join(blobs)), dtype="<f4").reshape(len(rows), dim)
    return (
        torch.from_numpy(x.astype(np.float32, copy=False)),
        torch.tensor([row[2] for row in rows], dtype=torch.long),
        torch.tensor([row[3] for row in rows], dtype=torch.float64),
        torch.tensor([row[0] for row in rows], dtype=torch.long),
    )
