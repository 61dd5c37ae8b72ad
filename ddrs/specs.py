"""Run specifications: one dataclass per kind of run, built once (from the command line or from
Python), checked once when built, and the one home of each setting's default and help text.

A run over a dataset (`CertifyRun`, `PredictRun`, `SigmaRun`) also says which inputs it covers
(`indices`) and produces its own resume settings (`settings`): the sidecar that stops a resumed
results file from mixing settings. So `ddrs.runs` called from a notebook validates and resumes
exactly as the command line does. `TrainConfig` specifies a training run, `ServeRun` the
service. The command line (cli.py) builds its options from these fields: flag names, defaults
and help all come from here.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from torch import nn

from ddrs.core.checks import integer, number, optional_integer, positive, probability
from ddrs.core.experts import Experts
from ddrs.core.sigma import (
    DEFAULT_CLAMP,
    DEFAULT_GRID,
    DEFAULT_SAMPLES,
    MIN_SIGMA,
    check_search_options,
)
from ddrs.errors import InputError, ResultsFileError
from ddrs.models.experts import expert_specs, load_experts
from ddrs.results import file_digest, read_sigmas


def setting(default: Any = None, help: str = "", **cli: Any) -> Any:
    """A spec field with its default and help; `cli` tells the command line more (flags,
    aliases, type, choices, required, metavar; flag: the option's name when not --FIELD-NAME;
    group: a required choice of one field among several; section: a heading in --help)."""
    if "factory" in cli:
        return field(default_factory=cli.pop("factory"), metadata={"help": help, **cli})
    return field(default=default, metadata={"help": help, **cli})


def default_of(spec: type, name: str) -> Any:
    """A spec field's default, for a library signature that restates it."""
    for f in fields(spec):
        if f.name == name:
            return f.default if f.default is not MISSING else f.default_factory()
    raise KeyError(name)


def from_namespace(spec: type, values: Any, **overrides: Any):
    """Build `spec` from an object holding its fields as attributes (argparse's Namespace)."""
    given = {f.name: getattr(values, f.name) for f in fields(spec) if hasattr(values, f.name)}
    return spec(**{**given, **overrides})


def _floats(text: str) -> tuple[float, float]:
    """'LOW,HIGH' -> (low, high), for the command line."""
    import argparse

    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected two numbers LOW,HIGH (e.g. 0.5,2), got {text!r}"
        ) from None
    return low, high


def _image_size(text: str) -> tuple[int, int]:
    import argparse

    from ddrs.data import parse_image_size
    from ddrs.errors import DatasetError

    try:
        return parse_image_size(text)
    except DatasetError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _normalize(text: str):
    import argparse

    from ddrs.data import parse_normalize
    from ddrs.errors import DatasetError

    try:
        return parse_normalize(text)
    except DatasetError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _shape(text: str) -> tuple[int, int, int]:
    import argparse

    try:
        channels, height, width = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W (e.g. 3,32,32), got {text!r}") from None
    return channels, height, width


DATASETS_HELP = "digits, mnist, cifar10, imagenet, imagefolder (your images), npz (arrays)"
IMAGE_SIZE_HELP = ("imagefolder: H[,W] of the inputs (default: the images' own size when they "
                   "all share it; a checkpoint's recorded size)")
CHANNELS_HELP = "imagefolder: 1 (grey) or 3 (default: 1 when every image is grey)"
DD_SECTION = "data-dependent sigma (Alfarra et al. 2022)"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


# -- where the model and the inputs come from -----------------------------------------------------
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
        None, "an expert, SOURCE:SIGMA or NAME=SOURCE:SIGMA (SOURCE a checkpoint or "
        "package.module:factory; repeatable): inputs are routed among the experts",
        group="model", repeatable=True,
    )  # fmt: skip
    experts: str | None = setting(
        None, "a file of experts, one per line: NAME SOURCE SIGMA", group="model"
    )

    def __post_init__(self) -> None:
        given = [self.checkpoint, self.model, self.expert or self.experts]
        if sum(g is not None for g in given) != 1:
            raise InputError("give exactly one of --checkpoint, --model, or experts")
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


