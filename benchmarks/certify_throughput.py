"""CERTIFY throughput: the reference loop vs ddrs's batched engine vs the bare forward pass.

On the same model, inputs, N0, N, alpha and batch:

(a) reference: a faithful re-implementation of Cohen et al.'s `core.py` (one input at a time;
    per batch `x.repeat`, `randn_like * sigma`, `model(batch + noise).argmax(1)`, counts moved
    to the host with `.cpu().numpy()` and counted in a Python loop; Clopper-Pearson per input
    via `scipy.stats.beta.ppf`, the math of statsmodels' `proportion_confint(method="beta")`),
    model in PyTorch's default memory format, under `torch.no_grad()`, as their code runs it;
(b) ddrs: `Smooth(model, ...).certify_batch` on all inputs at once (default: channels_last);
(c) the limit: the bare forward pass (+ argmax) over the same total number of noisy inputs,
    generated beforehand, under `inference_mode`, channels_last, at the best batch among a few.

Variants run in turn (order rotated every round), repeated; ratios are medians of per-round
ratios. Models have random weights: throughput does not depend on the weights.

    .venv/bin/python benchmarks/certify_throughput.py --quick
    .venv/bin/python benchmarks/certify_throughput.py --json runs/bench/certify_throughput.json
    .venv/bin/python benchmarks/certify_throughput.py --engines --json runs/bench/engines.json

`--engines`: ResNet-110 end to end at N = 100,000 with each engine and precision
(models/engines.py) against the reference loop; one run each, in turn.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import math
import pstats
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from common import (
    LoadMonitor,
    add_common_args,
    apply_threads,
    interleaved,
    median,
    paired_ratio,
    print_machine,
    save_json,
    spread,
    table,
)
from scipy.stats import beta, norm

import ddrs.core.sampling
import ddrs.core.smooth
from ddrs.core.smooth import Smooth
from ddrs.data.cifar import INFO as CIFAR
from ddrs.models import build_model

SHAPE = (3, 32, 32)
NUM_CLASSES = 10
SIGMA = 0.25
ALPHA = 0.001


# ------------------------------------------------------------------ (a) the reference loop


class CohenSmooth:
    """Cohen, Rosenfeld & Kolter's `core.Smooth.certify`, CPU edition, line for line."""

    ABSTAIN = -1

    def __init__(self, base_classifier: torch.nn.Module, num_classes: int, sigma: float):
        self.base_classifier = base_classifier
        self.num_classes = num_classes
        self.sigma = sigma

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int):
        self.base_classifier.eval()
        counts_selection = self._sample_noise(x, n0, batch_size)
        cAHat = counts_selection.argmax().item()
        counts_estimation = self._sample_noise(x, n, batch_size)
        nA = counts_estimation[cAHat].item()
        pABar = self._lower_confidence_bound(nA, n, alpha)
        if pABar < 0.5:
            return CohenSmooth.ABSTAIN, 0.0
        radius = self.sigma * norm.ppf(pABar)
        return cAHat, radius

    def _sample_noise(self, x: torch.Tensor, num: int, batch_size: int) -> np.ndarray:
        with torch.no_grad():
            counts = np.zeros(self.num_classes, dtype=int)
            for _ in range(math.ceil(num / batch_size)):
                this_batch_size = min(batch_size, num)
                num -= this_batch_size
                batch = x.repeat((this_batch_size, 1, 1, 1))
                noise = torch.randn_like(batch) * self.sigma
                predictions = self.base_classifier(batch + noise).argmax(1)
                counts += self._count_arr(predictions.cpu().numpy(), self.num_classes)
            return counts

    def _count_arr(self, arr: np.ndarray, length: int) -> np.ndarray:
        counts = np.zeros(length, dtype=int)
        for idx in arr:
            counts[idx] += 1
        return counts

    def _lower_confidence_bound(self, NA: int, N: int, alpha: float) -> float:
        # statsmodels' proportion_confint(NA, N, alpha=2 * alpha, method="beta")[0]
        if NA == 0:
            return 0.0
        return float(beta.ppf(alpha, NA, N - NA + 1))


