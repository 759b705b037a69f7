"""One exception tree for everything the library reports to its users.

Every error carries a message a person can act on and an ``exit_code`` that the CLI uses:
2 for usage errors (wrong arguments, output folder in the way), 1 for bad data.
"""

from __future__ import annotations


class AdapterMergeError(Exception):
    """Base of all adaptermerge errors."""

    exit_code: int = 1


class UsageError(AdapterMergeError):
    """The call itself is wrong (arguments, counts, output location)."""

    exit_code = 2


class OutputExistsError(UsageError):
    """The output folder exists and is not empty, and overwrite was not asked for."""


class InvalidAdapter(AdapterMergeError):
    """An adapter folder is missing, corrupt or inconsistent."""


class UnsafeFormat(InvalidAdapter):
    """The only weights available are in a pickle-based format, which we never load."""


class UnsupportedAdapter(AdapterMergeError):
    """A valid adapter of a kind this operation does not handle (e.g. non-LoRA PEFT types)."""


class IncompatibleAdapters(AdapterMergeError):
    """Adapters that cannot be combined (different bases, shapes, layouts, DoRA...)."""


class InvalidCheckpoint(AdapterMergeError):
    """A base model checkpoint folder is missing, corrupt or inconsistent."""


class UnsupportedArchitecture(AdapterMergeError):
    """A valid checkpoint whose architecture an operation cannot handle exactly (an unknown model class, a
    layer layout that cannot be known, a model transformers does not 4-bit quantize)."""


class NumericalError(AdapterMergeError):
    """A computation produced NaN/Inf or lost what it was meant to keep."""


class ValidationFailed(AdapterMergeError):
    """``validate`` found a failing check where a valid folder was required (``push --require-valid``)."""


class PublishError(AdapterMergeError):
    """Publishing to the Hub failed: no token, refused token, no network, or the Hub refused the upload."""


class InvalidData(AdapterMergeError):
    """A task data file (JSONL) is missing, empty, or has rows of the wrong form."""
