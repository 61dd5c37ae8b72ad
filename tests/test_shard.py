"""Sharded runs (`--nproc-per-node`, torchrun): equal to one process, and resumable after a
worker is killed. Two Gloo workers on CPU, digits."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from ddrs.cli import main
from ddrs.results import read_table
from ddrs.runs.shard import part_path, parts_dir

REPO = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()),
        reason="torch.distributed with the gloo backend is not available",
    ),
]


@pytest.fixture(scope="module")
def checkpoint(digits_checkpoint):
    return digits_checkpoint


def certify(ckpt, out, *extra):
    return [
        "certify",
        "--checkpoint",
        ckpt,
        "--dataset",
        "digits",
        "--device",
        "cpu",
        "--sigma",
        "0.4",
        "--n0",
        "20",
        "--num-samples",
        "300",
        "--alpha",
        "0.01",
        "--max-index",
        "30",
        "--batch",
        "64",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


def without_time(path) -> dict:
    table = read_table(path)
    return {c: v.tolist() for c, v in table.items() if c != "time"}


def memory_rows(path) -> list[tuple]:
    """Every stored column but the wall-clock timestamp, in entry order."""
    with sqlite3.connect(path) as conn:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(entries)")]
        keep = [c for c in columns if c not in ("created", "time", "timestamp")]
        assert len(keep) == len(columns) - 1, columns  # exactly the timestamp is dropped
        return conn.execute(f"SELECT {', '.join(keep)} FROM entries ORDER BY ord").fetchall()


def test_two_workers_with_a_memory_equal_one_process(checkpoint, tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    for folder, extra in ((one, []), (two, ["--nproc-per-node", "2"])):
        args = certify(
            checkpoint,
            folder / "cert.tsv",
            "--memory",
            str(folder / "mem.sqlite"),
            "--counts",
            str(folder / "counts.tsv"),
            *extra,
        )
        assert main(args) == 0
    assert "certified accuracy (30 inputs)" in capsys.readouterr().out
    assert without_time(one / "cert.tsv") == without_time(two / "cert.tsv")
    assert (one / "counts.tsv").read_text() == (two / "counts.tsv").read_text()
    assert memory_rows(one / "mem.sqlite") == memory_rows(two / "mem.sqlite")
    assert len(memory_rows(two / "mem.sqlite")) == 30
    assert not parts_dir(two / "cert.tsv").exists(), "part files are removed once merged"
    assert main(["memory", "check", str(two / "mem.sqlite")]) == 0


def test_predict_in_three_workers_equals_one_process(checkpoint, tmp_path):
    base = [
        "predict",
        "--checkpoint",
        checkpoint,
        "--dataset",
        "digits",
        "--device",
        "cpu",
        "--sigma",
        "0.5",
        "--n",
        "200",
        "--alpha",
        "0.01",
        "--max",
        "25",
        "--no-progress",
    ]
    assert main([*base, "--out", str(tmp_path / "one.tsv")]) == 0
    assert main([*base, "--out", str(tmp_path / "three.tsv"), "--nproc-per-node", "3"]) == 0
    assert without_time(tmp_path / "one.tsv") == without_time(tmp_path / "three.tsv")


def test_routing_among_experts_in_two_workers_equals_one_process(checkpoint, tmp_path):
    """Routes (`sigma --expert`), certification through them with a memory, and dual
    smoothing: each equal to one process when split over two workers."""
    from ddrs.core.experts import Expert, Experts
    from ddrs.models import load_checkpoint
    from ddrs.train.config import TrainConfig
    from ddrs.train.router import train_router

    model = load_checkpoint(checkpoint).model
    experts = Experts(tuple(Expert(f"{s:g}", checkpoint, s, model) for s in (0.12, 0.5)))
    router = train_router(
        experts,
        TrainConfig(
            dataset="digits",
            arch="cnn",
            sigma=0.25,
            epochs=1,
            batch=32,
            eval_max=None,
            progress=False,
            out=str(tmp_path / "router"),
        ),
        list(range(0, 400, 4)),
        samples=8,
        n=300,
        alpha=0.01,
    )
    two = ["--expert", f"0.12={checkpoint}:0.12", "--expert", f"0.5={checkpoint}:0.5"]
    common = [
        *two,
        "--dataset",
        "digits",
        "--device",
        "cpu",
        "--max-index",
        "20",
        "--num-samples",
        "300",
        "--alpha",
        "0.01",
        "--batch",
        "64",
        "--no-progress",
    ]
    for folder, extra in ((tmp_path / "one", []), (tmp_path / "two", ["--nproc-per-node", "2"])):
        folder.mkdir()
        assert (
            main(["sigma", *common, "--samples", "8", "--out", str(folder / "routes.tsv"), *extra])
            == 0
        )
        assert (
            main(
                [
                    "certify",
                    *common,
                    "--n0",
                    "20",
                    "--sigmas",
                    str(folder / "routes.tsv"),
                    "--memory",
                    str(folder / "m.sqlite"),
                    "--out",
                    str(folder / "cert.tsv"),
                    *extra,
                ]
            )
            == 0
        )
        assert (
            main(
                [
                    "certify",
                    *common,
                    "--n0",
                    "20",
                    "--router",
                    str(router),
                    "--router-n",
                    "200",
                    "--out",
                    str(folder / "dual.tsv"),
                    *extra,
                ]
            )
            == 0
        )
    for name in ("routes.tsv", "cert.tsv", "dual.tsv"):
        assert without_time(tmp_path / "one" / name) == without_time(tmp_path / "two" / name)
    assert memory_rows(tmp_path / "one" / "m.sqlite") == memory_rows(tmp_path / "two" / "m.sqlite")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def test_the_documented_two_machine_torchrun_command_equals_one_process(checkpoint, tmp_path):
    """README's multi-machine command, as written (static rendezvous, long spellings torchrun
    does not claim), as two 'machines' on this one, each in its own folder: no shared file
    system. Node 1 starts first, and still the machine given --node-rank 0 writes the file."""
    sigma = [
        "sigma",
        "--checkpoint",
        checkpoint,
        "--dataset",
        "digits",
        "--device",
        "cpu",
        "--sigma0",
        "0.25",
        "--num-samples",
        "500",
        "--alpha",
        "0.01",
        "--max-index",
        "24",
        "--batch",
        "128",
        "--no-progress",
        "--out",
        "sigmas.tsv",
    ]
    (tmp_path / "single").mkdir()
    assert main([*sigma[:-1], str(tmp_path / "single" / "sigmas.tsv")]) == 0
    port = str(_free_port())
    nodes = []
    for node in (1, 0):
        folder = tmp_path / f"node{node}"
        folder.mkdir()
        command = [
            "torchrun",
            "--nnodes",
            "2",
            "--node-rank",
            str(node),
            "--nproc-per-node",
            "1",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            port,
            "-m",
            "ddrs",
            *sigma,
        ]
        command[0:1] = [sys.executable, "-m", "torch.distributed.run"]  # torchrun, this Python
        nodes.append(
            subprocess.Popen(
                command,
                cwd=folder,
                env=_env(),
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
        if node == 1:
            time.sleep(3)  # node 1 is waiting for the rendezvous before node 0 exists
    for process in nodes:
        output, _ = process.communicate(timeout=240)
        assert process.returncode == 0, output[-3000:]
    merged = tmp_path / "node0" / "sigmas.tsv"
    assert without_time(merged) == without_time(tmp_path / "single" / "sigmas.tsv")
    assert not (tmp_path / "node1" / "sigmas.tsv").exists(), "only rank 0 writes the results"
    assert not parts_dir(tmp_path / "node1" / "sigmas.tsv").exists()


def _writer_of(path: Path) -> int | None:
    """The process holding `path` open (the worker writing that part file)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) == str(path) for fd in (entry / "fd").iterdir()):
                return int(entry.name)
        except OSError:
            continue
    return None


