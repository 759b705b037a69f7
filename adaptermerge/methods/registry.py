"""The method registry: every merge method is a declaration, and the only dispatch.

A method declares its name, paper, formula, the kind of function it is, its output-rank rule, what a base merge
may use instead of re-factoring, and its parameters (:class:`Param`: name, type, default, range, help). From
these declarations come the CLI's ``--method`` choices and method options, the recipe schema (checked when a
recipe is loaded), the per-method rules of :func:`adaptermerge.combine`, and ``docs/methods.md``. Adding a
method is one new module in ``adaptermerge/methods/`` that calls :func:`register`; nothing else changes.

This module imports neither torch nor the method modules at import time, so ``--help`` stays fast; the method
modules are imported the first time the registry is read.
"""

from __future__ import annotations

import enum
import importlib
import math
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from adaptermerge.errors import UsageError


class Kind(enum.Enum):
    """What the method's function consumes and returns, for one module."""

    FACTORED = "factored"  # fn(terms: [(w_i, LowRank_i)], params: dict) -> (B, A) stacked factors
    ELEMENTWISE = "elementwise"  # fn(tensors: [Tensor], weights: [float], params: dict, generator) -> Tensor


class RankRule(enum.Enum):
    """How the method's result becomes the output adapter's factors (``--rank``/``--energy`` per rule)."""

    KEEP = "keep"  # the factors as the method returns them (no --rank/--energy)
    EXACT = "exact"  # the exact result at its numerical rank; --rank/--energy truncate it
    BEST_RANK = "best-rank"  # best rank-k (Eckart-Young); k = --rank (default: the largest input rank) or --energy
    REFACTOR = "refactor"  # a result of any rank re-factored; k = --rank (default: sum of input ranks) or --energy


class BaseMerge(enum.Enum):
    """What ``adaptermerge merge BASE a b --method M`` adds to the base."""

    STACKED = "stacked"  # the exact stacked factors, never decomposed (the dense delta is formed per module)
    ADAPTER = "adapter"  # the combined adapter, as combine returns it (with its rank rule)
    DENSE = "dense"  # the per-module dense result, added straight into the base (nothing lost to re-factoring)


@dataclass(frozen=True)
class Param:
    """One parameter of a method: a CLI option ``--name`` and a recipe ``parameters`` entry.

    ``type`` is ``int``, ``float``, ``bool`` or ``str``; ``low``/``high`` bound numbers (``open_low`` excludes the
    bound); ``choices`` restricts strings.
    """

    name: str
    type: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple[str, ...] | None = None
    attr: str | None = None  # the attribute of the method's params dataclass, when it is not ``name`` (``lambda_``)

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def field(self) -> str:
        return self.attr or self.name

    def check(self, value: Any) -> Any:
        """The value as this parameter's type, or a :class:`UsageError` naming the option and the range."""
        if value is None:
            return None
        try:
            if self.type is bool:
                if not isinstance(value, bool):
                    raise ValueError
                v: Any = value
            elif self.type is int:
                if isinstance(value, bool) or int(value) != float(value):
                    raise ValueError
                v = int(value)
            else:
                v = self.type(value)
        except (TypeError, ValueError):
            raise UsageError(f"`{self.name}` must be {self.type.__name__}, got {value!r}") from None
        if self.choices is not None and v not in self.choices:
            raise UsageError(f"`{self.name}` must be one of {', '.join(self.choices)}, got {v!r}")
        if self.type in (int, float) and not math.isfinite(v):
            raise UsageError(f"`{self.name}` must be a finite number, got {v!r}")
        low_bad = self.low is not None and (v < self.low or (self.open_low and v == self.low))
        high_bad = self.high is not None and (v > self.high or (self.open_high and v == self.high))
        if low_bad or high_bad:
            raise UsageError(f"`{self.name}` must be in {self.range_text()}, got {v}")
        return v

    def range_text(self) -> str:
        """``(0, 1]``, ``[0, inf)``, ``a | b``, or ``any``."""
        if self.choices:
            return " | ".join(self.choices)
        if self.type is bool:
            return "true | false"
        if self.low is None and self.high is None:
            return "any"
        left = ("(" if self.open_low or self.low is None else "[") + ("-inf" if self.low is None else f"{self.low:g}")
        right = ("inf" if self.high is None else f"{self.high:g}") + (
            ")" if self.open_high or self.high is None else "]"
        )
        return f"{left}, {right}"


