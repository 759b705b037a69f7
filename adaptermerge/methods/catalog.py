"""Shared pieces of the task-vector and subspace method modules: the spaces, and checking a params dataclass
against the method's declared parameters (:class:`~adaptermerge.methods.registry.Param`).

Two function families, one signature each (see :class:`~adaptermerge.methods.registry.Kind`):

* elementwise: ``fn(tensors, weights, params, generator=None) -> Tensor`` on a list of same-shape tensors (dense
  deltas, R x R core-space cores, or KnOTS per-task ``S V_i^T`` blocks; see :mod:`adaptermerge.methods.spaces`);
* factored: ``fn(terms, params) -> (B, A)`` on ``terms = [(w_i, LowRank_i), ...]`` of one module.
"""

from __future__ import annotations

from typing import Any

from adaptermerge.errors import UsageError
from adaptermerge.methods.registry import SPACES, Param

__all__ = ["SPACES", "validate_declared"]


def validate_declared(method: str, params: Any, declared: tuple[Param, ...]) -> None:
    """Check every declared parameter of a params dataclass against its :class:`Param` (type and range)."""
    for p in declared:
        value = getattr(params, p.field)
        if value is None and p.default is None:
            continue
        if p.type is bool and not isinstance(value, bool):
            raise UsageError(f"{method}: `{p.name}` must be true or false, got {value!r}")
        if p.type in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UsageError(f"{method}: `{p.name}` must be a number, got {value!r}")
        if p.type is int and not isinstance(value, int):
            raise UsageError(f"{method}: `{p.name}` must be an integer, got {value!r}")
        try:
            p.check(value)
        except UsageError as e:
            raise UsageError(f"{method}: {e}") from None
