"""README.md as a test (Sybil): every ```bash and ```python block runs, in order, in one fresh
copy of the repository that holds what a new user would have: the CIFAR-10 archive as its site
serves it, and a folder of their own images (small, generated). Sizes are reduced by one rule,
`SIZE_RULE`, which the README states in "How this README is tested"; nothing else is edited.

Why Sybil: it is maintained, reads Markdown's fenced blocks with their line numbers, runs them
as pytest items in document order with a shared namespace, and takes our own evaluators for
shell blocks; its skip directive (`<!-- skip: next -->`) marks the one block CI runs itself.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from sybil import Example, Sybil
from sybil.parsers.markdown import CodeBlockParser, SkipParser

REPO = Path(__file__).resolve().parents[1]
# flag -> the value it gets in the test, whatever the README writes (sizes only)
SIZE_RULE = {
    "--epochs": "1",
    "--router-epochs": "1",
    "--n": "100",
    "--num-samples": "100",
    "--n0": "10",
    "--label-n": "100",
    "--pilot": "50",
    "--samples": "8",
    "--train-subset": "300",
    "--images": "50",
    "--val-images": "20",
    "--router-images": "50",
    "--val-n": "100",
}
DATABASE = "postgresql://ddrs@db.example/ddrs"  # the README's database, the test's own server
BLOCK_SECONDS = 900


def scaled(text: str, database: str | None) -> str:
    """The block as the test runs it: SIZE_RULE's flags get their test values, and the
    README's database is the test's."""
    for flag, value in SIZE_RULE.items():
        text = re.sub(rf"(?<![\w-]){re.escape(flag)}([ =])\S+", rf"{flag}\g<1>{value}", text)
    if database is not None:
        text = text.replace(DATABASE, database)
    return text


def setup(namespace: dict) -> None:
    """A copy of the repository as a clone has it, the user's files, an environment."""
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import PostgresMissing, PostgresServer, write_cifar_archive, write_folder

    work = Path(tempfile.mkdtemp(prefix="ddrs-readme-"))
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, work / name)
    (work / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    write_cifar_archive(work / "cifar-10-python.tar.gz", {"train": 40, "test": 10})
    write_folder(work / "my_images", {"train": 6, "test": 4})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DDRS_", "VIRTUAL_ENV"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["OMP_NUM_THREADS"] = "2"
    database = None
    folder = tempfile.mkdtemp(prefix="ddrs-readme-pg-")
    try:
        server = PostgresServer(folder)
        database = server.fresh_database("readme")
        namespace["postgres"] = server
    except PostgresMissing:
        pass
    namespace.update(work=work, env=env, database=database, pg_folder=folder)


def teardown(namespace: dict) -> None:
    if "postgres" in namespace:
        namespace["postgres"].stop("immediate")
    shutil.rmtree(namespace["pg_folder"], ignore_errors=True)
    shutil.rmtree(namespace["work"], ignore_errors=True)


def _run(example: Example, command: list[str], script: str) -> None:
    """Run a block in the work folder; its background jobs end with it."""
    namespace = example.namespace
    process = subprocess.Popen(
        [*command, script],
        cwd=namespace["work"],
        env=namespace["env"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=BLOCK_SECONDS)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert process.returncode == 0, (
        f"README.md line {example.line}: the block failed (exit {process.returncode}):\n"
        f"{script}\n--- output ---\n{output[-6000:]}"
    )


def run_bash(example: Example) -> None:
    namespace = example.namespace
    if DATABASE in example.parsed and namespace["database"] is None:
        import pytest

        pytest.skip("needs PostgreSQL (apt-get install postgresql)")
    state = namespace["work"] / ".readme-env"
    body = scaled(example.parsed, namespace["database"])
    script = (
        f"set -euo pipefail\nif [ -f {state} ]; then source {state}; fi\n{body}\n"
        f"export -p > {state}\n"
    )  # the next block starts where this one ended
    _run(example, ["bash", "-c"], script)


def run_python(example: Example) -> None:
    _run(example, [sys.executable, "-c"], example.parsed)


readme = Sybil(
    parsers=[
        CodeBlockParser("bash", run_bash),
        CodeBlockParser("python", run_python),
        SkipParser(),
    ],
    path=str(REPO),
    patterns=["README.md"],
    setup=setup,
    teardown=teardown,
)
