"""The method registry: every method declares its name, paper, parameters and output-rank rule.

The CLI's ``--method`` choices, the recipe schema and docs/methods.md are generated from these
declarations; no code branches on method names elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from adaptermerge.errors import UsageError


@dataclass(frozen=True)
class Param:
    """One tunable parameter of a method."""

    name: str
    type: type
    default: Any
    help: str


@dataclass(frozen=True)
class Method:
    """A merge method's declaration.

    Attributes:
        name: registry key (CLI ``--method`` value, recipe ``merge_method``).
        title: one-line description.
        paper: citation, or ``None`` for plain linear algebra.
        url: link to the paper or reference implementation.
        formula: the definition, as printed in docs/methods.md.
        space: ``factored`` methods map per-module factor lists to stacked factors; ``delta`` methods
            work on dense per-module deltas (elementwise methods such as TIES/DARE).
        refactor: output-rank rule applied after the method: ``none`` (keep the stacked factors),
            ``lossless`` (factored SVD to the numerical rank, or truncate when a rank/energy is given),
            ``truncate`` (factored SVD to ``rank``/``energy``, default rank = largest input rank).
        fn: the pure function. For ``factored`` methods:
            ``fn(terms: list[tuple[float, LowRank]], params: dict) -> tuple[B, A]``.
        params: extra parameters the method takes.
    """

    name: str
    title: str
    paper: str | None
    url: str | None
    formula: str
    space: str
    refactor: str
    fn: Callable[..., Any]
    params: tuple[Param, ...] = field(default_factory=tuple)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry (names are unique)."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """Look up a method by name, with a usage error that lists the choices."""
    from adaptermerge.methods import basic  # noqa: F401  (registers the built-ins)

    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}") from None


def method_names() -> list[str]:
    from adaptermerge.methods import basic  # noqa: F401

    return sorted(METHODS)
