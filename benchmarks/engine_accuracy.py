"""What the engines, precisions, `--radius` and input-specific N do to a real certification:
the studies' Gaussian-trained CIFAR-10 model on the studies' 500 test images (every 20th),
certified by `ddrs certify` once per variant, one after the other.

Per variant: certified accuracy at r = 0.25 and 0.5, estimation samples per input, wall time,
and against eager fp32: inputs with the same answer (class and radius), the largest radius
change. `--radius R` rows answer "certified at R?" only, so they give certified accuracy at R.

    .venv/bin/python benchmarks/engine_accuracy.py \\
        --checkpoint runs/cifar10_routing/gaussian-fixed-0.25/last.pt --data-root data/cifar10 \\
        --out runs/bench/engine_accuracy
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from common import LoadMonitor, print_machine, save_json, table

from ddrs.cli import main as ddrs
from ddrs.results import read_table

VARIANTS = {
    "eager fp32": ["--engine", "eager"],
    "onnxruntime fp32": ["--engine", "onnxruntime"],
    "openvino fp32": ["--engine", "openvino"],
    "openvino bf16": ["--engine", "openvino", "--precision", "bf16"],
    "onnxruntime int8": ["--engine", "onnxruntime", "--precision", "int8"],
    "openvino int8": ["--engine", "openvino", "--precision", "int8"],
    "eager fp32 --pilot 1000": ["--engine", "eager", "--pilot", "1000"],
    "eager fp32 --radius 0.25": ["--engine", "eager", "--radius", "0.25"],
    "eager fp32 --radius 0.5": ["--engine", "eager", "--radius", "0.5"],
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-root", required=True)
    p.add_argument("--out", required=True, help="a folder for the results files")
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--skip", type=int, default=20)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names")
    p.add_argument("--json", metavar="OUT")
    return p.parse_args()


def certified(table_: dict, r: float) -> float:
    return float(np.mean((table_["correct"] == 1) & (table_["radius"] >= r)))


def main() -> None:
    args = parse_args()
    machine = print_machine("engines, precisions, --radius and --pilot on CIFAR-10", args)
    monitor = LoadMonitor()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, tables = [], {}
    for name in args.variants.split(","):
        path = out / (name.replace(" --", "-").replace(" ", "-") + ".tsv")
        counts = out / f"{path.stem}.counts.tsv"
        extra = VARIANTS[name]
        with_counts = [] if "--radius" in extra else ["--counts", str(counts)]
        start = time.perf_counter()
        code = ddrs(
            ["certify", "--checkpoint", args.checkpoint, "--dataset", "cifar10", "--data-root",
             args.data_root, "--sigma", str(args.sigma), "--n", str(args.n), "--skip",
             str(args.skip), "--no-progress", "--out", str(path), *with_counts, *extra]
        )  # fmt: skip
        seconds = time.perf_counter() - start
        if code not in (0, None):
            raise SystemExit(f"{name}: ddrs certify failed ({code})")
        t = read_table(path)
        samples = t["n"] if "n" in t else read_table(counts)["n"]
        tables[name] = t
        rows.append({"variant": name, "seconds": seconds, "samples": float(np.mean(samples))})
        print(f"{name}: {seconds:.0f} s", flush=True)
    base = tables.get("eager fp32")
    for row in rows:
        t = tables[row["variant"]]
        row["r=0.25"], row["r=0.5"] = certified(t, 0.25), certified(t, 0.5)
        if base is not None and "--radius" not in VARIANTS[row["variant"]]:
            same = (t["predict"] == base["predict"]) & np.isclose(t["radius"], base["radius"])
            row["same_answer"] = float(np.mean(same))
            row["largest_radius_change"] = float(np.max(np.abs(t["radius"] - base["radius"])))
    eager = rows[0]["seconds"] if rows and rows[0]["variant"] == "eager fp32" else None
    print(
        table(
            ["variant", "r=0.25", "r=0.5", "samples per input", "seconds",
             "time / eager fp32", "same answer as eager fp32", "largest radius change"],
            [[r["variant"], f"{100 * r['r=0.25']:.1f}", f"{100 * r['r=0.5']:.1f}",
              f"{r['samples']:.0f}", f"{r['seconds']:.0f}",
              f"{r['seconds'] / eager:.2f}" if eager else "",
              f"{100 * r['same_answer']:.1f}%" if "same_answer" in r else "",
              f"{r['largest_radius_change']:.4f}" if "same_answer" in r else ""]
             for r in rows],
        )
    )  # fmt: skip
    save_json(args.json, {"machine": machine, "rows": rows, "load": monitor.report()})


if __name__ == "__main__":
    main()
