"""Where a run's model and inputs come from, loaded in one place: a checkpoint, your own model
or experts (always as `Experts`: one model is the one expert of every input), the dataset
split, the router of dual smoothing, and the memory a run resolves through."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from ddrs.core.experts import Experts
from ddrs.core.route import Router
from ddrs.core.torchutil import model_device
from ddrs.data.tensors import as_dataset
from ddrs.errors import CheckpointError, InputError
from ddrs.memory import CertificationMemory
from ddrs.models import (
    load_checkpoint,
    load_denoiser,
    load_model,
    memory_fingerprint,
    model_fingerprint,
    with_denoiser,
)
from ddrs.models.engines import (
    CALIBRATION_IMAGES,
    ENGINES,
    PRECISIONS,
    check_engine,
    default_engine,
    with_engine,
)
from ddrs.models.experts import expert_specs, load_experts
from ddrs.options import setting

DATASETS_HELP = "digits, mnist, cifar10, imagenet, imagefolder (your images), npz (arrays)"
IMAGE_SIZE_HELP = (
    "imagefolder: H[,W] of the inputs (default: the images' own size when they "
    "all share it; a checkpoint's recorded size)"
)
DENOISER_HELP = (
    "denoised smoothing: a denoiser in front of the model (or every expert): a `ddrs "
    "train-denoiser` checkpoint, package.module:factory, TorchScript or .onnx file"
)
ENGINE_HELP = (
    "what runs the model: auto (the fastest fp32 engine installed whose votes equal eager's, "
    "measured once per model and machine), eager, compile (torch.compile), onnxruntime, "
    "openvino (default: auto, or $DDRS_ENGINE)"
)
PRECISION_HELP = (
    "fp32; bf16 (OpenVINO, CPUs with bf16) or int8 (ONNX Runtime or OpenVINO, calibrated on "
    f"{CALIBRATION_IMAGES} training images): another base classifier, with its own fingerprint"
)
CHANNELS_HELP = "imagefolder: 1 (grey) or 3 (default: 1 when every image is grey)"


@dataclass(frozen=True, kw_only=True)
class Models:
    """The model a run uses: a checkpoint, your own model, or experts (exactly one)."""

    checkpoint: str | None = setting(
        None, "a ddrs or published (Cohen/SmoothAdv/MACER) checkpoint", group="model"
    )
    model: str | None = setting(
        None, "your own model: package.module:factory, or a TorchScript file", group="model"
    )
    expert: tuple[str, ...] | None = setting(
        None,
        "an expert, SOURCE:SIGMA or NAME=SOURCE:SIGMA (SOURCE a checkpoint or "
        "package.module:factory; repeatable): inputs are routed among the experts",
        group="model",
        repeatable=True,
    )
    experts: str | None = setting(
        None, "a file of experts, one per line: NAME SOURCE SIGMA", group="model"
    )
    denoiser: str | None = setting(None, DENOISER_HELP)
    engine: str = setting(factory=default_engine, help=ENGINE_HELP, choices=list(ENGINES))
    precision: str = setting("fp32", PRECISION_HELP, choices=list(PRECISIONS))

    def __post_init__(self) -> None:
        given = [self.checkpoint, self.model, self.expert or self.experts]
        if sum(g is not None for g in given) != 1:
            raise InputError("give exactly one of --checkpoint, --model, or experts")
        check_engine(self.engine, self.precision)
        if self.has_experts:
            expert_specs(self.expert, self.experts)  # their format, sigmas and names

    @property
    def has_experts(self) -> bool:
        return bool(self.expert or self.experts)

    @property
    def first_source(self) -> str | None:
        """The checkpoint, or the first expert's source (what records the inputs' options)."""
        if self.has_experts:
            return expert_specs(self.expert, self.experts)[0].source
        return self.checkpoint

    def load_for(
        self, num_classes: int, input_shape, inputs_name: str, device, calibration=None
    ) -> Experts:
        """The model (as the one expert) or the experts, each checked against the inputs and
        run by the engine (`calibration`: int8's training images, a callable)."""
        inputs = {
            "num_classes": num_classes,
            "input_shape": input_shape,
            "inputs_name": inputs_name,
            "device": device,
        }
        if self.has_experts:
            experts = load_experts(expert_specs(self.expert, self.experts), **inputs)
        else:
            experts = Experts.of_model(
                load_model(checkpoint=self.checkpoint, model=self.model, **inputs)
            )
        experts = denoised(experts, self.denoiser, input_shape, device)
        engine, precision = self.engine, self.precision
        return with_engine(experts, engine, precision, input_shape, model_fingerprint, calibration)


@dataclass(frozen=True, kw_only=True)
class ModelSource(Models):
    """The model (a checkpoint, your own, or experts) and the dataset split it is run on."""

    dataset: str | None = setting(None, DATASETS_HELP, required=True)
    data_root: str | None = setting(
        None, "dataset folder, or the .npz file (default: $DDRS_DATA_ROOT)"
    )
    split: str = setting("test", "dataset split", choices=["train", "test"])
    device: str = setting("auto", "auto, cpu, cuda, cuda:1, ...")
    image_size: tuple[int, int] | None = setting(None, IMAGE_SIZE_HELP, type="image_size")
    channels: int | None = setting(None, CHANNELS_HELP, type=int)

    def __post_init__(self) -> None:
        from ddrs.data import ImageOptions

        super().__post_init__()
        ImageOptions(self.image_size, self.channels)  # checks them

    def load(self) -> tuple[Experts, Any]:
        """(the model as the one expert, or the experts, in eval mode on their device; the
        dataset split): every model checked against the dataset's inputs."""
        from ddrs.data import get_dataset
        from ddrs.launch import device_for

        if self.dataset is None:
            raise InputError("give --dataset")
        options = self.image_options()
        dataset = get_dataset(
            self.dataset,
            self.split,
            self.data_root,
            augment=False,
            options=options if self.dataset == "imagefolder" else None,
        )
        info = dataset.info
        experts = self.load_for(
            info.num_classes,
            info.input_shape,
            self.dataset,
            device_for(self.device),
            lambda: calibration_images(self.dataset, self.data_root, options),
        )
        return experts, dataset

    def image_options(self):
        """How the images become inputs: the flags, else what the checkpoint (or the first
        expert's) records."""
        from ddrs.data import ImageOptions

        return ImageOptions(
            *recorded_image_options(self.first_source, self.image_size, self.channels)
        )


def denoised(experts: Experts, denoiser: str | None, input_shape, device) -> Experts:
    """The experts (or the one model) behind the denoiser at `denoiser`, if one is given."""
    if denoiser is None:
        return experts
    return with_denoiser(experts, load_denoiser(denoiser, input_shape, device), denoiser)


def calibration_images(dataset: str, data_root: str | None, options=None) -> torch.Tensor:
    """int8's calibration set: CALIBRATION_IMAGES images of the dataset's training split,
    drawn by a fixed seed (never the test images)."""
    from ddrs.data import get_dataset

    train = get_dataset(
        dataset,
        "train",
        data_root,
        augment=False,
        options=options if dataset == "imagefolder" else None,
    )
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(train), generator=generator)[:CALIBRATION_IMAGES]
    return torch.stack([torch.as_tensor(train[int(i)][0]).float() for i in order])


