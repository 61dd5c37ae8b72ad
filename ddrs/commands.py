"""What each CLI command does, in terms of library calls (the CLI itself only parses)."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

from ddrs.classifier import memory_fingerprint
from ddrs.data import get_dataset
from ddrs.errors import CheckpointError, InputError, ResultsFileError
from ddrs.memory import CertificationMemory
from ddrs.models import load_checkpoint, load_user_model, model_fingerprint
from ddrs.report import summary_line
from ddrs.results import MEMORY_COLUMNS, ResultsWriter, read_sigmas, read_table, row_count
from ddrs.runs import (
    Selection,
    certify_dataset,
    check_run_args,
    check_sigmas_cover,
    predict_dataset,
    sigma_dataset,
)
from ddrs.shard import current_shard, in_worker, launch, worker_device
from ddrs.sigma import check_search_options


def _device(name: str) -> torch.device:
    name = worker_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model_and_data(args: argparse.Namespace):
    """The model (eval mode, on its device) and the dataset split a command works on."""
    dataset = get_dataset(args.dataset, args.split, args.data_root, augment=False)
    info = dataset.info
    device = _device(args.device)
    if args.checkpoint:
        expect = {"num_classes": info.num_classes, "input_shape": list(info.input_shape)}
        try:
            model = load_checkpoint(args.checkpoint, device=device, expect=expect).model
        except CheckpointError as error:
            raise CheckpointError(
                f"{error} — this checkpoint was trained for other inputs than {args.dataset}'s "
                f"{tuple(info.input_shape)} images in {info.num_classes} classes; pass the "
                "checkpoint trained on this dataset (or the --dataset it was trained on)"
            ) from None
    else:
        model = load_user_model(args.model).to(device).eval()
    try:
        with torch.inference_mode():
            probe = model(dataset[0][0].unsqueeze(0).to(device))
    except (RuntimeError, ValueError, TypeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else error
        raise CheckpointError(
            f"the model fails on one {args.dataset} input of shape "
            f"{tuple(info.input_shape)} ({type(error).__name__}: {first_line}); is it the "
            "model for this dataset?"
        ) from None
    if probe.dim() != 2 or probe.shape[1] != info.num_classes:
        raise CheckpointError(
            f"the model maps a {tuple(info.input_shape)} input to shape {tuple(probe.shape)}; "
            f"expected logits of shape (1, {info.num_classes}) for {args.dataset}"
        )
    return model, dataset


def _file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _common_settings(args, model) -> dict:
    return {
        "command": args.command,
        "model": model_fingerprint(model)[:16],
        "dataset": args.dataset,
        "split": args.split,
        "seed": args.seed,
        "skip": args.skip,  # --max may grow on resume: the rows stay a prefix of the selection
    }


def _sigma_settings(args) -> dict:
    if args.sigmas:
        if not Path(args.sigmas).is_file():
            raise InputError(
                f"--sigmas {args.sigmas}: no such file; write it first with `ddrs sigma ... "
                f"--out {args.sigmas}`"
            )
        return {"sigmas": str(args.sigmas), "sigmas_sha256": _file_digest(args.sigmas)}
    return {"sigma": args.sigma}


def _selection(args) -> Selection:
    return Selection(skip=args.skip, max=args.max)


def _smoothing_run(args, model) -> tuple[dict, dict]:
    """What certify and predict share: the settings recorded for resuming, and the keyword
    arguments of `certify_dataset` / `predict_dataset`."""
    settings = {
        **_common_settings(args, model),
        **_sigma_settings(args),
        "n": args.n,
        "alpha": args.alpha,
        "amp": args.amp,
        "compile": args.compile,
    }
    options = {
        "n": args.n,
        "alpha": args.alpha,
        "sigma": args.sigma,
        "sigmas": read_sigmas(args.sigmas) if args.sigmas else None,
        "batch": args.batch,
        "selection": _selection(args),
        "seed": args.seed,
        "progress": not args.no_progress,
        "amp": args.amp,
        "compile": args.compile,
    }
    return settings, options


def _check_run_flags(args, n0: int | None = None) -> None:
    """Every flag of certify / predict, checked before the model, data or any file."""
    check_run_args(
        n=args.n,
        alpha=args.alpha,
        n0=n0,
        batch=args.batch,
        selection=_selection(args),
        sigma=args.sigma,
    )


def _launches_workers(args) -> bool:
    """`--nproc-per-node K` > 1 outside a worker: this process only starts the workers."""
    if args.nproc_per_node < 1:
        raise InputError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
    launches = args.nproc_per_node > 1 and not in_worker()
    gpus = torch.cuda.device_count() if args.device in ("auto", "cuda") else 0
    if launches and 0 < gpus < args.nproc_per_node:
        raise InputError(
            f"--nproc-per-node {args.nproc_per_node} gives each worker its own GPU, and this "
            f"machine has {gpus}; use at most {gpus} (or --device cpu)"
        )
    return launches


def _certify_plan(args):
    """Everything cmd_certify checks before it writes: the model, data, settings, options."""
    _check_run_flags(args, n0=args.n0)
    model, dataset = load_model_and_data(args)
    settings, options = _smoothing_run(args, model)
    settings.update(n0=args.n0, memory=args.memory)
    if args.pilot:
        settings.update(pilot=args.pilot, radius_tolerance=args.radius_tolerance)
    check_sigmas_cover(options["selection"].indices(len(dataset)), options["sigmas"])
    if args.memory and not Path(args.memory).exists() and row_count(args.out):
        raise ResultsFileError(
            f"cannot resume {args.out}: its rows were resolved against a memory, and "
            f"{args.memory} does not exist; restore that memory, or start both afresh"
        )
    return model, dataset, settings, options


def cmd_certify(args) -> int | None:
    if _launches_workers(args):
        _certify_plan(args)
        return launch(args.argv, args.nproc_per_node)
    model, dataset, settings, options = _certify_plan(args)
    shard = current_shard()
    memory = None
    if args.memory and shard.is_main:
        if Path(args.memory).is_file() and Path(args.memory).stat().st_size == 0:
            print(f"note: {args.memory} is an empty file; starting a new memory in it")
        fingerprint = memory_fingerprint(model, args.dataset, dataset.info.input_shape)
        memory = CertificationMemory(args.memory, fingerprint, dataset.info.input_shape)
    try:
        certify_dataset(
            model,
            dataset,
            args.out,
            n0=args.n0,
            memory=memory,
            settings=settings,
            counts=args.counts,
            pilot=args.pilot,
            tolerance=args.radius_tolerance,
            shard=shard,
            **options,
        )
    finally:
        if memory is not None:
            memory.close()
    if shard.is_main:
        print(summary_line(args.out))
        print(f"results: {args.out}")
    return None


def cmd_predict(args) -> int | None:
    _check_run_flags(args)
    model, dataset = load_model_and_data(args)
    settings, options = _smoothing_run(args, model)
    if _launches_workers(args):
        check_sigmas_cover(options["selection"].indices(len(dataset)), options["sigmas"])
        return launch(args.argv, args.nproc_per_node)
    shard = current_shard()
    predict_dataset(model, dataset, args.out, settings=settings, shard=shard, **options)
    if not shard.is_main:
        return None
    table = read_table(args.out, required=("correct", "predict"))
    accuracy = table["correct"].mean() if len(table["idx"]) else float("nan")
    abstain = (table["predict"] == -1).mean() if len(table["idx"]) else float("nan")
    print(f"accuracy {accuracy:.3f}  abstain {abstain:.3f}  ({len(table['idx'])} inputs)")
    print(f"results: {args.out}")
    return None


def sigma_search_options(args) -> dict:
    """The keyword arguments of the chosen search (sigma.SEARCHES), from the CLI flags."""
    from ddrs.sigma import DEFAULT_GRID, DEFAULT_SAMPLES, MIN_SIGMA

    search = args.search
    options: dict = {"samples": DEFAULT_SAMPLES[search] if args.samples is None else args.samples}
    grid = DEFAULT_GRID.get(search) if args.grid is None else args.grid
    if search == "certified":
        options.update(grid=grid, n=args.n, alpha=args.alpha)
        if args.min_sigma is not None and args.max_sigma is not None:
            options["sigma_range"] = (args.min_sigma, args.max_sigma)
        elif args.min_sigma is not None or args.max_sigma is not None:
            raise InputError(
                "--search certified takes both --min-sigma and --max-sigma (an absolute "
                "candidate range) or neither (candidates sigma0 * --spread)"
            )
        else:
            options["spread"] = tuple(args.spread)
        return options
    options.update(
        clamp=tuple(args.clamp),
        min_sigma=MIN_SIGMA if args.min_sigma is None else args.min_sigma,
        max_sigma=args.max_sigma,
    )
    if search == "ascent":
        options.update(iterations=args.iterations, lr=args.lr)
    else:
        options.update(grid=grid, spread=tuple(args.spread))
    return options


def cmd_sigma(args) -> int | None:
    options = sigma_search_options(args)
    model, dataset = load_model_and_data(args)
    settings = {
        **_common_settings(args, model),
        "sigma0": args.sigma0,
        "search": args.search,
        **options,
    }
    if _launches_workers(args):
        check_search_options(args.search, options)
        return launch(args.argv, args.nproc_per_node)
    shard = current_shard()
    sigma_dataset(
        model,
        dataset,
        args.out,
        sigma0=args.sigma0,
        search=args.search,
        options=options,
        batch=args.batch,
        selection=_selection(args),
        seed=args.seed,
        settings=settings,
        progress=not args.no_progress,
        shard=shard,
    )
    if not shard.is_main:
        return None
    s = read_table(args.out, required=("sigma",))["sigma"]
    print(
        f"sigma over {len(s)} inputs: min {s.min():.4f}  median {np.median(s):.4f}  "
        f"max {s.max():.4f}"
    )
    print(f"sigmas: {args.out}")
    return None


def cmd_recertify(args) -> None:
    from ddrs.runs import recertify

    recertify(args.counts, args.out, args.alpha)
    print(summary_line(args.out))
    print(f"results: {args.out}")


def cmd_memory_apply(args) -> None:
    """Offline memory: resolve a finished certify run in dataset-index order."""
    model, dataset = load_model_and_data(args)
    table = read_table(args.results, required=("idx", "label", "predict", "radius", "sigma"))
    mc_predict = table.get("mc_predict", table["predict"])
    mc_radius = table.get("mc_radius", table["radius"])
    if args.memory == ":memory:" and Path(args.out).exists():
        raise ResultsFileError(
            f"{args.out} exists; an in-RAM memory cannot resume it. Pass "
            "--memory FILE to make the run resumable, or choose another --out"
        )
    settings = {
        "command": "memory apply",
        "results": str(args.results),
        "results_sha256": _file_digest(args.results),
        "memory": args.memory,
        "model": model_fingerprint(model)[:16],
        "dataset": args.dataset,
        "split": args.split,
    }
    fingerprint = memory_fingerprint(model, args.dataset, dataset.info.input_shape)
    order = table["idx"].argsort(kind="stable")
    with (
        CertificationMemory(args.memory, fingerprint, dataset.info.input_shape) as memory,
        ResultsWriter(args.out, MEMORY_COLUMNS, settings) as writer,
    ):
        for row in order.tolist():
            idx = int(table["idx"][row])
            if idx in writer.done:
                continue
            x, label, _ = dataset[idx]
            if int(label) != int(table["label"][row]):
                raise ResultsFileError(
                    f"{args.results}: idx {idx} has label "
                    f"{int(table['label'][row])}, the dataset says {int(label)}"
                    " — wrong dataset or split?"
                )
            r = memory.resolve_and_store(
                x,
                int(mc_predict[row]),
                float(mc_radius[row]),
                sigma=float(table["sigma"][row]),
                idx=idx,
            )
            writer.write(
                {
                    "idx": idx,
                    "label": int(label),
                    "predict": r.predict,
                    "radius": r.radius,
                    "correct": int(r.predict == int(label)),
                    "sigma": float(table["sigma"][row]),
                    "time": float(table["time"][row]) if "time" in table else 0.0,
                    "mc_predict": r.mc_predict,
                    "mc_radius": r.mc_radius,
                }
            )
    print(summary_line(args.out))
    print(f"resolved results: {args.out}")


def cmd_memory_stats(args) -> None:
    with CertificationMemory.open_existing(args.memory) as memory:
        stats = memory.stats()
    if args.json:
        print(json.dumps(stats, indent=1))
        return
    print(format_memory_stats(args.memory, stats))


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


def cmd_train(args) -> None:
    from ddrs.train.loop import TrainConfig, train

    config = TrainConfig(
        dataset=args.dataset,
        arch=args.arch,
        out=args.out,
        method=args.method,
        method_settings=parse_settings(args.setting),
        sigma=args.sigma,
        epochs=args.epochs,
        batch=args.batch,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        lr_step=args.lr_step,
        lr_gamma=args.lr_gamma,
        seed=args.seed,
        data_root=args.data_root,
        train_subset=args.train_subset,
        eval_max=args.eval_max,
        device=args.device,
        workers=args.workers,
        data_dependent=args.data_dependent,
        dd_iterations=args.dd_iterations,
        dd_lr=args.dd_lr,
        dd_samples=args.dd_samples,
        dd_start_epoch=args.dd_start_epoch,
        dd_every=args.dd_every,
        resume=args.resume,
        init=args.init,
        tensorboard=args.tensorboard,
        progress=not args.no_progress,
    )
    path = train(config)
    print(f"checkpoint: {path}")


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


def _serve_model(args):
    """The model and the description of its inputs for `ddrs serve`: a dataset's, or
    --input-shape/--num-classes for a custom model."""
    from ddrs.data import DatasetInfo, dataset_info

    if args.dataset:
        info = dataset_info(args.dataset, args.data_root)
    elif args.input_shape and args.num_classes:
        channels, height, width = args.input_shape
        info = DatasetInfo("custom", args.num_classes, (channels, height, width),
                           (0.0,) * channels, (1.0,) * channels)
    else:
        raise InputError("give --dataset, or --input-shape C,H,W and --num-classes K")
    device = _device(args.device)
    if args.checkpoint:
        expect = {"num_classes": info.num_classes, "input_shape": list(info.input_shape)}
        model = load_checkpoint(args.checkpoint, device=device, expect=expect).model
    else:
        model = load_user_model(args.model).to(device).eval()
    with torch.inference_mode():
        logits = model(torch.zeros(1, *info.input_shape, device=device))
    if tuple(logits.shape) != (1, info.num_classes):
        raise CheckpointError(
            f"the model maps a {tuple(info.input_shape)} input to shape {tuple(logits.shape)}; "
            f"expected (1, {info.num_classes})"
        )
    return model, info


def cmd_serve(args) -> None:
    try:
        import uvicorn

        from ddrs.serve import CertificationService, create_app, read_token
    except ImportError as error:
        raise InputError(
            f"ddrs serve needs FastAPI and uvicorn ({error.name} is missing): "
            "pip install 'ddrs[serve]'"
        ) from None
    from ddrs.classifier import DataDependentSmoothClassifier

    check_run_args(n=args.n, alpha=args.alpha, n0=args.n0, batch=args.batch,
                   sigma=args.sigma)
    if args.max_batch < 1 or not (math.isfinite(args.max_wait_ms) and args.max_wait_ms >= 0):
        raise InputError("--max-batch must be >= 1 and --max-wait-ms finite and >= 0")
    search = args.search if args.sigma is None else None
    options = {}
    if search is not None:
        # the classifier scores a certified search at its own n and alpha
        options = {k: v for k, v in sigma_search_options(args).items() if k not in ("n", "alpha")}
        check_search_options(search, {**options, "n": args.n, "alpha": args.alpha})
    token = read_token(args.token_file) if args.token_file else None
    model, info = _serve_model(args)
    fingerprint = memory_fingerprint(model, info.name, info.input_shape)
    sigma0 = args.sigma if args.sigma is not None else args.sigma0

    def make_classifier():
        memory = CertificationMemory(args.memory, fingerprint, info.input_shape)
        return DataDependentSmoothClassifier(
            model, info.num_classes, memory, sigma0, n0=args.n0, n=args.n, alpha=args.alpha,
            batch=args.batch, seed=args.seed, selector=search, search=options,
        )

    make_classifier().memory.close()  # a memory of another model or a corrupt one: say so now
    describe = {
        "model": fingerprint[:16], "dataset": info.name, "input_shape": list(info.input_shape),
        "num_classes": info.num_classes, "sigma": args.sigma, "sigma0": args.sigma0,
        "search": search, "n0": args.n0, "n": args.n, "alpha": args.alpha,
        "memory": str(args.memory),
    }  # fmt: skip
    service = CertificationService(make_classifier, info, max_batch=args.max_batch,
                                   max_wait=args.max_wait_ms / 1000, describe=describe)
    app = create_app(service, token=token, max_body_bytes=args.max_body_bytes)
    auth = "token required" if token else "no token"
    if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host} without --token-file: anyone who can reach "
              "it can query the model and grow the memory", flush=True)
    print(f"ddrs serve: http://{args.host}:{args.port}/  memory {args.memory}  {auth}",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.drain_seconds)


def cmd_quickstart(args) -> None:
    from ddrs.quickstart import quickstart

    quickstart(args.out, quick=args.quick, progress=not args.no_progress)


def run(args: argparse.Namespace) -> int | None:
    if args.command == "memory":
        return {"apply": cmd_memory_apply, "stats": cmd_memory_stats, "check": cmd_memory_check}[
            args.memory_command
        ](args)
    return globals()[f"cmd_{args.command}"](args)
