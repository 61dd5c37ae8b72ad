"""ONNX models through ONNX Runtime (`pip install 'ddrs[onnx]'`), as torch modules, so an
exported classifier or denoiser runs wherever a model goes.

The module holds the file's sha256 as a buffer, so its fingerprint (models/identity.py) is the
file's: a memory written with one ONNX model refuses another. ONNX Runtime computes no
gradients: the gradient sigma searches refuse it in one line (`OnnxModel.forward`)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ddrs.errors import CheckpointError, InputError


class OnnxRunner:
    """An ONNX model (bytes) run by ONNX Runtime's CPU provider on numpy arrays. A model
    exported with a fixed batch size is run in chunks of that size. Serves a user's own
    `.onnx` model (OnnxModel) and the onnxruntime engine (models/engines.py)."""

    def __init__(self, data: bytes, name: str):
        ort = _onnxruntime()
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        options.intra_op_num_threads = torch.get_num_threads()  # torch's, before sampling
        try:
            self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else error
            raise CheckpointError(f"{name} is not a usable ONNX model: {first}") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise CheckpointError(
                f"{name}: an ONNX model here takes one input (a batch of images) and gives "
                f"logits or images; this one has {len(inputs)} inputs"
            )
        self.input_name = inputs[0].name
        first_dim = inputs[0].shape[0] if inputs[0].shape else None
        self.fixed_batch = first_dim if isinstance(first_dim, int) and first_dim > 0 else None

    def __call__(self, array: np.ndarray) -> np.ndarray:
        step = self.fixed_batch or max(1, len(array))
        parts = [
            self.session.run(None, {self.input_name: _padded(array[i : i + step], step)})[0][
                : len(array[i : i + step])
            ]
            for i in range(0, len(array), step)
        ]
        return np.concatenate(parts) if parts else np.zeros((0,), np.float32)


def run_numpy(runner, x: Tensor) -> Tensor:
    """A runner's output on a torch batch, as float32 on x's device."""
    out = runner(x.detach().to("cpu", torch.float32).contiguous().numpy())
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(x.device)


class OnnxModel(nn.Module):
    """An ONNX file run by ONNX Runtime (OnnxRunner) as a torch module."""

    def __init__(self, path: str | Path):
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"ONNX model not found: {path}")
        data = path.read_bytes()
        self.runner = OnnxRunner(data, str(path))
        self.path = str(path)
        digest = hashlib.sha256(data).digest()
        self.register_buffer("onnx_sha256", torch.tensor(list(digest), dtype=torch.uint8))

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise InputError(
                f"{self.path} is an ONNX model, which gives no gradients: this needs a torch "
                "model (a ddrs checkpoint, package.module:factory or TorchScript), or a sigma "
                "search that takes no gradients (--search certified or grid)"
            )
        return run_numpy(self.runner, x)


def gives_gradients(model: nn.Module) -> bool:
    """False when an ONNX model is inside `model` (ONNX Runtime computes no gradients)."""
    return not any(isinstance(m, OnnxModel) for m in model.modules())


def _padded(chunk: np.ndarray, size: int) -> np.ndarray:
    """A last chunk filled up to a fixed batch size with copies of its first row."""
    if len(chunk) == size:
        return chunk
    fill = np.repeat(chunk[:1], size - len(chunk), axis=0)
    return np.concatenate([chunk, fill])


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise InputError(
            "ONNX models run through ONNX Runtime, which is not installed: pip install 'ddrs[onnx]'"
        ) from None
    return onnxruntime
