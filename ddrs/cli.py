"""The `ddrs` command line: argument parsing only; every command calls library functions."""

from __future__ import annotations

import argparse
import sys

from ddrs.errors import DDRSError

CERTIFY_DEFAULTS = {"n0": 100, "n": 100_000, "alpha": 0.001}


def _floats(text: str) -> tuple[float, float]:
    """'LOW,HIGH' -> (low, high); argparse reports a bad value with this message."""
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected two numbers LOW,HIGH (e.g. 0.5,2), got {text!r}"
        ) from None
    return low, high


def add_model_args(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint", help="a ddrs or published (Cohen/SmoothAdv/MACER) checkpoint"
    )
    source.add_argument(
        "--model", help="your own model: package.module:factory, or a TorchScript file"
    )
    p.add_argument("--dataset", required=True, help="digits, mnist, cifar10, imagenet, imagefolder")
    p.add_argument("--data-root", help="dataset folder (default: $DDRS_DATA_ROOT)")
    p.add_argument("--split", default="test", choices=["train", "test"], help="dataset split")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--skip", type=int, default=1, help="use every SKIP-th input (Cohen's --skip)")
    p.add_argument(
        "--max",
        "--max-index",
        type=int,
        default=-1,
        help="stop before this dataset index (-1: all); --max-index under torchrun",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="noisy samples per forward pass (None: automatic)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of all Monte Carlo noise")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_search_args(p: argparse.ArgumentParser) -> None:
    """The sigma search's flags (ddrs sigma, ddrs serve)."""
    p.add_argument(
        "--search",
        default="certified",
        choices=["certified", "ascent", "grid"],
        help="certified: by the predicted certified radius (default); ascent: the paper's "
        "gradient ascent; grid: forward-only, by the paper's surrogate",
    )
    p.add_argument(
        "--samples",
        type=int,
        default=None,
        help="noise samples: per candidate (None: certified 64, grid 8) or per ascent step (1)",
    )
    p.add_argument(
        "--grid", type=int, default=None, help="number of candidates (None: certified 9, grid 12)"
    )
    p.add_argument(
        "--spread",
        type=_floats,
        default=(0.5, 2.0),
        help="low,high factors of sigma0 spanned by the candidates",
    )
    p.add_argument("--iterations", type=int, default=100, help="ascent: steps K (authors: 100)")
    p.add_argument("--lr", type=float, default=1e-4, help="ascent: step size (authors: 1e-4)")
    p.add_argument(
        "--clamp", type=_floats, default=(0.02, 0.98), help="ascent, grid: low,high clamp of pA, pB"
    )
    p.add_argument(
        "--min-sigma",
        type=float,
        default=None,
        help="lower bound on sigma (None: 1e-3); certified: with --max-sigma, the "
        "candidates span this absolute range instead of sigma0 * spread",
    )
    p.add_argument("--max-sigma", type=float, default=None, help="upper bound on sigma")


def add_num_samples(p: argparse.ArgumentParser, help: str) -> None:
    """--n, also spelled --num-samples: torchrun's parser takes --n for its own options."""
    p.add_argument(
        "--n",
        "--num-samples",
        type=int,
        default=CERTIFY_DEFAULTS["n"],
        help=f"{help} (--num-samples under torchrun)",
    )


def add_shard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        help="split the inputs over this many worker processes (one device each); the part "
        "files are merged into --out in index order, equal to a one-process run",
    )


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--amp",
        choices=["fp16", "bf16"],
        help="CUDA only: autocast the base classifier (changes its arithmetic, "
        "not the soundness of the statistics)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (pays off for long runs; 10-40 s per shape)",
    )


