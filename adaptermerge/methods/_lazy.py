"""``torch``, imported on first use: method modules are read by the CLI's ``--help`` (their declarations give the
method choices and options), which must answer without paying for importing torch.

Method modules write ``from adaptermerge.methods._lazy import torch`` and use torch only inside functions (and in
string annotations); ``tests/methods/test_registry.py`` checks that reading the registry imports no torch.
"""

from __future__ import annotations

from typing import Any


class _LazyTorch:
    def __getattr__(self, name: str) -> Any:
        import torch as _torch

        return getattr(_torch, name)


torch: Any = _LazyTorch()
