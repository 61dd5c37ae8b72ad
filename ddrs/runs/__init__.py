"""Runs over a dataset that write results files, each spec beside its loop: certify.py
(`CertifyRun`, `certify_dataset`), predict.py, sigma.py (`SigmaRun` with the search's
settings), offline.py (a memory applied to a finished run; recertify); source.py: where the
model and the inputs come from; dataset.py: what every run shares; loop.py, progress.py and
shard.py: the loop, in one process or many.

Each run takes its specification, checked when built and the source of its resume settings,
so a call from Python validates and resumes exactly as the command line does. Rows already in
the results file (same settings) are skipped.
"""

from ddrs.core.experts import as_experts
from ddrs.runs.certify import CertifyRun, certify_dataset
from ddrs.runs.dataset import DatasetRun, SmoothingRun
from ddrs.runs.offline import apply_memory, recertify
from ddrs.runs.predict import PredictRun, predict_dataset
from ddrs.runs.sigma import SearchSettings, SigmaRun, sigma_dataset
from ddrs.runs.source import Models, ModelSource, load_router, open_memory

__all__ = [
    "CertifyRun",
    "DatasetRun",
    "ModelSource",
    "Models",
    "PredictRun",
    "SearchSettings",
    "SigmaRun",
    "SmoothingRun",
    "apply_memory",
    "as_experts",
    "certify_dataset",
    "load_router",
    "open_memory",
    "predict_dataset",
    "recertify",
    "sigma_dataset",
]
