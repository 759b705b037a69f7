"""A base model loaded once, whose LoRA deltas are swapped in place: the engine of ``tune`` and of the statistics
RegMean needs.

Every module an adapter may touch gets a forward hook that adds ``B (A x)`` (``x`` the module's input; for an
embedding, the rows of ``B`` for the input ids times ``A``) to the module's output, the same arithmetic as PEFT's
LoRA layers with the scaling folded into ``A``. :meth:`LiveModel.use` replaces the factors with another adapter's
(a candidate merge, a task adapter, or none for the base) in microseconds: nothing is re-loaded, re-wrapped or
merged into the weights, so scoring a candidate costs its forward passes only. ``tests/test_tune.py`` checks that
the scores equal those of the saved adapter evaluated with PEFT.

A hook can also capture the modules' inputs (:meth:`LiveModel.capture`), which is how
:mod:`adaptermerge.statistics` collects them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from adaptermerge.adapter import Adapter
from adaptermerge.errors import IncompatibleAdapters, UnsupportedAdapter
from adaptermerge.lowrank import LowRank
from adaptermerge.models import load_causal_lm, load_tokenizer, resolve_base

Capture = Callable[[str, torch.Tensor], None]


def module_layout(module: torch.nn.Module) -> str | None:
    """``linear``, ``conv1d`` (GPT-2's ``Conv1D``) or ``embedding`` for the layers LoRA adapts; else ``None``."""
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "conv1d"
    return None


class LiveModel:
    """The base (and its tokenizer) with a hook on each of ``modules`` that adds the active adapter's delta.

    Args:
        base: the base model folder (or a cached Hub id), loaded as a causal LM.
        modules: the module paths (as adapters name them) that candidates may touch.
        device: ``cpu`` or ``cuda``.
        progress: keep transformers' loading bar (off: it is switched off for the process, as ``evaluate`` does).
    """

    def __init__(self, base: str | os.PathLike, modules: list[str], device: str = "cpu", progress: bool = False):
        if not progress:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # transformers' own "Loading weights" bar
        self.path: Path = resolve_base(base)
        self.tokenizer = load_tokenizer(self.path)
        self.model = load_causal_lm(self.path, device=device)
        self.model.eval()
        self.device = device
        self.dtype = next(self.model.parameters()).dtype
        self._active: dict[str, LowRank] = {}
        self._capture: Capture | None = None
        self.layouts = self._check_modules(modules)
        named = dict(self.model.named_modules())
        self._handles = [named[m].register_forward_hook(self._hook(m)) for m in modules]

    def _check_modules(self, modules: list[str]) -> dict[str, str]:
        named = dict(self.model.named_modules())
        layouts: dict[str, str] = {}
        for m in modules:
            if m not in named:
                raise IncompatibleAdapters(
                    f"module {m} is not in the base {self.path} (loaded as a causal LM); the adapters were made on "
                    "another model or model class"
                )
            layout = module_layout(named[m])
            if layout is None:
                raise UnsupportedAdapter(
                    f"module {m} is a {type(named[m]).__name__}; LoRA deltas apply to linear layers and embeddings"
                )
            layouts[m] = layout
        return layouts

    def _hook(self, name: str) -> Callable[..., Any]:
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            if self._capture is not None:
                self._capture(name, x)
            lr = self._active.get(name)
            if lr is None:
                return output
            if lr.layout == "embedding":
                delta = torch.nn.functional.embedding(x, lr.B) @ lr.A
            else:
                delta = (x.to(lr.A.dtype) @ lr.A.T) @ lr.B.T
            if lr.bias is not None:
                delta = delta + lr.bias
            return output + delta.to(output.dtype)

        return hook

    def use(self, adapter: Adapter | Mapping[str, LowRank] | None) -> None:
        """Make ``adapter``'s deltas the active ones (``None``: the plain base)."""
        modules = {} if adapter is None else dict(adapter.modules if isinstance(adapter, Adapter) else adapter)
        active: dict[str, LowRank] = {}
        for name, lr in modules.items():
            if name not in self.layouts:
                raise IncompatibleAdapters(
                    f"module {name} was not prepared on this base (known: {len(self.layouts)} modules)"
                )
            if lr.magnitude is not None:
                raise UnsupportedAdapter(f"module {name} is a DoRA module; tune and regmean apply plain LoRA deltas")
            if lr.layout != self.layouts[name]:
                raise IncompatibleAdapters(
                    f"module {name} is a {lr.layout} delta but the base layer is {self.layouts[name]}"
                )
            active[name] = lr.to(dtype=self.dtype, device=self.device)
        self._active = active

    @contextmanager
    def capture(self, fn: Capture) -> Iterator[None]:
        """Call ``fn(module, input)`` for each hooked module's input during the forward passes of the block."""
        self._capture = fn
        try:
            yield
        finally:
            self._capture = None

    def close(self) -> None:
        """Remove the hooks (the model is the plain base again)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._active = {}

    def __enter__(self) -> LiveModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def live_adapters(adapters: Sequence[Any], base: Any, operation: str) -> list[Adapter]:
    """The adapters read as plain LoRA (PiSSA/OLoRA/CorDA/EVA inputs converted against ``base``), refusing what a
    :class:`LiveModel` cannot set in place: ``modules_to_save`` copies, trained token rows and DoRA updates."""
    from adaptermerge.surgery.init_conversion import plain_adapters

    loaded = plain_adapters(adapters, base=base if Path(base).is_dir() else None)
    for a in loaded:
        what = a.source or "an adapter"
        if a.extra_tensors or a.token_rows or a.modules_to_save:
            raise UnsupportedAdapter(
                f"{what} carries modules_to_save or trained token rows; {operation} sets LoRA deltas in place and "
                "does not swap full modules (combine/merge such adapters with chosen weights)"
            )
        if a.uses_dora:
            raise UnsupportedAdapter(
                f"{what} is a DoRA adapter; DoRA updates do not add linearly, so they are not merged"
            )
    return loaded