@dataclass(frozen=True, kw_only=True)
class ModelSource(Models):
    """The model (a checkpoint, your own, or experts) and the dataset split it is run on."""

    dataset: str | None = setting(None, DATASETS_HELP, required=True)
    data_root: str | None = setting(None, "dataset folder, or the .npz file (default: "
                                    "$DDRS_DATA_ROOT)")  # fmt: skip
    split: str = setting("test", "dataset split", choices=["train", "test"])
    device: str = setting("auto", "auto, cpu, cuda, cuda:1, ...")
    image_size: tuple[int, int] | None = setting(None, IMAGE_SIZE_HELP, type=_image_size)
    channels: int | None = setting(None, CHANNELS_HELP, type=int)

    def __post_init__(self) -> None:
        from ddrs.data import ImageOptions

        super().__post_init__()
        ImageOptions(self.image_size, self.channels)  # checks them

    def load(self) -> tuple[nn.Module | Experts, Any]:
        """(model in eval mode on its device, or the experts; the dataset split): every model
        checked against the dataset's inputs."""
        from ddrs.data import get_dataset
        from ddrs.launch import device_for
        from ddrs.models import load_model

        if self.dataset is None:
            raise InputError("give --dataset")
        options = self.image_options()
        dataset = get_dataset(self.dataset, self.split, self.data_root, augment=False,
                              options=options if self.dataset == "imagefolder" else None)
        info = dataset.info
        inputs = {"num_classes": info.num_classes, "input_shape": info.input_shape,
                  "inputs_name": self.dataset, "device": device_for(self.device)}  # fmt: skip
        if self.checkpoint is None and self.model is None:
            return load_experts(expert_specs(self.expert, self.experts), **inputs), dataset
        return load_model(checkpoint=self.checkpoint, model=self.model, **inputs), dataset

    def image_options(self):
        """How the images become inputs: the flags, else what the checkpoint (or the first
        expert's) records."""
        from ddrs.data import ImageOptions

        return ImageOptions(*recorded_image_options(self.first_source, self.image_size,
                                                    self.channels))


def recorded_image_options(source: str | None, image_size, channels) -> tuple:
    """(image_size, channels): the given ones, else those a checkpoint at `source` records."""
    if (image_size is None or channels is None) and source and Path(source).is_file():
        from ddrs.data import ImageOptions
        from ddrs.models import recorded_meta

        recorded = ImageOptions.from_meta(recorded_meta(source).get("data_options"))
        image_size = image_size or recorded.image_size
        channels = channels or recorded.channels
    return image_size, channels


# -- runs over a dataset --------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class DatasetRun:
    """What every run over a dataset shares: its results file and the inputs it covers
    (Cohen et al.'s --skip / --max: every skip-th index below max)."""

    out: str = setting(None, "results TSV (resumed if it exists)", required=True)
    skip: int = setting(1, "use every SKIP-th input (Cohen's --skip)")
    max: int | None = setting(
        None, "stop before this dataset index (default: all; --max-index under torchrun)",
        aliases=("--max-index",), type=int,
    )  # fmt: skip
    batch: int | None = setting(
        None, "noisy samples per forward pass (default: automatic)", type=int
    )
    seed: int = setting(0, "seed of all Monte Carlo noise")
    progress: bool = setting(True, "hide progress bars", flag="--no-progress")

    def __post_init__(self) -> None:
        if not self.out:
            raise InputError("give --out, the results file")
        integer("--skip", self.skip)
        optional_integer("--batch", self.batch)
        integer("--seed", self.seed, minimum=0)
        if self.max is not None:
            integer("--max", self.max, minimum=-1)  # -1: all (Cohen et al.'s scripts)

    def indices(self, length: int) -> list[int]:
        """The dataset indices this run covers."""
        stop = length if self.max is None or self.max < 0 else min(self.max, length)
        return list(range(0, stop, self.skip))

    def base_settings(self, command: str, model: nn.Module | Experts, dataset) -> dict:
        from ddrs.models import memory_fingerprint, model_fingerprint

        if isinstance(model, Experts):
            shape = dataset.info.input_shape
            identity = {"model": memory_fingerprint(model, dataset.info.name, shape)[:16],
                        "experts": model.describe()}  # fmt: skip
        else:
            identity = {"model": model_fingerprint(model)[:16]}
        from ddrs.data import radius_units

        return {
            "command": command,
            **identity,
            "radius_units": radius_units(dataset.info.input_shape),
            "dataset": dataset.info.name,
            "split": dataset.split,
            "seed": self.seed,
            "skip": self.skip,  # --max may grow on resume: the rows stay a prefix
        }


