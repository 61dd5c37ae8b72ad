"""Checkpoints (ours and the field's published format), user-supplied models, model identity."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddrs.errors import CheckpointError, InputError
from ddrs.models.build import ARCH_NAMES, build_model

FORMAT = "ddrs-checkpoint/1"
REQUIRED_META = ("arch", "num_classes", "input_shape", "mean", "std")
_RESERVED = ("format", "arch", "state_dict", "meta")
# Wrapper prefixes left in state dict keys by DataParallel / DDP and torch.compile.
_WRAPPER_PARTS = ("module", "_orig_mod")

_CIFAR10 = {
    "dataset": "cifar10",
    "num_classes": 10,
    "input_shape": (3, 32, 32),
    "mean": (0.4914, 0.4822, 0.4465),
    "std": (0.2023, 0.1994, 0.2010),
}
_IMAGENET = {
    "dataset": "imagenet",
    "num_classes": 1000,
    "input_shape": (3, 224, 224),
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
}
PUBLISHED_ARCHS = {"cifar_resnet20": _CIFAR10, "cifar_resnet110": _CIFAR10, "resnet50": _IMAGENET}


@dataclass
class LoadedCheckpoint:
    model: nn.Module  # eval mode, on the requested device
    meta: dict[str, Any]
    payload: dict[str, Any]  # the raw file contents (optimizer state etc., for resuming)


def save_checkpoint(
    path: str | os.PathLike[str], model: nn.Module, meta: dict[str, Any], **extra: Any
) -> None:
    """Atomically write {"format", "arch", "state_dict", "meta", **extra}.

    Everything in meta / extra must be weights-only loadable: python scalars, strings, tensors,
    and lists / tuples / dicts of them (store RNG states as tensors).
    """
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        raise InputError(f"checkpoint meta lacks {', '.join(missing)}")
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise InputError(f"extra checkpoint entries may not be named {', '.join(clash)}")
    payload = {
        "format": FORMAT,
        "arch": meta["arch"],
        "state_dict": _unwrap(model).state_dict(),
        "meta": dict(meta),
        **extra,
    }
    _atomic_save(payload, Path(path))


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename durable on POSIX; directories cannot be opened like this on Windows.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_checkpoint(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    expect: Mapping[str, Any] | None = None,
) -> LoadedCheckpoint:
    """Load a ddrs or published (Cohen et al.-style) checkpoint and rebuild its model."""
    path = Path(path)
    payload = _read_payload(path)
    if payload.get("format") == FORMAT:
        meta = _our_meta(payload, path)
    elif "format" in payload:
        raise CheckpointError(f"{path}: unsupported checkpoint format {payload['format']!r}")
    elif "arch" in payload and "state_dict" in payload:
        meta = _published_meta(payload["arch"], path)
    else:
        keys = ", ".join(sorted(map(str, payload))[:8])
        raise CheckpointError(f"{path}: not a recognised checkpoint (top-level keys: {keys})")
    _check_expect(meta, expect or {}, path)
    model = _build_and_load(meta, payload["state_dict"], path)
    guard_input_shape(model, tuple(meta["input_shape"]))
    return LoadedCheckpoint(model.to(device).eval(), meta, payload)


def recorded_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The meta a ddrs checkpoint records ({} for a published one)."""
    payload = _read_payload(Path(path))
    meta = payload.get("meta") if payload.get("format") == FORMAT else None
    return meta if isinstance(meta, dict) else {}


class CheckpointMismatch(CheckpointError):
    """A checkpoint that loads, but was trained for other inputs than those it is given."""


class InputShapeError(InputError):
    """A model was given inputs of another shape than the one it was trained on."""


