"""What each task feeds each adapted module: the statistics data-aware methods (RegMean) take, collected with
forward hooks beside :mod:`adaptermerge.evaluation`.

Task ``i``'s statistics are collected on task ``i``'s own model, the base with adapter ``i`` attached (RegMean
needs the inputs each fine-tuned model sees), over every real token of its examples (prompt and completion,
tokenized as ``evaluate`` and ``train`` tokenize them; padding never counts). The base is loaded once and the
adapters are switched in place (:class:`adaptermerge.live.LiveModel`).

Memory. Per module and task the collector keeps the input rows ``X`` (``tokens x in``) while there are fewer tokens
than input features, and the Gram matrix ``X^T X`` (``in x in``) once that is smaller, in fp32: ``min(tokens, in)
* in * 4`` bytes. Modules that read the same tensor (``q/k/v_proj`` read one hidden state, ``gate/up_proj``
another) share one record. For a Llama-2-7B adapter on all linear layers (32 layers; per layer three distinct
4096-wide inputs and one 11008-wide input) that is at most 32 * (3 * 4096^2 + 11008^2) * 4 B = 22.0 GB per task
in Gram form, or 32 * (3 * 4096 + 11008) * tokens * 4 B = 3.0 MB per token in row form (6.1 GB for 2,048
tokens). docs/regmean.md gives the figures and the ways to stay below them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from adaptermerge.adapter import Adapter
from adaptermerge.data import Row, tokenize_row
from adaptermerge.errors import InvalidData, NumericalError, UnsupportedArchitecture
from adaptermerge.evaluation import DEFAULT_MAX_LENGTH, batches, pad_batch
from adaptermerge.live import LiveModel
from adaptermerge.methods.regmean import ModuleInputs

STAT_BATCH = 16  # examples per forward pass while collecting (a fixed size: the sums are then reproducible)


@dataclass
class TaskStatistics:
    """Per module, one :class:`ModuleInputs` per task (``None`` for modules that are not linear layers).

    ``tasks`` are in the adapters' order; ``tokens[i]`` counts task ``i``'s tokens.
    """

    tasks: list[str]
    modules: dict[str, list[ModuleInputs | None]]
    tokens: list[int] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Memory held (shared records counted once)."""
        seen = {id(x): x for xs in self.modules.values() for x in xs if x is not None}
        return sum(x.nbytes for x in seen.values())


class _Accumulator:
    """One task's inputs to one module (or group of modules reading the same tensor): rows, then their Gram."""

    def __init__(self, features: int):
        self.features = features
        self.rows: list[torch.Tensor] = []
        self.count = 0
        self.gram: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        self.count += int(x.shape[0])
        if self.gram is None and self.count < self.features:
            self.rows.append(x)
            return
        if self.gram is None:
            self.gram = torch.zeros(self.features, self.features, dtype=torch.float32)
            for r in self.rows:
                self.gram.addmm_(r.T, r)
            self.rows = []
        self.gram.addmm_(x.T, x)

    def result(self) -> ModuleInputs:
        if self.gram is not None:
            return ModuleInputs(gram=self.gram, tokens=self.count)
        return ModuleInputs(
            rows=torch.cat(self.rows) if self.rows else torch.zeros(0, self.features), tokens=self.count
        )


