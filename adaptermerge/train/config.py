"""Training settings: defaults from the usual LoRA/QLoRA recipes, checks, and the anti-pattern warnings.

Defaults follow the LoRA guidelines our users work from: r=16, lora_alpha=32 (alpha = 2r), dropout 0.05,
learning rate 2e-4, every linear layer but the output head, batch 4 with 4 accumulation steps, 3 epochs.
QLoRA adds 4-bit NF4 loading with double quantization and PEFT's ``prepare_model_for_kbit_training``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from adaptermerge.errors import UsageError
from adaptermerge.models import QUANT_TYPES

DEFAULT_EPOCHS = 3.0
MAX_LENGTH_CAP = 2048  # default --max-length when the model allows more


@dataclass
class TrainConfig:
    """Everything that decides what a training run computes (and so what its recipe records).

    Attributes:
        rank, alpha, dropout: LoRA's r, lora_alpha and lora_dropout.
        targets: ``"all-linear"`` (PEFT's rule: every linear layer but the output head) or module names.
        quantize: ``None``, ``"nf4"`` or ``"fp4"`` (QLoRA: the base is loaded in 4 bits).
        steps, epochs: length of training; ``steps`` wins when both are given (default: 3 epochs).
        lr, batch_size, grad_accum: optimiser step size; examples per device per step; accumulation steps.
        max_length: longest tokenized example (default: the model's limit, at most 2048).
        seed: seeds the LoRA initialisation, dropout and the data order.
        gradient_checkpointing, bf16, dora, rslora: the usual switches.
        save_steps: checkpoint (and evaluate, with eval data) every this many steps (default: 4 times per run).
        skip_bad_rows: leave out bad rows of the data files instead of refusing them.
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: str | list[str] = "all-linear"
    quantize: str | None = None
    steps: int | None = None
    epochs: float | None = None
    lr: float = 2e-4
    batch_size: int = 4
    grad_accum: int = 4
    max_length: int | None = None
    seed: int = 0
    gradient_checkpointing: bool = False
    bf16: bool = False
    dora: bool = False
    rslora: bool = False
    save_steps: int | None = None
    skip_bad_rows: bool = False

    def check(self) -> list[str]:
        """Refuse impossible values (``UsageError``); return warnings for the guidelines' anti-patterns."""
        from adaptermerge.guidelines import rank_findings, scaling_findings, scaling_ratio

        for name in ("rank", "batch_size", "grad_accum"):
            _positive_int(name, getattr(self, name))
        for name in ("steps", "max_length", "save_steps"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if not self.alpha > 0 or not self.lr > 0:
            raise UsageError(f"`alpha` and `lr` must be positive, got alpha={self.alpha}, lr={self.lr}")
        if self.epochs is not None and not self.epochs > 0:
            raise UsageError(f"`epochs` must be positive, got {self.epochs}")
        if not 0 <= self.dropout < 1:
            raise UsageError(f"`dropout` must be in [0, 1), got {self.dropout}")
        if self.quantize is not None and self.quantize not in QUANT_TYPES:
            raise UsageError(f"`quantize` must be one of {', '.join(QUANT_TYPES)}, got {self.quantize!r}")
        self.targets = parse_targets(self.targets)
        ratio = scaling_ratio({"r": self.rank, "lora_alpha": self.alpha, "use_rslora": self.rslora})
        findings = scaling_findings(ratio, self.alpha, self.rank) + rank_findings(self.rank)
        return [f.message for f in findings]

    @property
    def total_epochs(self) -> float:
        return self.epochs if self.epochs is not None else DEFAULT_EPOCHS

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """A config from a recipe's ``parameters`` (unknown keys are refused)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UsageError(f"unknown training parameters {unknown}; known: {', '.join(sorted(known))}")
        return cls(**d)


def parse_targets(targets: str | list[str] | tuple[str, ...]) -> str | list[str]:
    """``"all-linear"`` stays as it is (PEFT resolves it); ``"q_proj,v_proj"`` becomes a list of names."""
    if isinstance(targets, str):
        if targets.strip() == "all-linear":
            return "all-linear"
        targets = targets.split(",")
    names = [t.strip() for t in targets if t.strip()]
    if not names:
        raise UsageError("`targets` needs 'all-linear' or module names such as q_proj,v_proj")
    return names


def _positive_int(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise UsageError(f"`{name}` must be a positive integer, got {v!r}")
