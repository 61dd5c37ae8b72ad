"""The memory on both stores (SQLite, PostgreSQL): the rule equals the in-RAM reference, the
index prunes exactly, concurrent writers keep the invariant, copies are exact, and the
command line takes a postgresql:// URL wherever it takes a memory file."""

from __future__ import annotations

import multiprocessing
import sqlite3

import numpy as np
import pytest
import torch
from test_memory import Ram

from ddrs.cli import main
from ddrs.errors import MemoryStoreError
from ddrs.memory import CertificationMemory, copy_memory
from ddrs.memory.store import ENTRY_COLUMNS

SHAPE = (3, 4, 4)


@pytest.fixture(params=["sqlite", "postgres"])
def location(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "m.sqlite")
    return request.getfixturevalue("pg_url")


def random_queries(seed: int, count: int, shape=SHAPE):
    """Inputs in clusters (so that balls meet), exact repeats, abstentions, near-copies."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(6, *shape, generator=g)
    queries = []
    for k in range(count):
        if k > 5 and k % 9 == 0:
            x, c = queries[k // 3][0], k % 4 - 1  # an exact repeat of an earlier input
            r = 0.0 if c == -1 else 0.3
        else:
            centre = centres[int(torch.randint(0, 6, (1,), generator=g))]
            x = (centre + 0.15 * torch.randn(*shape, generator=g)).clamp(0, 1)
            c = int(torch.randint(-1, 4, (1,), generator=g))
            r = 0.0 if c == -1 else float(torch.rand(1, generator=g)) * 0.6
        queries.append((x, c, r))
    return queries


@pytest.mark.parametrize("cache_bytes", [1 << 30, 0])
def test_the_rule_on_each_store_equals_the_reference(location, cache_bytes):
    """The store's answers (index of candidates, or a scan without one) are those of the rule
    applied to all earlier entries."""
    reference = Ram(SHAPE)
    with CertificationMemory(location, "fp", SHAPE, cache_bytes=cache_bytes) as memory:
        for x, c, r in random_queries(0, 150):
            answer = memory.resolve_and_store(x, c, r, sigma=0.25)
            expected_c, expected_r, _, repeat = reference.add(x, c, r)
            assert (answer.predict, answer.radius, answer.repeat) == (
                expected_c,
                expected_r,
                repeat,
            )
        assert memory.check() == [] and memory.corrupt_entries() == []
        assert len(memory) == len(reference.x)


def test_the_index_skips_most_entries_and_misses_no_conflict():
    from ddrs.memory.index import Index
    from ddrs.memory.rule import distances

    g = torch.Generator().manual_seed(1)
    index = Index(48)
    centres = torch.rand(30, 48, generator=g)  # inputs in clusters, as images are
    x = (centres[torch.arange(3000) % 30] + 0.05 * torch.randn(3000, 48, generator=g)).clamp(0, 1)
    c = torch.randint(0, 5, (3000,), generator=g)
    r = torch.rand(3000, generator=g, dtype=torch.float64) * 0.4
    for lo in range(0, 3000, 700):  # appended in pieces, as a memory grows
        index.append(
            x[lo : lo + 700],
            c[lo : lo + 700],
            r[lo : lo + 700],
            torch.full((len(x[lo : lo + 700]),), 0.25, dtype=torch.float64),
            torch.arange(lo, min(lo + 700, 3000)),
        )
    pruned = []
    queries = (centres[torch.arange(40) % 30] + 0.05 * torch.randn(40, 48, generator=g)).clamp(0, 1)
    for q in queries:
        for predict, radius in ((0, 0.3), (-1, 0.0), (3, 1.0)):
            kept = set(index.candidates(q, predict, radius).tolist())
            d = distances(q, x)
            conflicts = torch.nonzero((c != predict) & (d < r + radius)).flatten().tolist()
            assert set(conflicts) <= kept  # exact: every conflict is a candidate
            pruned.append(1 - len(kept) / 3000)
    assert np.median(pruned) > 0.5  # and most entries were never compared


def worker(location: str, seed: int, count: int) -> None:
    with CertificationMemory(location, "fp", SHAPE) as memory:
        for x, c, r in random_queries(seed, count):
            memory.resolve_and_store(x, c, r, sigma=0.25, idx=seed * 1000 + len(memory))


def test_three_writer_processes_on_postgres_keep_the_invariant(pg_url):
    with CertificationMemory(pg_url, "fp", SHAPE):
        pass
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=worker, args=(pg_url, seed, 60)) for seed in (1, 2, 3)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=600)
        assert p.exitcode == 0
    with CertificationMemory.open_existing(pg_url) as memory:
        assert memory.check() == [] and memory.corrupt_entries() == []
        orders = [int(o) for chunk in memory.entries() for o in chunk[4]]
        assert orders == list(range(len(orders))) and len(orders) > 150  # no gap, no twin


def _entries(location: str) -> list[tuple]:
    with CertificationMemory.open_existing(location) as memory:
        return [row for rows in memory.store.rows(ENTRY_COLUMNS[1:], 0, None, 1000) for row in rows]


def test_copy_sqlite_to_postgres_and_back_is_exact(pg_url, tmp_path):
    source = str(tmp_path / "a.sqlite")
    with CertificationMemory(source, "fp", SHAPE) as memory:
        for x, c, r in random_queries(4, 60):
            memory.resolve_and_store(x, c, r, sigma=0.25, idx=len(memory))
    assert copy_memory(source, pg_url) == len(_entries(source))
    back = str(tmp_path / "back.sqlite")
    assert main(["memory", "copy", pg_url, back]) == 0
    assert _entries(source) == _entries(pg_url) == _entries(back)
    with pytest.raises(MemoryStoreError, match="already holds a memory"):
        copy_memory(source, pg_url)
    with sqlite3.connect(back) as conn:  # a corrupt entry stops the copy
        conn.execute("UPDATE entries SET radius = radius + 1 WHERE ord = 5")
    with pytest.raises(MemoryStoreError, match="entry 5 does not match its checksum"):
        copy_memory(back, str(tmp_path / "again.sqlite"))


def test_the_command_line_takes_a_url_for_a_memory(pg_url, digits_checkpoint, tmp_path, capsys):
    base = [
        "certify",
        "--checkpoint",
        digits_checkpoint,
        "--dataset",
        "digits",
        "--sigma",
        "0.3",
        "--n0",
        "20",
        "--n",
        "200",
        "--alpha",
        "0.01",
        "--max",
        "12",
        "--no-progress",
    ]
    assert main([*base, "--memory", pg_url, "--out", str(tmp_path / "a.tsv")]) == 0
    assert (
        main([*base, "--memory", str(tmp_path / "m.sqlite"), "--out", str(tmp_path / "b.tsv")]) == 0
    )
    assert (tmp_path / "a.tsv").read_text().split("\n")[1:] and [
        line.split("\t")[:5] for line in (tmp_path / "a.tsv").read_text().splitlines()
    ] == [line.split("\t")[:5] for line in (tmp_path / "b.tsv").read_text().splitlines()]
    base[base.index("--max") + 1] = "20"  # resumes against the database
    assert main([*base, "--memory", pg_url, "--out", str(tmp_path / "a.tsv")]) == 0
    capsys.readouterr()
    assert main(["memory", "stats", pg_url]) == 0
    assert "20 entries" in capsys.readouterr().out
    assert main(["memory", "check", pg_url]) == 0
    other = pg_url.replace("@", ":secret@")  # a URL's password is never printed
    assert main(["memory", "stats", other]) == 0 and "secret" not in capsys.readouterr().out


def test_a_memory_of_another_model_is_refused_on_postgres(pg_url):
    with CertificationMemory(pg_url, "model A", SHAPE):
        pass
    with pytest.raises(MemoryStoreError, match="another model"):
        CertificationMemory(pg_url, "model B", SHAPE)
    with pytest.raises(MemoryStoreError, match="shape"):
        CertificationMemory(pg_url, "model A", (1, 8, 8))
