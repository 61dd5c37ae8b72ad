"""Tests of the memory-enhanced certification rule and its SQLite store (ddrs.memory)."""

from __future__ import annotations

import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import rule_oracle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ddrs
from ddrs.errors import InputError, MemoryStoreError
from ddrs.memory import TOLERANCE, Answer, CertificationMemory, entry_checksum
from ddrs.memory.rule import find_repeat, resolve

REPO = Path(ddrs.__file__).resolve().parents[1]
HIGH = (3, 8, 8)


Tensor = torch.Tensor


def point(*v: float) -> Tensor:
    return torch.tensor([float(a) for a in v])


class Ram:
    """An in-RAM memory driven by the pure rule over *all* entries (the reference for the
    stores, whose index hands the rule only the candidates)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.x = torch.empty(0, *shape)
        self.c = torch.empty(0, dtype=torch.long)
        self.r = torch.empty(0, dtype=torch.float64)

    def add(self, x: Tensor, c: int, r: float) -> tuple[int, float, int | None, bool]:
        j = find_repeat(x, self.x)
        if j is not None:
            return int(self.c[j]), float(self.r[j]), j, True
        new_c, new_r, j = resolve(x, c, r, self.x, self.c, self.r)
        self.x = torch.cat([self.x, x.float()[None]])
        self.c = torch.cat([self.c, torch.tensor([new_c])])
        self.r = torch.cat([self.r, torch.tensor([new_r], dtype=torch.float64)])
        return new_c, new_r, j, False


def stored(mem: CertificationMemory) -> tuple[Tensor, Tensor, Tensor]:
    chunks = list(mem.entries())
    if not chunks:
        return torch.empty(0, *mem.input_shape), torch.empty(0).long(), torch.empty(0).double()
    return tuple(torch.cat([ch[k] for ch in chunks]) for k in range(3))


def assert_answers_inside_balls(mem: CertificationMemory, queries: Tensor) -> None:
    """Every query strictly inside a stored ball is answered with that ball's class."""
    xs, cs, rs = stored(mem)
    for q in queries:
        d = (xs.double() - q.double()).reshape(len(xs), q.numel()).norm(dim=1)
        inside = torch.nonzero(d < rs - TOLERANCE * (1 + rs)).flatten()
        for mc in (-1, 0, 3):
            c, _, _ = resolve(q, mc, 0.0 if mc == -1 else 1.0, xs, cs, rs)
            assert all(c == int(cs[j]) for j in inside)


def assert_replays(mem: CertificationMemory) -> None:
    """Every stored answer is the rule applied to its MC certificate and the entries before it."""
    xs, cs, rs = stored(mem)
    with sqlite3.connect(mem.path) as conn:
        mc = conn.execute("SELECT mc_predict, mc_radius FROM entries ORDER BY ord").fetchall()
    assert len(mc) == len(xs)
    for k, (mc_c, mc_r) in enumerate(mc):
        c, r, _ = resolve(xs[k], mc_c, mc_r, xs[:k], cs[:k], rs[:k])
        assert (c, r) == (int(cs[k]), float(rs[k]))


# ----------------------------------------------------------------------------- hand cases


@pytest.fixture
def line() -> CertificationMemory:
    with CertificationMemory(":memory:", "fp", (1,), pixel_range=None) as mem:
        yield mem


def test_no_conflict_stores_as_is(line):
    a = line.resolve_and_store(point(0), 0, 1.0, sigma=0.5, idx=7)
    b = line.resolve_and_store(point(3), 1, 2.0, sigma=0.5)  # touching: d = R_a + R_b
    assert a == Answer(0, 1.0, 0.5, False, False, 0, 1.0, repeat=False, entry=0)
    assert b == Answer(1, 2.0, 0.5, False, False, 1, 2.0, repeat=False, entry=1)
    again = line.resolve_and_store(point(0), 1, 5.0, sigma=0.9)  # a repeat: a's stored answer
    assert again == Answer(0, 1.0, 0.5, False, False, 0, 1.0, repeat=True, entry=0)
    assert line.resolve_and_store(point(10), 1, 3.0, sigma=0.5).radius == 3.0  # same class
    assert len(line) == 3 and line.check(tol=0) == []


