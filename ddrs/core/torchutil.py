"""Helpers on torch modules that the engine, the searches and training share: where a model
lives, eval mode restored exactly, frozen weights, the memory layout, autocast."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from ddrs.errors import InputError

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


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


@contextmanager
def frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients inside; every module's mode and flag restored."""
    flags = {p: p.requires_grad for p in model.parameters()}
    with eval_mode(model):
        for p in flags:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)


def is_convolutional(model: nn.Module) -> bool:
    """True if any Conv2d is inside (TorchScript modules report their original class name)
    and torch runs it: a model that runs outside torch takes its inputs as they are."""
    if runs_outside_torch(model):
        return False
    return any(
        isinstance(m, nn.Conv2d) or getattr(m, "original_name", None) == "Conv2d"
        for m in model.modules()
    )


def runs_outside_torch(model: nn.Module) -> bool:
    """A model whose forward pass another runtime computes (models/engines.py says so)."""
    return bool(getattr(model, "runs_outside_torch", False))


@contextmanager
def torch_threads_for(model: nn.Module):
    """While another runtime computes the forward passes, torch (the noise) uses one thread:
    torch's idle OpenMP threads spin between its ops and steal the cores the runtime's own
    threads need (measured: 2x slower certification with both on 2 cores)."""
    if not runs_outside_torch(model):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
