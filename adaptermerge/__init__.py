"""adaptermerge: LoRA adapter merging and model surgery on the files people already have.

Example:
    >>> import adaptermerge
    >>> a = adaptermerge.load_adapter("adapters/math")  # doctest: +SKIP
    >>> b = adaptermerge.load_adapter("adapters/code")  # doctest: +SKIP
    >>> merged = adaptermerge.combine([a, b], [0.7, 0.3], method="svd", rank=32)  # doctest: +SKIP
    >>> merged.save("adapters/math-code")  # doctest: +SKIP
"""

from adaptermerge.adapter import Adapter
from adaptermerge.combination import combine, save_combined
from adaptermerge.errors import (
    AdapterMergeError,
    IncompatibleAdapters,
    InvalidAdapter,
    InvalidCheckpoint,
    InvalidData,
    NumericalError,
    OutputExistsError,
    UnsafeFormat,
    UnsupportedAdapter,
    UsageError,
)
from adaptermerge.evaluate import EvalReport, evaluate
from adaptermerge.inspection import describe
from adaptermerge.io.adapter import load_adapter
from adaptermerge.io.checkpoint import open_checkpoint
from adaptermerge.lowrank import LowRank
from adaptermerge.surgery.extract import extract_lora, save_extracted
from adaptermerge.surgery.merge import MergeReport, merge_into_base
from adaptermerge.surgery.resize import resize_adapter
from adaptermerge.train import TrainConfig, TrainResult, train_adapter

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterMergeError",
    "EvalReport",
    "IncompatibleAdapters",
    "InvalidAdapter",
    "InvalidCheckpoint",
    "InvalidData",
    "LowRank",
    "MergeReport",
    "NumericalError",
    "OutputExistsError",
    "TrainConfig",
    "TrainResult",
    "UnsafeFormat",
    "UnsupportedAdapter",
    "UsageError",
    "__version__",
    "combine",
    "describe",
    "evaluate",
    "extract_lora",
    "load_adapter",
    "merge_into_base",
    "open_checkpoint",
    "resize_adapter",
    "save_combined",
    "save_extracted",
    "train_adapter",
]
