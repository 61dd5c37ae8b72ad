"""Your own tensors as a dataset: a `TensorDataset` of (x, y) or a pair of tensors (x, y), as
the runs take them (items `(x, label, index)` with an `info`)."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from ddrs.core.validate import check_pixels
from ddrs.data import DatasetInfo, IndexedDataset
from ddrs.errors import InputError


class TensorInputs(IndexedDataset):
    """Inputs x (N, *shape) in [0, 1] with labels y (N,); its name carries a digest of the
    tensors, so that a results file or a memory refuses other tensors under the same name."""

    def __init__(self, x: Tensor, y: Tensor, num_classes: int) -> None:
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise InputError("give the inputs and labels as two tensors (x, y)")
        if x.dim() < 2 or y.dim() != 1 or len(x) != len(y) or len(x) == 0:
            raise InputError(
                f"x must be (N, C, H, W) or (N, D) and y (N,); got x "
                f"{tuple(x.shape)} and y {tuple(y.shape)}"
            )
        x = x.detach().to("cpu", torch.float32).contiguous()
        check_pixels(x)
        if y.is_floating_point() and not bool((y == y.round()).all()):
            raise InputError("labels y must be whole numbers (class indices)")
        y = y.detach().to("cpu").long()
        if int(num_classes) < 2 or bool((y < 0).any()) or bool((y >= num_classes).any()):
            raise InputError(
                f"labels must lie in 0..{int(num_classes) - 1} (num_classes "
                f"{num_classes}); got {int(y.min())}..{int(y.max())}"
            )
        digest = hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:12]
        shape = tuple(int(s) for s in x.shape[1:])
        channels = shape[0] if len(shape) == 3 else 1
        info = DatasetInfo(
            f"tensors-{digest}", int(num_classes), shape, (0.0,) * channels, (1.0,) * channels
        )
        super().__init__(info, "given", y.tolist())
        self.x = x

    def _load(self, i: int) -> Tensor:
        return self.x[i]


def as_dataset(data, num_classes: int | None = None):
    """`data` as a dataset the runs take: one of ours as it is; a `TensorDataset` of (x, y) or
    a pair (x, y) as `TensorInputs` (`num_classes`: else one more than the largest label)."""
    if hasattr(data, "info") and hasattr(data, "split"):
        return data
    if isinstance(data, TensorDataset):
        if len(data.tensors) != 2:
            raise InputError("a TensorDataset must hold two tensors: inputs and labels")
        data = data.tensors
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise InputError("give a ddrs dataset, a TensorDataset(x, y) or a pair of tensors (x, y)")
    x, y = data
    if num_classes is None:
        num_classes = int(torch.as_tensor(y).max()) + 1
    return TensorInputs(x, torch.as_tensor(y), num_classes)