def recorded_image_options(source: str | None, image_size, channels) -> tuple:
    """(image_size, channels): the given ones, else those a checkpoint at `source` records."""
    if (image_size is None or channels is None) and source and Path(source).is_file():
        from ddrs.data import ImageOptions
        from ddrs.models import recorded_meta

        recorded = ImageOptions.from_meta(recorded_meta(source).get("data_options"))
        image_size = image_size or recorded.image_size
        channels = channels or recorded.channels
    return image_size, channels


def inputs_of(data, experts: Experts):
    """The dataset a run goes over: one of ddrs's, or your tensors (a TensorDataset or a pair
    (x, y)), whose number of classes is the model's number of outputs (one probe pass)."""
    if hasattr(data, "info"):
        return data
    x = data.tensors[0] if isinstance(data, TensorDataset) else data[0]
    model = experts[0].model
    with torch.inference_mode():
        outputs = model(torch.as_tensor(x[:1]).float().to(model_device(model)))
    return as_dataset(data, int(outputs.shape[-1]))


def load_router(path: str, experts: Experts, device) -> Router:
    """A router checkpoint of `ddrs train-router`, for these experts."""
    loaded = load_checkpoint(path, device=device)
    about = loaded.meta.get("router")
    if not about:
        raise CheckpointError(f"{path} is not a router (train one with `ddrs train-router`)")
    return Router(loaded.model, float(about["sigma"]), tuple(about["experts"]))


def open_memory(path: str, experts: Experts, dataset, norm: str = "l2") -> CertificationMemory:
    """The certification memory at `path` for this model (or these experts) on this dataset,
    with balls in `norm`, created if new."""
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        print(f"note: {path} is an empty file; starting a new memory in it")
    shape = dataset.info.input_shape
    fingerprint = memory_fingerprint(experts, dataset.info.name, shape)
    return CertificationMemory(path, fingerprint, shape, norm=norm)
