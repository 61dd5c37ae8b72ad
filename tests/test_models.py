"""Architectures, normalisation, checkpoints (ours and published), user models, fingerprints."""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from ddrs.core.torchutil import is_convolutional
from ddrs.errors import CheckpointError, InputError
from ddrs.models import (
    ARCH_NAMES,
    NormalizeLayer,
    build_model,
    load_checkpoint,
    load_user_model,
    model_fingerprint,
    save_checkpoint,
)

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _meta(arch: str = "cnn", shape: tuple[int, int, int] = (3, 32, 32)) -> dict:
    return {
        "arch": arch,
        "dataset": "cifar10",
        "num_classes": 10,
        "input_shape": shape,
        "mean": list(CIFAR_MEAN),
        "std": list(CIFAR_STD),
    }


def _build(meta: dict) -> nn.Module:
    model = build_model(
        meta["arch"], meta["num_classes"], meta["input_shape"], meta["mean"], meta["std"]
    )
    _randomise_bn(model)
    return model.eval()


def _randomise_bn(model: nn.Module) -> None:
    # Non-trivial running statistics, so a checkpoint that drops buffers would be noticed.
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _outputs(model: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        return model(x)


@pytest.fixture(scope="module")
def resnet50_imagenet() -> nn.Module:
    torch.manual_seed(0)
    return _build(
        {
            **_meta("resnet50", (3, 224, 224)),
            "num_classes": 1000,
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
        }
    )


# --- architectures -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "shape", "batch"),
    [
        ("cnn", (1, 8, 8), 3),
        ("cnn", (1, 28, 28), 3),
        ("cnn", (3, 32, 32), 3),
        ("cnn", (3, 64, 48), 2),
        ("cnn_small", (3, 32, 32), 3),
        ("cifar_resnet20", (3, 32, 32), 2),
        ("cifar_resnet110", (3, 32, 32), 2),
        ("cifar_resnet18", (3, 32, 32), 2),
        ("cifar_resnet20", (1, 28, 28), 2),
    ],
)
def test_output_shapes(arch: str, shape: tuple[int, int, int], batch: int) -> None:
    c = shape[0]
    model = build_model(arch, 7, shape, [0.5] * c, [0.25] * c).eval()
    assert _outputs(model, (batch, *shape)).shape == (batch, 7)


def test_resnet50_shape_and_torchvision_names(resnet50_imagenet: nn.Module) -> None:
    assert _outputs(resnet50_imagenet, (1, 3, 224, 224)).shape == (1, 1000)
    keys = resnet50_imagenet.state_dict().keys()
    for key in [
        "1.conv1.weight",
        "1.layer1.0.downsample.0.weight",
        "1.layer4.2.bn3.running_var",
        "1.layer3.5.conv2.weight",
        "1.fc.bias",
    ]:
        assert key in keys
    # torchvision's resnet50() has exactly this many parameters.
    assert sum(p.numel() for p in resnet50_imagenet.parameters()) == 25_557_032


def test_cifar_resnet_names_follow_cohen() -> None:
    keys = build_model("cifar_resnet110", 10, (3, 32, 32), CIFAR_MEAN, CIFAR_STD).state_dict()
    assert {
        "1.conv1.weight",
        "1.bn1.running_mean",
        "1.layer2.0.downsample.1.weight",
        "1.layer3.17.conv2.weight",
        "1.fc.weight",
    } <= set(keys)
    assert "1.layer1.0.downsample.0.weight" not in keys
    assert "1.layer3.18.conv1.weight" not in keys
    keys18 = build_model("cifar_resnet18", 10, (3, 32, 32), CIFAR_MEAN, CIFAR_STD).state_dict()
    assert {"1.layer2.0.shortcut.0.weight", "1.layer4.1.bn2.bias", "1.linear.weight"} <= set(keys18)


def test_build_model_rejects_bad_arguments() -> None:
    with pytest.raises(InputError, match="cifar_resnet110"):
        build_model("vgg16", 10, (3, 32, 32), CIFAR_MEAN, CIFAR_STD)
    with pytest.raises(InputError):
        build_model("cnn", 10, (1, 32, 32), CIFAR_MEAN, CIFAR_STD)
    with pytest.raises(InputError):
        build_model("cnn", 10, (3, 4, 4), CIFAR_MEAN, CIFAR_STD)
    assert set(ARCH_NAMES) == {
        "cnn",
        "cnn_small",
        "cifar_resnet20",
        "cifar_resnet110",
        "cifar_resnet18",
        "resnet50",
    }


