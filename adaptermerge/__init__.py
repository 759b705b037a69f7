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
    UnsafeFormat,
    UnsupportedAdapter,
    UsageError,
)
from adaptermerge.inspection import describe
from adaptermerge.io.adapter import load_adapter
from adaptermerge.io.checkpoint import open_checkpoint
from adaptermerge.lowrank import LowRank

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterMergeError",
    "IncompatibleAdapters",
    "InvalidAdapter",
    "InvalidCheckpoint",
    "LowRank",
    "NumericalError",
    "OutputExistsError",
    "UnsafeFormat",
    "UnsupportedAdapter",
    "UsageError",
    "__version__",
    "combine",
    "describe",
    "load_adapter",
    "open_checkpoint",
    "save_combined",
]