def guard_input_shape(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Make `model` refuse inputs whose shape (after the batch dimension) is not `shape`:
    a normalisation layer would broadcast one channel to three and adaptive pooling takes any
    size, so a mismatch would otherwise go unnoticed."""
    expected = tuple(int(s) for s in shape)

    def check(_module, args):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and tuple(x.shape[1:]) != expected:
            raise InputShapeError(
                f"this model was trained on inputs of shape {expected}; it was given "
                f"{tuple(x.shape[1:])} (check --dataset, --image-size and --channels)"
            )

    model.register_forward_pre_hook(check)
    return model


def _read_payload(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        # Ours always loads weights-only. Published checkpoints written by older research code
        # may pickle other objects (e.g. argparse Namespaces), which need the full unpickler;
        # such files are trusted model downloads the user pointed us at.
        try:
            payload = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:
            raise CheckpointError(
                f"cannot read checkpoint {path}: not a torch file, truncated or corrupt ({err})"
            ) from err
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(payload).__name__}")
    return payload


def _our_meta(payload: dict[str, Any], path: Path) -> dict[str, Any]:
    meta = payload.get("meta")
    if not isinstance(meta, dict) or "state_dict" not in payload:
        raise CheckpointError(f"{path}: ddrs checkpoint lacks 'meta' or 'state_dict'")
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        raise CheckpointError(f"{path}: checkpoint meta lacks {', '.join(missing)}")
    return meta


def _published_meta(arch: Any, path: Path) -> dict[str, Any]:
    if arch not in PUBLISHED_ARCHS:
        known = ", ".join(PUBLISHED_ARCHS)
        raise CheckpointError(f"{path}: unknown published architecture {arch!r} (known: {known})")
    return {"arch": arch, **PUBLISHED_ARCHS[arch], "format": "published"}


def _check_expect(meta: dict[str, Any], expect: Mapping[str, Any], path: Path) -> None:
    for key, wanted in expect.items():
        if key not in meta:
            raise CheckpointError(f"{path}: checkpoint does not record {key!r} (need {wanted!r})")
        if _plain(meta[key]) != _plain(wanted):
            raise CheckpointMismatch(f"{path}: checkpoint has {key}={meta[key]!r}, need {wanted!r}")


def _plain(value: Any) -> Any:
    # Lists and tuples compare equal, so (3, 32, 32) matches [3, 32, 32].
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build_and_load(meta: dict[str, Any], state_dict: Any, path: Path) -> nn.Module:
    arch = meta["arch"]
    if meta.get("kind") == "denoiser":
        from ddrs.models.dncnn import DENOISER_ARCHS, build_denoiser

        if arch not in DENOISER_ARCHS:
            raise CheckpointError(f"{path}: unknown denoiser architecture {arch!r}")
        return _load_state(build_denoiser(arch, meta["input_shape"]), state_dict, path, arch)
    if arch not in ARCH_NAMES:
        raise CheckpointError(f"{path}: unknown architecture {arch!r} (known: {ARCH_NAMES})")
    try:
        model = build_model(
            arch, meta["num_classes"], tuple(meta["input_shape"]), meta["mean"], meta["std"]
        )
    except InputError as err:
        raise CheckpointError(f"{path}: checkpoint describes an invalid model: {err}") from err
    return _load_state(model, state_dict, path, arch)


def _load_state(model: nn.Module, state_dict: Any, path: Path, arch: str) -> nn.Module:
    if not isinstance(state_dict, Mapping) or not all(isinstance(k, str) for k in state_dict):
        raise CheckpointError(f"{path}: 'state_dict' is not a mapping of names to tensors")
    cleaned = OrderedDict((_strip_wrappers(k), v) for k, v in state_dict.items())
    try:
        result = model.load_state_dict(cleaned, strict=False)
    except (RuntimeError, TypeError) as err:
        raise CheckpointError(f"{path}: state dict does not fit {arch}: {str(err)[:800]}") from err
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: state dict does not match {arch}: "
            f"{_describe('missing', result.missing_keys)}, "
            f"{_describe('unexpected', result.unexpected_keys)}"
        )
    return model


def _strip_wrappers(key: str) -> str:
    return ".".join(part for part in key.split(".") if part not in _WRAPPER_PARTS)


def _describe(kind: str, keys: list[str]) -> str:
    shown = f" (e.g. {', '.join(keys[:4])})" if keys else ""
    return f"{len(keys)} {kind} keys{shown}"


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def load_user_model(spec: str) -> nn.Module:
    """'package.module:factory' (factory() -> nn.Module), a TorchScript .pt / .pth file, or an
    ONNX file (run by ONNX Runtime: `pip install 'ddrs[onnx]'`).

    Returns the model in eval mode.
    """
    if spec.lower().endswith(".onnx"):
        from ddrs.models.onnx import OnnxModel

        return OnnxModel(spec).eval()
    if spec.lower().endswith((".pt", ".pth")):
        return _load_torchscript(Path(spec))
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CheckpointError(
            f"model spec {spec!r}: expected 'package.module:factory' or a TorchScript .pt/.pth file"
        )
    factory = _import_attr(module_name, attr)
    try:
        model = factory()
    except Exception as err:
        raise CheckpointError(f"model spec {spec!r}: factory raised {err!r}") from err
    if not isinstance(model, nn.Module):
        raise CheckpointError(
            f"model spec {spec!r}: factory returned {type(model).__name__}, not a torch nn.Module"
        )
    return model.eval()


def _import_attr(module_name: str, attr: str) -> Any:
    """`module:attr`, the module found as `python -m` would: in the current folder first."""
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise CheckpointError(
            f"cannot import {module_name!r} ({err}): put {module_name.split('.')[0]}.py (or "
            "its package) in the current folder, or add its folder to PYTHONPATH"
        ) from err
    except Exception as err:
        raise CheckpointError(f"importing {module_name!r} failed: {err!r}") from err
    finally:
        if added:
            sys.path.remove(os.getcwd())
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CheckpointError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CheckpointError(f"{module_name}:{attr} is not callable")
    return obj


def _load_torchscript(path: Path) -> nn.Module:
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}")
    try:
        # TorchScript is deprecated in recent torch, but it is what the user chose to hand us.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            model = torch.jit.load(str(path), map_location="cpu")
    except Exception as err:
        raise CheckpointError(f"{path} is not a TorchScript model: {err}") from err
    return model.eval()


def load_model(
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    model: str | None = None,
    num_classes: int,
    input_shape: tuple[int, ...],
    inputs_name: str = "these",
    device: str | torch.device = "cpu",
) -> nn.Module:
    """The one model loader of every command: a checkpoint (ours or published) or a user
    model (`model`: package.module:factory or TorchScript), in eval mode on `device`,
    checked against the inputs it will see (`inputs_name`, e.g. the dataset: its
    `input_shape` and `num_classes`) by one probe forward pass."""
    if (checkpoint is None) == (model is None):
        raise InputError("give exactly one of a checkpoint or a model")
    shape = tuple(int(s) for s in input_shape)
    if checkpoint is not None and str(checkpoint).lower().endswith(".onnx"):
        checkpoint, model = None, str(checkpoint)  # an exported model, whichever flag named it
    if checkpoint is not None:
        expect = {"num_classes": num_classes, "input_shape": list(shape)}
        if recorded_meta(checkpoint).get("kind") == "denoiser":
            raise CheckpointError(
                f"{checkpoint} is a denoiser (ddrs train-denoiser), not a classifier: pass it as "
                "--denoiser, beside the classifier it was trained for"
            )
        try:
            loaded = load_checkpoint(checkpoint, device=device, expect=expect).model
        except CheckpointMismatch as error:
            raise CheckpointError(
                f"{error} — this checkpoint was trained for other inputs than {inputs_name} "
                f"{shape} inputs in {num_classes} classes; pass the checkpoint trained on them "
                "(or the --dataset it was trained on)"
            ) from None
    else:
        loaded = load_user_model(model).to(device).eval()
    try:
        with torch.inference_mode():
            probe = loaded(torch.zeros(1, *shape, device=device))
    except (RuntimeError, ValueError, TypeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else error
        raise CheckpointError(
            f"the model fails on one {inputs_name} input of shape {shape} "
            f"({type(error).__name__}: {first_line}); is it the model for these inputs?"
        ) from None
    if tuple(probe.shape) != (1, num_classes):
        raise CheckpointError(
            f"the model maps a {shape} input to shape {tuple(probe.shape)}; expected logits "
            f"of shape (1, {num_classes}) for {inputs_name} inputs"
        )
    return loaded


def is_own_model(source: str) -> bool:
    """True when `source` is a user's model (package.module:factory, TorchScript or ONNX)
    rather than a ddrs or published checkpoint."""
    return not Path(source).is_file() or is_torchscript(source) or source.lower().endswith(".onnx")


def is_torchscript(path: str) -> bool:
    """A TorchScript archive holds a `code/` folder; our and published checkpoints do not."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False
