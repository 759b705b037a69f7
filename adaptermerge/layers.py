"""Layer groups: which part of the network a module belongs to, for weights given per group of layers.

A module's *layer index* is the first all-digit component of its path (``model.layers.3.mlp.up_proj`` -> 3,
``transformer.h.11.attn.c_attn`` -> 11). Modules without one (token embeddings, the output head) form the
``embeddings`` group. The repeated blocks are split in thirds by depth, ``group = floor(3 * index / num_layers)``:
``early``, ``middle``, ``late`` (a 2-layer model has only ``early`` and ``middle``; empty groups are left out).

A weight per group is written as a mapping whose keys say which modules they cover, so that a recipe replays
without knowing how the groups were chosen: ``embeddings`` or ``layers A-B`` (inclusive block indices)::

    {"embeddings": 0.2, "layers 0-10": 0.5, "layers 11-21": 0.7, "layers 22-31": 0.4}

Example:
    >>> [g.key for g in layer_groups(32)]
    ['embeddings', 'layers 0-10', 'layers 11-21', 'layers 22-31']
    >>> module_weight({"embeddings": 0.2, "layers 0-10": 0.5, "layers 11-31": 0.7}, "model.layers.12.mlp.up_proj")
    0.7
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from adaptermerge.errors import UsageError

EMBEDDINGS = "embeddings"
THIRDS = ("early", "middle", "late")
_RANGE = re.compile(r"^layers (\d+)-(\d+)$")

Weight = float | Mapping[str, float]


@dataclass(frozen=True)
class LayerGroup:
    """A named group of modules: the ``embeddings`` group (``first is None``) or the blocks ``first..last``."""

    name: str
    first: int | None = None
    last: int | None = None

    @property
    def key(self) -> str:
        """How a weight mapping names this group (``embeddings`` or ``layers A-B``)."""
        return EMBEDDINGS if self.first is None else f"layers {self.first}-{self.last}"


def layer_index(module: str) -> int | None:
    """The block index of a module path (its first all-digit component), or ``None`` outside the blocks."""
    for part in module.split("."):
        if part.isdigit():
            return int(part)
    return None


def layer_groups(num_layers: int) -> list[LayerGroup]:
    """``embeddings`` plus the non-empty thirds (early / middle / late) of ``num_layers`` blocks."""
    if num_layers < 1:
        raise UsageError(f"a model needs at least one layer to group, got {num_layers}")
    members: dict[int, list[int]] = {}
    for i in range(num_layers):
        members.setdefault(math.floor(3 * i / num_layers), []).append(i)
    return [LayerGroup(EMBEDDINGS)] + [LayerGroup(THIRDS[g], min(ix), max(ix)) for g, ix in sorted(members.items())]


def groups_used(groups: Iterable[LayerGroup], modules: Iterable[str]) -> list[LayerGroup]:
    """The groups that hold at least one of ``modules`` (a search has nothing to tune in the others)."""
    mods = list(modules)
    return [g for g in groups if any(_covers(g.key, m) for m in mods)]


def module_weight(weight: Weight, module: str) -> float:
    """The weight that applies to ``module``: the number itself, or the value of the group key that covers it."""
    if not isinstance(weight, Mapping):
        return float(weight)
    for key, value in weight.items():
        if _covers(key, module):
            return float(value)
    raise UsageError(
        f"no layer group of the weights {dict(weight)} covers module {module}; give `embeddings` and "
        "`layers A-B` keys that cover every module the adapters touch"
    )


def check_weight(weight: Weight) -> Weight:
    """A number, or a mapping with valid group keys (``embeddings``, ``layers A-B`` with A <= B) and finite values."""
    if not isinstance(weight, Mapping):
        return float(weight)
    if not weight:
        raise UsageError("a weight per layer group must name at least one group")
    out: dict[str, float] = {}
    for key, value in weight.items():
        k = str(key)
        m = _RANGE.match(k)
        if k != EMBEDDINGS and (m is None or int(m.group(1)) > int(m.group(2))):
            raise UsageError(f"layer group {k!r} is not `embeddings` or `layers A-B` (A <= B)")
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise UsageError(f"the weight of layer group {k!r} must be a number, got {value!r}") from None
        if not math.isfinite(v):
            raise UsageError(f"the weight of layer group {k!r} must be finite, got {v}")
        out[k] = v
    return out


def describe_weight(weight: Weight) -> str:
    """``0.5`` or ``embeddings 0.2, layers 0-10 0.5`` (for cards and tables)."""
    if not isinstance(weight, Mapping):
        return f"{float(weight):g}"
    return ", ".join(f"{k} {float(v):g}" for k, v in weight.items())


def _covers(key: str, module: str) -> bool:
    idx = layer_index(module)
    if key == EMBEDDINGS:
        return idx is None
    m = _RANGE.match(key)
    return m is not None and idx is not None and int(m.group(1)) <= idx <= int(m.group(2))