def test_inside_another_ball_takes_its_class(line):
    line.resolve_and_store(point(0), 0, 2.0, sigma=0.5)
    res = line.resolve_and_store(point(0.5), 1, 5.0, sigma=0.5)
    assert (res.predict, res.radius, res.changed, res.shrunk) == (0, 1.5, True, False)
    assert (res.mc_predict, res.mc_radius, res.entry) == (1, 5.0, 1)


def test_overlapping_but_outside_shrinks(line):
    line.resolve_and_store(point(0), 0, 1.0, sigma=0.5)
    res = line.resolve_and_store(point(3), 1, 2.5, sigma=0.5)
    assert (res.predict, res.radius, res.changed, res.shrunk) == (1, 2.0, False, True)
    on_boundary = line.resolve_and_store(point(1), 2, 1.0, sigma=0.5)  # d_0 = R_0 exactly
    assert (on_boundary.predict, on_boundary.radius) == (2, 0.0)


def test_several_conflicts_pick_smallest_margin_and_earliest_on_ties():
    xs, cs, rs = point(0, 4, 7)[:, None], torch.tensor([0, 1, 2]), torch.tensor([1.0, 1.0, 3.0])
    # margins d_j - R_j: 2 - 1 = 1, 2 - 1 = 1 (tie), 5 - 3 = 2
    assert resolve(point(2), 3, 4.0, xs, cs, rs) == (3, 1.0, 0)
    # at 5.5 the third ball (margin -1.5) beats the second (0.5): inside it, class 2
    assert resolve(point(5.5), 3, 4.0, xs, cs, rs) == (2, 1.5, 2)
    assert resolve(point(2), 3, 0.5, xs, cs, rs) == (3, 0.5, None)  # no intersection


def test_abstention_is_never_swallowed(line):
    line.resolve_and_store(point(0), -1, 0.0, sigma=0.5)
    big = line.resolve_and_store(point(1), 0, 5.0, sigma=0.5)
    assert (big.predict, big.radius) == (0, 1.0)  # shrunk to leave the abstained point outside
    again = line.resolve_and_store(point(0), 0, 3.0, sigma=0.5)
    assert (again.predict, again.radius, again.repeat) == (-1, 0.0, True)
    # a nearby input at 0.5 is strictly inside ball 1 -> class 0 with radius 0.5
    assert line.resolve_and_store(point(0.5), -1, 0.0, sigma=0.5).predict == 0
    assert line.check(tol=0) == []


def test_abstention_inside_a_ball_is_answered_by_the_ball(line):
    line.resolve_and_store(point(0), 0, 2.0, sigma=0.5)
    res = line.resolve_and_store(point(1), -1, 0.0, sigma=0.5)
    assert (res.predict, res.radius, res.changed) == (0, 1.0, True)


def test_exact_repeat_returns_stored_answer(line):
    line.resolve_and_store(point(0), 0, 2.0, sigma=0.5)
    first = line.resolve_and_store(point(1), 1, 1.0, sigma=0.5)
    again = line.resolve_and_store(point(1), 2, 9.0, sigma=0.7)
    assert (again.predict, again.radius, again.entry) == (first.predict, first.radius, 1)
    # the stored answer, its Monte Carlo certificate included, not this query's
    assert again.repeat and (again.changed, again.mc_predict, again.mc_radius) == (True, 1, 1.0)
    assert len(line) == 2 and line.stats()["repeats"] == 1
    # inputs are canonical before the bytes are compared: -0.0 is a repeat of 0.0
    zero = line.resolve_and_store(point(-0.0), 3, 1.0, sigma=0.5)
    assert zero.repeat and (zero.predict, zero.radius, zero.entry) == (0, 2.0, 0)
    assert line.repeat_answer(point(-0.0)) == zero and line.repeat_answer(point(0.25)) is None
    assert len(line) == 2 and line.stats()["repeats"] == 3


