"""What every run over a dataset shares: its results file, the inputs it covers, its identity
in the resume settings; and, for CERTIFY and PREDICT, where each input's sigma comes from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ddrs.core.cascade import check_p0
from ddrs.core.checks import integer, optional_integer, positive, probability
from ddrs.core.experts import Experts, as_experts
from ddrs.core.families import GAUSSIAN, NOISES, NORMS, Family, noise_family
from ddrs.core.lattice import check_sigma, lattice_levels
from ddrs.core.smooth import DEFAULTS
from ddrs.data import radius_units
from ddrs.errors import InputError, ResultsFileError
from ddrs.models import Denoised, memory_fingerprint, model_fingerprint
from ddrs.models.engines import base_of, engine_of
from ddrs.options import setting
from ddrs.results import (
    CASCADE_COLUMNS,
    EXPERT_COLUMNS,
    NORM_COLUMN,
    ROUTER_COLUMNS,
    ResultsWriter,
    file_digest,
    read_routes,
    read_settings,
    read_sigmas,
)

NORM_HELP = (
    "the norm of the certified radius: l2 (Gaussian noise, sigma) or l1 (uniform noise of "
    "half-width lambda, given where sigma is asked for; docs/METHODS.md)"
)
NOISE_HELP = (
    "float: noise in floating point (the field's practice); discrete: the Gaussian rounded "
    "to the 1/255 lattice, sampled exactly, sound in floating point (8-bit images only)"
)


@dataclass(frozen=True, kw_only=True)
class NoiseSettings:
    """The noise family's flags (core/families.py): --norm and --noise."""

    norm: str = setting("l2", NORM_HELP, choices=list(NORMS))
    noise: str = setting("float", NOISE_HELP, choices=list(NOISES))

    def __post_init__(self) -> None:
        noise_family(self.norm, self.noise)  # bad combinations, in one line

    @property
    def family(self) -> Family:
        return noise_family(self.norm, self.noise)

    def noise_settings(self) -> dict:
        """What the results' settings record of the noise (compared on resume)."""
        return {"norm": self.norm, "noise": self.noise}


@dataclass(frozen=True, kw_only=True)
class DatasetRun:
    """What every run over a dataset shares: its results file and the inputs it covers
    (Cohen et al.'s --skip / --max: every skip-th index below max)."""

    out: str = setting(None, "results TSV (resumed if it exists)", required=True)
    skip: int = setting(1, "use every SKIP-th input (Cohen's --skip)")
    max: int | None = setting(
        None,
        "stop before this dataset index (default: all; --max-index under torchrun)",
        aliases=("--max-index",),
        type=int,
    )
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

    def base_settings(self, command: str, experts: Experts | nn.Module, dataset) -> dict:
        experts = as_experts(experts)
        if experts.is_model:
            identity = {"model": model_fingerprint(experts[0].model)[:16]}
        else:
            shape = dataset.info.input_shape
            identity = {
                "model": memory_fingerprint(experts, dataset.info.name, shape)[:16],
                "experts": experts.describe(),
            }
        models = [base_of(e.model) for e in experts]
        denoisers = sorted({m.source for m in models if isinstance(m, Denoised)})
        if denoisers:  # which denoiser, for a reader (the fingerprint already tells them apart)
            identity["denoiser"] = denoisers[0] if len(denoisers) == 1 else denoisers
        engine, precision = engine_of(experts[0].model)
        norm = getattr(self, "norm", "l2")
        return {
            "command": command,
            **identity,
            "engine": engine,
            "precision": precision,
            "radius_units": radius_units(dataset.info.input_shape, norm),
            "dataset": dataset.info.name,
            "split": dataset.split,
            "seed": self.seed,
            "skip": self.skip,  # --max may grow on resume: the rows stay a prefix
        }


