"""Results files: tab-separated, one row per input, in the field's reference format.

Certify files have the columns of Cohen et al.'s `certify.py` (`idx label predict radius
correct time`) plus `sigma`; memory-based runs add the Monte Carlo certificate
(`mc_predict`, `mc_radius`). A sidecar `<file>.settings.json` records the run's settings so
that a resumed run can refuse to mix settings. Rows are flushed as they are written; an
interrupted last line is dropped on resume. This module is the only reader and writer.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

import numpy as np

from ddrs.errors import ResultsFileError

CERTIFY_COLUMNS = ("idx", "label", "predict", "radius", "correct", "sigma", "time")
MEMORY_COLUMNS = CERTIFY_COLUMNS + ("mc_predict", "mc_radius")
PREDICT_COLUMNS = ("idx", "label", "predict", "correct", "time")
SIGMA_COLUMNS = ("idx", "sigma", "sigma0", "radius_before", "radius_after", "time")
REFERENCE_COLUMNS = ("idx", "label", "predict", "radius", "correct")
# the counts behind each certificate: enough to recompute it at any alpha (`ddrs recertify`)
COUNTS_COLUMNS = ("idx", "label", "selected", "count", "top1", "top2", "n", "n0", "sigma", "seed")
# a sharded certify worker's part file: the Monte Carlo certificate and its counts
CERTIFY_PART_COLUMNS = (
    "idx",
    "label",
    "predict",
    "radius",
    "sigma",
    "time",
    "selected",
    "count",
    "top1",
    "top2",
    "n",
    "n0",
    "seed",
)
# experts: the expert that answered (its name; "-" when a router abstained or no cascade
# level was confident: "no route" in reports)
NORM_COLUMN = "norm"  # an L1 run's rows: "l1" (L2 rows keep Cohen et al.'s columns)
EXPERT_COLUMNS = ("expert",)
ROUTER_COLUMNS = ("expert", "route_radius", "expert_radius")
# the cascade: the answering expert, its level's radius, the larger levels' guard radius, and
# how many levels were sampled
CASCADE_COLUMNS = ("expert", "level_radius", "guard_radius", "levels")
# `ddrs sigma` with experts: each input's expert and sigma, and the winning score
ROUTE_COLUMNS = ("idx", "expert", "sigma", "score", "time")
STRING_COLUMNS = {"expert", NORM_COLUMN}
NO_EXPERT = "-"
INTEGER_COLUMNS = {
    "idx",
    "label",
    "predict",
    "correct",
    "mc_predict",
    "selected",
    "count",
    "top1",
    "top2",
    "n",
    "n0",
    "seed",
    "route",
    "right",
    "levels",
}


def file_digest(path: str | os.PathLike) -> str:
    """A short sha256 of a file's bytes: which input file a run's settings were made from."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


# settings that describe a run without changing its rows: not compared on resume (an fp32
# engine computes the model's function; a precision changes the model, and its fingerprint)
INFORMATIONAL_SETTINGS = {"radius_units", "engine"}
# settings added later, with the value every earlier run had: an earlier file still resumes
SETTINGS_BEFORE_THEY_WERE_RECORDED = {"precision": "fp32", "norm": "l2", "noise": "float"}


def settings_path(path: str | os.PathLike) -> Path:
    return Path(f"{path}.settings.json")


def _format(value) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return repr(float(value))  # full precision, so re-reading a radius gives the same float
    return str(value)


_TIMEDELTA = re.compile(
    r"^(?:(?P<days>-?\d+) days?, )?(?P<h>\d+):(?P<m>\d{1,2}):(?P<s>\d{1,2}(?:\.\d*)?)$"
)


def parse_seconds(text: str) -> float:
    """A time column value in seconds: a number (`13.7`, `13.7s`) or Python's timedelta text
    as Cohen et al.'s certify.py writes it (`0:00:13.736080`, `1 day, 2:03:04.5`). Anything
    else is NaN: the time column is informational and never makes a file unreadable."""
    text = text.strip()
    try:
        return float(text[:-1] if text.endswith("s") else text)
    except ValueError:
        pass
    match = _TIMEDELTA.match(text)
    if not match:
        return math.nan
    days = int(match["days"] or 0)
    return days * 86400 + int(match["h"]) * 3600 + int(match["m"]) * 60 + float(match["s"])


def _parse(column: str, text: str, path, line_no: int):
    if column == "time":
        return parse_seconds(text)
    if column in STRING_COLUMNS:
        return text
    try:
        return int(text) if column in INTEGER_COLUMNS else float(text)
    except ValueError:
        raise ResultsFileError(
            f"{path}, line {line_no}: column '{column}' has value {text!r}, expected a number"
        ) from None


