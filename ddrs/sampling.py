"""The sampling engine: vote counts of the base classifier under Gaussian noise.

One routine, `sample_counts`, serves CERTIFY, PREDICT and every tool on top of them. It
evaluates f(x_i + sigma_i * e) for many inputs at once, each with its own sigma (pixel
units, inputs in [0, 1], noise added before the model's normalisation layer).

Reproducibility: the noise of input i is a pure function of (seed, stream, key_i, block),
where `key_i` is a caller-chosen integer (the dataset index in the CLI) and a block is
`NOISE_BLOCK` consecutive samples of that input. Counts are therefore identical whatever
`batch` is, whichever other inputs share a call, and when a run is resumed half-way.
Different streams (selection, estimation, prediction, sigma search) and different keys give
independent noise.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn

from ddrs.errors import InputError
from ddrs.models import is_convolutional

NOISE_BLOCK = 64
STREAM_SELECTION = 0
STREAM_ESTIMATION = 1
STREAM_PREDICTION = 2
STREAM_SIGMA_SEARCH = 3
STREAM_TRAINING = 4
STREAM_PILOT = 5

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
    """Standard normal noise addressed by (key, sample index), generated block by block."""

    def __init__(self, seed: int, stream: int, device: torch.device | str = "cpu"):
        self.seed, self.stream = int(seed), int(stream)
        self.generator = torch.Generator(device=device)
        self.device = torch.device(device)

    def block(self, key: int, block: int, shape: Sequence[int]) -> Tensor:
        self.generator.manual_seed(block_seed(self.seed, self.stream, key, block))
        return torch.randn(NOISE_BLOCK, *shape, generator=self.generator, device=self.device)

    def fill(self, out: Tensor, key: int, start: int, stop: int) -> None:
        """Write the noise of samples [start, stop) of input `key` into `out` (stop-start rows)."""
        shape = out.shape[1:]
        pos = 0
        for b in range(start // NOISE_BLOCK, (stop - 1) // NOISE_BLOCK + 1):
            lo = max(start, b * NOISE_BLOCK) - b * NOISE_BLOCK
            hi = min(stop, (b + 1) * NOISE_BLOCK) - b * NOISE_BLOCK
            if hi - lo == NOISE_BLOCK:  # a whole block: generate it in place
                self.generator.manual_seed(block_seed(self.seed, self.stream, key, b))
                torch.randn(
                    NOISE_BLOCK, *shape, generator=self.generator, out=out[pos : pos + NOISE_BLOCK]
                )
            else:
                out[pos : pos + hi - lo] = self.block(key, b, shape)[lo:hi]
            pos += hi - lo


def noise_for(
    keys: Sequence[int], num: int, shape: Sequence[int], seed: int, stream: int, device
) -> Tensor:
    """All `num` noise samples of each key, shape (len(keys), num, *shape). For small jobs."""
    source = NoiseSource(seed, stream, device)
    out = torch.empty(len(keys), num, *shape, device=device)
    for i, key in enumerate(keys):
        source.fill(out[i], int(key), 0, num)
    return out


def _chunks(num_inputs: int, num: int, batch: int):
    """Split the flat sample space [0, num_inputs * num) into forward batches.

    Yields lists of (input position, first sample, stop sample) segments; one batch holds
    at most `batch` samples and may span many inputs (this is what makes small-N runs fast).
    """
    segments, filled = [], 0
    for i in range(num_inputs):
        start = 0
        while start < num:
            take = min(num - start, batch - filled)
            segments.append((i, start, start + take))
            start += take
            filled += take
            if filled == batch:
                yield segments
                segments, filled = [], 0
    if segments:
        yield segments


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
CPU_BATCH = 256  # default on CPU where nothing is measured (batches of 64-400 beat 1000)
CPU_BATCH_CANDIDATES = (64, 128, 256)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside; every module's own train/eval flag restored exactly afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def autocast_context(device: torch.device, amp: str | None):
    """fp16/bf16 autocast on CUDA (changes f's arithmetic, not the statistics' soundness)."""
    if amp is None:
        return nullcontext()
    if amp not in AUTOCAST_DTYPES:
        raise InputError(f"amp must be one of {sorted(AUTOCAST_DTYPES)}, got {amp!r}")
    if device.type != "cuda":
        raise InputError("--amp needs a CUDA device (on CPUs without bf16 it is much slower)")
    return torch.autocast("cuda", dtype=AUTOCAST_DTYPES[amp])


def _fastest_cpu_batch(model: nn.Module, input_shape: Sequence[int]) -> int:
    """The candidate batch with the best forward throughput on this CPU (measured: small
    models run up to 1.45x faster at 64 than at 256 here, large ones prefer 64-256)."""
    layout = torch.channels_last if len(input_shape) == 3 and is_convolutional(model) else None
    best, best_rate = CPU_BATCH, 0.0
    with eval_mode(model), torch.inference_mode():
        for size in CPU_BATCH_CANDIDATES:
            probe = torch.rand(size, *input_shape)
            if layout is not None:
                probe = probe.contiguous(memory_format=layout)
            model(probe)  # warm-up
            start = time.perf_counter()
            model(probe)
            seconds = time.perf_counter() - start
            if size / seconds > best_rate:
                best, best_rate = size, size / seconds
            if seconds > 2.0:  # a large model: do not spend long measuring
                break
    return best


def auto_batch_size(model: nn.Module, input_shape: Sequence[int], limit: int = 16384) -> int:
    """The batch size to use when none is given.

    CPU: the fastest of CPU_BATCH_CANDIDATES, measured. CUDA: the largest power of two up to `limit`
    whose forward pass fits in memory, found by trying (then halved once, for headroom).
    """
    device = model_device(model)
    if device.type != "cuda":
        return _fastest_cpu_batch(model, input_shape)
    size, fits = 64, 64
    with eval_mode(model), torch.inference_mode():
        while size <= limit:
            try:
                model(torch.zeros(size, *input_shape, device=device))
                fits, size = size, size * 2
            except torch.cuda.OutOfMemoryError:
                break
            finally:
                torch.cuda.empty_cache()
    return max(64, fits // 2) if fits < limit else fits


def sample_counts(
    model: nn.Module,
    x: Tensor,
    sigma: Tensor | float,
    num: int,
    num_classes: int,
    *,
    batch: int = 256,
    seed: int = 0,
    stream: int = STREAM_ESTIMATION,
    keys: Sequence[int] | None = None,
    amp: str | None = None,
) -> Tensor:
    """Votes of the base classifier on `num` noisy copies of each input.

    x: (B, *shape) inputs in [0, 1]; sigma: scalar or (B,) noise levels (pixel units).
    Returns int64 counts of shape (B, num_classes), on the CPU, transferred once. Runs
    `model` in eval mode under `torch.inference_mode`, `batch` samples per forward pass,
    and restores every module's mode. `amp` ("fp16"/"bf16", CUDA only) autocasts f.
    """
    device = model_device(model)
    x = x.to(device, torch.float32)
    num_inputs, shape = x.shape[0], tuple(x.shape[1:])
    batch = max(1, min(batch, num_inputs * num))  # buffers no larger than the work
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device).expand(num_inputs)
    keys = list(range(num_inputs)) if keys is None else [int(k) for k in keys]
    source = NoiseSource(seed, stream, device)
    counts = torch.zeros(num_inputs * num_classes, dtype=torch.int64, device=device)
    layout = torch.channels_last if x.dim() == 4 and is_convolutional(model) else None
    # buffers reused across batches; the model's input is written in its memory layout
    noise_buffer = torch.empty(batch, *shape, device=device)
    input_buffer = torch.empty(batch, *shape, device=device)
    if layout is not None:
        input_buffer = input_buffer.contiguous(memory_format=layout)
    owner_buffer = torch.empty(batch, dtype=torch.int64, device=device)
    with eval_mode(model), torch.inference_mode(), autocast_context(device, amp):
        for segments in _chunks(num_inputs, num, batch):
            size = sum(stop - start for _, start, stop in segments)
            noise, owner, noisy = noise_buffer[:size], owner_buffer[:size], input_buffer[:size]
            pos = 0
            for i, start, stop in segments:
                source.fill(noise[pos : pos + stop - start], keys[i], start, stop)
                owner[pos : pos + stop - start] = i
                pos += stop - start
            if len(segments) == 1:  # one input: broadcast it rather than gather copies
                i = segments[0][0]
                torch.addcmul(x[i], noise, sigma[i], out=noisy)
            else:
                scale = sigma[owner].view(-1, *([1] * len(shape)))
                torch.addcmul(x[owner], noise, scale, out=noisy)
            predictions = model(noisy).argmax(dim=1)
            counts.index_add_(0, owner * num_classes + predictions, torch.ones_like(owner))
    return counts.view(num_inputs, num_classes).cpu()
