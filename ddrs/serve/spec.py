"""`ddrs serve`'s specification: the model, its inputs, the memory, the certification and the
server. (Importing it needs no FastAPI: the command line builds its options from it.)"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ddrs.core.cascade import check_p0
from ddrs.core.checks import integer, number, optional_integer, positive, probability
from ddrs.core.families import GAUSSIAN
from ddrs.core.lattice import check_sigma
from ddrs.core.route import ROUTE_RULES, check_route_rule
from ddrs.core.sigma import DEFAULT_SAMPLES
from ddrs.core.smooth import DEFAULTS
from ddrs.core.stats import check_radius_reach
from ddrs.errors import InputError
from ddrs.options import setting
from ddrs.runs.dataset import NoiseSettings
from ddrs.runs.sigma import SearchSettings
from ddrs.runs.source import Models

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
SERVICE_N = 10_000  # a query's N: an answer in about a second on a CPU, not in a minute


@dataclass(frozen=True, kw_only=True)
class ServeRun(NoiseSettings, SearchSettings, Models):
    """`ddrs serve`: the model, its inputs, the memory, the certification and the server."""

    dataset: str | None = setting(None, "gives the input shape, classes and image transform")
    data_root: str | None = setting(None, "dataset folder (imagefolder: to count its classes)")
    input_shape: tuple[int, int, int] | None = setting(
        None, "without --dataset: C,H,W of the inputs", type="shape"
    )
    num_classes: int | None = setting(None, "without --dataset: number of classes", type=int)
    memory: str | None = setting(
        None,
        "certification memory (created if new): an SQLite file, or a postgresql:// URL that "
        "several replicas share; needed by a sigma search or the selector over experts, not by "
        "a fixed --sigma, a --router or a --cascade (stateless: replicas share nothing)",
    )
    sigma: float | None = setting(
        None,
        "one model: one noise level for every query",
        group="sigma",
        type=float,
        group_required=False,
    )
    sigma0: float | None = setting(
        None,
        "one model, data-dependent: the search's centre",
        group="sigma",
        type=float,
        group_required=False,
    )
    route_rule: str = setting(
        ROUTE_RULES[0],
        "experts: radius, agree or agree:P (see `ddrs sigma --help`)",
    )
    router: str | None = setting(None, "experts: a router checkpoint (dual smoothing)")
    cascade: float | None = setting(
        None,
        "experts: the multi-scale cascade at threshold P0 (memory-free; `ddrs certify --help`)",
        type=float,
        metavar="P0",
    )
    radius: float | None = setting(
        None,
        "only answer whether each query is certified at this radius: a sequential test stops "
        "once decided (at most --n samples); the answer's radius is R or 0",
        type=float,
    )
    router_n: int | None = setting(None, "the router's samples (default: --n)", type=int)
    router_share: float = setting(0.5, "the share of --alpha spent on the router")
    n0: int = setting(DEFAULTS.n0, "selection samples")
    n: int = setting(SERVICE_N, "estimation samples per query")
    alpha: float = setting(DEFAULTS.alpha, "failure probability")
    amp: str | None = setting(
        None, "CUDA only: autocast the base classifiers", choices=["fp16", "bf16"]
    )
    compile: bool = setting(False, "torch.compile the models (10-40 s per shape at start)")
    batch: int | None = setting(
        None, "noisy samples per forward pass (default: automatic)", type=int
    )
    seed: int = setting(0, "seed of all Monte Carlo noise")
    device: str = setting("auto", "auto, cpu, cuda, cuda:1, ...")
    host: str = setting(
        "127.0.0.1",
        "address to listen on: 127.0.0.1 or ::1 (loopback, the default), or "
        "0.0.0.0 / :: (every interface: give --token-file)",
    )
    port: int = setting(8000, "port to listen on")
    token_file: str | None = setting(None, "require Authorization: Bearer <the file's token>")
    max_batch: int = setting(32, "queries answered in one engine call (1: off)")
    max_wait_ms: float = setting(
        0.0,
        "how long a query waits for others to share its engine call (0: none; queries "
        "that arrive while the engine is busy share the next call anyway)",
    )
    max_body_bytes: int = setting(8 << 20, "larger requests get 413")
    max_pixels: int = setting(
        4096 * 4096,
        "larger uploaded images get 413 (checked from the image's header, before decoding)",
    )
    allowed_host: tuple[str, ...] | None = setting(
        None,
        "a Host name the service answers to (repeatable; default: the --host address, "
        "localhost, 127.0.0.1 and ::1): other Host headers get 400, against DNS rebinding",
        repeatable=True,
    )
    metrics_public: bool = setting(False, "let /metrics be scraped without the token")
    header_timeout: float = setting(
        10.0, "seconds a client may take to send a request's headers (then 408, closed)"
    )
    body_timeout: float = setting(
        60.0, "seconds a client may take to send a request's body (then 408)"
    )
    drain_seconds: int = setting(60, "on SIGTERM, time given to queries in flight")
    log_level: str = setting(
        "warning",
        "log level of the server's lines (uvicorn's and the service's)",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
    )

    def __post_init__(self) -> None:
        Models.__post_init__(self)
        NoiseSettings.__post_init__(self)
        if self.has_experts:
            if self.sigma is not None or self.sigma0 is not None:
                raise InputError("experts answer at their own sigmas: no --sigma or --sigma0")
        else:
            if (self.sigma is None) == (self.sigma0 is None):
                raise InputError("give exactly one of --sigma (fixed) or --sigma0 (a search)")
            positive("--sigma" if self.sigma is not None else "--sigma0", self.noise_level)
            if self.family.discrete:
                check_sigma(self.noise_level)
            if self.router is not None:
                raise InputError("--router routes among experts: give --expert or --experts")
        if self.router is not None and not Path(self.router).is_file():
            raise InputError(f"--router {self.router}: no such file")
        if self.cascade is not None:
            check_p0(self.cascade)
            if self.family is not GAUSSIAN:
                raise InputError(
                    "--cascade certifies L2 radii with float Gaussian noise: it takes neither "
                    "--norm l1 nor --noise discrete"
                )
            if not self.has_experts or self.router is not None:
                raise InputError(
                    "--cascade runs among experts (--expert or --experts), without a --router"
                )
        if self.radius is not None:
            check_radius_reach(self.radius, self.sigma, self.n, self.alpha, self.family)
            if self.router is not None or self.cascade is not None:
                raise InputError("--radius certifies one model or experts, not a router or cascade")
        if self.memory is None and not self.stateless:
            raise InputError(
                "give --memory: a service whose sigma or expert depends on the input must "
                "remember its answers (or serve a fixed --sigma, a --router or a --cascade)"
            )
        check_route_rule(self.route_rule)
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
    def stateless(self) -> bool:
        """Certifiable without a memory: a fixed sigma, a router, or the cascade."""
        return self.sigma is not None or self.router is not None or self.cascade is not None

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
