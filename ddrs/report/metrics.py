"""The numbers of results files: certified accuracy, ACR, abstention, the memory's changes,
expert shares, the envelope of fixed-sigma runs and the paired sign test against it."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddrs.errors import InputError
from ddrs.results import REFERENCE_COLUMNS, read_table

ENVELOPE_LABEL = "envelope (best over runs)"
SHRINK_TOLERANCE = 1e-12
MAX_RADII = 1000


def certified_accuracy(table: dict[str, np.ndarray], radius: float) -> float:
    """Fraction of inputs predicted correctly with a certified radius >= `radius`."""
    if len(table["idx"]) == 0:
        return float("nan")
    return float(np.mean((table["correct"] == 1) & (table["radius"] >= radius)))


def average_certified_radius(table: dict[str, np.ndarray]) -> float:
    """ACR: mean over inputs of radius x correct (abstentions and errors count as 0)."""
    if len(table["idx"]) == 0:
        return float("nan")
    return float(np.mean(table["radius"] * (table["correct"] == 1)))


def summarize(table: dict[str, np.ndarray], radii) -> dict[str, float]:
    summary = {f"r={r:g}": certified_accuracy(table, r) for r in radii}
    summary["ACR"] = average_certified_radius(table)
    summary["abstain"] = float(np.mean(table["predict"] == -1)) if len(table["idx"]) else 0.0
    return summary


def summary_line(path, radii=(0.0, 0.25, 0.5, 0.75, 1.0)) -> str:
    table = read_table(path, required=REFERENCE_COLUMNS)
    parts = [f"certified accuracy ({len(table['idx'])} inputs):"]
    parts += [f"{k} {v:.3f}" for k, v in summarize(table, radii).items()]
    return "  ".join(parts)


@dataclass
class Run:
    """One results file, read once."""

    label: str
    path: Path
    table: dict[str, np.ndarray]

    @property
    def size(self) -> int:
        return len(self.table["idx"])

    @property
    def is_memory_run(self) -> bool:
        return "mc_predict" in self.table and "mc_radius" in self.table

    def varying_sigmas(self) -> np.ndarray | None:
        """The per-input sigmas, or None without a sigma column or with a constant one."""
        sigma = self.table.get("sigma")
        if sigma is None or len(sigma) == 0 or np.all(sigma == sigma[0]):
            return None
        return sigma


def load_runs(paths: Sequence[str | os.PathLike], labels: Sequence[str] | None = None) -> list[Run]:
    """Read each results file; labels default to the file names without extension."""
    if labels is not None and len(labels) != len(paths):
        raise InputError(f"--labels: got {len(labels)} label(s) for {len(paths)} run(s)")
    if labels is None:
        labels = [Path(p).stem for p in paths]
    return [
        Run(label, Path(p), read_table(p, required=REFERENCE_COLUMNS))
        for label, p in zip(labels, paths)
    ]


def idx_mismatch(runs: Sequence[Run]) -> str | None:
    """A one-line description of how the runs' input sets differ, or None if they agree."""
    sets = [set(r.table["idx"].tolist()) for r in runs]
    if len(runs) < 2 or all(s == sets[0] for s in sets):
        return None
    common = set.intersection(*sets)
    sizes = ", ".join(f"{r.label}: {len(s)}" for r, s in zip(runs, sets))
    return f"the runs cover different inputs ({sizes}; {len(common)} in common)"


def restrict_to_common(runs: Sequence[Run]) -> list[Run]:
    """The runs restricted to the inputs (idx) that all of them certified."""
    common = set.intersection(*(set(r.table["idx"].tolist()) for r in runs))
    out = []
    for run in runs:
        keep = np.isin(run.table["idx"], sorted(common))
        out.append(Run(run.label, run.path, {k: v[keep] for k, v in run.table.items()}))
    return out


def parse_radii(text: str) -> list[float]:
    """'start:stop:step' (stop included when it lands on the grid) or '0,0.5,1'; sorted."""
    try:
        if ":" in text:
            radii = _radius_range(*(float(v) for v in text.split(":")))
        else:
            radii = [float(v) for v in text.split(",")]
    except (TypeError, ValueError):
        raise InputError(
            f"--radii {text!r}: expected start:stop:step (e.g. 0:1:0.25) or a comma list"
        ) from None
    if not all(math.isfinite(r) and r >= 0 for r in radii):
        raise InputError(f"--radii {text!r}: radii must be finite and >= 0")
    return sorted(set(radii))


def _radius_range(start: float, stop: float, step: float) -> list[float]:
    if not all(map(math.isfinite, (start, stop, step))) or not step > 0 or not stop >= start:
        raise InputError(f"radii {start:g}:{stop:g}:{step:g}: need step > 0 and stop >= start")
    count = math.floor((stop - start) / step + 1e-9) + 1  # tolerance: 0:1:0.1 includes 1
    if count > MAX_RADII:
        raise InputError(f"radii {start:g}:{stop:g}:{step:g}: {count} radii, at most {MAX_RADII}")
    return [round(start + i * step, 12) for i in range(count)]


