"""adaptermerge: LoRA adapter merging and model surgery on the files people already have.

Example:
    >>> import adaptermerge
    >>> a = adaptermerge.load_adapter("adapters/math")  # doctest: +SKIP
    >>> b = adaptermerge.load_adapter("adapters/code")  # doctest: +SKIP
    >>> merged = adaptermerge.combine([a, b], [0.7, 0.3], method="svd", rank=32)  # doctest: +SKIP
    >>> adaptermerge.save_adapter(merged, "adapters/math-code")  # doctest: +SKIP
"""

from typing import TYPE_CHECKING

from adaptermerge.errors import (
    AdapterMergeError,
    IncompatibleAdapters,
    InvalidAdapter,
    InvalidCheckpoint,
    InvalidData,
    NumericalError,
    OutputExistsError,
    PublishError,
    UnsafeFormat,
    UnsupportedAdapter,
    UnsupportedArchitecture,
    UsageError,
    ValidationFailed,
)

# Public names -> the module that defines them. They are imported on first use (PEP 562), so that
# ``import adaptermerge`` and the CLI's ``--help``/``--version`` do not pay for importing torch.
_LAZY = {
    "Adapter": "adaptermerge.adapter",
    "combine": "adaptermerge.combination",
    "save_combined": "adaptermerge.combination",
    "describe": "adaptermerge.inspection",
    "DistillSettings": "adaptermerge.distillation",
    "distill": "adaptermerge.distillation",
    "save_distilled": "adaptermerge.distillation",
    "load_adapter": "adaptermerge.io.adapter",
    "save_adapter": "adaptermerge.io.adapter",
    "open_checkpoint": "adaptermerge.io.checkpoint",
    "LowRank": "adaptermerge.lowrank",
    "extract_lora": "adaptermerge.surgery.extract",
    "save_extracted": "adaptermerge.surgery.extract",
    "MergeReport": "adaptermerge.surgery.merge",
    "merge_into_base": "adaptermerge.surgery.merge",
    "resize_adapter": "adaptermerge.surgery.resize",
    "convert_to_plain_lora": "adaptermerge.surgery.init_conversion",
    "PushResult": "adaptermerge.hub",
    "push": "adaptermerge.hub",
    "Check": "adaptermerge.validation",
    "ValidationReport": "adaptermerge.validation",
    "validate": "adaptermerge.validation",
    "EvalReport": "adaptermerge.evaluation",
    "evaluate": "adaptermerge.evaluation",
    "TrainConfig": "adaptermerge.train",
    "TrainResult": "adaptermerge.train",
    "train_adapter": "adaptermerge.train",
    "TuneResult": "adaptermerge.tuning",
    "tune": "adaptermerge.tuning",
}

if TYPE_CHECKING:
    from adaptermerge.adapter import Adapter
    from adaptermerge.combination import combine, save_combined
    from adaptermerge.distillation import DistillSettings, distill, save_distilled
    from adaptermerge.evaluation import EvalReport, evaluate
    from adaptermerge.hub import PushResult, push
    from adaptermerge.inspection import describe
    from adaptermerge.io.adapter import load_adapter, save_adapter
    from adaptermerge.io.checkpoint import open_checkpoint
    from adaptermerge.lowrank import LowRank
    from adaptermerge.surgery.extract import extract_lora, save_extracted
    from adaptermerge.surgery.init_conversion import convert_to_plain_lora
    from adaptermerge.surgery.merge import MergeReport, merge_into_base
    from adaptermerge.surgery.resize import resize_adapter
    from adaptermerge.train import TrainConfig, TrainResult, train_adapter
    from adaptermerge.tuning import TuneResult, tune
    from adaptermerge.validation import Check, ValidationReport, validate


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'adaptermerge' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterMergeError",
    "Check",
    "DistillSettings",
    "EvalReport",
    "IncompatibleAdapters",
    "InvalidAdapter",
    "InvalidCheckpoint",
    "InvalidData",
    "LowRank",
    "MergeReport",
    "NumericalError",
    "OutputExistsError",
    "PublishError",
    "PushResult",
    "TrainConfig",
    "TrainResult",
    "TuneResult",
    "UnsafeFormat",
    "UnsupportedAdapter",
    "UnsupportedArchitecture",
    "UsageError",
    "ValidationFailed",
    "ValidationReport",
    "__version__",
    "combine",
    "convert_to_plain_lora",
    "describe",
    "distill",
    "evaluate",
    "extract_lora",
    "load_adapter",
    "merge_into_base",
    "open_checkpoint",
    "push",
    "resize_adapter",
    "save_adapter",
    "save_combined",
    "save_distilled",
    "save_extracted",
    "validate",
    "train_adapter",
    "tune",
]