@dataclass(frozen=True, kw_only=True)
class SmoothingRun(DatasetRun):
    """CERTIFY or PREDICT over a dataset: one sigma, or a sigma per input from a file."""

    sigma: float | None = setting(
        None, "one noise level for all inputs (pixel units)", group="sigma source", type=float
    )
    sigmas: str | None = setting(
        None, "TSV with idx and sigma columns (from `ddrs sigma`)", group="sigma source"
    )
    n: int = setting(100_000, "estimation samples (--num-samples under torchrun)",
                     aliases=("--num-samples",))  # fmt: skip
    alpha: float = setting(0.001, "failure probability")
    amp: str | None = setting(
        None, "CUDA only: autocast the base classifier (changes its arithmetic, not the "
        "soundness of the statistics)", choices=["fp16", "bf16"],
    )  # fmt: skip
    compile: bool = setting(
        False, "torch.compile the model (pays off for long runs; 10-40 s per shape)"
    )

    def sigma_sources(self) -> list:
        return [self.sigma, self.sigmas]

    def __post_init__(self) -> None:
        super().__post_init__()
        if sum(source is not None for source in self.sigma_sources()) != 1:
            raise InputError(
                "give exactly one of a fixed --sigma or a per-input --sigmas file"
                + (" or a --router" if len(self.sigma_sources()) > 2 else "")
            )
        if self.sigma is not None:
            positive("--sigma", self.sigma)
        if self.sigmas is not None and not Path(self.sigmas).is_file():
            raise InputError(
                f"--sigmas {self.sigmas}: no such file; write it first with `ddrs sigma ... "
                f"--out {self.sigmas}`"
            )
        integer("--n", self.n)
        probability("--alpha", self.alpha)

    def sigma_by_index(self, indices: list[int]) -> dict[int, float] | None:
        """Each covered input's sigma; a sigmas file must hold every one of them. None when
        a router chooses them."""
        if self.sigmas is None:
            return None if self.sigma is None else dict.fromkeys(indices, float(self.sigma))
        sigmas = read_sigmas(self.sigmas)
        missing = [i for i in indices if i not in sigmas]
        if missing:
            raise ResultsFileError(
                f"the sigmas file has no row for dataset index {missing[0]} ({len(missing)} of "
                f"the {len(indices)} selected inputs missing); run `ddrs sigma` with the same "
                "--skip/--max"
            )
        return {i: sigmas[i] for i in indices}

    def smoothing_settings(self, command: str, model: nn.Module | Experts, dataset) -> dict:
        source = {"sigma": self.sigma}
        if self.sigmas is not None:
            source = {"sigmas": str(self.sigmas), "sigmas_sha256": file_digest(self.sigmas)}
        return {
            **self.base_settings(command, model, dataset), **source, "n": self.n,
            "alpha": self.alpha, "amp": self.amp, "compile": self.compile,
        }  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class CertifyRun(SmoothingRun):
    """CERTIFY every covered input; optionally through a memory, with a counts file, with
    input-specific sample sizes."""

    n0: int = setting(100, "selection samples")
    memory: str | None = setting(
        None, "certification memory (an SQLite file, or a postgresql:// URL): resolve answers "
        "online in index order",
    )  # fmt: skip
    counts: str | None = setting(
        None, "also write each input's vote counts here (selected class, its count, top two "
        "counts, N, N0, sigma, seed), for `ddrs recertify` at another alpha",
    )  # fmt: skip
    pilot: int = setting(
        0, "input-specific N: a pilot of this many samples picks each input's N (at most --n) "
        "within --radius-tolerance of the radius predicted at --n; 0: off",
    )  # fmt: skip
    radius_tolerance: float = setting(
        0.01, "with --pilot: the predicted radius an input may lose to a smaller N"
    )
    router: str | None = setting(
        None, "dual smoothing: a router checkpoint (`ddrs train-router`) that certifies each "
        "input's route to one of the experts; the answer holds on the smaller of its ball and "
        "the expert's", group="sigma source",
    )  # fmt: skip
    router_n: int | None = setting(
        None, "the router's CERTIFY samples (default: --n)", type=int
    )
    router_share: float = setting(
        0.5, "the share of --alpha spent on the router's certificate (the expert gets the rest)"
    )

    def sigma_sources(self) -> list:
        return [self.sigma, self.sigmas, self.router]

    def __post_init__(self) -> None:
        super().__post_init__()
        integer("--n0", self.n0)
        integer("--pilot", self.pilot, minimum=0)
        number("--radius-tolerance", self.radius_tolerance, minimum=0)
        optional_integer("--router-n", self.router_n)
        probability("--router-share", self.router_share)
        if self.router is not None:
            if not Path(self.router).is_file():
                raise InputError(f"--router {self.router}: no such file; train one with "
                                 "`ddrs train-router`")  # fmt: skip
            if self.pilot or self.counts:
                raise InputError("--router certifies with fixed N; it takes neither --pilot "
                                 "nor --counts")  # fmt: skip

    def settings(self, model: nn.Module | Experts, dataset) -> dict:
        from ddrs.memory.store import shown_location

        memory = None if self.memory is None else shown_location(self.memory)  # no password
        settings = {**self.smoothing_settings("certify", model, dataset), "n0": self.n0,
                    "memory": memory}  # fmt: skip
        if self.pilot:
            settings.update(pilot=self.pilot, radius_tolerance=self.radius_tolerance)
        if self.router:
            settings.update(router=str(self.router), router_sha256=file_digest(self.router),
                            router_n=self.router_n or self.n, router_share=self.router_share)
        return settings


