"""What a training run depends on (`TrainConfig`, recorded in each checkpoint), and what a
router learns from (`RouterLabels`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ddrs.core.checks import integer, number, optional_integer, positive, probability
from ddrs.core.smooth import DEFAULTS
from ddrs.errors import InputError
from ddrs.models.experts import expert_specs
from ddrs.options import setting
from ddrs.runs.source import CHANNELS_HELP, DATASETS_HELP, DENOISER_HELP, IMAGE_SIZE_HELP

DD_SECTION = "data-dependent sigma (Alfarra et al. 2022)"


@dataclass(kw_only=True)
class TrainConfig:
    """Everything a training run depends on; recorded in each checkpoint.

    Optimiser defaults are Cohen et al.'s CIFAR-10 settings: SGD lr 0.1, momentum 0.9,
    weight decay 1e-4, lr x0.1 every 30 epochs, batch 256.
    """

    dataset: str = setting(None, DATASETS_HELP, required=True)
    arch: str = setting(
        None,
        "cnn, cnn_small, cifar_resnet20, cifar_resnet110, cifar_resnet18, resnet50",
        required=True,
    )
    out: str = setting(None, "run folder: last.pt, best.pt, log.csv", required=True)
    method: str = setting("gaussian", "gaussian, smoothadv, macer, consistency")
    method_settings: dict = setting(
        help="a method hyper-parameter, e.g. --setting eps=0.5 (repeatable; see docs/METHODS.md)",
        factory=dict,
        flag="--setting",
        metavar="KEY=VALUE",
    )
    sigma: float = setting(
        0.25,
        "training noise level (pixel units); 0 trains on clean images (--method gaussian), "
        "the off-the-shelf model that denoised smoothing certifies",
        required=True,
    )
    norm: str = setting(
        "l2",
        "the training noise, for certificates in this norm: l2 (Gaussian) or l1 (uniform of "
        "half-width --sigma; --method gaussian, without --data-dependent)",
        choices=["l2", "l1"],
    )
    epochs: int = setting(90, "training epochs")
    batch: int = setting(256, "training batch size")
    lr: float = setting(0.1, "SGD learning rate")
    momentum: float = setting(0.9, "SGD momentum")
    weight_decay: float = setting(1e-4, "SGD weight decay")
    lr_step: int = setting(30, "multiply lr by --lr-gamma every this many epochs")
    lr_gamma: float = setting(0.1, "lr factor every --lr-step")
    seed: int = setting(0, "seed of initialisation, order, noise")
    data_root: str | None = setting(
        None, "dataset folder, or the .npz file (default: $DDRS_DATA_ROOT)"
    )
    image_size: tuple[int, int] | None = setting(None, IMAGE_SIZE_HELP, type="image_size")
    channels: int | None = setting(None, CHANNELS_HELP, type=int)
    normalize: str | tuple | None = setting(
        None,
        "imagefolder: the model's normalisation: imagenet, none, auto (the training "
        "split's per-channel mean and std) or MEAN,STD (default: 0.5,0.5)",
        type="normalize",
    )
    train_subset: int | None = setting(
        None, "train on a fixed random subset of this size", type=int
    )
    eval_max: int | None = setting(2000, "test inputs for per-epoch accuracy", type=int)
    device: str = setting("auto", "auto, cpu, cuda, cuda:1, ...")
    workers: int = setting(0, "data loader worker processes")
    data_dependent: bool = setting(False, "per-sample sigma, warm-started", section=DD_SECTION)
    dd_iterations: int = setting(
        10, "ascent steps per batch (authors: 10 CIFAR, 1 ImageNet)", section=DD_SECTION
    )
    dd_lr: float = setting(
        1e-4,
        "ascent step (authors: 1e-4 over 440 epochs; short runs: see docs/METHODS.md)",
        section=DD_SECTION,
    )
    dd_samples: int = setting(
        64, "noise samples per step (authors: 64 CIFAR, 1 ImageNet)", section=DD_SECTION
    )
    dd_start_epoch: int = setting(
        0, "first epoch (0-based) that updates sigmas", section=DD_SECTION
    )
    dd_every: int = setting(1, "update sigmas every this many epochs", section=DD_SECTION)
    resume: bool = setting(False, "continue from OUT/last.pt exactly")
    init: str | None = setting(None, "fine-tune: start from this checkpoint's weights")
    tensorboard: bool = setting(False, "also log to OUT/tensorboard")
    progress: bool = setting(True, "hide progress bars", flag="--no-progress")

    def __post_init__(self) -> None:
        from ddrs.train.methods import build_method

        self._check_sigma()
        for name in ("epochs", "batch", "lr_step", "dd_samples", "dd_every"):
            integer(f"--{name.replace('_', '-')}", getattr(self, name))
        for name in ("lr", "momentum", "weight_decay", "dd_lr"):
            number(f"--{name.replace('_', '-')}", getattr(self, name), minimum=0)
        number("--lr-gamma", self.lr_gamma)
        for name in ("dd_iterations", "dd_start_epoch", "workers"):
            integer(f"--{name.replace('_', '-')}", getattr(self, name), minimum=0)
        optional_integer("--train-subset", self.train_subset)
        optional_integer("--eval-max", self.eval_max)
        build_method(self.method, **self.method_settings)  # checks the method's settings
        _ = self.image_options  # checks them

    def _check_sigma(self) -> None:
        number("--sigma", self.sigma, minimum=0)
        if self.norm == "l1" and (self.method != "gaussian" or self.data_dependent):
            raise InputError(
                "--norm l1 trains with uniform noise under --method gaussian, without "
                f"--data-dependent (got --method {self.method}"
                f"{' --data-dependent' if self.data_dependent else ''})"
            )
        if self.sigma == 0 and (self.method != "gaussian" or self.data_dependent):
            raise InputError(
                f"--sigma 0 trains on clean images, which only --method gaussian without "
                f"--data-dependent does (got --method {self.method}"
                f"{' --data-dependent' if self.data_dependent else ''}); give a noise level > 0"
            )

    @property
    def image_options(self):
        """How an image folder becomes inputs (ImageOptions)."""
        from ddrs.data import ImageOptions

        return ImageOptions(self.image_size, self.channels, self.normalize)


@dataclass(frozen=True, kw_only=True)
class RouterLabels:
    """`ddrs train-router`: the experts a router learns to choose among, and its images and
    labels (the router itself is a TrainConfig: --arch, --sigma (its sigma_r), --epochs...)."""

    expert: tuple[str, ...] | None = setting(
        None,
        "an expert, SOURCE:SIGMA or NAME=SOURCE:SIGMA (repeatable; the router's classes "
        "follow their order)",
        group="experts",
        repeatable=True,
    )
    experts: str | None = setting(
        None, "a file of experts, one per line: NAME SOURCE SIGMA", group="experts"
    )
    denoiser: str | None = setting(None, DENOISER_HELP)
    images: int | None = setting(
        None,
        "label this many of the training images no expert trained on, spread evenly "
        "(default: all of them)",
        type=int,
    )
    exclude: str | None = setting(
        None, "a TSV whose idx column lists training images to leave out (e.g. validation)"
    )
    label_samples: int = setting(64, "votes per expert and image for the labels")
    label_n: int = setting(DEFAULTS.n, "the N of the certification the labels score for")
    label_alpha: float = setting(
        DEFAULTS.alpha, "the alpha of the certification the labels score for"
    )

    temperature: float = setting(
        0.1, "soft targets: softmax of the experts' predicted radii / this (pixel units)"
    )
    uncertified_weight: float = setting(
        0.0,
        "weight of the images no expert certifies, kept with the nearest-to-right expert's "
        "label (0: left out)",
    )
    balance: bool = setting(
        True, "do not weigh images by 1 / their route's share", flag="--no-balance"
    )
    check_n: int = setting(
        1000, "after training, CERTIFY the router on its held-out images at this N (0: skip)"
    )

    def __post_init__(self) -> None:
        expert_specs(self.expert, self.experts)
        positive("--temperature", self.temperature)
        number("--uncertified-weight", self.uncertified_weight, minimum=0)
        integer("--check-n", self.check_n, minimum=0)
        optional_integer("--images", self.images)
        integer("--label-samples", self.label_samples)
        integer("--label-n", self.label_n)
        probability("--label-alpha", self.label_alpha)
        if self.exclude is not None and not Path(self.exclude).is_file():
            raise InputError(f"--exclude {self.exclude}: no such file")