@dataclass(frozen=True, kw_only=True)
class SmoothingRun(NoiseSettings, DatasetRun):
    """CERTIFY or PREDICT over a dataset: one sigma, or a sigma per input from a file."""

    sigma: float | None = setting(
        None, "one noise level for all inputs (pixel units)", group="sigma source", type=float
    )
    sigmas: str | None = setting(
        None, "TSV with idx and sigma columns (from `ddrs sigma`)", group="sigma source"
    )
    n: int = setting(
        DEFAULTS.n, "estimation samples (--num-samples under torchrun)", aliases=("--num-samples",)
    )
    alpha: float = setting(DEFAULTS.alpha, "failure probability")
    amp: str | None = setting(
        None,
        "CUDA only: autocast the base classifier (changes its arithmetic, not the "
        "soundness of the statistics)",
        choices=["fp16", "bf16"],
    )
    compile: bool = setting(
        False, "torch.compile the model (pays off for long runs; 10-40 s per shape)"
    )
    cascade: float | None = setting(
        None,
        "experts, memory-free: the multi-scale cascade at threshold P0 in [0.5, 1): from the "
        "largest sigma down, the first expert whose smoothed class probability exceeds P0 "
        "answers (docs/METHODS.md)",
        group="sigma source",
        type=float,
        metavar="P0",
    )

    def sigma_sources(self) -> list:
        return [self.sigma, self.sigmas, self.cascade]

    def __post_init__(self) -> None:
        DatasetRun.__post_init__(self)
        NoiseSettings.__post_init__(self)
        if sum(source is not None for source in self.sigma_sources()) != 1:
            raise InputError(
                "give exactly one of a fixed --sigma or a per-input --sigmas file"
                + (" or a --router" if len(self.sigma_sources()) > 2 else "")
            )
        if self.sigma is not None:
            positive("--sigma", self.sigma)
        if self.cascade is not None:
            check_p0(self.cascade)
            if self.family is not GAUSSIAN:
                raise InputError(
                    "--cascade certifies L2 radii with float Gaussian noise: it takes neither "
                    "--norm l1 nor --noise discrete"
                )
        if self.sigma is not None and self.family.discrete:
            check_sigma(self.sigma)
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

    def routes(self, experts: Experts, indices: list[int]) -> dict[int, tuple[int, float]] | None:
        """Each covered input's (expert, sigma): expert 0 at the run's sigmas for one model;
        for experts, the routes file's; None when a router chooses at certification time."""
        experts = as_experts(experts)
        if experts.is_model:
            for option in ("router", "cascade"):
                if getattr(self, option, None) is not None:
                    raise InputError(
                        f"--{option} routes among experts: give them with --expert or --experts"
                    )
            return {i: (0, s) for i, s in self.sigma_by_index(indices).items()}
        if self.sigma is not None:
            raise InputError(
                "experts certify at their own sigmas: give --sigmas from `ddrs "
                "sigma --expert ...` (or a --router), not --sigma"
            )
        if self.sigmas is None:
            return None
        routes = read_routes(self.sigmas)
        self.sigma_by_index(indices)  # every input has a row
        return {i: (experts.index(routes[i][0]), routes[i][1]) for i in indices}

    def check(self, experts: Experts, dataset, settings: dict | None = None):
        """What the run checks before it writes anything (and before a sharded run starts its
        workers); returns each covered input's (expert, sigma) (`routes`)."""
        check_resumable(self, experts, dataset, settings)
        chosen_for = read_settings(self.sigmas).get("norm", "l2") if self.sigmas else self.norm
        if chosen_for != self.norm:
            raise InputError(
                f"--sigmas {self.sigmas} was chosen for --norm {chosen_for}: certify with "
                f"--norm {chosen_for}, or choose them with `ddrs sigma --norm {self.norm}`"
            )
        indices = self.indices(len(dataset))
        if self.family.discrete and indices:  # the dataset's kind of values, before any file
            lattice_levels(dataset[indices[0]][0])
        return self.routes(experts, indices)

    def extra_columns(self, experts: Experts) -> tuple[str, ...]:
        """What experts add to a results file: which one answered (and the router's radius);
        an L1 run's rows say their norm (L2 rows keep Cohen et al.'s columns)."""
        norm = (NORM_COLUMN,) if self.norm != "l2" else ()
        if as_experts(experts).is_model:
            return norm
        if self.cascade is not None:
            return CASCADE_COLUMNS + norm
        return (ROUTER_COLUMNS if getattr(self, "router", None) else EXPERT_COLUMNS) + norm

    def smoothing_settings(self, command: str, experts: Experts, dataset) -> dict:
        source = {"sigma": self.sigma}
        if self.cascade is not None:
            source = {"cascade": self.cascade}
        if self.sigmas is not None:
            source = {"sigmas": str(self.sigmas), "sigmas_sha256": file_digest(self.sigmas)}
        return {
            **self.base_settings(command, experts, dataset),
            **source,
            "n": self.n,
            "alpha": self.alpha,
            "amp": self.amp,
            "compile": self.compile,
            **self.noise_settings(),
        }


def check_resumable(run, experts: Experts, dataset, settings: dict | None = None) -> None:
    """A results file to resume must have been written with these settings and columns."""
    if Path(run.out).is_file() and Path(run.out).stat().st_size > 0:
        settings = settings or run.settings(experts, dataset)
        ResultsWriter.check_settings(Path(run.out), run.columns(experts), settings)