def reference_certify(model, xs, n0, n, batch):
    smoothed = CohenSmooth(model, NUM_CLASSES, SIGMA)
    return [smoothed.certify(x, n0, n, ALPHA, batch) for x in xs]


# ------------------------------------------------------------------ (b) ddrs


@contextmanager
def without_channels_last():
    """ddrs with channels_last switched off (both places that decide it)."""
    saved = ddrs.core.sampling.is_convolutional, ddrs.core.smooth.is_convolutional
    ddrs.core.sampling.is_convolutional = ddrs.core.smooth.is_convolutional = lambda model: False
    try:
        yield
    finally:
        ddrs.core.sampling.is_convolutional, ddrs.core.smooth.is_convolutional = saved


def ddrs_certify(smooth: Smooth, xs, n0, n, batch, channels_last=True):
    keys = list(range(len(xs)))
    if channels_last:
        return smooth.certify_batch(xs, SIGMA, n0, n, ALPHA, batch, keys=keys)
    with without_channels_last():
        return smooth.certify_batch(xs, SIGMA, n0, n, ALPHA, batch, keys=keys)


# ------------------------------------------------------------------ (c) the bare forward


def noisy_inputs(xs: torch.Tensor, per_input: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(len(xs) * per_input, *xs.shape[1:]).contiguous(
        memory_format=torch.channels_last
    )
    for i, x in enumerate(xs):
        rows = out[i * per_input : (i + 1) * per_input]
        rows.copy_(x + SIGMA * torch.randn(per_input, *x.shape, generator=g))
    return out


def bare_forward(model, noisy: torch.Tensor, batch: int) -> None:
    with torch.inference_mode():
        for s in range(0, len(noisy), batch):
            model(noisy[s : s + batch]).argmax(1)


def best_batch(model, candidates, images: int) -> tuple[int, dict[int, float]]:
    """The candidate batch with the highest bare-forward throughput (images/s)."""
    rates = {}
    pool = noisy_inputs(torch.rand(1, *SHAPE), max(candidates))
    for bs in candidates:
        bare_forward(model, pool[:bs], bs)  # warm-up
        steps = max(1, math.ceil(images / bs))
        seconds = 0.0
        for _ in range(steps):
            start = time.perf_counter()
            bare_forward(model, pool[:bs], bs)
            seconds += time.perf_counter() - start
        rates[bs] = steps * bs / seconds
    return max(rates, key=rates.get), rates


# ------------------------------------------------------------------ the benchmark


@dataclass
class Setting:
    arch: str
    label: str
    inputs: int
    n0: int
    n: int
    repeats: int


def make_models(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(arch, NUM_CLASSES, SHAPE, CIFAR.mean, CIFAR.std).eval()
    reference = copy.deepcopy(model)  # Cohen et al.'s code: default (contiguous) format
    ddrs_model = copy.deepcopy(model)  # Smooth() converts it to channels_last in place
    contiguous = copy.deepcopy(model)  # ddrs with channels_last off
    bare = copy.deepcopy(model).to(memory_format=torch.channels_last)
    return reference, ddrs_model, contiguous, bare


def compare(setting: Setting, models, batch: int, c_batch: int) -> dict:
    reference, ddrs_model, _, bare = models
    xs = torch.rand(setting.inputs, *SHAPE, generator=torch.Generator().manual_seed(7))
    smooth = Smooth(ddrs_model, NUM_CLASSES, seed=0)
    noisy = noisy_inputs(xs, setting.n0 + setting.n)
    total = setting.inputs * (setting.n0 + setting.n)
    print(
        f"\n{setting.arch} / {setting.label}: {setting.inputs} inputs, N0={setting.n0}, "
        f"N={setting.n}, batch {batch} ({total:,} forward samples per variant), "
        f"(c) at batch {c_batch}",
        flush=True,
    )
    out = {}

    def run_a():
        out["a"] = reference_certify(reference, xs, setting.n0, setting.n, batch)

    def run_b():
        out["b"] = ddrs_certify(smooth, xs, setting.n0, setting.n, batch)

    variants = {"(a) reference": run_a, "(b) ddrs": run_b}
    variants["(c) bare forward"] = lambda: bare_forward(bare, noisy, c_batch)
    if c_batch != batch:  # also at (b)'s batch: separates the engine from the batch choice
        variants["(c) bare forward, (b)'s batch"] = lambda: bare_forward(bare, noisy, batch)
    times = interleaved(variants, setting.repeats)
    a, b, c = times["(a) reference"], times["(b) ddrs"], times["(c) bare forward"]
    c_same = times.get("(c) bare forward, (b)'s batch", c)
    agree = np.mean([ra[0] == rb.predict for ra, rb in zip(out["a"], out["b"])])
    result = {
        "arch": setting.arch,
        "setting": setting.label,
        "inputs": setting.inputs,
        "n0": setting.n0,
        "n": setting.n,
        "batch": batch,
        "c_batch": c_batch,
        "samples": total,
        "times": times,
        "a_over_b": paired_ratio(a, b),
        "b_over_c": paired_ratio(b, c),
        "b_over_c_same_batch": paired_ratio(b, c_same),
        "rate_a": total / median(a),
        "rate_b": total / median(b),
        "rate_c": total / median(c),
        "spread": {"a": spread(a), "b": spread(b), "c": spread(c)},
        "classes_agree_a_b": float(agree),
    }
    return result


def variants_study(arch: str, models, inputs: int, n: int, batches, repeats: int) -> dict:
    """(b) with and without channels_last at several batch sizes, with (c) at the same batch."""
    _, ddrs_model, contiguous, bare = models
    xs = torch.rand(inputs, *SHAPE, generator=torch.Generator().manual_seed(8))
    smooth_cl = Smooth(ddrs_model, NUM_CLASSES, seed=0)
    with without_channels_last():
        smooth_plain = Smooth(contiguous, NUM_CLASSES, seed=0)
    n0 = 100
    noisy = noisy_inputs(xs, n0 + n)
    variants = {}
    for bs in batches:
        variants[f"(b) channels_last batch {bs}"] = lambda bs=bs: ddrs_certify(
            smooth_cl, xs, n0, n, bs
        )
        variants[f"(b) contiguous batch {bs}"] = lambda bs=bs: ddrs_certify(
            smooth_plain, xs, n0, n, bs, channels_last=False
        )
        variants[f"(c) bare forward batch {bs}"] = lambda bs=bs: bare_forward(bare, noisy, bs)
    total = inputs * (n0 + n)
    print(
        f"{arch} / (b) variants: {inputs} input(s), N0={n0}, N={n} ({total:,} samples)", flush=True
    )
    times = interleaved(variants, repeats)
    rows = []
    ref = times[f"(b) channels_last batch {256 if 256 in batches else batches[0]}"]
    for bs in batches:
        cl, plain = times[f"(b) channels_last batch {bs}"], times[f"(b) contiguous batch {bs}"]
        bare_t = times[f"(c) bare forward batch {bs}"]
        rows.append(
            {
                "batch": bs,
                "rate_cl": total / median(cl),
                "rate_plain": total / median(plain),
                "plain_over_cl": paired_ratio(plain, cl),
                "cl_over_bare": paired_ratio(cl, bare_t),
                "cl_over_cl256": paired_ratio(cl, ref),
            }
        )
    return {
        "arch": arch,
        "inputs": inputs,
        "n0": n0,
        "n": n,
        "samples": total,
        "times": times,
        "rows": rows,
    }


def profile_ddrs(arch: str, models, n: int, batch: int) -> dict:
    """Where the time of `sample_counts` goes (cProfile; one input, N0=100, N=n)."""
    _, ddrs_model, _, _ = models
    smooth = Smooth(ddrs_model, NUM_CLASSES, seed=0)
    xs = torch.rand(1, *SHAPE)
    ddrs_certify(smooth, xs, 100, min(n, batch), batch)  # warm-up
    profiler = cProfile.Profile()
    profiler.enable()
    ddrs_certify(smooth, xs, 100, n, batch)
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = forward = noise = index_add = layout = gather = 0.0
    for (filename, _, func), (_, _, _, ct, callers) in stats.stats.items():
        from_engine = [
            v
            for k, v in callers.items()
            if k[2] == "sample_counts" and k[0].endswith("sampling.py")
        ]
        if func == "sample_counts" and filename.endswith("sampling.py"):
            total = ct
        elif func == "fill" and filename.endswith("sampling.py"):
            noise = ct
        elif from_engine and func in ("_wrapped_call_impl", "_call_impl"):
            forward += sum(v[3] for v in from_engine)
        elif from_engine and "index_add_" in func:
            index_add += sum(v[3] for v in from_engine)
        elif from_engine and "contiguous" in func:
            layout += sum(v[3] for v in from_engine)
        elif from_engine and func in (
            "<method 'mul_' of 'torch._C.TensorBase' objects>",
            "<method 'add_' of 'torch._C.TensorBase' objects>",
        ):
            gather += sum(v[3] for v in from_engine)
    other = total - forward - noise - index_add - layout - gather
    print(f"{arch}: cProfile of certify_batch (1 input, N0=100, N={n}, batch {batch}):")
    parts = {
        "forward (model call)": forward,
        "noise (NoiseSource.fill)": noise,
        "scale + add (mul_, add_)": gather,
        "channels_last copy (.contiguous)": layout,
        "counting (index_add_)": index_add,
        "rest of sample_counts": other,
    }
    print(
        table(
            ["part of sample_counts", "seconds", "share"],
            [[k, v, f"{100 * v / total:.1f}%"] for k, v in parts.items()],
        )
    )
    stats.sort_stats("tottime").print_stats(8)
    return {"arch": arch, "n": n, "batch": batch, "total": total, "parts": parts}


def op_latency(batch: int) -> dict:
    """Time of one memory-bound op on a batch of noisy CIFAR inputs (3 MB at batch 256), with
    torch's threads and with one: on a shared machine, every parallel op waits for its
    slowest thread, so each op of the sampling loop can cost far more than its memory."""
    t = torch.randn(batch, *SHAPE)
    out = torch.empty_like(t)
    threads = torch.get_num_threads()
    result = {}
    for n in sorted({threads, 1}, reverse=True):
        torch.set_num_threads(n)
        torch.mul(t, 2.0, out=out)
        samples = []
        for _ in range(30):
            start = time.perf_counter()
            torch.mul(t, 2.0, out=out)
            samples.append(time.perf_counter() - start)
        result[n] = 1e3 * median(samples)
    torch.set_num_threads(threads)
    print(
        f"one elementwise op on a ({batch}, 3, 32, 32) tensor: "
        + ", ".join(f"{ms:.2f} ms with {n} thread(s)" for n, ms in result.items())
    )
    return result


# ------------------------------------------------------------------ engines and precisions

ENGINE_ROWS = (
    ("onnxruntime", "fp32"),
    ("openvino", "fp32"),
    ("openvino", "bf16"),
    ("onnxruntime", "int8"),
    ("openvino", "int8"),
)


def engine_models(model, calibration: torch.Tensor, only: list[str] | None = None) -> dict:
    """The model run by each installed engine at each precision (ddrs's own runners); `only`:
    these rows (names "engine precision")."""
    from ddrs.core.experts import Experts
    from ddrs.models import model_fingerprint
    from ddrs.models.engines import installed, with_engine

    models = {"eager fp32": model}
    for engine, precision in ENGINE_ROWS:
        if only and f"{engine} {precision}" not in only:
            continue
        if installed(engine) and installed("onnxruntime"):
            experts = with_engine(
                Experts.of_model(model), engine, precision, SHAPE, model_fingerprint,
                lambda: calibration,
            )  # fmt: skip
            models[f"{engine} {precision}"] = experts[0].model
    if only and "eager fp32" not in only:
        del models["eager fp32"]
    return models


def engines_study(arch: str, n: int, inputs: int, batch: int, calibration, only=None) -> dict:
    """End to end at N = n: the reference loop, then ddrs with each engine and precision, one
    after the other on the same inputs (one run each: at N = 100,000 a ResNet-110 input takes
    minutes). Votes: each engine's certificates against eager fp32's."""
    torch.manual_seed(0)
    model = build_model(arch, NUM_CLASSES, SHAPE, CIFAR.mean, CIFAR.std).eval()
    reference = copy.deepcopy(model)
    xs = torch.rand(inputs, *SHAPE, generator=torch.Generator().manual_seed(7))
    models = engine_models(copy.deepcopy(model), calibration, only)
    print(f"\n{arch}: engines at N0=100, N={n}, {inputs} input(s), batch {batch}", flush=True)
    seconds, found = {}, {}
    start = time.perf_counter()
    reference_certify(reference, xs, 100, n, batch)
    seconds["reference loop"] = time.perf_counter() - start
    print(f"  reference loop: {seconds['reference loop']:.1f} s", flush=True)
    for name, m in models.items():
        smooth = Smooth(m, NUM_CLASSES, seed=0)
        smooth.certify_batch(xs[:1], SIGMA, 10, batch, ALPHA, batch)  # warm-up
        start = time.perf_counter()
        found[name] = ddrs_certify(smooth, xs, 100, n, batch)
        seconds[name] = time.perf_counter() - start
        print(f"  {name}: {seconds[name]:.1f} s", flush=True)
    base = found.get("eager fp32")
    rows = []
    for name, t in seconds.items():
        row = {"variant": name, "seconds": t, "speedup": seconds["reference loop"] / t}
        if name in found and base is not None:
            pairs = list(zip(found[name], base))
            row["same_class"] = float(np.mean([a.predict == b.predict for a, b in pairs]))
            row["largest_radius_change"] = max(abs(a.radius - b.radius) for a, b in pairs)
            row["count_change"] = max(abs(a.count - b.count) for a, b in pairs)
        rows.append(row)
    print(
        table(
            ["variant", "seconds", "x reference", "same class", "largest radius change",
             "largest change of nA"],
            [[r["variant"], f"{r['seconds']:.1f}", f"{r['speedup']:.2f}",
              f"{r.get('same_class', float('nan')):.0%}",
              f"{r.get('largest_radius_change', float('nan')):.4f}",
              r.get("count_change", "")] for r in rows],
        )
    )  # fmt: skip
    return {"arch": arch, "n": n, "inputs": inputs, "batch": batch, "rows": rows}


def calibration_images(data_root: str | None) -> torch.Tensor:
    """int8's calibration set as `ddrs` draws it: CIFAR-10 training images when a data root is
    given, else random images (throughput does not depend on them)."""
    if data_root:
        from ddrs.runs.source import calibration_images as drawn

        return drawn("cifar10", data_root)
    return torch.rand(256, *SHAPE, generator=torch.Generator().manual_seed(3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument(
        "--batch", type=int, default=256, help="batch of (a) and (b) (ddrs's default is 256)"
    )
    parser.add_argument("--archs", default="cnn,cifar_resnet110")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-study", action="store_true", help="skip the (b) variants study")
    parser.add_argument(
        "--engines", action="store_true",
        help="only the engines and precisions, end to end (ResNet-110, N 100,000, 1 input)",
    )  # fmt: skip
    parser.add_argument("--engines-n", type=int, default=100_000)
    parser.add_argument("--engines-inputs", type=int, default=1)
    parser.add_argument(
        "--engines-only", help='these rows besides the reference, e.g. "openvino int8,eager fp32"'
    )
    parser.add_argument("--data-root", help="CIFAR-10, for int8's calibration images")
    args = parser.parse_args()
    apply_threads(args)
    if args.engines:
        machine = print_machine("certify throughput: engines and precisions", args)
        monitor = LoadMonitor()
        study = engines_study(
            "cifar_resnet110", args.engines_n, args.engines_inputs, args.batch,
            calibration_images(args.data_root),
            args.engines_only.split(",") if args.engines_only else None,
        )  # fmt: skip
        save_json(args.json, {"machine": machine, "engines": study, "load": monitor.report()})
        return
    machine = print_machine(
        "certify throughput: reference (a) vs ddrs (b) vs bare forward (c)", args
    )
    q = args.quick
    rep = args.repeats
    settings = {
        "cnn": [
            Setting("cnn", "large N", 1, 100, 1_000 if q else 10_000, rep or 3),
            Setting("cnn", "small N", 8 if q else 32, 100, 100, rep or 3),
        ],
        "cifar_resnet110": [
            Setting("cifar_resnet110", "large N", 1, 100, 200 if q else 1_000, rep or 3),
            Setting("cifar_resnet110", "small N", 2 if q else 4, 100, 100, rep or 3),
        ],
    }
    candidates = {
        "cnn": (64, 256, 1000) if q else (64, 128, 256, 512, 1000),
        "cifar_resnet110": (128, 256) if q else (64, 256, 512, 1000),
    }
    calibrate = {"cnn": 500 if q else 3000, "cifar_resnet110": 256 if q else 1000}
    study = {"cnn": (400 if q else 2_000, 1 if q else 2), "cifar_resnet110": (900, 1)}
    study_batches = {"cnn": (64, 256, 1000), "cifar_resnet110": (256, 1000)}
    monitor = LoadMonitor()
    results = {
        "machine": machine,
        "args": vars(args),
        "compare": [],
        "study": [],
        "profile": [],
        "calibration": {},
    }
    results["op_latency_ms"] = op_latency(args.batch)
    for arch in args.archs.split(","):
        models = make_models(arch)
        c_batch, rates = best_batch(models[3], candidates[arch], calibrate[arch])
        print(
            f"{arch}: bare-forward throughput by batch (images/s): "
            + ", ".join(f"{bs}: {r:.0f}" for bs, r in rates.items())
            + f" -> (c) uses {c_batch}"
        )
        results["calibration"][arch] = {"rates": rates, "best": c_batch}
        for setting in settings[arch]:
            results["compare"].append(compare(setting, models, args.batch, c_batch))
        if not args.no_study and not (q and arch != "cnn"):
            results["study"].append(
                variants_study(arch, models, 1, study[arch][0], study_batches[arch], study[arch][1])
            )
        if not (q and arch != "cnn"):
            results["profile"].append(
                profile_ddrs(arch, models, 1_000 if arch == "cnn" else 300, args.batch)
            )

    print(
        "\n## (a) reference vs (b) ddrs vs (c) bare forward "
        "(ratios: medians of per-round time ratios)"
    )
    print(
        table(
            [
                "model",
                "setting",
                "inputs",
                "N0",
                "N",
                "(a) samples/s",
                "(b) samples/s",
                "(c) samples/s",
                "(a)/(b) time",
                "(b)/(c) time",
                "(b)/(c) at (b)'s batch",
                "spread a/b/c",
                "classes a=b",
            ],
            [
                [
                    r["arch"],
                    r["setting"],
                    r["inputs"],
                    r["n0"],
                    r["n"],
                    f"{r['rate_a']:.0f}",
                    f"{r['rate_b']:.0f}",
                    f"{r['rate_c']:.0f} (batch {r['c_batch']})",
                    f"{r['a_over_b']:.2f}",
                    f"{r['b_over_c']:.2f}",
                    f"{r['b_over_c_same_batch']:.2f}",
                    "/".join(r["spread"].values()),
                    f"{r['classes_agree_a_b']:.0%}",
                ]
                for r in results["compare"]
            ],
        )
    )
    for s in results["study"]:
        print(f"\n## (b) variants, {s['arch']}: 1 input, N0={s['n0']}, N={s['n']}")
        print(
            table(
                [
                    "batch",
                    "(b) channels_last samples/s",
                    "(b) contiguous samples/s",
                    "contiguous/channels_last time",
                    "(b)/(c) same batch",
                    "(b) time / (b) at batch 256",
                ],
                [
                    [
                        r["batch"],
                        f"{r['rate_cl']:.0f}",
                        f"{r['rate_plain']:.0f}",
                        f"{r['plain_over_cl']:.2f}",
                        f"{r['cl_over_bare']:.2f}",
                        f"{r['cl_over_cl256']:.2f}",
                    ]
                    for r in s["rows"]
                ],
            )
        )
    print("\n## targets")
    for r in results["compare"]:
        print(
            f"{r['arch']:>16s} {r['setting']:8s}: (b) within 10% of (c): "
            f"{'yes' if r['b_over_c'] <= 1.10 else 'NO'} ({r['b_over_c']:.2f}); "
            f"(b) faster than (a): {'yes' if r['a_over_b'] > 1 else 'NO'} "
            f"({r['a_over_b']:.2f}x)"
        )
    results["load"] = monitor.report()
    save_json(args.json, results)


if __name__ == "__main__":
    main()