def run_summary(run: Run, radii: Sequence[float]) -> dict:
    """Numbers of one run. Accuracies are fractions (NaN for an empty run); memory and sigma
    entries are None when the run has no such columns."""
    t = run.table
    summary: dict = {
        "label": run.label,
        "inputs": run.size,
        "clean": certified_accuracy(t, 0.0),
        "certified": {float(r): certified_accuracy(t, r) for r in radii},
        "ACR": average_certified_radius(t),
        "abstain": float(np.mean(t["predict"] == -1)) if run.size else float("nan"),
        "changed": None,
        "shrunk": None,
        "sigma_min": None,
        "sigma_median": None,
        "sigma_max": None,
        "experts": expert_shares(t),
    }
    if run.is_memory_run:
        same = t["predict"] == t["mc_predict"]
        summary["changed"] = int(np.sum(~same))
        summary["shrunk"] = int(np.sum(same & (t["radius"] < t["mc_radius"] - SHRINK_TOLERANCE)))
    sigmas = run.varying_sigmas()
    if sigmas is not None:
        summary["sigma_min"] = float(np.min(sigmas))
        summary["sigma_median"] = float(np.median(sigmas))
        summary["sigma_max"] = float(np.max(sigmas))
    return summary


def expert_shares(table: dict[str, np.ndarray]) -> dict[str, float] | None:
    """{expert: share of the inputs it answered} of a run with an expert column (a router's
    abstentions count as "-"), or None."""
    experts = table.get("expert")
    if experts is None or len(experts) == 0:
        return None
    names, counts = np.unique(experts.astype(str), return_counts=True)
    return {str(n): float(k) / len(experts) for n, k in zip(names, counts)}


def sign_test(a: dict[str, np.ndarray], b: dict[str, np.ndarray], radius: float):
    """Paired comparison of two runs at `radius` on the inputs both cover: (inputs only a
    certifies correctly at >= radius, inputs only b does, two-sided sign-test p-value)."""
    common = np.intersect1d(a["idx"], b["idx"])

    def certified(t):
        keep = np.isin(t["idx"], common)
        order = np.argsort(t["idx"][keep])
        ok = (t["correct"][keep] == 1) & (t["radius"][keep] >= radius)
        return ok[order]

    ok_a, ok_b = certified(a), certified(b)
    a_only, b_only = int(np.sum(ok_a & ~ok_b)), int(np.sum(ok_b & ~ok_a))
    if a_only + b_only == 0:
        return a_only, b_only, 1.0
    from scipy.stats import binomtest

    return a_only, b_only, float(binomtest(a_only, a_only + b_only, 0.5).pvalue)


SIGNIFICANCE = 0.05


def versus_envelope(run: Run, fixed: Sequence[Run], radius: float) -> dict:
    """`run` against the envelope at `radius`: the fixed run with the best certified accuracy
    there. The difference in points, and the paired sign test on the inputs both cover."""
    best = max(fixed, key=lambda f: certified_accuracy(f.table, radius))
    only_run, only_best, p = sign_test(run.table, best.table, radius)
    delta = certified_accuracy(run.table, radius) - certified_accuracy(best.table, radius)
    return {
        "delta": round(100 * delta, 9),  # 5 images of 500 are -1.0 points, not -1.0000000000000009
        "only_run": only_run,
        "only_envelope": only_best,
        "p": p,
        "envelope_run": best.label,
    }


def significant_claims(
    runs: Sequence[Run], fixed: Sequence[Run], radii: Sequence[float], level: float = SIGNIFICANCE
) -> str:
    """The differences to the envelope that the sign test finds significant, in words: the
    only ones a reader should take as results (the others may change with the CPU)."""
    claims = []
    for run in runs:
        above, below = [], []
        for r in radii:
            c = versus_envelope(run, fixed, r)
            if c["p"] < level:
                where = "clean" if r == 0 else f"r={r:g}"
                (above if c["delta"] > 0 else below).append(f"{where} ({c['delta']:+.1f})")
        if above:
            claims.append(f"{run.label} above the envelope at {', '.join(above)}")
        if below:
            claims.append(f"{run.label} below it at {', '.join(below)}")
    found = "; ".join(claims) if claims else "none"
    return (
        f"Significant at p < {level:g} (two-sided sign test): {found}. Every other "
        "difference is not significant."
    )


def envelope_summary(summaries: Sequence[dict], radii: Sequence[float]) -> dict:
    """Best value over runs at each radius (and the best ACR); other entries are None."""
    return {
        "label": ENVELOPE_LABEL,
        "inputs": None,
        "clean": _nanmax(s["clean"] for s in summaries),
        "certified": {
            float(r): _nanmax(s["certified"][float(r)] for s in summaries) for r in radii
        },
        "ACR": _nanmax(s["ACR"] for s in summaries),
        "abstain": None,
        "changed": None,
        "shrunk": None,
        "sigma_min": None,
        "sigma_median": None,
        "sigma_max": None,
        "experts": None,
    }


def _nanmax(values) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return max(finite) if finite else float("nan")
