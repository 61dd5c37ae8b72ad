"""How experts (core/experts.py) are given and loaded.

An expert is given on the command line as `--expert SOURCE:SIGMA` (or `NAME=SOURCE:SIGMA`),
SOURCE a checkpoint or your own model (package.module:factory, TorchScript file), or in an
experts file, one expert per line: `NAME SOURCE SIGMA` (blank lines and # comments
allowed). Every expert is checked before anything is written: sigma > 0, distinct names, and
each model's probe forward pass on the inputs' shape and class count (`models.load_model`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ddrs.core.checks import positive
from ddrs.core.experts import Expert, Experts
from ddrs.errors import InputError
from ddrs.models.checkpoint import is_own_model, load_model


@dataclass(frozen=True)
class ExpertSpec:
    """An expert before its model is loaded."""

    name: str
    source: str  # a checkpoint path, or package.module:factory, or a TorchScript file
    sigma: float


def _default_name(source: str, sigma: float) -> str:
    path = Path(source)
    if path.suffix in (".pt", ".pth"):
        # runs/x/last.pt says less than its folder does
        base = path.parent.name if path.stem in ("last", "best") and path.parent.name else path.stem
    else:
        base = source.rsplit(":", 1)[-1] or source
    return f"{base}@{sigma:g}"


def parse_expert(text: str) -> ExpertSpec:
    """`SOURCE:SIGMA` or `NAME=SOURCE:SIGMA` (the last ':' separates the sigma, so a
    package.module:factory source works)."""
    name, _, rest = text.rpartition("=") if "=" in text else ("", "", text)
    source, sep, sigma_text = rest.rpartition(":")
    try:
        sigma = float(sigma_text)
    except ValueError:
        sigma = None
    if not sep or not source or sigma is None:
        raise InputError(
            f"--expert {text!r}: expected SOURCE:SIGMA or NAME=SOURCE:SIGMA (e.g. "
            "runs/g025/last.pt:0.25)"
        )
    positive(f"--expert {text!r}: sigma", sigma)
    return ExpertSpec(name or _default_name(source, sigma), source, sigma)


def read_experts_file(path: str | Path) -> list[ExpertSpec]:
    """One expert per line, `NAME SOURCE SIGMA`, whitespace separated; # starts a comment."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--experts {path}: no such file (one line per expert: NAME SOURCE SIGMA)")
    experts = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 3:
            raise InputError(
                f"{path}, line {number}: expected NAME SOURCE SIGMA, got {len(fields)} field(s)"
            )
        name, source, sigma_text = fields
        try:
            sigma = float(sigma_text)
        except ValueError:
            raise InputError(
                f"{path}, line {number}: sigma {sigma_text!r} is not a number"
            ) from None
        positive(f"{path}, line {number}: sigma", sigma)
        experts.append(ExpertSpec(name, source, sigma))
    return experts


def check_experts(experts: list[ExpertSpec]) -> list[ExpertSpec]:
    """At least one expert, distinct names."""
    if not experts:
        raise InputError("no experts given (--expert SOURCE:SIGMA, or --experts FILE)")
    names = [e.name for e in experts]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(
            f"expert name {repeated[0]!r} is given twice; name each expert "
            "(--expert NAME=SOURCE:SIGMA, or an experts file)"
        )
    return experts


def expert_specs(expert: list[str] | None, experts_file: str | None) -> list[ExpertSpec]:
    """The experts of `--expert` flags and an `--experts` file, checked."""
    found = [parse_expert(text) for text in expert or []]
    if experts_file:
        found += read_experts_file(experts_file)
    return check_experts(found)


def load_experts(
    specs: list[ExpertSpec], *, num_classes: int, input_shape, inputs_name: str, device="cpu"
) -> Experts:
    """Load every expert's model (once per distinct source), checked against the inputs."""
    models: dict[str, nn.Module] = {}
    for spec in check_experts(specs):
        if spec.source not in models:
            kind = "model" if is_own_model(spec.source) else "checkpoint"
            models[spec.source] = load_model(
                **{kind: spec.source},
                num_classes=num_classes,
                input_shape=input_shape,
                inputs_name=inputs_name,
                device=device,
            )
    return Experts(tuple(Expert(s.name, s.source, s.sigma, models[s.source]) for s in specs))