class _Collector:
    """The hook side: each module's real-token input rows go to its (possibly shared) accumulator."""

    def __init__(self, layouts: dict[str, str]):
        self.linear = {m for m, lay in layouts.items() if lay != "embedding"}
        self.leader: dict[str, str] = {}  # module -> the module whose record it shares
        self.acc: dict[str, _Accumulator] = {}
        self.mask: torch.Tensor | None = None
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}

    def start_batch(self, mask: torch.Tensor) -> None:
        self.mask = mask.reshape(-1).bool()
        self._seen = {}

    def __call__(self, module: str, x: torch.Tensor) -> None:
        if module not in self.linear:  # embeddings: RegMean takes their weighted mean, no statistics
            return
        first = self._seen.get(id(x))
        if first is not None and first[0] is x:
            self._share(module, first[1])
            return
        self._seen[id(x)] = (x, module)  # the reference keeps the id from being reused within the batch
        if self.leader.get(module, module) != module:
            raise NumericalError(
                f"module {module} read the same tensor as {self.leader[module]} in an earlier batch but not in this "
                "one; the model's forward pass is not deterministic in its inputs"
            )
        self.leader.setdefault(module, module)
        rows = x.reshape(-1, x.shape[-1])
        if self.mask is None or rows.shape[0] != self.mask.numel():
            raise UnsupportedArchitecture(
                f"module {module} receives inputs of shape {tuple(x.shape)}, not one row per token; RegMean's "
                "statistics need a module applied to every token (mixture-of-experts layers are not supported)"
            )
        acc = self.acc.setdefault(module, _Accumulator(rows.shape[-1]))
        acc.add(rows[self.mask.to(rows.device)].detach().to(device="cpu", dtype=torch.float32))

    def _share(self, module: str, leader: str) -> None:
        known = self.leader.get(module)
        if known is None:
            self.leader[module] = leader
        elif known != leader:
            raise NumericalError(f"module {module} shares its input with {leader} in one batch and {known} in another")

    def results(self, modules: Sequence[str]) -> dict[str, ModuleInputs | None]:
        done = {m: a.result() for m, a in self.acc.items()}
        return {m: (done.get(self.leader.get(m, m)) if m in self.linear else None) for m in modules}


def collect_statistics(
    live: LiveModel,
    adapters: Sequence[Adapter],
    tasks: Sequence[tuple[str, Sequence[Row]]],
    max_length: int = DEFAULT_MAX_LENGTH,
    progress: bool = False,
) -> TaskStatistics:
    """The inputs of every module ``live`` hooks, per task, on task ``i``'s model (the base with adapter ``i``).

    Args:
        live: the base with hooks on the modules of interest.
        adapters: one adapter per task, in the same order.
        tasks: ``(name, rows)`` per task.
        max_length: longest tokenized example (longer ones are cut, as ``evaluate`` cuts them).
        progress: progress bar on stderr.
    """
    from adaptermerge.progress import bar

    if len(tasks) != len(adapters):
        raise InvalidData(f"got {len(tasks)} tasks for {len(adapters)} adapters; give one task per adapter, in order")
    modules = list(live.layouts)
    per_task: list[dict[str, ModuleInputs | None]] = []
    tokens: list[int] = []
    items = [(name, _tokenized(name, rows, live.tokenizer, max_length)) for name, rows in tasks]
    pbar = bar(sum(len(t) for _, t in items), "collecting task inputs", "example", progress, leave=False)
    leaders: dict[str, str] = {}
    for adapter, (_, examples) in zip(adapters, items, strict=True):
        live.use(adapter)
        col = _Collector(live.layouts)
        col.leader = dict(leaders)
        with live.capture(col), torch.no_grad():
            for batch in batches(examples, STAT_BATCH):
                ids, _, mask = pad_batch(batch, live.tokenizer.pad_token_id)
                col.start_batch(mask)
                live.model(input_ids=ids.to(live.device), attention_mask=mask.to(live.device))
                pbar.update(len(batch))
        leaders = col.leader
        per_task.append(col.results(modules))
        tokens.append(sum(len(t.input_ids) for t in examples))
    pbar.close()
    live.use(None)
    return TaskStatistics(
        tasks=[n for n, _ in tasks], modules={m: [pt[m] for pt in per_task] for m in modules}, tokens=tokens
    )


def _tokenized(name: str, rows: Sequence[Row], tok: Any, max_length: int) -> list[Any]:
    out = [t for t in (tokenize_row(r, tok, max_length) for r in rows) if t is not None]
    if not out:
        raise InvalidData(f"task {name}: no example has a completion token within {max_length} tokens")
    return out


def task_statistics(
    base: str | os.PathLike,
    adapters: Sequence[Adapter],
    tasks: Sequence[tuple[str, Sequence[Row]]],
    modules: Sequence[str],
    device: str = "cpu",
    max_length: int = DEFAULT_MAX_LENGTH,
    progress: bool = False,
) -> TaskStatistics:
    """Load ``base`` once, hook ``modules`` and collect every task's statistics (see :func:`collect_statistics`)."""
    with LiveModel(base, list(modules), device=device, progress=progress) as live:
        return collect_statistics(live, adapters, tasks, max_length=max_length, progress=progress)