def add_sigma_source(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--sigma", type=float, help="one noise level for all inputs (pixel units)")
    source.add_argument("--sigmas", help="TSV with idx and sigma columns (from `ddrs sigma`)")


def add_train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a base classifier under noise",
        description="Defaults: SGD lr 0.1, momentum 0.9, weight decay 1e-4, "
        "lr x0.1 every 30 epochs, batch 256 (Cohen et al.'s CIFAR-10 settings).",
    )
    p.add_argument("--dataset", required=True, help="digits, mnist, cifar10, imagenet, imagefolder")
    p.add_argument("--data-root", help="dataset folder (default: $DDRS_DATA_ROOT)")
    p.add_argument(
        "--arch",
        required=True,
        help="cnn, cnn_small, cifar_resnet20, cifar_resnet110, cifar_resnet18, resnet50",
    )
    p.add_argument("--method", default="gaussian", help="gaussian, smoothadv, macer, consistency")
    p.add_argument("--sigma", type=float, required=True, help="training noise level (pixel units)")
    p.add_argument("--epochs", type=int, default=90, help="training epochs")
    p.add_argument("--batch", type=int, default=256, help="training batch size")
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay")
    p.add_argument(
        "--lr-step", type=int, default=30, help="multiply lr by --lr-gamma every this many epochs"
    )
    p.add_argument("--lr-gamma", type=float, default=0.1, help="lr factor every --lr-step")
    p.add_argument("--train-subset", type=int, help="train on a fixed random subset of this size")
    p.add_argument("--eval-max", type=int, default=2000, help="test inputs for per-epoch accuracy")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, order, noise")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--out", required=True, help="run folder: last.pt, best.pt, log.csv")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt exactly")
    p.add_argument("--init", help="fine-tune: start from this checkpoint's weights")
    p.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    dd = p.add_argument_group("data-dependent sigma (Alfarra et al. 2022)")
    dd.add_argument("--data-dependent", action="store_true", help="per-sample sigma, warm-started")
    dd.add_argument(
        "--dd-iterations",
        type=int,
        default=10,
        help="ascent steps per batch (authors: 10 CIFAR, 1 ImageNet)",
    )
    dd.add_argument(
        "--dd-lr",
        type=float,
        default=1e-4,
        help="ascent step (authors: 1e-4 over 440 epochs; short runs: see docs/METHODS.md)",
    )
    dd.add_argument(
        "--dd-samples",
        type=int,
        default=64,
        help="noise samples per step (authors: 64 CIFAR, 1 ImageNet)",
    )
    dd.add_argument(
        "--dd-start-epoch", type=int, default=0, help="first epoch (0-based) that updates sigmas"
    )
    dd.add_argument("--dd-every", type=int, default=1, help="update sigmas every this many epochs")
    m = p.add_argument_group("method settings (see docs/METHODS.md)")
    m.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method hyper-parameter, e.g. --setting eps=0.5 (repeatable)",
    )


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends '(default: X)' to an option's help when it has a meaningful default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        shown = not (default is None or default is False or default == argparse.SUPPRESS)
        shown = shown and not action.required
        if shown and "%(default)" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def _show_defaults(subparsers) -> None:
    """Every subcommand's --help shows each option's default."""
    add_parser = subparsers.add_parser

    def with_defaults(*args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        return add_parser(*args, **kwargs)

    subparsers.add_parser = with_defaults


def _shape(text: str) -> tuple[int, int, int]:
    try:
        channels, height, width = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W (e.g. 3,32,32), got {text!r}") from None
    return channels, height, width


def add_serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="an HTTP service of certified predictions with a persistent memory",
        description='POST /v1/certify or /v1/predict with JSON {"input": C x H x W floats '
        "in [0, 1]} or an image upload; GET /health, /v1/memory/stats, /metrics, and / (a page "
        "to try it). Every answer is stored in --memory before it is sent.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a ddrs or published checkpoint")
    source.add_argument("--model", help="your own model: package.module:factory or TorchScript")
    p.add_argument("--dataset", help="gives the input shape, classes and image transform")
    p.add_argument("--data-root", help="dataset folder (imagefolder: to count its classes)")
    p.add_argument("--input-shape", type=_shape, help="without --dataset: C,H,W of the inputs")
    p.add_argument("--num-classes", type=int, help="without --dataset: number of classes")
    p.add_argument("--memory", required=True, help="SQLite certification memory (created if new)")
    sigma = p.add_mutually_exclusive_group(required=True)
    sigma.add_argument("--sigma", type=float, help="one noise level for every query")
    sigma.add_argument("--sigma0", type=float, help="data-dependent: the search's centre")
    add_search_args(p)
    p.add_argument("--n0", type=int, default=CERTIFY_DEFAULTS["n0"], help="selection samples")
    p.add_argument("--n", type=int, default=10_000, help="estimation samples per query")
    p.add_argument(
        "--alpha", type=float, default=CERTIFY_DEFAULTS["alpha"], help="failure probability"
    )
    p.add_argument("--batch", type=int, default=None, help="noisy samples per forward pass")
    p.add_argument("--seed", type=int, default=0, help="seed of all Monte Carlo noise")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token-file", help="require Authorization: Bearer <the file's token>")
    p.add_argument(
        "--max-batch", type=int, default=32, help="queries answered in one engine call (1: off)"
    )
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=0.0,
        help="how long a query waits for others to share its engine call (0: none; queries "
        "that arrive while the engine is busy share the next call anyway)",
    )
    p.add_argument("--max-body-bytes", type=int, default=8 << 20, help="larger requests get 413")
    p.add_argument(
        "--drain-seconds", type=int, default=60, help="on SIGTERM, time given to queries in flight"
    )
    p.add_argument("--log-level", default="warning", help="uvicorn's access/error log level")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddrs",
        description="Certifiably robust classification with data-dependent "
        "randomized smoothing. Sigmas and radii are L2, in [0, 1] pixel units.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _show_defaults(sub)

    add_train_parser(sub)

    p = sub.add_parser("certify", help="CERTIFY inputs of a dataset; writes a results TSV")
    add_model_args(p)
    add_sigma_source(p)
    p.add_argument("--n0", type=int, default=CERTIFY_DEFAULTS["n0"], help="selection samples")
    add_num_samples(p, "estimation samples")
    p.add_argument(
        "--alpha", type=float, default=CERTIFY_DEFAULTS["alpha"], help="failure probability"
    )
    add_engine_args(p)
    add_shard_args(p)
    p.add_argument(
        "--memory", help="SQLite certification memory: resolve answers online in index order"
    )
    p.add_argument("--out", required=True, help="results TSV (resumed if it exists)")
    p.add_argument(
        "--pilot",
        type=int,
        default=0,
        help="input-specific N: a pilot of this many samples picks each input's N (at most "
        "--n) within --radius-tolerance of the radius predicted at --n; 0: off",
    )
    p.add_argument(
        "--radius-tolerance",
        type=float,
        default=0.01,
        help="with --pilot: the predicted radius an input may lose to a smaller N",
    )
    p.add_argument(
        "--counts",
        help="also write each input's vote counts here (selected class, its count, top two "
        "counts, N, N0, sigma, seed), for `ddrs recertify` at another alpha",
    )

    p = sub.add_parser(
        "recertify", help="recompute certificates at another alpha from a --counts file"
    )
    p.add_argument("counts", help="counts TSV written by `ddrs certify --counts`")
    p.add_argument("--alpha", type=float, required=True, help="the new failure probability")
    p.add_argument("--out", required=True, help="results TSV (certify format)")

    p = sub.add_parser("predict", help="PREDICT inputs of a dataset; writes a results TSV")
    add_model_args(p)
    add_sigma_source(p)
    add_engine_args(p)
    add_shard_args(p)
    add_num_samples(p, "noise samples per input")
    p.add_argument(
        "--alpha",
        type=float,
        default=CERTIFY_DEFAULTS["alpha"],
        help="bound on the probability of returning a wrong class (else abstain)",
    )
    p.add_argument("--out", required=True, help="results TSV (resumed if it exists)")

    p = sub.add_parser(
        "sigma",
        help="choose a sigma per input (data-dependent smoothing)",
        description="Searches: certified (default) scores log-spaced candidates by the radius "
        "CERTIFY would give at --n and --alpha, from hard votes on --samples noisy copies; "
        "ascent is the paper's gradient ascent on its surrogate (authors: K 100, lr 1e-4, n 1); "
        "grid scores candidates by that surrogate.",
    )
    add_model_args(p)
    add_shard_args(p)
    p.add_argument(
        "--sigma0", type=float, required=True, help="centre of the candidates / ascent start"
    )
    add_num_samples(p, "certified: the N of the certification that follows")
    p.add_argument(
        "--alpha",
        type=float,
        default=CERTIFY_DEFAULTS["alpha"],
        help="certified: the alpha of the certification that follows",
    )
    add_search_args(p)
    p.add_argument("--out", required=True, help="TSV of idx, sigma, score before/after")

    add_serve_parser(sub)

    p = sub.add_parser("memory", help="certification memory tools")
    msub = p.add_subparsers(dest="memory_command", required=True, help="what to do")
    _show_defaults(msub)
    q = msub.add_parser("apply", help="resolve an existing results TSV against a memory, offline")
    q.add_argument("results", help="results TSV of a data-dependent certify run")
    add_model_args(q)
    q.add_argument(
        "--memory", default=":memory:", help="SQLite memory (default: a fresh one in RAM)"
    )
    q.add_argument("--out", required=True)
    q = msub.add_parser("stats", help="entries, classes, changed/shrunk answers, radius histogram")
    q.add_argument("memory")
    q.add_argument("--json", action="store_true", help="print the numbers as JSON")
    q = msub.add_parser("check", help="verify that no two balls of different classes intersect")
    q.add_argument("memory")

    p = sub.add_parser("report", help="tables and plots of certified accuracy from results TSVs")
    p.add_argument("runs", nargs="+", help="results TSVs (ours or the reference format)")
    p.add_argument("--labels", nargs="+", help="one label per run (default: file names)")
    p.add_argument("--radii", default="0:1:0.25", help="start:stop:step or a comma list")
    p.add_argument(
        "--format", default="markdown", choices=["markdown", "latex", "csv"], help="table format"
    )
    p.add_argument(
        "--envelope", action="store_true", help="add the best-over-runs row (and plot curve)"
    )
    p.add_argument(
        "--common",
        action="store_true",
        help="compare on the inputs (idx) that every run covers (runs of different sizes)",
    )
    p.add_argument("--title", help="title of the --plot figure")
    p.add_argument("--out", help="write the table here instead of stdout")
    p.add_argument("--plot", help="PNG of certified accuracy vs radius")
    p.add_argument("--sigma-plot", help="PNG histogram of per-input sigmas (data-dependent runs)")
    p.add_argument("--sigma0", type=float, help="mark this sigma0 on the --sigma-plot")

    p = sub.add_parser(
        "quickstart", help="the main job on built-in digits: fixed vs data-dependent"
    )
    p.add_argument("--out", default="runs/quickstart", help="folder of every file it writes")
    p.add_argument("--quick", action="store_true", help="a reduced run (seconds), for tests")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # what sharded workers are started with
    from ddrs import commands

    try:
        return commands.run(args) or 0
    except DDRSError as error:
        if not getattr(error, "quiet", False):  # a sharded run's other ranks stay quiet
            print(f"ddrs: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from ddrs.shard import quiet_on_interrupt

        if not quiet_on_interrupt():
            print(
                "ddrs: interrupted; results written so far are kept (re-run to resume)",
                file=sys.stderr,
            )
        return 130
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """A worker of a sharded run leaves its process group before exiting (a group left
    open aborts the interpreter at exit: "terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
