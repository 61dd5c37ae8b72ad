"""The parser of the `ddrs` command line: the options of training, certify / predict / sigma
and serve are the fields of their run specifications: names, defaults and help come from
there (`add_spec`)."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

from ddrs import __version__
from ddrs.cli.converters import CONVERTERS
from ddrs.runs import CertifyRun, ModelSource, PredictRun, SigmaRun
from ddrs.serve.spec import ServeRun
from ddrs.train.config import RouterLabels, TrainConfig
from ddrs.train.denoiser import DenoiserConfig


def add_spec(parser: argparse.ArgumentParser, spec: type) -> None:
    """One option per field of `spec` (a run specification), from its metadata: the flag
    (--FIELD-NAME unless `flag`), `aliases`, `type` (else the default's; a name is one of
    converters.py's), `choices`,
    `required`, `repeatable`, `group` (a required choice of one among the fields sharing it),
    `section` (a heading in --help); bool fields are switches."""
    groups: dict[str, argparse._ActionsContainer] = {}
    for f in fields(spec):
        meta = dict(f.metadata)
        if "help" not in meta:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        flags = [meta.get("flag", "--" + f.name.replace("_", "-")), *meta.get("aliases", ())]
        options: dict = {"dest": f.name, "help": meta["help"]}
        if isinstance(default, bool):
            options["action"] = "store_false" if default else "store_true"
        elif isinstance(default, dict):  # KEY=VALUE pairs, repeatable
            options.update(action="append", default=[], metavar=meta.get("metavar"))
        elif meta.get("repeatable"):
            options.update(action="append", default=None)
        else:
            kind = meta.get("type", type(default))
            options.update(default=default, type=CONVERTERS.get(kind, kind))
            if default is None and "type" not in meta:
                options["type"] = str
            for key in ("choices", "metavar"):
                if key in meta:
                    options[key] = meta[key]
        if meta.get("required") and "group" not in meta:
            options.update(required=True, default=None)
        container = parser
        if "group" in meta:
            if meta["group"] not in groups:
                required = meta.get("group_required", True)
                groups[meta["group"]] = parser.add_mutually_exclusive_group(required=required)
            container = groups[meta["group"]]
        elif "section" in meta:
            if meta["section"] not in groups:
                groups[meta["section"]] = parser.add_argument_group(meta["section"])
            container = groups[meta["section"]]
        container.add_argument(*flags, **options)


def add_nproc(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        help="split the inputs over this many worker processes (one device each); the part "
        "files are merged into --out in index order, equal to a one-process run",
    )


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends '(default: X)' to an option's help when it has a meaningful default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        shown = not (default is None or default is False or default == argparse.SUPPRESS)
        shown = shown and not action.required and default != []
        if isinstance(action, argparse._StoreFalseAction):
            shown = False
        if shown and "%(default)" not in text and action.option_strings:
            if isinstance(default, tuple):  # as the option takes it: 0.5,2
                text += " (default: " + ",".join(f"{v:g}" for v in default) + ")"
            else:
                text += " (default: %(default)s)"
        return text


def _show_defaults(subparsers) -> None:
    """Every subcommand's --help shows each option's default."""
    add_parser = subparsers.add_parser

    def with_defaults(*args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        return add_parser(*args, **kwargs)

    subparsers.add_parser = with_defaults


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddrs",
        description="Certifiably robust classification with data-dependent "
        "randomized smoothing. Sigmas and radii are L2, in [0, 1] pixel units.",
    )
    parser.add_argument("--version", action="version", version=f"ddrs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _show_defaults(sub)

    p = sub.add_parser(
        "train",
        help="train a base classifier under noise",
        description="Defaults: SGD lr 0.1, momentum 0.9, weight decay 1e-4, "
        "lr x0.1 every 30 epochs, batch 256 (Cohen et al.'s CIFAR-10 settings).",
    )
    add_spec(p, TrainConfig)

    p = sub.add_parser(
        "train-router",
        help="train a router among experts for dual smoothing (certify --router)",
        description="Scores each held-out training image by every expert's predicted "
        "certified radius (0 where the expert is wrong), then trains the router on soft "
        "targets softmax(radii / --temperature), class-balanced, without the images no "
        "expert certifies, at its own noise level --sigma (sigma_r: at least the largest "
        "expert's), with the consistency term by default (--method consistency).",
    )
    add_spec(p, RouterLabels)
    add_spec(p, TrainConfig)
    p.set_defaults(method="consistency")

    p = sub.add_parser(
        "train-denoiser",
        help="train a denoiser for a frozen classifier (denoised smoothing: certify --denoiser)",
        description="Salman et al. (2020): the classifier is never changed; the denoiser "
        "learns to undo the noise (mse), or to give the classifier back its own clean-image "
        "class (stability, no labels needed), or mse then stability. Several --sigmas train "
        "a blind denoiser, for one classifier as experts at every sigma. Adam, lr 1e-3.",
    )
    add_spec(p, DenoiserConfig)

    p = sub.add_parser("certify", help="CERTIFY inputs of a dataset; writes a results TSV")
    add_spec(p, ModelSource)
    add_spec(p, CertifyRun)
    add_nproc(p)

    p = sub.add_parser(
        "recertify", help="recompute certificates at another alpha from a --counts file"
    )
    p.add_argument("counts", help="counts TSV written by `ddrs certify --counts`")
    p.add_argument("--alpha", type=float, required=True, help="the new failure probability")
    p.add_argument("--out", required=True, help="results TSV (certify format)")

    p = sub.add_parser("predict", help="PREDICT inputs of a dataset; writes a results TSV")
    add_spec(p, ModelSource)
    add_spec(p, PredictRun)
    add_nproc(p)

    p = sub.add_parser(
        "sigma",
        help="choose a sigma per input (data-dependent smoothing)",
        description="Searches: certified (default) scores log-spaced candidates by the radius "
        "CERTIFY would give at --n and --alpha, from hard votes on --samples noisy copies; "
        "ascent is the paper's gradient ascent on its surrogate (authors: K 100, lr 1e-4, n 1); "
        "grid scores candidates by that surrogate.",
    )
    add_spec(p, ModelSource)
    add_spec(p, SigmaRun)
    add_nproc(p)

    p = sub.add_parser(
        "serve",
        help="an HTTP service of certified predictions (with a persistent memory, or stateless)",
        description='POST /v1/certify or /v1/predict with JSON {"input": C x H x W floats '
        "in [0, 1]} or an image upload; GET /health, /v1/memory/stats, /metrics, and / (a page "
        "to try it). With --memory, every answer is stored there before it is sent; without "
        "(a fixed --sigma, a --router, a --cascade), nothing is kept.",
    )
    add_spec(p, ServeRun)

    p = sub.add_parser("memory", help="certification memory tools")
    msub = p.add_subparsers(dest="memory_command", required=True, help="what to do")
    _show_defaults(msub)
    q = msub.add_parser("apply", help="resolve an existing results TSV against a memory, offline")
    q.add_argument("results", help="results TSV of a data-dependent certify run")
    add_spec(q, ModelSource)
    q.add_argument(
        "--memory", default=":memory:", help="SQLite memory (default: a fresh one in RAM)"
    )
    q.add_argument(
        "--out",
        required=True,
        help="the resolved results TSV (each row's answer "
        "after the memory, and its Monte Carlo one: mc_predict, mc_radius)",
    )
    q.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide the progress bar"
    )
    memory_help = "the memory: an SQLite file or a postgresql:// URL"
    q = msub.add_parser("stats", help="entries, classes, changed/shrunk answers, radius histogram")
    q.add_argument("memory", help=memory_help)
    q.add_argument("--json", action="store_true", help="print the numbers as JSON")
    q = msub.add_parser("check", help="verify that no two balls of different classes intersect")
    q.add_argument("memory", help=memory_help)
    q = msub.add_parser(
        "copy",
        help="copy a memory to another store (SQLite file or "
        "postgresql:// URL), every checksum verified",
    )
    q.add_argument("source", help="the memory to copy: an SQLite file or a postgresql:// URL")
    q.add_argument("destination", help="where to create the copy (must not hold a memory)")

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
    p.add_argument("--expert-plot", help="PNG of each input's sigma and expert (runs of experts)")
    p.add_argument("--sigma0", type=float, help="mark this sigma0 on the --sigma-plot")

    p = sub.add_parser(
        "quickstart", help="the main job on built-in digits: fixed vs data-dependent"
    )
    p.add_argument("--out", default="runs/quickstart", help="folder of every file it writes")
    p.add_argument("--quick", action="store_true", help="a reduced run (seconds), for tests")
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide progress bars"
    )
    return parser
