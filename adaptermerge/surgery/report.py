"""What a merge reports: per-module figures and warnings (shared by the executor and the 4-bit handlers)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ModuleResult:
    """Per-module figures of a merge."""

    module: str
    key: str
    delta_rel_norm: float  # ||delta|| / ||W||
    quant_type: str | None = None
    requant_rel_error: float | None = None  # ||deq(out) - (W + delta)|| / ||W + delta||
    delta_survival: float | None = None  # share of delta the stored weights carry: <deq(out) - W, delta> / ||delta||^2
    plain_requant_rel_error: float | None = None  # same with absmax scales (what PEFT's path gives)


@dataclass
class MergeReport:
    output: str
    modules: list[ModuleResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    bytes_written: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