@pytest.mark.parametrize(
    "x, predict, radius, sigma",
    [
        (torch.zeros(2), 0, 1.0, 0.5),  # wrong shape
        (point(float("nan")), 0, 1.0, 0.5),
        (point(float("inf")), 0, 1.0, 0.5),
        (torch.tensor([1]), 0, 1.0, 0.5),  # integer dtype
        (np.zeros(1), 0, 1.0, 0.5),
        (point(0), -2, 0.0, 0.5),
        (point(0), 0, -1.0, 0.5),
        (point(0), 0, float("nan"), 0.5),
        (point(0), 0, float("inf"), 0.5),
        (point(0), -1, 0.5, 0.5),  # abstention with a radius
        (point(0), 0, 1.0, 0.0),
        (point(0), 0, 1.0, float("nan")),
    ],
)
def test_invalid_arguments(line, x, predict, radius, sigma):
    with pytest.raises(InputError):
        line.resolve_and_store(x, predict, radius, sigma=sigma)
    assert len(line) == 0


def test_stats_and_entries(line):
    for i, (v, c, r) in enumerate([(0, 0, 1.0), (0.5, 1, 1.0), (5, -1, 0.0), (9, 2, 2.0)]):
        line.resolve_and_store(point(v), c, r, sigma=0.25 * (i + 1), idx=None if i else 42)
    s = line.stats()
    assert s["entries"] == 4 and s["classes"] == {0: 2, 2: 1} and s["abstentions"] == 1
    assert (s["changed"], s["shrunk"], s["repeats"]) == (1, 0, 0)
    assert sum(s["radius_histogram"]["counts"]) == 3
    assert s["sigma"] == {"min": 0.25, "median": 0.625, "max": 1.0}
    chunks = zip(*line.entries(chunk_size=3), strict=True)
    x, c, r, sigma, order, idx = (torch.cat(t) for t in chunks)
    assert x.shape == (4, 1) and x.dtype == torch.float32
    assert c.tolist() == [0, 0, -1, 2] and r.tolist() == [1.0, 0.5, 0.0, 2.0]
    assert order.tolist() == [0, 1, 2, 3] and idx.tolist() == [42, -1, -1, -1]


def test_check_reports_violations(tmp_path):
    path = tmp_path / "m.sqlite"
    with CertificationMemory(path, "fp", (1,), chunk_size=2, pixel_range=None) as mem:
        for v in range(0, 50, 10):
            mem.resolve_and_store(point(v), v // 10 % 2, 4.0, sigma=0.5)
        assert mem.check() == []
    blob = point(34).numpy().tobytes()
    with sqlite3.connect(path) as conn:  # tamper: a class-2 ball of radius 3 at 34
        conn.execute(
            "INSERT INTO entries VALUES (5, NULL, ?, 0, 2, 3.0, 0.5, 2, 3.0, 0, 0, 0, ?)",
            (blob, entry_checksum(5, blob, 2, 3.0)),
        )
    with CertificationMemory(path, "fp", (1,), chunk_size=2, pixel_range=None) as mem:
        assert mem.check() == [(3, 5, 3.0), (4, 5, 1.0)]


# ----------------------------------------------------------------------------- properties

coordinate = st.integers(-8, 8).map(lambda k: k / 2)
mc_class = st.integers(-1, 2)
mc_radius = st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 3.0])
step = st.one_of(
    st.tuples(st.just("new"), st.lists(coordinate, min_size=3, max_size=3), mc_class, mc_radius),
    # on the boundary of a stored ball (k picks the ball), or an exact repeat of a stored input
    st.tuples(st.just("boundary"), st.integers(0, 50), mc_class, mc_radius),
    st.tuples(st.just("repeat"), st.integers(0, 50), mc_class, mc_radius),
)


def make_memories(shape: tuple[int, ...]) -> list[CertificationMemory]:
    """The same rule three ways: cached, scanning SQLite, and a cache that overflows."""
    return [
        CertificationMemory(":memory:", "fp", shape, chunk_size=2, pixel_range=None),
        CertificationMemory(":memory:", "fp", shape, chunk_size=3, cache_bytes=0, pixel_range=None),
        CertificationMemory(
            ":memory:", "fp", shape, chunk_size=1, cache_bytes=200, pixel_range=None
        ),
    ]