@dataclass(frozen=True, kw_only=True)
class PredictRun(SmoothingRun):
    """PREDICT every covered input."""

    n: int = setting(100_000, "noise samples per input (--num-samples under torchrun)",
                     aliases=("--num-samples",))  # fmt: skip
    alpha: float = setting(
        0.001, "bound on the probability of returning a wrong class (else abstain)"
    )

    def settings(self, model: nn.Module, dataset) -> dict:
        return self.smoothing_settings("predict", model, dataset)


# -- the sigma search -------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class SearchSettings:
    """The data-dependent sigma search's flags (`ddrs sigma`, `ddrs serve`)."""

    search: str = setting(
        "certified", "certified: by the predicted certified radius (default); ascent: the "
        "paper's gradient ascent; grid: forward-only, by the paper's surrogate",
        choices=["certified", "ascent", "grid"],
    )  # fmt: skip
    samples: int | None = setting(
        None, "noise samples: per candidate (default: certified 64, grid 8) or per ascent "
        "step (1)", type=int,
    )  # fmt: skip
    grid: int | None = setting(
        None, "number of candidates (default: certified 9, grid 12)", type=int
    )
    spread: tuple[float, float] = setting(
        (0.5, 2.0), "low,high factors of sigma0 spanned by the candidates", type=_floats
    )
    iterations: int = setting(100, "ascent: steps K (authors: 100)")
    lr: float = setting(1e-4, "ascent: step size (authors: 1e-4)")
    clamp: tuple[float, float] = setting(
        DEFAULT_CLAMP, "ascent, grid: low,high clamp of pA, pB", type=_floats
    )
    min_sigma: float | None = setting(
        None, "lower bound on sigma (default: 1e-3); certified: with --max-sigma, the "
        "candidates span this absolute range instead of sigma0 * spread", type=float,
    )  # fmt: skip
    max_sigma: float | None = setting(
        None, "upper bound on sigma (default: none); certified: with --min-sigma, the top of "
        "the candidates' absolute range", type=float,
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.search == "certified" and (self.min_sigma is None) != (self.max_sigma is None):
            raise InputError(
                "--search certified takes both --min-sigma and --max-sigma (an absolute "
                "candidate range) or neither (candidates sigma0 * --spread)"
            )
        check_search_options(self.search, self.search_options(100_000, 0.001))

    def search_options(self, n: int, alpha: float) -> dict:
        """The keyword arguments of the chosen search (sigma.SEARCHES); `n`, `alpha`: those
        of the certification that follows (what the certified search scores at)."""
        if self.search not in DEFAULT_SAMPLES:
            check_search_options(self.search, {})  # raises: unknown search
        samples = DEFAULT_SAMPLES[self.search] if self.samples is None else self.samples
        grid = DEFAULT_GRID.get(self.search) if self.grid is None else self.grid
        options: dict = {"samples": samples}
        if self.search == "certified":
            options.update(grid=grid, n=n, alpha=alpha)
            if self.min_sigma is not None:
                options["sigma_range"] = (self.min_sigma, self.max_sigma)
            else:
                options["spread"] = tuple(self.spread)
            return options
        options.update(
            clamp=tuple(self.clamp),
            min_sigma=MIN_SIGMA if self.min_sigma is None else self.min_sigma,
            max_sigma=self.max_sigma,
        )
        if self.search == "ascent":
            options.update(iterations=self.iterations, lr=self.lr)
        else:
            options.update(grid=grid, spread=tuple(self.spread))
        return options


@dataclass(frozen=True, kw_only=True)
class SigmaRun(SearchSettings, DatasetRun):
    """Choose a sigma for every covered input."""

    out: str = setting(
        None, "TSV of idx and sigma (one model: radius_before / radius_after, the search's "
        "score at sigma0 and at the chosen sigma; experts: expert and score)", required=True,
    )  # fmt: skip
    sigma0: float | None = setting(
        None, "centre of the candidates / ascent start (one model; experts have their own)",
        type=float,
    )  # fmt: skip
    route_rule: str = setting(
        "radius", "experts: radius (the largest predicted radius wins) or agree (only an "
        "expert whose top class is the smallest sigma's may win)", choices=["radius", "agree"],
    )  # fmt: skip
    n: int = setting(100_000, "certified: the N of the certification that follows "
                     "(--num-samples under torchrun)", aliases=("--num-samples",))  # fmt: skip
    alpha: float = setting(0.001, "certified: the alpha of the certification that follows")

    def __post_init__(self) -> None:
        DatasetRun.__post_init__(self)
        if self.sigma0 is not None:
            positive("--sigma0", self.sigma0)
        if self.route_rule not in ("radius", "agree"):
            raise InputError(f"--route-rule must be radius or agree, got {self.route_rule!r}")
        integer("--n", self.n)
        probability("--alpha", self.alpha)
        SearchSettings.__post_init__(self)

    @property
    def options(self) -> dict:
        return self.search_options(self.n, self.alpha)

    def settings(self, model: nn.Module | Experts, dataset) -> dict:
        if isinstance(model, Experts):
            return {**self.base_settings("sigma", model, dataset), "route_rule": self.route_rule,
                    "samples": self.options["samples"], "n": self.n, "alpha": self.alpha}
        return {**self.base_settings("sigma", model, dataset), "sigma0": self.sigma0,
                "search": self.search, **self.options}  # fmt: skip


# -- training ---------------------------------------------------------------------------------
@dataclass(kw_only=True)
class TrainConfig:
    """Everything a training run depends on; recorded in each checkpoint.

    Optimiser defaults are Cohen et al.'s CIFAR-10 settings: SGD lr 0.1, momentum 0.9,
    weight decay 1e-4, lr x0.1 every 30 epochs, batch 256.
    """

    dataset: str = setting(None, DATASETS_HELP, required=True)
    arch: str = setting(
        None, "cnn, cnn_small, cifar_resnet20, cifar_resnet110, cifar_resnet18, resnet50",
        required=True,
    )  # fmt: skip
    out: str = setting(None, "run folder: last.pt, best.pt, log.csv", required=True)
    method: str = setting("gaussian", "gaussian, smoothadv, macer, consistency")
    method_settings: dict = setting(
        help="a method hyper-parameter, e.g. --setting eps=0.5 (repeatable; see "
        "docs/METHODS.md)", factory=dict, flag="--setting", metavar="KEY=VALUE",
    )  # fmt: skip
    sigma: float = setting(0.25, "training noise level (pixel units)", required=True)
    epochs: int = setting(90, "training epochs")
    batch: int = setting(256, "training batch size")
    lr: float = setting(0.1, "SGD learning rate")
    momentum: float = setting(0.9, "SGD momentum")
    weight_decay: float = setting(1e-4, "SGD weight decay")
    lr_step: int = setting(30, "multiply lr by --lr-gamma every this many epochs")
    lr_gamma: float = setting(0.1, "lr factor every --lr-step")
    seed: int = setting(0, "seed of initialisation, order, noise")
    data_root: str | None = setting(None, "dataset folder, or the .npz file (default: "
                                    "$DDRS_DATA_ROOT)")  # fmt: skip
    image_size: tuple[int, int] | None = setting(None, IMAGE_SIZE_HELP, type=_image_size)
    channels: int | None = setting(None, CHANNELS_HELP, type=int)
    normalize: str | tuple | None = setting(
        None, "imagefolder: the model's normalisation: imagenet, none, auto (the training "
        "split's per-channel mean and std) or MEAN,STD (default: 0.5,0.5)", type=_normalize,
    )  # fmt: skip
    train_subset: int | None = setting(
        None, "train on a fixed random subset of this size", type=int
    )
    eval_max: int | None = setting(2000, "test inputs for per-epoch accuracy", type=int)
    device: str = setting("auto", "auto, cpu, cuda, cuda:1, ...")
    workers: int = setting(0, "data loader worker processes")
    data_dependent: bool = setting(
        False, "per-sample sigma, warm-started", section=DD_SECTION
    )
    dd_iterations: int = setting(
        10, "ascent steps per batch (authors: 10 CIFAR, 1 ImageNet)", section=DD_SECTION
    )
    dd_lr: float = setting(
        1e-4, "ascent step (authors: 1e-4 over 440 epochs; short runs: see docs/METHODS.md)",
        section=DD_SECTION,
    )  # fmt: skip
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

        positive("--sigma", self.sigma)
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
        None, "an expert, SOURCE:SIGMA or NAME=SOURCE:SIGMA (repeatable; the router's classes "
        "follow their order)", group="experts", repeatable=True,
    )  # fmt: skip
    experts: str | None = setting(
        None, "a file of experts, one per line: NAME SOURCE SIGMA", group="experts"
    )
    images: int | None = setting(
        None, "label this many of the training images no expert trained on, spread evenly "
        "(default: all of them)", type=int,
    )  # fmt: skip
    exclude: str | None = setting(
        None, "a TSV whose idx column lists training images to leave out (e.g. validation)"
    )
    label_samples: int = setting(64, "votes per expert and image for the labels")
    label_n: int = setting(100_000, "the N of the certification the labels score for")
    label_alpha: float = setting(0.001, "the alpha of the certification the labels score for")

    def __post_init__(self) -> None:
        expert_specs(self.expert, self.experts)
        optional_integer("--images", self.images)
        integer("--label-samples", self.label_samples)
        integer("--label-n", self.label_n)
        probability("--label-alpha", self.label_alpha)
        if self.exclude is not None and not Path(self.exclude).is_file():
            raise InputError(f"--exclude {self.exclude}: no such file")


