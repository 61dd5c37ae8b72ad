"""Distributed training: the per-sample sigma merge, and a 2-process torchrun run on CPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ddrs.cli import main
from ddrs.launch import Rank
from ddrs.models import load_checkpoint
from ddrs.train.distributed import merge_sigma_buffer

REPO = Path(__file__).resolve().parents[1]
TRAIN_ARGS = [
    "train",
    "--dataset",
    "digits",
    "--arch",
    "cnn",
    "--sigma",
    "0.25",
    "--epochs",
    "2",
    "--batch",
    "64",
    "--data-dependent",
    "--dd-iterations",
    "1",
    "--dd-samples",
    "2",
    "--device",
    "cpu",
    "--no-progress",
]
DIGITS_TRAIN = 1437

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)


# -- merge_sigma_buffer across two real gloo processes ----------------------------------------
# rank 0 updates indices 0, 1, 2 and rank 1 updates 2, 3, 4 (index 2 is seen twice, like a
# DistributedSampler pad); nobody updates index 5.
UPDATES = {0: [0, 1, 2], 1: [2, 3, 4]}


def _merge_worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        info = Rank(rank, world, rank, "cpu")
        buffer = torch.full((6,), 0.25)
        updated = torch.zeros(6, dtype=torch.bool)
        buffer[UPDATES[rank]] = torch.tensor(UPDATES[rank], dtype=torch.float32) / 10 + rank
        updated[UPDATES[rank]] = True
        merged = merge_sigma_buffer(buffer, updated, info)
        seen = merge_sigma_buffer(updated.float(), updated, info) > 0
        torch.save({"merged": merged, "seen": seen}, os.path.join(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@needs_gloo
def test_merge_sigma_buffer_gives_each_index_one_writer(tmp_path):
    mp.spawn(_merge_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1)]
    expected = torch.tensor([0.0, 0.1, 0.2, 1.3, 1.4, 0.25])  # index 2: the lowest rank's value
    for result in results:
        assert torch.allclose(result["merged"], expected)
        assert result["seen"].tolist() == [True] * 5 + [False]


def test_merge_sigma_buffer_is_the_identity_in_one_process():
    buffer = torch.rand(4)
    assert merge_sigma_buffer(buffer, torch.ones(4, dtype=torch.bool), Rank()) is buffer


# -- end to end: torchrun with two CPU processes -----------------------------------------------
def _check_sigmas(out: Path, epochs: int = 2) -> None:
    payload = load_checkpoint(out / "last.pt").payload
    updates, sigma = payload["sigma_updates"], payload["sigma_buffer"]
    assert updates.shape == sigma.shape == (DIGITS_TRAIN,)
    assert bool((updates == epochs).all()), "every train index is updated once per epoch"
    assert bool(torch.isfinite(sigma).all()) and bool((sigma > 0).all())
    assert float((sigma != 0.25).float().mean()) > 0.5
    assert len((out / "log.csv").read_text().strip().splitlines()) == 1 + epochs  # one writer


@needs_gloo
@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("torch.distributed.run") is None,
    reason="torch.distributed.run is not available",
)
def test_torchrun_two_processes_update_every_sigma_once_per_epoch(tmp_path):
    out = tmp_path / "ddp"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "ddrs",
        *TRAIN_ARGS,
        "--out",
        str(out),
    ]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _check_sigmas(out)


@pytest.mark.slow
def test_single_process_run_has_the_same_update_semantics(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*TRAIN_ARGS, "--out", str(tmp_path / "single")]) == 0
    finally:
        torch.set_num_threads(threads)
    _check_sigmas(tmp_path / "single")
