"""What each CLI command does, in terms of library calls (the CLI itself only parses).

`COMMANDS` maps each command to its function; each builds its run specification
(runs/, train/config.py, serve/spec.py) from the arguments, loads the model once
(`ModelSource.load`), and calls the
library. `entry` is the command line's own main, which the launcher runs in each worker of a
sharded run.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import numpy as np

from ddrs.core.checks import probability
from ddrs.errors import InputError
from ddrs.launch import join, launch, starts_workers
from ddrs.memory import CertificationMemory
from ddrs.memory.store import shown_location
from ddrs.options import from_namespace
from ddrs.report import summary_line
from ddrs.results import read_table
from ddrs.runs import (
    CertifyRun,
    ModelSource,
    PredictRun,
    SigmaRun,
    apply_memory,
    certify_dataset,
    predict_dataset,
    recertify,
    sigma_dataset,
)
from ddrs.serve.spec import ServeRun
from ddrs.train.config import RouterLabels, TrainConfig
from ddrs.train.denoiser import DenoiserConfig

Entry = Callable[[list[str]], int]


def _dataset_run(args, argv: list[str], entry: Entry, spec: type, run_dataset) -> int | None:
    """certify, predict, sigma: everything checked in this process (also when it only starts
    the workers: a bad setting is one line before any worker starts); then the run, in this
    process or in `--nproc-per-node` workers."""
    run = from_namespace(spec, args)
    model, dataset = from_namespace(ModelSource, args).load()
    if isinstance(run, CertifyRun):
        print(run.reach())
    if starts_workers(args.nproc_per_node, args.device):
        run.check(model, dataset)
        return launch(entry, argv, args.nproc_per_node)
    rank = join()
    run_dataset(model, dataset, run, rank=rank)
    if rank.is_main:
        print(_summary(run))
        print(f"{'sigmas' if isinstance(run, SigmaRun) else 'results'}: {run.out}")
    return None


def _summary(run) -> str:
    if isinstance(run, CertifyRun):
        return summary_line(run.out)
    if isinstance(run, PredictRun):
        table = read_table(run.out, required=("correct", "predict"))
        accuracy = table["correct"].mean() if len(table["idx"]) else float("nan")
        abstain = (table["predict"] == -1).mean() if len(table["idx"]) else float("nan")
        return f"accuracy {accuracy:.3f}  abstain {abstain:.3f}  ({len(table['idx'])} inputs)"
    s = read_table(run.out, required=("sigma",))["sigma"]
    return (
        f"sigma over {len(s)} inputs: min {s.min():.4f}  median {np.median(s):.4f}  "
        f"max {s.max():.4f}"
    )


def cmd_certify(args, argv: list[str], entry: Entry) -> int | None:
    return _dataset_run(args, argv, entry, CertifyRun, certify_dataset)


def cmd_predict(args, argv: list[str], entry: Entry) -> int | None:
    return _dataset_run(args, argv, entry, PredictRun, predict_dataset)


def cmd_sigma(args, argv: list[str], entry: Entry) -> int | None:
    return _dataset_run(args, argv, entry, SigmaRun, sigma_dataset)


def cmd_recertify(args) -> None:
    recertify(args.counts, args.out, probability("--alpha", args.alpha))
    print(summary_line(args.out))
    print(f"results: {args.out}")


def cmd_memory_apply(args) -> None:
    """Offline memory: resolve a finished certify run in dataset-index order."""
    model, dataset = from_namespace(ModelSource, args).load()
    apply_memory(args.results, model, dataset, args.out, args.memory, args.progress)
    print(summary_line(args.out))
    print(f"resolved results: {args.out}")


def cmd_memory_stats(args) -> None:
    with CertificationMemory.open_existing(args.memory) as memory:
        stats = memory.stats()
    if args.json:
        print(json.dumps(stats, indent=1))
        return
    print(format_memory_stats(shown_location(args.memory), stats))


def format_memory_stats(path: str, stats: dict) -> str:
    """`ddrs memory stats` for a reader: counts, classes, sigma and the radius histogram."""
    n = stats["entries"]

    def share(k: int) -> str:
        return f"{k} ({k / n:.1%})" if n else str(k)

    classes = ", ".join(f"{c}: {k}" for c, k in stats["classes"].items()) or "none"
    sigma = stats["sigma"]
    lines = [
        f"memory {path}: {n} entries of shape {tuple(stats['input_shape'])}",
        f"  classes          {classes}",
        f"  abstentions      {share(stats['abstentions'])}",
        f"  changed by memory {share(stats['changed'])} (class taken from a stored ball)",
        f"  shrunk by memory {share(stats['shrunk'])} (radius reduced)",
        f"  exact repeats    {stats['repeats']} (answered from the memory, not stored again)",
    ]
    if sigma["min"] is not None:
        lines.append(
            f"  sigma            min {sigma['min']:.4f}  median {sigma['median']:.4f}  "
            f"max {sigma['max']:.4f}"
        )
    edges, counts = stats["radius_histogram"]["edges"], stats["radius_histogram"]["counts"]
    if sum(counts):
        lines.append("  certified radius (non-abstained entries):")
        top = max(counts)
        for lo, hi, k in zip(edges, edges[1:], counts):
            bar = "#" * round(30 * k / top) if top else ""
            lines.append(f"    [{lo:6.3f}, {hi:6.3f})  {k:6d}  {bar}")
    return "\n".join(lines)


def cmd_memory_check(args) -> int:
    with CertificationMemory.open_existing(args.memory) as memory:
        corrupt = memory.corrupt_entries()
        violations = memory.check()
        count = len(memory)
    for order in corrupt[:20]:
        print(f"entry {order} does not match its checksum (changed outside ddrs)")
    for i, j, overlap in violations[:20]:
        print(f"entries {i} and {j} (different classes) overlap by {overlap:.6g}")
    if corrupt or violations:
        print(
            f"memory check FAILED: {len(corrupt)} corrupt entr{'y' if len(corrupt) == 1 else 'ies'}"
            f" and {len(violations)} intersecting pair(s) among {count} entries"
        )
        return 1
    print(
        f"memory check ok: {count} entries, every checksum matches, no balls of different "
        "classes intersect"
    )
    return 0


def cmd_memory_copy(args) -> None:
    from ddrs.memory import copy_memory

    count = copy_memory(args.source, args.destination)
    print(
        f"copied {count} entries from {shown_location(args.source)} to "
        f"{shown_location(args.destination)}; every checksum verified"
    )


def cmd_train(args) -> None:
    from ddrs.train.loop import train

    config = from_namespace(TrainConfig, args, method_settings=parse_settings(args.method_settings))
    print(f"checkpoint: {train(config)}")


def cmd_train_denoiser(args) -> None:
    from ddrs.train.denoiser import train_denoiser

    config = from_namespace(DenoiserConfig, args)
    print(f"denoiser checkpoint: {train_denoiser(config)}")


def cmd_train_router(args) -> None:
    from ddrs.data import get_dataset
    from ddrs.launch import device_for
    from ddrs.models.experts import expert_specs, load_experts
    from ddrs.runs.source import denoised
    from ddrs.train.loop import spread_indices
    from ddrs.train.router import (
        RouterOptions,
        check_router_method,
        held_out_indices,
        not_trained_on_by,
        train_router,
    )

    config = from_namespace(TrainConfig, args, method_settings=parse_settings(args.method_settings))
    labels = from_namespace(RouterLabels, args)
    check_router_method(config.method)
    plain = get_dataset(config.dataset, "train", config.data_root, augment=False)
    device = device_for(config.device)
    experts = load_experts(
        expert_specs(labels.expert, labels.experts),
        num_classes=plain.info.num_classes,
        input_shape=plain.info.input_shape,
        inputs_name=config.dataset,
        device=device,
    )
    experts = denoised(experts, labels.denoiser, plain.info.input_shape, device)
    indices = held_out_indices(experts, len(plain))
    if labels.denoiser:
        indices = not_trained_on_by(labels.denoiser, indices, len(plain))
    if labels.exclude:
        left_out = set(read_table(labels.exclude)["idx"].tolist())
        indices = [i for i in indices if i not in left_out]
    if labels.images is not None:
        indices = [indices[k] for k in spread_indices(len(indices), labels.images)]
    print(f"router: {len(indices)} held-out images, experts {', '.join(experts.names)}")
    largest = max(e.sigma for e in experts)
    if config.sigma < largest:
        print(
            f"note: sigma_r {config.sigma:g} is below the largest expert's sigma {largest:g}: "
            "the route's radius may cap that expert's answers"
        )
    path = train_router(
        experts,
        config,
        indices,
        samples=labels.label_samples,
        n=labels.label_n,
        alpha=labels.label_alpha,
        options=RouterOptions(
            temperature=labels.temperature,
            uncertified_weight=labels.uncertified_weight,
            balance=labels.balance,
            check_n=labels.check_n,
        ),
    )
    print(f"router checkpoint: {path}")


def parse_settings(items: list[str]) -> dict:
    """--setting KEY=VALUE pairs; numbers become int/float, true/false become bools."""
    settings = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"--setting expects KEY=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        value: object = text
        if text.lower() in ("true", "false"):
            value = text.lower() == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(text)
                    break
                except ValueError:
                    pass
        settings[key.strip().replace("-", "_")] = value
    return settings


def cmd_report(args) -> None:
    from ddrs.report import report_command

    report_command(args)


def cmd_serve(args) -> None:
    run = from_namespace(ServeRun, args)
    try:
        from ddrs.serve.server import serve
    except ImportError as error:
        raise InputError(
            f"ddrs serve needs FastAPI and uvicorn ({error.name} is missing): "
            "pip install 'ddrs[serve]'"
        ) from None
    serve(run)


def cmd_quickstart(args) -> None:
    from ddrs.quickstart import quickstart

    quickstart(args.out, quick=args.quick, progress=args.progress)


# commands that may start workers get the argument list and the entry point to run in them
LAUNCHING = {"certify": cmd_certify, "predict": cmd_predict, "sigma": cmd_sigma}
COMMANDS: dict[str, Callable[[argparse.Namespace], int | None]] = {
    "train": cmd_train,
    "train-router": cmd_train_router,
    "train-denoiser": cmd_train_denoiser,
    "recertify": cmd_recertify,
    "serve": cmd_serve,
    "report": cmd_report,
    "quickstart": cmd_quickstart,
}
MEMORY_COMMANDS = {
    "apply": cmd_memory_apply,
    "stats": cmd_memory_stats,
    "check": cmd_memory_check,
    "copy": cmd_memory_copy,
}


def run(args: argparse.Namespace, argv: list[str], entry: Entry) -> int | None:
    """Run the parsed command; `argv` and `entry` start the workers of a sharded run."""
    if args.command in LAUNCHING:
        return LAUNCHING[args.command](args, argv, entry)
    if args.command == "memory":
        return MEMORY_COMMANDS[args.memory_command](args)
    return COMMANDS[args.command](args)
