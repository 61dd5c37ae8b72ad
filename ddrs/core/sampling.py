"""The sampling engine: vote counts of the base classifier under noise (Gaussian by default).

One routine, `sample_counts`, serves CERTIFY, PREDICT and every tool on top of them. It
evaluates f(x_i + sigma_i * e) for many inputs at once, each with its own sigma (pixel
units, inputs in [0, 1], noise added before the model's normalisation layer).

Reproducibility: the noise is keyed (noise.py), so counts are identical whatever `batch`
is, whichever other inputs share a call, and when a run is resumed half-way.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ddrs.core.families import GAUSSIAN, Family
from ddrs.core.lattice import LEVELS, RoundedGaussian, check_dim, lattice_levels
from ddrs.core.noise import STREAM_ESTIMATION, NoiseSource
from ddrs.core.torchutil import (
    autocast_context,
    eval_mode,
    is_convolutional,
    model_device,
    torch_threads_for,
)


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


CPU_BATCH = 256  # default on CPU where nothing is measured (batches of 64-400 beat 1000)
CPU_BATCH_CANDIDATES = (64, 128, 256)


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


class _Lattice:
    """The discrete family's inputs as 8-bit levels, and a rounded Gaussian per sigma."""

    def __init__(self, x: Tensor, sigma: Tensor) -> None:
        check_dim(x[0].numel())
        self.levels = lattice_levels(x)
        self.gaussians = {s: RoundedGaussian(s, x.device) for s in set(sigma.tolist())}
        self.sigma = sigma.tolist()


def _lattice_inputs(x, sigma, uniform, segments, noisy, lattice: _Lattice) -> None:
    """The noisy lattice points (levels + K) / 255 of each segment's input, in `noisy`."""
    pos = 0
    for i, start, stop in segments:
        size = stop - start
        offsets = lattice.gaussians[lattice.sigma[i]].offsets(uniform[pos : pos + size])
        torch.div(lattice.levels[i] + offsets, LEVELS, out=noisy[pos : pos + size])
        pos += size


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
    first: int = 0,
    family: Family = GAUSSIAN,
) -> Tensor:
    """Votes of the base classifier on `num` noisy copies of each input (samples
    [first, first + num) of each input's noise: a sequential test draws more of them later).

    x: (B, *shape) inputs in [0, 1]; sigma: scalar or (B,) noise levels (pixel units).
    Returns int64 counts of shape (B, num_classes), on the CPU, transferred once. Runs
    `model` in eval mode under `torch.inference_mode`, `batch` samples per forward pass,
    and restores every module's mode. `amp` ("fp16"/"bf16", CUDA only) autocasts f.
    `family` (families.py): the noise, sigma its scale; the discrete family needs 8-bit
    inputs and gives f the lattice points (levels + K) / 255.
    """
    device = model_device(model)
    x = x.to(device, torch.float32)
    num_inputs, shape = x.shape[0], tuple(x.shape[1:])
    batch = max(1, min(batch, num_inputs * num))  # buffers no larger than the work
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device).expand(num_inputs)
    keys = list(range(num_inputs)) if keys is None else [int(k) for k in keys]
    source = NoiseSource(seed, stream, device, family)
    counts = torch.zeros(num_inputs * num_classes, dtype=torch.int64, device=device)
    layout = torch.channels_last if x.dim() == 4 and is_convolutional(model) else None
    # buffers reused across batches; the model's input is written in its memory layout
    noise_buffer = torch.empty(batch, *shape, dtype=source.dtype, device=device)
    input_buffer = torch.empty(batch, *shape, device=device)
    if layout is not None:
        input_buffer = input_buffer.contiguous(memory_format=layout)
    owner_buffer = torch.empty(batch, dtype=torch.int64, device=device)
    lattice = _Lattice(x, sigma) if family.discrete else None
    with (
        eval_mode(model),
        torch.inference_mode(),
        autocast_context(device, amp),
        torch_threads_for(model),
    ):
        for segments in _chunks(num_inputs, num, batch):
            size = sum(stop - start for _, start, stop in segments)
            noise, owner, noisy = noise_buffer[:size], owner_buffer[:size], input_buffer[:size]
            pos = 0
            for i, start, stop in segments:
                source.fill(noise[pos : pos + stop - start], keys[i], first + start, first + stop)
                owner[pos : pos + stop - start] = i
                pos += stop - start
            if family.discrete:
                _lattice_inputs(x, sigma, noise, segments, noisy, lattice)
            elif len(segments) == 1:  # one input: broadcast it rather than gather copies
                i = segments[0][0]
                torch.addcmul(x[i], noise, sigma[i], out=noisy)
            else:
                scale = sigma[owner].view(-1, *([1] * len(shape)))
                torch.addcmul(x[owner], noise, scale, out=noisy)
            predictions = model(noisy).argmax(dim=1)
            counts.index_add_(0, owner * num_classes + predictions, torch.ones_like(owner))
    return counts.view(num_inputs, num_classes).cpu()
