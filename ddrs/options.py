"""The fields of run specifications: each setting's default and help in one place, and what
the command line needs to spell it (flags, converters by name, choices, groups). A spec is a
dataclass of such fields; the command line (cli/parser.py) builds its options from them."""

from __future__ import annotations

from dataclasses import MISSING, field, fields
from typing import Any


def setting(default: Any = None, help: str = "", **cli: Any) -> Any:
    """A spec field with its default and help; `cli` tells the command line more (flag: the
    option's name when not --FIELD-NAME; aliases; type: a Python type or the name of one of
    cli/converters.py's converters; choices; required; repeatable; metavar; group: a required
    choice of one field among several; section: a heading in --help)."""
    if "factory" in cli:
        return field(default_factory=cli.pop("factory"), metadata={"help": help, **cli})
    return field(default=default, metadata={"help": help, **cli})


def default_of(spec: type, name: str) -> Any:
    """A spec field's default, for a library signature that restates it."""
    for f in fields(spec):
        if f.name == name:
            return f.default if f.default is not MISSING else f.default_factory()
    raise KeyError(name)


def from_namespace(spec: type, values: Any, **overrides: Any):
    """Build `spec` from an object holding its fields as attributes (argparse's Namespace)."""
    given = {f.name: getattr(values, f.name) for f in fields(spec) if hasattr(values, f.name)}
    return spec(**{**given, **overrides})