def read_table(
    path: str | os.PathLike, required=("idx",), drop_torn_line: bool = False
) -> dict[str, np.ndarray]:
    """Read a results TSV into {column: array}; ints for integer columns, floats otherwise.
    `drop_torn_line`: ignore a last line without its newline (a file being written or one
    whose writer was killed).

    Raises ResultsFileError for a missing file, a missing header or column, a row with the
    wrong number of fields, a non-numeric value, or a repeated idx.
    """
    path = Path(path)
    if not path.is_file():
        raise ResultsFileError(f"results file not found: {path}")
    try:
        data = path.read_bytes()
        if drop_torn_line:
            data = data[: data.rfind(b"\n") + 1]
        lines = data.decode().splitlines()
    except UnicodeDecodeError:
        raise ResultsFileError(f"{path} is not a text TSV file") from None
    lines = [line for line in lines if line.strip() and not line.startswith("#")]
    if not lines:
        raise ResultsFileError(f"{path} is empty: expected a header line with columns {required}")
    header = lines[0].strip().split("\t")
    missing = [c for c in required if c not in header]
    if missing:
        raise ResultsFileError(f"{path}: missing column(s) {missing}; header is {header}")
    columns: dict[str, list] = {c: [] for c in header}
    for line_no, line in enumerate(lines[1:], start=2):
        fields = line.rstrip("\n").split("\t")
        if len(fields) != len(header):
            raise ResultsFileError(
                f"{path}, line {line_no}: {len(fields)} fields, header has {len(header)}"
            )
        for column, text in zip(header, fields):
            columns[column].append(_parse(column, text, path, line_no))
    table = {c: np.asarray(v, dtype=_dtype(c)) for c, v in columns.items()}
    if "idx" in table and len(np.unique(table["idx"])) != len(table["idx"]):
        raise ResultsFileError(f"{path}: repeated idx values")
    return table


def _dtype(column: str):
    if column in STRING_COLUMNS:
        return object
    return np.int64 if column in INTEGER_COLUMNS else np.float64


def row_count(path: str | os.PathLike | None) -> int:
    """Rows after the header of a results file (0 when there is no such file)."""
    if path is None or not os.path.isfile(path):
        return 0
    with open(path) as f:
        return max(0, sum(1 for line in f if line.strip()) - 1)


def read_settings(path: str | os.PathLike) -> dict:
    """A results file's settings sidecar ({} when there is none or it is unreadable)."""
    try:
        return json.loads(settings_path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def read_routes(path: str | os.PathLike) -> dict[int, tuple[str, float]]:
    """{dataset index: (expert name, sigma)} from a TSV with `idx`, `expert` and `sigma`
    columns (`ddrs sigma --expert ...`)."""
    table = read_table(path, required=("idx", "expert", "sigma"))
    sigmas = read_sigmas(path)
    return {i: (str(e), sigmas[i]) for i, e in zip(table["idx"].tolist(), table["expert"])}


def read_sigmas(path: str | os.PathLike) -> dict[int, float]:
    """{dataset index: sigma} from any TSV with `idx` and `sigma` columns."""
    table = read_table(path, required=("idx", "sigma"))
    sigmas = dict(zip(table["idx"].tolist(), table["sigma"].tolist()))
    bad = [i for i, s in sigmas.items() if not (math.isfinite(s) and s > 0)]
    if bad:
        raise ResultsFileError(f"{path}: sigma must be finite and > 0 (bad at idx {bad[:5]})")
    return sigmas


def _complete_prefix(path: Path) -> int:
    """Byte length of the file up to its last newline (drops an interrupted last row)."""
    data = path.read_bytes()
    return data.rfind(b"\n") + 1


class ResultsWriter:
    """Append-only writer that resumes a previous run with the same settings.

    `done` holds the idx values already present. Settings are compared key by key; a
    mismatch raises ResultsFileError and leaves the file untouched.
    """

    def __init__(self, path: str | os.PathLike, columns: tuple[str, ...], settings: dict):
        self.path, self.columns = Path(path), tuple(columns)
        settings = json.loads(json.dumps(settings))  # normalise tuples, paths
        self.done: set[int] = set()
        if self.path.exists() and self.path.stat().st_size > 0:
            self.check_settings(self.path, self.columns, settings)
            size = _complete_prefix(self.path)
            with open(self.path, "r+b") as f:
                f.truncate(size)
            self.done = set(read_table(self.path, required=self.columns)["idx"].tolist())
            self.file = open(self.path, "a")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            settings_path(self.path).write_text(json.dumps(settings, indent=1, sort_keys=True))
            self.file = open(self.path, "w")
            self.file.write("\t".join(self.columns) + "\n")
            self.file.flush()

    @staticmethod
    def check_settings(path: Path, columns: tuple[str, ...], settings: dict) -> None:
        """Refuse to resume `path` unless its sidecar holds `settings` and its header is
        `columns` (read only)."""
        path, settings = Path(path), json.loads(json.dumps(settings))
        sidecar = settings_path(path)
        if not sidecar.exists():
            raise ResultsFileError(
                f"{path} exists but has no {sidecar.name}: refusing to append to a file "
                "written by another tool or run; choose another --out"
            )
        try:
            previous = json.loads(sidecar.read_text())
        except json.JSONDecodeError:
            raise ResultsFileError(f"{sidecar} is corrupt; choose another --out") from None
        for key, value in SETTINGS_BEFORE_THEY_WERE_RECORDED.items():
            if key in settings and key not in previous:  # written before the key existed
                previous[key] = value
        diffs = [
            f"{k}: {previous.get(k)!r} -> {settings.get(k)!r}"
            for k in sorted((set(previous) | set(settings)) - INFORMATIONAL_SETTINGS)
            if previous.get(k) != settings.get(k)
        ]
        if diffs:
            raise ResultsFileError(
                f"refusing to append to {path}: it was written with other settings "
                f"({'; '.join(diffs)}); use the same settings to resume, or another --out"
            )
        with open(path) as f:
            header = f.readline().rstrip("\n").split("\t")
        if tuple(header) != tuple(columns):
            raise ResultsFileError(f"{path}: header {header} differs from {list(tuple(columns))}")

    def write(self, row: dict) -> None:
        self.file.write("\t".join(_format(row[c]) for c in self.columns) + "\n")
        self.file.flush()
        self.done.add(int(row["idx"]))

    def close(self) -> None:
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