def run_sequence(shape, items, exact: bool) -> CertificationMemory:
    mems, ram = make_memories(shape), Ram(shape)
    for x, c, r in items:
        r = 0.0 if c == -1 else r
        expected = rule_oracle(x, c, r, ram.x, ram.c, ram.r) if exact else None
        new_c, new_r, j, repeat = ram.add(x, c, r)
        if exact:
            assert (new_c, new_r) == expected
        for mem in mems:
            res = mem.resolve_and_store(x, c, r, sigma=0.5)
            assert (res.predict, res.radius, res.repeat) == (new_c, new_r, repeat)
            # a fresh answer's Monte Carlo certificate is this query's; a repeat's is the
            # stored one, and changed/shrunk say what the memory did to it
            assert repeat or (res.mc_predict, res.mc_radius) == (c, r)
            assert res.changed == (res.predict != res.mc_predict)
            assert res.shrunk == (res.predict == res.mc_predict and res.radius < res.mc_radius)
            assert res.entry == (j if repeat else len(ram.x) - 1)
    for mem in mems[1:]:
        mem.close()
    return mems[0]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dim=st.integers(1, 3), steps=st.lists(step, min_size=1, max_size=25))
def test_rule_low_dimension(dim, steps):
    ram, items = Ram((dim,)), []
    for kind, arg, c, r in steps:
        if kind == "new":
            x = point(*arg[:dim])
        elif len(ram.x) == 0:
            continue
        elif kind == "repeat":
            x = ram.x[arg % len(ram.x)].clone()
        else:
            k = arg % len(ram.x)
            x = ram.x[k].clone()
            x[0] += float(ram.r[k]) if arg % 2 else -float(ram.r[k])
        ram.add(x, c, 0.0 if c == -1 else r)
        items.append((x, c, r))
    with run_sequence((dim,), items, exact=True) as mem:
        assert mem.check() == []
        if dim == 1:  # dyadic coordinates and radii: all arithmetic is exact
            assert mem.check(tol=0) == []
        grid = torch.arange(-10, 10.25, 0.25)
        queries = torch.stack(torch.meshgrid(*[grid] * dim, indexing="ij"), -1).reshape(-1, dim)
        assert_answers_inside_balls(mem, queries[torch.randperm(len(queries))[:200]])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    kinds=st.lists(st.sampled_from(["new", "inside", "boundary", "repeat"]), max_size=30),
)
def test_rule_high_dimension(seed, kinds):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, *HIGH, generator=g) * 0.05
    ram, xs, items = Ram(HIGH), [], []
    for kind in ["new", *kinds]:
        c = int(torch.randint(-1, 3, (), generator=g))
        r = 0.0 if c == -1 else float(torch.rand((), generator=g)) * 1.5
        k = int(torch.randint(len(ram.x), (), generator=g)) if len(ram.x) else None
        if kind == "new" or k is None:
            x = centers[int(torch.randint(3, (), generator=g))]
            x = x + torch.randn(HIGH, generator=g) * 0.05
        elif kind == "repeat":
            x = ram.x[k].clone()
        else:  # inside stored ball k, or on its boundary, along a random direction
            u = torch.randn(HIGH, generator=g)
            t = float(torch.rand((), generator=g)) if kind == "inside" else 1.0
            x = ram.x[k] + u / u.norm() * t * float(ram.r[k])
        ram.add(x, c, r)
        xs.append(x)
        items.append((x, c, r))
    with run_sequence(HIGH, items, exact=False) as mem:
        assert mem.check() == []
        probes = torch.stack(xs) + torch.randn(len(xs), *HIGH, generator=g) * 0.02
        assert_answers_inside_balls(mem, torch.cat([torch.stack(xs), probes]))


# ----------------------------------------------------------------------------- the file


def fill(mem: CertificationMemory, n: int, seed: int, classes=(-1, 0, 1, 2)) -> None:
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        c = classes[int(torch.randint(len(classes), (), generator=g))]
        r = 0.0 if c == -1 else float(torch.rand((), generator=g)) * 6
        mem.resolve_and_store(torch.rand(mem.input_shape, generator=g), c, r, sigma=0.25, idx=i)


