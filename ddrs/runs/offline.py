"""Runs from finished files: a certify run resolved against a memory offline, in index order;
certificates recomputed from a counts file at another alpha, without sampling."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ddrs.core.checks import check_alpha
from ddrs.core.experts import Experts, as_experts
from ddrs.core.families import noise_family
from ddrs.core.smooth import certificate_from_counts
from ddrs.errors import ResultsFileError
from ddrs.memory.store import shown_location
from ddrs.models import model_fingerprint
from ddrs.results import (
    CERTIFY_COLUMNS,
    COUNTS_COLUMNS,
    MEMORY_COLUMNS,
    ResultsWriter,
    file_digest,
    read_settings,
    read_table,
)
from ddrs.runs.certify import resolved_row
from ddrs.runs.progress import progress_bar
from ddrs.runs.source import open_memory


def apply_memory(
    results: str,
    model: nn.Module | Experts,
    dataset,
    out: str,
    memory: str,
    progress: bool = True,
) -> str:
    """Resolve a finished certify run against a memory, offline, in dataset-index order;
    rows in MEMORY_COLUMNS. Resumable when `memory` is a file."""
    table = read_table(results, required=("idx", "label", "predict", "radius", "sigma"))
    if memory == ":memory:" and Path(out).exists():
        raise ResultsFileError(
            f"{out} exists; an in-RAM memory cannot resume it. Pass --memory FILE to make the "
            "run resumable, or choose another --out"
        )
    mc_predict = table.get("mc_predict", table["predict"])
    mc_radius = table.get("mc_radius", table["radius"])
    seconds = table["time"] if "time" in table else [0.0] * len(table["idx"])
    experts = as_experts(model)
    norm = read_settings(results).get("norm", "l2")  # the results' radii, and the balls
    settings = {
        "command": "memory apply",
        "results": str(results),
        "results_sha256": file_digest(results),
        "memory": shown_location(memory),
        "model": model_fingerprint(experts[0].model)[:16],
        "dataset": dataset.info.name,
        "split": dataset.split,
        "norm": norm,
    }
    with (
        open_memory(memory, experts, dataset, norm) as store,
        ResultsWriter(out, MEMORY_COLUMNS, settings) as writer,
    ):
        order = table["idx"].argsort(kind="stable").tolist()
        bar = progress_bar(len(order), "memory apply", progress)
        for row in order:
            idx = int(table["idx"][row])
            bar.update(1)
            if idx in writer.done:
                continue
            x, label, _ = dataset[idx]
            if int(label) != int(table["label"][row]):
                raise ResultsFileError(
                    f"{results}: idx {idx} has label {int(table['label'][row])}, the dataset "
                    f"says {int(label)} — wrong dataset or split?"
                )
            writer.write(
                resolved_row(
                    store,
                    x,
                    idx,
                    int(label),
                    int(mc_predict[row]),
                    float(mc_radius[row]),
                    float(table["sigma"][row]),
                    float(seconds[row]),
                )
            )
        bar.close()
    return out


def recertify(counts: str, out: str, alpha: float) -> str:
    """CERTIFY's answers recomputed from a counts file at another `alpha`; rows in the certify
    format (`idx label predict radius correct sigma time`, time 0). The counts do not depend
    on alpha, so this equals a run at that alpha with the same seed and inputs."""
    alpha = check_alpha(alpha)
    recorded = read_settings(counts)
    noise = {"norm": recorded.get("norm", "l2"), "noise": recorded.get("noise", "float")}
    family = noise_family(**noise)
    table = read_table(counts)
    if "count" not in table and "radius" in table:
        raise ResultsFileError(
            f"{counts} is a results file; recertify reads the counts file that `ddrs certify "
            "... --counts FILE` writes beside it (re-run that certify with --counts)"
        )
    table = read_table(counts, required=COUNTS_COLUMNS)
    rows = []
    for k in range(len(table["idx"])):
        cert = certificate_from_counts(
            int(table["selected"][k]),
            int(table["count"][k]),
            int(table["n"][k]),
            alpha,
            float(table["sigma"][k]),
            family=family,
        )
        label = int(table["label"][k])
        rows.append(
            {
                "idx": int(table["idx"][k]),
                "label": label,
                "predict": cert.predict,
                "radius": cert.radius,
                "correct": int(cert.predict == label),
                "sigma": float(table["sigma"][k]),
                "time": 0.0,
            }
        )
    settings = {"recertify": str(counts), "alpha": alpha, **noise}
    with ResultsWriter(out, CERTIFY_COLUMNS, settings) as writer:
        for row in rows:
            if row["idx"] not in writer.done:
                writer.write(row)
    return out
