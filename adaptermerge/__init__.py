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
    NumericalError,
    OutputExistsError,
    PublishError,
    UnsafeFormat,
    UnsupportedAdapter,
    UsageError,
    ValidationFailed,
)
from adaptermerge.hub import PushResult, push
from adaptermerge.inspection import describe
from adaptermerge.io.adapter import load_adapter
from adaptermerge.io.checkpoint import open_checkpoint
from adaptermerge.lowrank import LowRank
from adaptermerge.surgery.extract import extract_lora, save_extracted
from adaptermerge.surgery.merge import MergeReport, merge_into_base
from adaptermerge.surgery.resize import resize_adapter
from adaptermerge.validation import Check, ValidationReport, validate

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterMergeError",
    "Check",
    "IncompatibleAdapters",
    "InvalidAdapter",
    "InvalidCheckpoint",
    "LowRank",
    "MergeReport",
    "NumericalError",
    "OutputExistsError",
    "PublishError",
    "PushResult",
    "UnsafeFormat",
    "UnsupportedAdapter",
    "UsageError",
    "ValidationFailed",
    "ValidationReport",
    "__version__",
    "combine",
    "describe",
    "extract_lora",
    "load_adapter",
    "merge_into_base",
    "open_checkpoint",
    "push",
    "resize_adapter",
    "save_combined",
    "save_extracted",
    "validate",
]
