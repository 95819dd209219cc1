"""Errors for configuration input: every problem carries the path of the field it concerns.

    ConfigError (ValueError)      one or more FieldErrors from one document
     └── .errors: tuple[FieldError, ...]

A path is a tuple of keys and list indices, rendered the way kubectl users read them:
`spec.template.spec.containers[0].image`, and map keys that are not plain identifiers in
brackets: `metadata.annotations["autoscaling.knative.dev/min-scale"]`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Path = tuple[str | int, ...]

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def format_path(path: Sequence[str | int]) -> str:
    """`("spec", "containers", 0, "image")` -> `spec.containers[0].image`; `()` -> `<root>`."""
    out: list[str] = []
    for part in path:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif _IDENT.match(part):
            out.append(f".{part}" if out else part)
        else:
            out.append(f'["{part}"]')
    return "".join(out) or "<root>"


def show(value: object) -> str:
    """A value as it appears in an error message: strings quoted, the rest as YAML would show them."""
    if isinstance(value, str):
        return '"' + value.replace('"', '\\"') + '"'
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class FieldError:
    path: Path
    message: str

    def __str__(self) -> str:
        return f"{format_path(self.path)}: {self.message}"


class ConfigError(ValueError):
    """A document failed validation; `errors` lists every problem found, each with its path."""

    def __init__(self, errors: Iterable[FieldError], source: str = "") -> None:
        self.errors = tuple(errors)
        self.source = source
        prefix = f"{source}: " if source else ""
        lines = [f"{prefix}{e}" for e in self.errors] or [f"{prefix}invalid configuration"]
        super().__init__("\n".join(lines))


def combine(failures: Iterable[ConfigError]) -> ConfigError:
    """One error for several documents: every line keeps its own document's source."""
    failures = list(failures)
    combined = ConfigError([e for f in failures for e in f.errors], failures[0].source if failures else "")
    combined.args = ("\n".join(str(f) for f in failures),)
    return combined


class Collector:
    """Accumulates FieldErrors so a parser reports every problem of a document at once."""

    def __init__(self, prefix: Path = ()) -> None:
        self.prefix = prefix
        self.errors: list[FieldError] = []

    def add(self, path: Path, message: str) -> None:
        self.errors.append(FieldError(self.prefix + path, message))

    def extend(self, errors: Iterable[FieldError]) -> None:
        self.errors.extend(errors)

    def raise_if_any(self, source: str = "") -> None:
        if self.errors:
            raise ConfigError(self.errors, source)