def _rows(path: Path) -> int:
    return max(0, len(path.read_text().splitlines()) - 1) if path.exists() else 0


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("victim, resume_workers", [(0, 2), (1, 1)])
def test_a_killed_worker_resumes_to_the_one_process_run(
    checkpoint, tmp_path, victim, resume_workers
):
    args = certify(
        checkpoint,
        tmp_path / "cert.tsv",
        "--memory",
        str(tmp_path / "mem.sqlite"),
        "--nproc-per-node",
        "2",
    )
    args[args.index("--num-samples") + 1] = "4000"  # slow enough to be caught mid-run
    args[args.index("--batch") + 1] = "256"
    run = subprocess.Popen(
        [sys.executable, "-m", "ddrs", *args],
        cwd=tmp_path,
        text=True,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    part = part_path(tmp_path / "cert.tsv", victim)
    deadline = time.monotonic() + 120
    while _rows(part) < 3 and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.02)
    pid = _writer_of(part)
    assert pid is not None and run.poll() is None, "the run ended before the kill"
    os.kill(pid, signal.SIGKILL)
    output, _ = run.communicate(timeout=120)
    assert run.returncode != 0, output
    assert "Traceback" not in output
    kept = read_table(part, drop_torn_line=True)
    kept_times = dict(zip(kept["idx"].tolist(), kept["time"].tolist()))
    assert 3 <= len(kept_times) < 15

    resume = args if resume_workers == 2 else args[: args.index("--nproc-per-node")]
    done = subprocess.run(
        [sys.executable, "-m", "ddrs", *resume],
        cwd=tmp_path,
        text=True,
        env=_env(),
        capture_output=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    single = tmp_path / "single"
    assert (
        main(
            certify(
                checkpoint,
                single / "cert.tsv",
                "--memory",
                str(single / "mem.sqlite"),
                "--num-samples",
                "4000",
                "--batch",
                "256",
            )
        )
        == 0
    )
    assert without_time(tmp_path / "cert.tsv") == without_time(single / "cert.tsv")
    assert memory_rows(tmp_path / "mem.sqlite") == memory_rows(single / "mem.sqlite")
    resumed = read_table(tmp_path / "cert.tsv")
    times = dict(zip(resumed["idx"].tolist(), resumed["time"].tolist()))
    assert all(times[idx] == t for idx, t in kept_times.items()), "finished rows were reused"
    assert not parts_dir(tmp_path / "cert.tsv").exists()


def test_errors_of_a_sharded_run_are_one_line(checkpoint, tmp_path, capsys):
    out = tmp_path / "cert.tsv"
    assert main(certify(checkpoint, out, "--nproc-per-node", "0")) == 2
    assert "--nproc-per-node must be an integer >= 1" in capsys.readouterr().err
    assert not out.exists()
    assert main(certify(checkpoint, out, "--max-index", "6")) == 0
    capsys.readouterr()
    resumed = certify(checkpoint, out, "--max-index", "6", "--nproc-per-node", "2")
    resumed[resumed.index("--sigma") + 1] = "0.3"
    done = subprocess.run(
        [sys.executable, "-m", "ddrs", *resumed],
        cwd=tmp_path,
        text=True,
        env=_env(),
        capture_output=True,
        timeout=240,
    )
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("ddrs: error: refusing to append"), lines
