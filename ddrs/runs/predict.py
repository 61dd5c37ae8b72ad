"""`ddrs predict` over a dataset: PREDICT every covered input (the binomial test on the top
two counts; abstain when it cannot tell), with one model or with experts along a routes file."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ddrs.core.cascade import Cascade
from ddrs.core.experts import Experts, as_experts
from ddrs.core.route import ExpertCertifier
from ddrs.core.smooth import DEFAULTS
from ddrs.launch import ONE_PROCESS, Rank
from ddrs.options import setting
from ddrs.results import NO_EXPERT, NORM_COLUMN, PREDICT_COLUMNS, ResultsWriter
from ddrs.runs.dataset import SmoothingRun
from ddrs.runs.loop import RowSource, group_size, stack, write_rows
from ddrs.runs.source import inputs_of


@dataclass(frozen=True, kw_only=True)
class PredictRun(SmoothingRun):
    """PREDICT every covered input."""

    n: int = setting(
        DEFAULTS.n,
        "noise samples per input (--num-samples under torchrun)",
        aliases=("--num-samples",),
    )
    alpha: float = setting(
        DEFAULTS.alpha, "bound on the probability of returning a wrong class (else abstain)"
    )

    def columns(self, experts: Experts) -> tuple[str, ...]:
        return PREDICT_COLUMNS + self.extra_columns(experts)

    def settings(self, experts: Experts, dataset) -> dict:
        return self.smoothing_settings("predict", experts, dataset)


def predict_dataset(
    model: nn.Module | Experts, dataset, run: PredictRun, *, rank: Rank = ONE_PROCESS
) -> str:
    """PREDICT every input `run` covers; rows `idx label predict correct time` (and the
    expert, for experts)."""
    experts = as_experts(model)
    dataset = inputs_of(dataset, experts)
    settings = run.settings(experts, dataset)
    routes = run.check(experts, dataset, settings)
    engine = {"seed": run.seed, "amp": run.amp, "compile": run.compile, "family": run.family}
    num_classes = dataset.info.num_classes
    cascade = Cascade(experts, num_classes, run.cascade, **engine) if routes is None else None
    certifier = cascade or ExpertCertifier(experts, num_classes, **engine)
    extra = run.extra_columns(experts)

    def answers_of(x, group) -> tuple[list[int], list[int], list[dict]]:
        """Each input's class, its expert, and the mode's extra columns."""
        if cascade is not None:
            found = cascade.certify_batch(
                x, n0=DEFAULTS.n0, n=run.n, alpha=run.alpha, batch=run.batch, keys=group
            )
            return (
                [c.predict for c in found],
                [c.expert for c in found],
                [
                    {
                        "level_radius": c.level_radius,
                        "guard_radius": c.guard_radius,
                        "levels": c.levels,
                    }
                    for c in found
                ],
            )
        expert = [routes[i][0] for i in group]
        sigma = torch.tensor([routes[i][1] for i in group], dtype=torch.float32)
        answers = certifier.predict_batch(x, expert, sigma, run.n, run.alpha, run.batch, group)
        return answers, expert, [{} for _ in group]

    def rows_of(group: list[int]) -> list[dict]:
        x, labels = stack(dataset, group)
        t0 = time.perf_counter()
        answers, expert, more = answers_of(x, group)
        elapsed = round((time.perf_counter() - t0) / len(group), 4)
        rows = [
            {
                "idx": idx,
                "label": label,
                "predict": answer,
                "correct": int(answer == label),
                "time": elapsed,
                **columns,
            }
            for idx, label, answer, columns in zip(group, labels, answers, more)
        ]
        if "expert" in extra:
            for row, k in zip(rows, expert):
                row["expert"] = experts[k].name if k >= 0 else NO_EXPERT
        if run.norm != "l2":
            for row in rows:
                row[NORM_COLUMN] = run.norm
        return rows

    columns = run.columns(experts)
    batch = certifier.batch_size(run.batch, dataset.info.input_shape)
    source = RowSource("predict", columns, group_size(run.n, batch), rows_of, dataset=dataset)
    write_rows(
        source,
        out=run.out,
        settings=settings,
        selected=run.indices(len(dataset)),
        open_outputs=lambda: ResultsWriter(run.out, columns, settings),
        progress=run.progress,
        rank=rank,
    )
    return run.out