# -- the service ------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ServeRun(SearchSettings, Models):
    """`ddrs serve`: the model, its inputs, the memory, the certification and the server."""

    dataset: str | None = setting(None, "gives the input shape, classes and image transform")
    data_root: str | None = setting(None, "dataset folder (imagefolder: to count its classes)")
    input_shape: tuple[int, int, int] | None = setting(
        None, "without --dataset: C,H,W of the inputs", type=_shape
    )
    num_classes: int | None = setting(None, "without --dataset: number of classes", type=int)
    memory: str = setting(None, "certification memory (created if new): an SQLite file, or a "
                          "postgresql:// URL that several replicas share", required=True)
    sigma: float | None = setting(
        None, "one model: one noise level for every query", group="sigma", type=float,
        group_required=False,
    )  # fmt: skip
    sigma0: float | None = setting(
        None, "one model, data-dependent: the search's centre", group="sigma", type=float,
        group_required=False,
    )  # fmt: skip
    route_rule: str = setting(
        "radius", "experts: radius or agree (see `ddrs sigma --help`)",
        choices=["radius", "agree"],
    )  # fmt: skip
    router: str | None = setting(None, "experts: a router checkpoint (dual smoothing)")
    router_n: int | None = setting(None, "the router's samples (default: --n)", type=int)
    router_share: float = setting(0.5, "the share of --alpha spent on the router")
    n0: int = setting(100, "selection samples")
    n: int = setting(10_000, "estimation samples per query")
    alpha: float = setting(0.001, "failure probability")
    batch: int | None = setting(
        None, "noisy samples per forward pass (default: automatic)", type=int
    )
    seed: int = setting(0, "seed of all Monte Carlo noise")
    device: str = setting("auto", "auto, cpu, cuda, cuda:1, ...")
    host: str = setting(
        "127.0.0.1", "address to listen on: 127.0.0.1 or ::1 (loopback, the default), or "
        "0.0.0.0 / :: (every interface: give --token-file)",
    )  # fmt: skip
    port: int = setting(8000, "port to listen on")
    token_file: str | None = setting(None, "require Authorization: Bearer <the file's token>")
    max_batch: int = setting(32, "queries answered in one engine call (1: off)")
    max_wait_ms: float = setting(
        0.0, "how long a query waits for others to share its engine call (0: none; queries "
        "that arrive while the engine is busy share the next call anyway)",
    )  # fmt: skip
    max_body_bytes: int = setting(8 << 20, "larger requests get 413")
    max_pixels: int = setting(4096 * 4096, "larger uploaded images get 413 (checked from the "
                              "image's header, before decoding)")  # fmt: skip
    allowed_host: tuple[str, ...] | None = setting(
        None, "a Host name the service answers to (repeatable; default: the --host address, "
        "localhost, 127.0.0.1 and ::1): other Host headers get 400, against DNS rebinding",
        repeatable=True,
    )  # fmt: skip
    metrics_public: bool = setting(False, "let /metrics be scraped without the token")
    header_timeout: float = setting(
        10.0, "seconds a client may take to send a request's headers (then 408, closed)"
    )
    body_timeout: float = setting(
        60.0, "seconds a client may take to send a request's body (then 408)"
    )
    drain_seconds: int = setting(60, "on SIGTERM, time given to queries in flight")
    log_level: str = setting(
        "warning", "log level of the server's lines (uvicorn's and the service's)",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
    )  # fmt: skip

    def __post_init__(self) -> None:
        Models.__post_init__(self)
        if self.has_experts:
            if self.sigma is not None or self.sigma0 is not None:
                raise InputError("experts answer at their own sigmas: no --sigma or --sigma0")
        else:
            if (self.sigma is None) == (self.sigma0 is None):
                raise InputError("give exactly one of --sigma (fixed) or --sigma0 (a search)")
            positive("--sigma" if self.sigma is not None else "--sigma0", self.noise_level)
            if self.router is not None:
                raise InputError("--router routes among experts: give --expert or --experts")
        if self.router is not None and not Path(self.router).is_file():
            raise InputError(f"--router {self.router}: no such file")
        optional_integer("--router-n", self.router_n)
        probability("--router-share", self.router_share)
        if self.dataset is None and not (self.input_shape and self.num_classes):
            raise InputError("give --dataset, or --input-shape C,H,W and --num-classes K")
        integer("--n0", self.n0)
        integer("--n", self.n)
        probability("--alpha", self.alpha)
        optional_integer("--batch", self.batch)
        integer("--max-batch", self.max_batch)
        number("--max-wait-ms", self.max_wait_ms, minimum=0)
        integer("--max-body-bytes", self.max_body_bytes)
        integer("--max-pixels", self.max_pixels)
        integer("--drain-seconds", self.drain_seconds, minimum=0)
        positive("--header-timeout", self.header_timeout)
        positive("--body-timeout", self.body_timeout)
        if self.selector is not None:
            SearchSettings.__post_init__(self)

    @property
    def noise_level(self) -> float | None:
        """sigma (fixed) or sigma0 (the search's centre); None for experts."""
        return self.sigma if self.sigma is not None else self.sigma0

    @property
    def selector(self) -> str | None:
        """The sigma search queries go through (None: the fixed sigma, or experts)."""
        return None if self.sigma is not None or self.has_experts else self.search

    @property
    def options(self) -> dict:
        """The search's options, less n and alpha (the classifier scores at its own)."""
        if self.has_experts:  # the certified selector over experts: its votes per expert
            return {"samples": self.samples or DEFAULT_SAMPLES["certified"]}
        if self.selector is None:
            return {}
        found = self.search_options(self.n, self.alpha)
        return {k: v for k, v in found.items() if k not in ("n", "alpha")}

    @property
    def max_wait(self) -> float:
        return self.max_wait_ms / 1000

    @property
    def allowed_hosts(self) -> list[str]:
        """The Host names answered: --allowed-host, or the bound address and loopback."""
        return list(self.allowed_host or (self.host, *LOOPBACK_NAMES))
