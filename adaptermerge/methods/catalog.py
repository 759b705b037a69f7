"""Declarations of the methods in :mod:`task_arithmetic` and :mod:`subspace`, for the registry to consume.

Each method is described once, by a :class:`MethodInfo` holding its name, paper, formula, parameters
(:class:`ParamInfo`: name, type, default, range, help), the spaces it runs in, its output-rank rule and the
pure function. The registry, the CLI options, the recipe schema and the docs can be generated from these.

Two function families, one signature each:

* ``kind="elementwise"``: ``fn(tensors, weights, params, generator=None) -> Tensor`` on a list of same-shape
  tensors (dense deltas, R x R core-space cores, or KnOTS per-task ``S V_i^T`` blocks; see
  :mod:`adaptermerge.methods.spaces`).
* ``kind="factored"``: ``fn(terms, params) -> (B, A)`` on ``terms = [(w_i, LowRank_i), ...]`` of one module.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from adaptermerge.errors import UsageError

SPACES = ("delta", "core", "knots")
"""The exact spaces an elementwise method can run in (``--space``)."""

OUTPUT_RANK_RULES = {
    "refactor": (
        "space=delta: the dense result is re-factored at --rank K (default: sum of the input ranks, capped at the "
        "module size; exact at full size) or --energy F. space=core/knots: exact adapter of rank <= R = sum of "
        "input ranks, truncated only when --rank/--energy is given."
    ),
    "exact": "exact adapter of rank <= R = sum of input ranks (factored); truncated only when --rank/--energy is given",
}


@dataclass(frozen=True)
class ParamInfo:
    """One parameter of a method.

    Attributes:
        name: CLI/recipe name (``--lambda`` -> ``lambda``).
        attr: attribute of the params dataclass (``lambda_`` for ``lambda``, a Python keyword).
        type: ``float``, ``int`` or ``bool``.
        default: default value (``None`` where the default depends on the inputs, see ``help``).
        range: ``(low, high, low_inclusive, high_inclusive)``; ``None`` bounds are open ends. ``None`` for
            unbounded or boolean parameters.
        help: one line for ``--help`` and the docs.
    """

    name: str
    attr: str
    type: type
    default: Any
    range: tuple[float | None, float | None, bool, bool] | None
    help: str

    def describe_range(self) -> str:
        """The range as printed in docs/errors, e.g. ``(0, 1]``."""
        if self.range is None:
            return "any"
        lo, hi, lo_in, hi_in = self.range
        left = ("[" if lo_in else "(") + ("-inf" if lo is None else f"{lo:g}")
        right = ("inf" if hi is None else f"{hi:g}") + ("]" if hi_in else ")")
        return f"{left}, {right}"


@dataclass(frozen=True)
class MethodInfo:
    """A method's declaration.

    Attributes:
        name: registry key (``--method``).
        title: one-line description.
        paper: citation.
        url: paper or reference implementation.
        formula: the definition as implemented.
        kind: ``elementwise`` or ``factored`` (see the module docstring for the signatures).
        spaces: where it runs: elementwise methods take ``--space delta|core|knots``; factored methods run in
            the core space, where they are exactly equal to their dense definition (``("core",)``).
        output_rank: key of :data:`OUTPUT_RANK_RULES`.
        stochastic: draws random numbers (needs ``--seed`` / a generator).
        params_cls: the frozen params dataclass; its ``__post_init__`` validates ranges (raises UsageError).
        params: the parameters, in CLI order.
        fn: the pure function.
    """

    name: str
    title: str
    paper: str
    url: str
    formula: str
    kind: str
    spaces: tuple[str, ...]
    output_rank: str
    stochastic: bool
    params_cls: type
    params: tuple[ParamInfo, ...]
    fn: Callable[..., Any] = field(repr=False)

    def make_params(self, **values: Any) -> Any:
        """Build the params dataclass from CLI/recipe names (``lambda=0.5`` -> ``lambda_=0.5``); unknown names refused."""
        by_name = {p.name: p for p in self.params}
        kwargs = {}
        for key, value in values.items():
            if key not in by_name:
                known = ", ".join(sorted(by_name))
                raise UsageError(f"method {self.name} has no parameter {key!r}; its parameters are: {known}")
            kwargs[by_name[key].attr] = value
        return self.params_cls(**kwargs)


def check_range(method: str, name: str, value: float, lo: float | None, hi: float | None, lo_in: bool, hi_in: bool):
    """Raise :class:`UsageError` unless ``value`` lies in the range (also refuses NaN and non-numbers)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{method}: --{name} must be a number, got {value!r}") from None
    ok = math.isfinite(v)
    if ok and lo is not None:
        ok = v >= lo if lo_in else v > lo
    if ok and hi is not None:
        ok = v <= hi if hi_in else v < hi
    if not ok:
        rng = ParamInfo(name, name, float, None, (lo, hi, lo_in, hi_in), "").describe_range()
        raise UsageError(f"{method}: --{name} must be in {rng}, got {value!r}")


def validate_declared(method: str, params: Any, infos: tuple[ParamInfo, ...]) -> None:
    """Check every declared parameter of ``params`` against its :class:`ParamInfo` range and type."""
    for info in infos:
        value = getattr(params, info.attr)
        if value is None and info.default is None:
            continue
        if info.type is bool:
            if not isinstance(value, bool):
                raise UsageError(f"{method}: --{info.name} must be true or false, got {value!r}")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{method}: --{info.name} must be a number, got {value!r}")
        if info.type is int and not isinstance(value, int):
            raise UsageError(f"{method}: --{info.name} must be an integer, got {value!r}")
        if info.range is not None:
            check_range(method, info.name, value, *info.range)
        else:
            check_range(method, info.name, value, None, None, False, False)


def param_infos_of(cls: type) -> tuple[str, ...]:
    """Attribute names of a params dataclass (used by tests to check the table matches the dataclasses)."""
    return tuple(f.name for f in fields(cls))
