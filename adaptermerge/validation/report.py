"""The validation report: a list of named checks, each pass / warn / fail, with a message and figures.

The JSON form (``ValidationReport.to_dict``) is a stable schema, documented in docs/validate.md: keys in a
fixed order, check names fixed per kind of check, floats rounded to 6 significant digits (so the same inputs
give the same bytes on machines whose BLAS rounds differently), NaN/Inf written as ``null`` (strict JSON).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

SCHEMA = "adaptermerge.validate/1"
STATUSES = ("pass", "warn", "fail")


@dataclass
class Check:
    """One check's outcome.

    Attributes:
        name: stable dotted identifier (``adapter.finite``, ``base.modules``, ``faithfulness.logits``...).
        status: ``pass``, ``warn`` (deployable, but look) or ``fail`` (not safe to deploy as it is).
        message: one line for people.
        figures: the numbers behind the verdict (JSON-ready).
        hint: what to do about a warning or failure, when something can be done.
        subject: the input the check is about (a path), when there are several.
    """

    name: str
    status: str
    message: str
    figures: dict[str, Any] = field(default_factory=dict)
    hint: str | None = None
    subject: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "subject": self.subject,
            "message": self.message,
            "hint": self.hint,
            "figures": jsonable(self.figures),
        }


@dataclass
class ValidationReport:
    """What :func:`adaptermerge.validate` found. ``ok`` is True when no check failed."""

    path: str
    kind: str  # "adapter", "checkpoint" or "unknown"
    inputs: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(c.status == "fail" for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    def check(self, name: str, subject: str | None = None) -> Check | None:
        """The first check called ``name`` (about ``subject`` when given), or None."""
        return next((c for c in self.checks if c.name == name and (subject is None or c.subject == subject)), None)

    def add(self, *checks: Check) -> None:
        self.checks.extend(checks)

    def summary(self) -> dict[str, int]:
        return {s: sum(c.status == s for c in self.checks) for s in STATUSES}

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "ok": self.ok,
            "path": self.path,
            "kind": self.kind,
            "inputs": jsonable(self.inputs),
            "summary": self.summary(),
            "checks": [c.to_dict() for c in self.checks],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def to_text(self) -> str:
        """One line per check, then the verdict."""
        lines = []
        for c in self.checks:
            about = f" [{c.subject}]" if c.subject and c.subject != self.path else ""
            lines.append(f"{c.status.upper():4s}  {c.name}{about}: {c.message}")
            if c.hint and c.status != "pass":
                lines.append(f"      fix: {c.hint}")
        s = self.summary()
        verdict = "safe to deploy" if self.ok else "NOT safe to deploy"
        lines.append(f"{verdict}: {s['pass']} passed, {s['warn']} warnings, {s['fail']} failed")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """The validation section of a model card."""
        from adaptermerge import __version__

        s = self.summary()
        head = "passed" if self.ok else "FAILED"
        lines = [
            "## Validation",
            "",
            f"`adaptermerge validate` {__version__}: **{head}** ({s['pass']} passed, {s['warn']} warnings, "
            f"{s['fail']} failed).",
            "",
            "| check | status | result |",
            "|---|---|---|",
        ]
        for c in self.checks:
            lines.append(f"| `{c.name}` | {c.status} | {c.message.replace('|', '/')} |")
        return "\n".join(lines) + "\n"


def jsonable(value: Any) -> Any:
    """``value`` with floats rounded to 6 significant digits, NaN/Inf as None, tuples as lists."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return jsonable(value.item())
    return str(value)
