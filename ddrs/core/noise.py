"""Keyed noise: the noise of input i is a pure function of (seed, stream, key_i,
block), where `key_i` is a caller-chosen integer (the dataset index in the CLI) and a block is
`NOISE_BLOCK` consecutive samples of that input. Counts are therefore identical whatever the
batch is, whichever other inputs share a call, and when a run is resumed half-way. Different
streams (below) and different keys give independent noise."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

from ddrs.core.families import GAUSSIAN, Family
from ddrs.core.lattice import draw_uniform

NOISE_BLOCK = 64
# Every noise stream: a draw of one stream is independent of every other stream's.
STREAM_SELECTION = 0  # CERTIFY's n0 samples that choose the class
STREAM_ESTIMATION = 1  # CERTIFY's n samples that bound its probability
STREAM_PREDICTION = 2  # PREDICT's samples
STREAM_SIGMA_SEARCH = 3  # the sigma searches' and the selector over experts' votes
STREAM_PILOT = 5  # input-specific N: the pilot that picks each input's N
STREAM_ROUTER = 6  # dual smoothing: the router's CERTIFY draws from a seed of its own
STREAM_TRAINING = 99  # the per-sample sigma search of data-dependent training (per epoch)

_MASK64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """splitmix64 finaliser: decorrelates nearby integers before they seed a generator."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def block_seed(seed: int, stream: int, key: int, block: int) -> int:
    """The generator seed of one noise block (a 63-bit integer)."""
    z = _mix64(seed & _MASK64)
    for part in (stream, key, block):
        z = _mix64(z ^ (part & _MASK64))
    return z >> 1


class NoiseSource:
    """Standard noise of a family (families.py) addressed by (key, sample index), generated
    block by block: N(0, 1) or U[-1, 1] floats, or, for the discrete family, uniform int64
    integers that core/lattice.py turns into lattice offsets."""

    def __init__(
        self,
        seed: int,
        stream: int,
        device: torch.device | str = "cpu",
        family: Family = GAUSSIAN,
    ):
        self.seed, self.stream, self.family = int(seed), int(stream), family
        self.generator = torch.Generator(device=device)
        self.device = torch.device(device)
        self.dtype = torch.int64 if family.discrete else torch.float32

    def _draw(self, out: Tensor) -> None:
        if self.family.discrete:
            draw_uniform(out, self.generator)
        else:
            self.family.standard(out, self.generator)

    def block(self, key: int, block: int, shape: Sequence[int]) -> Tensor:
        self.generator.manual_seed(block_seed(self.seed, self.stream, key, block))
        out = torch.empty(NOISE_BLOCK, *shape, dtype=self.dtype, device=self.device)
        self._draw(out)
        return out

    def fill(self, out: Tensor, key: int, start: int, stop: int) -> None:
        """Write the noise of samples [start, stop) of input `key` into `out` (stop-start rows)."""
        shape = out.shape[1:]
        pos = 0
        for b in range(start // NOISE_BLOCK, (stop - 1) // NOISE_BLOCK + 1):
            lo = max(start, b * NOISE_BLOCK) - b * NOISE_BLOCK
            hi = min(stop, (b + 1) * NOISE_BLOCK) - b * NOISE_BLOCK
            if hi - lo == NOISE_BLOCK:  # a whole block: generate it in place
                self.generator.manual_seed(block_seed(self.seed, self.stream, key, b))
                self._draw(out[pos : pos + NOISE_BLOCK])
            else:
                out[pos : pos + hi - lo] = self.block(key, b, shape)[lo:hi]
            pos += hi - lo


def noise_for(
    keys: Sequence[int],
    num: int,
    shape: Sequence[int],
    seed: int,
    stream: int,
    device,
    family: Family = GAUSSIAN,
) -> Tensor:
    """All `num` noise samples of each key, shape (len(keys), num, *shape). For small jobs."""
    source = NoiseSource(seed, stream, device, family)
    out = torch.empty(len(keys), num, *shape, dtype=source.dtype, device=device)
    for i, key in enumerate(keys):
        source.fill(out[i], int(key), 0, num)
    return out


def content_key(x: Tensor) -> int:
    """A noise key made of an input's own bytes (canonical float32): the same input always
    draws the same noise, so a service without a memory gives a repeated query the same
    answer, in any order and on any replica."""
    data = x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little") >> 2