def test_normalize_layer() -> None:
    layer = NormalizeLayer([0.5, 0.25], [2.0, 0.5])
    x = torch.rand(4, 2, 3, 3)
    expected = torch.stack([(x[:, 0] - 0.5) / 2.0, (x[:, 1] - 0.25) / 0.5], dim=1)
    torch.testing.assert_close(layer(x), expected)
    assert layer.state_dict() == {}
    assert layer.to(torch.float64).mean.dtype == torch.float64
    with pytest.raises(InputError):
        NormalizeLayer([0.5], [0.0])
    with pytest.raises(InputError):
        NormalizeLayer([0.5, 0.5], [1.0])


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_is_convolutional() -> None:
    assert is_convolutional(build_model("cnn", 10, (1, 8, 8), [0.5], [0.5]))
    assert not is_convolutional(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))
    assert is_convolutional(torch.jit.script(nn.Sequential(nn.Conv2d(1, 1, 3))))


# --- our checkpoint format -----------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    meta = _meta()
    model = _build(meta)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rng = torch.get_rng_state()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, meta, epoch=3, optimizer=opt.state_dict(), rng=rng)

    loaded = load_checkpoint(path, expect={"dataset": "cifar10", "input_shape": [3, 32, 32]})
    assert loaded.meta == meta
    assert not loaded.model.training
    torch.testing.assert_close(
        _outputs(loaded.model, (4, 3, 32, 32)), _outputs(model, (4, 3, 32, 32)), rtol=0, atol=0
    )
    assert loaded.payload["epoch"] == 3
    assert torch.equal(loaded.payload["rng"], rng)
    assert loaded.payload["format"] == "ddrs-checkpoint/1"
    assert set(torch.load(path, weights_only=True)["state_dict"]) == set(model.state_dict())


def test_save_is_atomic(tmp_path: Path) -> None:
    meta = _meta()
    model = _build(meta)
    path = tmp_path / "sub" / "ckpt.pt"
    save_checkpoint(path, model, meta)
    save_checkpoint(path, model, meta, epoch=1)
    assert os.listdir(path.parent) == ["ckpt.pt"]
    with pytest.raises(Exception):  # noqa: B017 - any pickling error
        save_checkpoint(path, model, meta, bad=lambda: None)
    assert os.listdir(path.parent) == ["ckpt.pt"]
    assert load_checkpoint(path).payload["epoch"] == 1
    with pytest.raises(InputError):
        save_checkpoint(path, model, {"arch": "cnn"})


def test_unreadable_checkpoints(tmp_path: Path) -> None:
    meta = _meta()
    good = tmp_path / "good.pt"
    save_checkpoint(good, _build(meta), meta)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    noise = tmp_path / "noise.pt"
    noise.write_bytes(os.urandom(4096))
    not_dict = tmp_path / "list.pt"
    torch.save([1, 2], not_dict)
    no_keys = tmp_path / "nokeys.pt"
    torch.save({"weights": torch.zeros(2)}, no_keys)
    for path in [truncated, noise, not_dict, no_keys, tmp_path / "missing.pt", tmp_path]:
        with pytest.raises(CheckpointError):
            load_checkpoint(path)


def test_state_dict_mismatch_is_reported(tmp_path: Path) -> None:
    meta = _meta()
    sd = _build(meta).state_dict()
    sd["1.extra.weight"] = sd.pop("1.features.0.weight")
    path = tmp_path / "bad.pt"
    torch.save({"format": "ddrs-checkpoint/1", "arch": "cnn", "state_dict": sd, "meta": meta}, path)
    with pytest.raises(CheckpointError, match=r"1 missing keys.*1\.features\.0\.weight.*1 unexp"):
        load_checkpoint(path)
    sd = _build(meta).state_dict()
    sd["1.features.0.weight"] = torch.zeros(1)
    torch.save({"format": "ddrs-checkpoint/1", "arch": "cnn", "state_dict": sd, "meta": meta}, path)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(path)


def test_expect_mismatch(tmp_path: Path) -> None:
    meta = _meta()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, _build(meta), meta)
    with pytest.raises(CheckpointError, match="num_classes"):
        load_checkpoint(path, expect={"num_classes": 100})
    with pytest.raises(CheckpointError, match="sigma"):
        load_checkpoint(path, expect={"sigma": 0.25})


# --- published checkpoints -----------------------------------------------------------------


