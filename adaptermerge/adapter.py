"""The ``Adapter``: module name -> :class:`LowRank`, plus what must round-trip.

An Adapter knows nothing about merging or files. Read one with :func:`adaptermerge.load_adapter`, write it
with :func:`adaptermerge.save_adapter`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adaptermerge.lowrank import LowRank
from adaptermerge.tokens import TokenRows


@dataclass
class Adapter:
    """A LoRA adapter in canonical form.

    Attributes:
        modules: module path (as PEFT names it inside the wrapped model, without the
            ``base_model.model.`` prefix) -> LowRank, scaling folded in.
        base_model: ``base_model_name_or_path`` of the config, if any.
        task_type: PEFT task type (``CAUSAL_LM``, ``SEQ_CLS``...), if any.
        extra_tensors: non-LoRA tensors that travel with the adapter (``modules_to_save`` copies,
            saved embedding layers), keyed as PEFT writes them (``base_model.model.<path>``).
        modules_to_save: the config's ``modules_to_save`` list.
        token_rows: PEFT TrainableTokens (``trainable_token_indices``): module path -> trained rows that replace
            the base rows of that module's weight (see :mod:`adaptermerge.tokens`).
        dtype: storage dtype of the factors on disk (what :meth:`save` writes by default).
        config: the source ``adapter_config.json`` (for provenance and inspection only).
        source: where it was read from, if anywhere.
        warnings: things a person should know (unknown keys, unusual values).
        provenance: free-form record of how it was made (method, inputs, per-module report).
    """

    modules: dict[str, LowRank]
    base_model: str | None = None
    task_type: str | None = None
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    token_rows: dict[str, TokenRows] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    config: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None
    warnings: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def ranks(self) -> dict[str, int]:
        """Rank per module."""
        return {n: m.rank for n, m in self.modules.items()}

    @property
    def uses_dora(self) -> bool:
        return any(m.magnitude is not None for m in self.modules.values())

    @property
    def uses_bias(self) -> bool:
        return any(m.bias is not None for m in self.modules.values())

    def num_parameters(self) -> int:
        """Trainable-parameter count of the factors (plus bias/magnitude and extra tensors)."""
        n = 0
        for m in self.modules.values():
            n += m.A.numel() + m.B.numel()
            n += 0 if m.bias is None else m.bias.numel()
            n += 0 if m.magnitude is None else m.magnitude.numel()
        n += sum(tr.rows.numel() for tr in self.token_rows.values())
        return n + sum(t.numel() for t in self.extra_tensors.values())