def test_persistence_round_trip(tmp_path):
    path = tmp_path / "memory.sqlite"
    with CertificationMemory(path, "model-A", HIGH, chunk_size=4, pixel_range=None) as mem:
        fill(mem, 15, seed=0)
        before = [torch.cat(t) for t in zip(*mem.entries(), strict=True)]
    with CertificationMemory(
        path, "model-A", HIGH, create=False, chunk_size=5, pixel_range=None
    ) as mem:
        after = [torch.cat(t) for t in zip(*mem.entries(), strict=True)]
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
        fill(mem, 10, seed=1)
        assert len(mem) == 25
    with CertificationMemory.open_existing(path) as mem:
        assert (mem.fingerprint, mem.input_shape, len(mem)) == ("model-A", HIGH, 25)
        assert mem.check() == [] and mem.stats()["entries"] == 25
        assert_replays(mem)


def test_wrong_fingerprint_or_shape_refused(tmp_path):
    path = tmp_path / "memory.sqlite"
    with CertificationMemory(path, "model-A", (1, 4, 4), pixel_range=None) as mem:
        mem.resolve_and_store(torch.zeros(1, 4, 4), 0, 1.0, sigma=0.5)
    with pytest.raises(MemoryStoreError, match="another model"):
        CertificationMemory(path, "model-B", (1, 4, 4), pixel_range=None)
    with pytest.raises(MemoryStoreError, match="shape"):
        CertificationMemory(path, "model-A", (4, 4), pixel_range=None)


def test_missing_file_with_create_false(tmp_path):
    path = tmp_path / "absent.sqlite"
    with pytest.raises(MemoryStoreError, match="does not exist"):
        CertificationMemory(path, "fp", (1,), create=False, pixel_range=None)
    with pytest.raises(MemoryStoreError, match="does not exist"):
        CertificationMemory.open_existing(path)
    assert not path.exists()
    path.touch()
    with pytest.raises(MemoryStoreError, match="empty"):
        CertificationMemory(path, "fp", (1,), create=False, pixel_range=None)