class _ParamFreeNormalize(nn.Module):
    """Like the published code's normalize layer: plain tensor attributes, no state dict keys."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.means, self.sds = torch.tensor(mean), torch.tensor(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.means.view(-1, 1, 1)) / self.sds.view(-1, 1, 1)


def test_published_cifar_checkpoint(tmp_path: Path) -> None:
    ours = _build(_meta("cifar_resnet110"))
    published = nn.Sequential(_ParamFreeNormalize(CIFAR_MEAN, CIFAR_STD), copy.deepcopy(ours[1]))
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(
        {
            "epoch": 90,
            "arch": "cifar_resnet110",
            "state_dict": published.state_dict(),
            "optimizer": {"state": {}, "param_groups": []},
        },
        path,
    )

    loaded = load_checkpoint(path, expect={"dataset": "cifar10", "num_classes": 10})
    assert loaded.meta["input_shape"] == (3, 32, 32)
    assert tuple(loaded.meta["mean"]) == CIFAR_MEAN
    torch.testing.assert_close(
        _outputs(loaded.model, (2, 3, 32, 32)), _outputs(published.eval(), (2, 3, 32, 32))
    )
    with pytest.raises(CheckpointError):
        load_checkpoint(path, expect={"dataset": "imagenet"})


def test_published_imagenet_checkpoint(tmp_path: Path, resnet50_imagenet: nn.Module) -> None:
    # DataParallel-wrapped keys; older torch versions wrote no num_batches_tracked.
    sd = {
        k.replace("1.", "1.module.", 1): v
        for k, v in resnet50_imagenet.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"arch": "resnet50", "state_dict": sd}, path)
    loaded = load_checkpoint(path, expect={"dataset": "imagenet", "num_classes": 1000})
    torch.testing.assert_close(
        _outputs(loaded.model, (1, 3, 224, 224)), _outputs(resnet50_imagenet, (1, 3, 224, 224))
    )
    with pytest.raises(InputError, match=r"trained on inputs of shape \(3, 224, 224\)"):
        loaded.model(torch.rand(1, 3, 64, 64))  # adaptive pooling would have taken it


def test_published_checkpoint_edge_cases(tmp_path: Path) -> None:
    sd = _build(_meta("cifar_resnet20")).state_dict()
    legacy = tmp_path / "legacy.pth"
    # A pickled argparse Namespace needs the full unpickler: the fallback path.
    torch.save(
        {"arch": "cifar_resnet20", "state_dict": sd, "args": argparse.Namespace(lr=0.1)}, legacy
    )
    assert load_checkpoint(legacy).meta["arch"] == "cifar_resnet20"
    unknown = tmp_path / "unknown.pth"
    torch.save({"arch": "wide_resnet", "state_dict": sd}, unknown)
    with pytest.raises(CheckpointError, match="wide_resnet"):
        load_checkpoint(unknown)
    wrong = tmp_path / "wrong.pth"
    torch.save({"arch": "cifar_resnet110", "state_dict": sd}, wrong)
    with pytest.raises(CheckpointError, match="missing keys"):
        load_checkpoint(wrong)


# --- user models ---------------------------------------------------------------------------


USER_MODULE = """
import torch.nn as nn

def make():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 3))

def not_a_module():
    return 42

def broken():
    raise RuntimeError("boom")

NOT_CALLABLE = 3
"""


def test_load_user_model_from_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ddrs_user_models.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = load_user_model("ddrs_user_models:make")
    assert isinstance(model, nn.Module) and not model.training
    assert model(torch.rand(2, 3, 2, 2)).shape == (2, 3)
    for spec, message in [
        ("ddrs_user_models:not_a_module", "not a torch"),
        ("ddrs_user_models:broken", "boom"),
        ("ddrs_user_models:NOT_CALLABLE", "not callable"),
        ("ddrs_user_models:missing", "no attribute"),
        ("ddrs_no_such_module_xyz:make", "cannot import"),
        ("just_a_name", "expected"),
    ]:
        with pytest.raises(CheckpointError, match=message):
            load_user_model(spec)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_load_user_model_torchscript(tmp_path: Path) -> None:
    model = build_model("cnn", 10, (1, 8, 8), [0.5], [0.5]).eval()
    path = tmp_path / "scripted.pt"
    torch.jit.script(model).save(str(path))
    loaded = load_user_model(str(path))
    torch.testing.assert_close(_outputs(loaded, (2, 1, 8, 8)), _outputs(model, (2, 1, 8, 8)))
    plain = tmp_path / "plain.pth"
    torch.save({"a": torch.zeros(1)}, plain)
    with pytest.raises(CheckpointError, match="TorchScript"):
        load_user_model(str(plain))
    with pytest.raises(CheckpointError, match="not found"):
        load_user_model(str(tmp_path / "absent.pt"))


# --- fingerprint ---------------------------------------------------------------------------


def test_fingerprint() -> None:
    model = _build(_meta())
    first = model_fingerprint(model)
    assert len(first) == 64 and first == model_fingerprint(model)
    assert model_fingerprint(copy.deepcopy(model).train()) == first
    other_norm = build_model("cnn", 10, (3, 32, 32), [0.5] * 3, [0.5] * 3)
    other_norm.load_state_dict(model.state_dict())
    assert model_fingerprint(other_norm) != first
    with torch.no_grad():
        model[1].features[0].weight[0, 0, 0, 0] += 1e-3
    assert model_fingerprint(model) != first