@dataclass(frozen=True)
class Method:
    """A merge method's declaration.

    Attributes:
        name: registry key (CLI ``--method`` value, recipe ``merge_method``).
        title: one-line description.
        paper: citation, or ``None`` for plain linear algebra.
        url: link to the paper or reference implementation.
        formula: the definition, as printed in docs/methods.md.
        kind: what ``fn`` consumes and returns (:class:`Kind`).
        rank_rule: how the result becomes factors (:class:`RankRule`).
        base_merge: what a merge into a base adds (:class:`BaseMerge`).
        fn: the pure function (see :class:`Kind`).
        params: the method's own parameters (besides weights, ``--rank`` and ``--energy``).
        reports_error: the result is not the exact weighted sum by design (PEFT's factor-wise ``linear``): each
            module's relative error against the exact sum is measured and reported.
        spaces: for elementwise methods, the exact spaces it runs in (``delta``, ``core``, ``knots``).
        data: what else the method needs beyond adapters (``()`` for data-free methods).
        relative_weights: only the ratios of the weights matter (scaling them all alike changes nothing, as in
            RegMean): ``tune`` searches them as shares summing to 1.
    """

    name: str
    title: str
    paper: str | None
    url: str | None
    formula: str
    kind: Kind
    rank_rule: RankRule
    base_merge: BaseMerge
    fn: Callable[..., Any]
    params: tuple[Param, ...] = field(default_factory=tuple)
    reports_error: bool = False
    spaces: tuple[str, ...] = ()
    data: tuple[str, ...] = ()
    params_cls: type | None = None
    relative_weights: bool = False

    @property
    def all_params(self) -> tuple[Param, ...]:
        """The method's parameters plus ``space`` for methods that run in several spaces."""
        return self.params + ((SPACE_PARAM,) if len(self.spaces) > 1 else ())

    @property
    def stochastic(self) -> bool:
        return any(p.name == "seed" for p in self.params)

    def param(self, name: str) -> Param | None:
        """A parameter by its name or its dataclass field (``lambda`` or ``lambda_``)."""
        return next((p for p in self.all_params if name in (p.name, p.field)), None)

    def resolve_params(self, given: dict[str, Any]) -> dict[str, Any]:
        """Every declared parameter with its value (given, else the default); refuses parameters it lacks.

        ``given`` may name a parameter by its name or its dataclass field (``lambda_``, for Python callers who cannot
        write ``lambda=``); ``None`` means not given.
        """
        unknown = sorted(k for k, v in given.items() if v is not None and self.param(k) is None)
        if unknown:
            opts = ", ".join(f"`{k}`" for k in unknown)
            takes = ", ".join(f"`{p.name}`" for p in self.all_params) or "no parameters of its own"
            raise UsageError(f"method {self.name} does not take {opts} (it takes {takes})")
        out = {}
        for p in self.all_params:
            value = given.get(p.name, given.get(p.field))
            v = p.check(value)
            out[p.name] = p.default if v is None else v
        return out

    def make_params(self, resolved: dict[str, Any]) -> Any:
        """What the method's function receives: its params dataclass built from resolved values (the dict itself
        for methods without one)."""
        if self.params_cls is None:
            return dict(resolved)
        return self.params_cls(**{p.field: resolved[p.name] for p in self.params if resolved.get(p.name) is not None})

    @property
    def takes_rank(self) -> bool:
        return self.rank_rule is not RankRule.KEEP


SPACES = ("delta", "core", "knots")
SPACE_PARAM = Param(
    "space",
    str,
    "delta",
    "where an elementwise method runs: the dense deltas, the core space (R x R cores) or the KnOTS space; "
    "the three agree for linear methods and differ by design for elementwise ones",
    choices=SPACES,
)

METHODS: dict[str, Method] = {}
_LOADED = False


def register(method: Method) -> Method:
    """Add a method to the registry (names are unique)."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} registered twice")
    METHODS[method.name] = method
    return method


def _load() -> None:
    """Import every module of ``adaptermerge.methods`` once: each registers its methods."""
    global _LOADED
    if _LOADED:
        return
    import adaptermerge.methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name != "registry":
            importlib.import_module(f"{pkg.__name__}.{info.name}")
    _LOADED = True


def get_method(name: str) -> Method:
    """Look up a method by name, with a usage error that lists the choices."""
    _load()
    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}") from None


def method_names() -> list[str]:
    _load()
    return sorted(METHODS)


def all_params() -> dict[str, list[tuple[Param, str]]]:
    """Every parameter name -> the (declaration, method name) pairs that take it (for CLI options and docs)."""
    _load()
    out: dict[str, list[tuple[Param, str]]] = {}
    for m in METHODS.values():
        for p in m.all_params:
            out.setdefault(p.name, []).append((p, m.name))
    return out


def methods_markdown() -> str:
    """docs/methods.md's method sections, generated from the declarations (a test keeps the page current)."""
    _load()
    parts = []
    for name in sorted(METHODS):
        m = METHODS[name]
        lines = [f"## `{m.name}`", "", m.title + ".", "", "```", m.formula, "```", ""]
        if m.paper:
            lines.append(f"- Reference: {m.paper}" + (f" — {m.url}" if m.url else ""))
        lines.append(f"- Output rank: {_RANK_TEXT[m.rank_rule]}")
        lines.append(f"- Merged into a base: {_BASE_TEXT[m.base_merge]}")
        if len(m.spaces) > 1:
            lines.append(f"- Spaces: {', '.join(f'`{s}`' for s in m.spaces)} (`--space`)")
        if m.data:
            lines.append(f"- Needs: {', '.join(m.data)}")
        if m.reports_error:
            lines.append("- Reports each module's relative error against the exact weighted sum.")
        if m.all_params:
            lines += ["", "| option | type | default | range | meaning |", "|---|---|---|---|---|"]
            for p in m.all_params:
                rng = p.range_text()
                lines.append(f"| `{p.option}` | {p.type.__name__} | `{p.default}` | {rng} | {p.help} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


_RANK_TEXT = {
    RankRule.KEEP: "the stacked factors as they are (sum of the input ranks); `--rank`/`--energy` do not apply",
    RankRule.EXACT: "the exact result at its numerical rank; `--rank`/`--energy` truncate it (best approximation)",
    RankRule.BEST_RANK: "best rank-k approximation; k = `--rank` (default: the largest input rank) or the smallest "
    "rank keeping `--energy` of the squared Frobenius norm",
    RankRule.REFACTOR: "re-factored to `--rank` (default: the sum of the input ranks, capped at the module size; "
    "exact at full size) or `--energy`; the kept energy is reported per module",
}
_BASE_TEXT = {
    BaseMerge.STACKED: "the exact stacked factors (no decomposition)",
    BaseMerge.ADAPTER: "the combined adapter (its rank rule applies)",
    BaseMerge.DENSE: "the dense per-module result, added straight into the base",
}