def test_corrupt_files_refused(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(random.Random(0).randbytes(10_000))
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE results (x)")
    good = tmp_path / "good.sqlite"
    with CertificationMemory(good, "fp", HIGH, pixel_range=None) as mem:
        fill(mem, 30, seed=0)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.sqlite"
    truncated.write_bytes(data[: len(data) // 2])
    header_only = tmp_path / "header.sqlite"
    header_only.write_bytes(data[:60])
    for path in (junk, other, truncated, header_only):
        with pytest.raises(MemoryStoreError):
            CertificationMemory(path, "fp", HIGH, pixel_range=None)
        with pytest.raises(MemoryStoreError):
            CertificationMemory.open_existing(path)


WRITER = textwrap.dedent(
    """
    import os, sys, time, torch
    from ddrs.memory import CertificationMemory
    path, seed, n, classes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    classes = [int(c) for c in classes.split(",")]
    g = torch.Generator().manual_seed(seed)
    with CertificationMemory(path, "fp", (3, 8, 8), pixel_range=None) as mem:
        print("ready", flush=True)
        while not os.path.exists(path + ".go"):
            time.sleep(0.005)
        for i in range(n):
            c = classes[int(torch.randint(len(classes), (), generator=g))]
            r = 0.0 if c == -1 else float(torch.rand((), generator=g)) * 6
            x = torch.rand(3, 8, 8, generator=g)
            mem.resolve_and_store(x, c, r, sigma=0.25, idx=seed * 1000 + i)
            print(i, flush=True)
            time.sleep(0.01 * float(torch.rand((), generator=g)))  # "certify" the next input
    """
)


def spawn_writer(path: Path, seed: int, n: int, classes: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(seed), str(n), classes],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def assert_consistent_file(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        lengths = conn.execute("SELECT DISTINCT length(x) FROM entries").fetchall()
        assert lengths in ([], [(math.prod(HIGH) * 4,)])
        orders = [o for (o,) in conn.execute("SELECT ord FROM entries ORDER BY ord")]
        assert orders == list(range(len(orders)))
    with CertificationMemory(path, "fp", HIGH, create=False, pixel_range=None) as mem:
        assert mem.check() == []
        assert_replays(mem)
        return len(mem)


def test_kill_during_insert_leaves_consistent_store(tmp_path):
    path = tmp_path / "memory.sqlite"
    CertificationMemory(path, "fp", HIGH, pixel_range=None).close()
    proc = spawn_writer(path, seed=3, n=10**6, classes="-1,0,1,2")
    Path(f"{path}.go").touch()
    try:
        for _ in range(25):
            proc.stdout.readline()
        time.sleep(random.uniform(0, 0.05))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert assert_consistent_file(path) >= 25
    with CertificationMemory(path, "fp", HIGH, pixel_range=None) as mem:  # and it can be continued
        fill(mem, 3, seed=9)
    assert_consistent_file(path)


def test_concurrent_writers(tmp_path):
    path = tmp_path / "memory.sqlite"
    CertificationMemory(path, "fp", HIGH, pixel_range=None).close()
    procs = [spawn_writer(path, 1, 40, "-1,0"), spawn_writer(path, 2, 40, "1,2")]
    Path(f"{path}.go").touch()
    for proc in procs:
        proc.communicate(timeout=120)
        assert proc.returncode == 0
    assert assert_consistent_file(path) == 80
    with CertificationMemory(path, "fp", HIGH, create=False, pixel_range=None) as mem:
        idx = torch.cat([chunk[5] for chunk in mem.entries()])
        assert sorted(idx.tolist()) == [*range(1000, 1040), *range(2000, 2040)]
        writer = (idx // 1000).tolist()
        assert sum(a != b for a, b in pairwise(writer)) >= 2  # the writers interleaved
        assert mem.stats()["changed"] + mem.stats()["shrunk"] > 0


# ----------------------------------------------------------------------------- integrity


def _flip_one_byte(path, order: int) -> None:
    with sqlite3.connect(path) as conn:
        (blob,) = conn.execute("SELECT x FROM entries WHERE ord = ?", (order,)).fetchone()
        changed = bytearray(blob)
        changed[5] ^= 0x01
        conn.execute("UPDATE entries SET x = ? WHERE ord = ?", (bytes(changed), order))


def test_a_changed_byte_in_a_stored_input_is_found(tmp_path, capsys):
    from ddrs.cli import main

    path = tmp_path / "m.sqlite"
    with CertificationMemory(path, "fp", (1, 4, 4)) as mem:
        for k in range(4):
            mem.resolve_and_store(torch.full((1, 4, 4), k / 4), k % 2, 0.1, sigma=0.25)
        assert mem.corrupt_entries() == []
    assert main(["memory", "check", str(path)]) == 0
    _flip_one_byte(path, 2)
    with CertificationMemory(path, "fp", (1, 4, 4)) as mem:
        assert mem.corrupt_entries() == [2]
        with pytest.raises(MemoryStoreError, match="entry 2 does not match its checksum"):
            mem.resolve_and_store(torch.full((1, 4, 4), 0.9), 0, 0.1, sigma=0.25)
    capsys.readouterr()
    assert main(["memory", "check", str(path)]) == 1
    assert "entry 2 does not match its checksum" in capsys.readouterr().out


def test_a_version_1_memory_is_upgraded_with_checksums(tmp_path):
    path = tmp_path / "m.sqlite"
    with CertificationMemory(path, "fp", (1, 2, 2)) as mem:
        for k in range(3):
            mem.resolve_and_store(torch.full((1, 2, 2), k / 3), k, 0.05, sigma=0.25)
    with sqlite3.connect(path) as conn:  # what version 1 wrote: no checksum column
        conn.execute("ALTER TABLE entries DROP COLUMN checksum")
        conn.execute("UPDATE meta SET value = 1 WHERE key = 'schema_version'")
    with CertificationMemory(path, "fp", (1, 2, 2)) as mem:
        assert len(mem) == 3 and mem.corrupt_entries() == []
        assert mem.resolve_and_store(torch.full((1, 2, 2), 1.0), 0, 0.05, sigma=0.25).entry == 3


def test_inputs_outside_the_pixel_range_are_refused_and_not_stored(tmp_path):
    with CertificationMemory(tmp_path / "m.sqlite", "fp", (1, 2, 2)) as mem:
        with pytest.raises(InputError, match=r"\[0, 1\]"):
            mem.resolve_and_store(torch.full((1, 2, 2), 1.5), 0, 0.1, sigma=0.25)
        with pytest.raises(InputError, match=r"\[0, 1\]"):
            mem.resolve_and_store(torch.full((1, 2, 2), -0.1), 0, 0.1, sigma=0.25)
        assert len(mem) == 0
