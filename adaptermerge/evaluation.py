"""Per-task scores of a base model, its adapters and merged models: test adapters separately and together.

The base is loaded once and adapters are switched on it with PEFT (``load_adapter`` / ``set_adapter``;
``disable_adapter`` for the base row); a merged checkpoint is loaded as its own model. Examples are batched.

Metrics (per task):

- ``loss``: mean negative log-likelihood per completion token, over all the task's completion tokens
  (token-weighted: ``sum NLL / number of completion tokens``), tokenized exactly as ``train`` tokenizes them.
- ``exact``: fraction of examples whose greedy continuation (up to EOS) equals the completion.
- ``char``: per-character accuracy of the greedy continuation: for each example, the number of positions
  where prediction and completion agree divided by the longer of the two lengths (so 1.0 only for an exact
  match), averaged over examples.

Retention compares a model with the task's own adapter (the adapter row whose name is the task's name):
for ``exact``/``char`` it is ``score / own score``; for ``loss`` it is the share of the own adapter's
improvement over the base that the model keeps, ``(loss_base - loss_model) / (loss_base - loss_own)``
(1 = as good as the own adapter, 0 = no better than the base, negative = worse than the base). It is left
out where the denominator is not positive.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptermerge.data import IGNORE_INDEX, Row, Tokenized, encode, prompt_and_target, read_task_file, tokenize_row
from adaptermerge.errors import IncompatibleAdapters, InvalidCheckpoint, UsageError
from adaptermerge.models import is_adapter_folder, load_causal_lm, load_tokenizer, resolve_base

METRICS = ("loss", "exact", "char")
LOWER_IS_BETTER = {"loss": True, "exact": False, "char": False}
DEFAULT_MAX_LENGTH = 1024


@dataclass
class EvalReport:
    """Scores per metric, model (row) and task (column), and retention against each task's own adapter.

    ``scores[metric][model][task]`` and ``retention[metric][model][task]`` (``None`` where undefined);
    ``kinds[model]`` is ``base``, ``adapter`` or ``checkpoint``; ``own[task]`` names the task's adapter.
    """

    metrics: list[str]
    tasks: list[str]
    models: list[str]
    kinds: dict[str, str]
    scores: dict[str, dict[str, dict[str, float]]]
    retention: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)
    own: dict[str, str] = field(default_factory=dict)
    examples: dict[str, int] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what ``--json`` prints)."""
        return {
            "metrics": self.metrics, "tasks": self.tasks, "models": self.models, "kinds": self.kinds,
            "paths": self.paths, "examples": self.examples, "own_adapter": self.own,
            "scores": self.scores, "retention": self.retention,
            "mean_retention": {m: {r: mean_retention(self, m, r) for r in self.models} for m in self.metrics},
        }  # fmt: skip

    def table(self) -> str:
        """One text table per metric: rows = models, columns = tasks (retention in brackets), mean retention."""
        return "\n\n".join(_table(self, m) for m in self.metrics)


def mean_retention(report: EvalReport, metric: str, model: str) -> float | None:
    """Mean of a model's defined retentions over the tasks (``None`` when none is defined)."""
    vals = [v for v in report.retention.get(metric, {}).get(model, {}).values() if v is not None]
    return sum(vals) / len(vals) if vals else None


def _table(r: EvalReport, metric: str) -> str:
    better = "lower" if LOWER_IS_BETTER[metric] else "higher"
    head = f"{metric} ({better} is better)"
    if r.own:
        head += "; (retention vs the task's own adapter)"
    width = max([len(m) for m in r.models] + [8])
    cols = [f"{t}" for t in r.tasks]
    lines = [head, f"{'model':{width}s}  {'kind':10s}  " + "  ".join(f"{c:>16s}" for c in cols) + "  mean ret."]
    for m in r.models:
        cells = []
        for t in r.tasks:
            s = r.scores[metric][m][t]
            ret = r.retention.get(metric, {}).get(m, {}).get(t)
            cells.append(f"{s:.4f}" + (f" ({ret:6.1%})" if ret is not None else " " * 9))
        mr = mean_retention(r, metric, m)
        lines.append(
            f"{m:{width}s}  {r.kinds[m]:10s}  "
            + "  ".join(f"{c:>16s}" for c in cells)
            + (f"  {mr:8.1%}" if mr is not None else "")
        )
    return "\n".join(lines)


# --- inputs ------------------------------------------------------------------------------------------------


def parse_named(items: Sequence[str | os.PathLike | tuple[str, str | os.PathLike]]) -> list[tuple[str, Path]]:
    """``PATH`` or ``NAME=PATH`` (or ``(name, path)``) to ``(name, path)``; a plain path is named by its folder.

    A string that exists as a path is a path even if it contains ``=``. Duplicate names are refused.
    """
    out: list[tuple[str, Path]] = []
    for it in items:
        if isinstance(it, tuple):
            name, path = it[0], Path(it[1])
        elif Path(it).exists() or "=" not in str(it):
            path = Path(it)
            name = path.resolve().name
        else:
            name, _, p = str(it).partition("=")
            path = Path(p)
        if not name:
            raise UsageError(f"{it}: empty name; write NAME=PATH")
        out.append((name, path))
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError(f"several models are named {', '.join(dup)}; name them apart with NAME=PATH")
    return out


def _load_tasks(tasks: Mapping[str, str | os.PathLike], max_examples: int | None) -> dict[str, list[Row]]:
    if not tasks:
        raise UsageError("give at least one task: `task` NAME=FILE.jsonl")
    if max_examples is not None and max_examples < 1:
        raise UsageError(f"`max_examples` must be positive, got {max_examples}")
    return {name: read_task_file(path, max_rows=max_examples).rows for name, path in tasks.items()}


# --- scoring -----------------------------------------------------------------------------------------------


def batches(seq: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def pad_batch(batch: Sequence[Tokenized], pad_id: int) -> tuple[Any, Any, Any]:
    """Right-padded ``(input_ids, labels, attention_mask)`` tensors of one batch of tokenized rows."""
    import torch

    width = max(len(t.input_ids) for t in batch)
    ids = torch.full((len(batch), width), int(pad_id), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, t in enumerate(batch):
        n = len(t.input_ids)
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(t.input_ids), torch.tensor(t.labels), 1
    return ids, labels, mask


def completion_loss(model: Any, tok: Any, rows: Sequence[Row], batch_size: int, max_length: int) -> float:
    """Token-weighted mean NLL of the labelled tokens (completions / assistant turns / text) of ``rows``."""
    import torch

    items = [t for t in (tokenize_row(r, tok, max_length) for r in rows) if t is not None]
    if not items:
        raise UsageError(f"no example has a completion token within {max_length} tokens")
    dev = _device_of(model)
    total, count = 0.0, 0
    for batch in batches(items, batch_size):
        ids, labels, mask = pad_batch(batch, tok.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
        target = labels[:, 1:].to(dev)
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total += float(nll)
        count += int((target != IGNORE_INDEX).sum())
    return total / count


def greedy_outputs(model: Any, tok: Any, rows: Sequence[Row], batch_size: int) -> list[tuple[str, str]]:
    """``(prediction, target)`` per row: the greedy continuation of the prompt up to EOS, decoded."""
    import torch

    pairs = [prompt_and_target(r, tok) for r in rows]
    dev = _device_of(model)
    out: list[tuple[str, str]] = []
    for batch in batches(pairs, batch_size):
        width = max(len(p) for p, _ in batch)
        ids = torch.full((len(batch), width), int(tok.pad_token_id), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (p, _) in enumerate(batch):  # left padding: every prompt ends where generation starts
            ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
        new = max(len(encode(tok, t, special=False)) for _, t in batch) + 1
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=new, do_sample=False,
                num_beams=1, pad_token_id=int(tok.pad_token_id), eos_token_id=tok.eos_token_id,
            )  # fmt: skip
        for row, (_, target) in zip(gen[:, width:].tolist(), batch, strict=True):
            if tok.eos_token_id is not None and tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id)]
            out.append((tok.decode(row, skip_special_tokens=True), target))
    return out


def exact_match(pairs: Sequence[tuple[str, str]]) -> float:
    """Fraction of predictions equal to their targets (surrounding whitespace ignored)."""
    return sum(p.strip() == t.strip() for p, t in pairs) / len(pairs)


def char_accuracy(pairs: Sequence[tuple[str, str]]) -> float:
    """Mean over examples of (agreeing positions) / max(len(prediction), len(target))."""
    accs = []
    for p, t in pairs:
        p, t = p.strip(), t.strip()
        n = max(len(p), len(t))
        accs.append(1.0 if n == 0 else sum(a == b for a, b in zip(p, t)) / n)
    return sum(accs) / len(accs)


def score_model(
    model: Any, tok: Any, tasks: Mapping[str, Sequence[Row]], metrics: Sequence[str], batch_size: int, max_length: int
) -> dict[str, dict[str, float]]:
    """``{metric: {task: score}}`` for one model."""
    model.eval()
    res: dict[str, dict[str, float]] = {m: {} for m in metrics}
    for task, rows in tasks.items():
        if "loss" in metrics:
            res["loss"][task] = completion_loss(model, tok, rows, batch_size, max_length)
        if "exact" in metrics or "char" in metrics:
            pairs = greedy_outputs(model, tok, rows, batch_size)
            if "exact" in metrics:
                res["exact"][task] = exact_match(pairs)
            if "char" in metrics:
                res["char"][task] = char_accuracy(pairs)
    return res


def _device_of(model: Any) -> Any:
    return next(model.parameters()).device


# --- the models --------------------------------------------------------------------------------------------


def evaluate(
    base: str | os.PathLike,
    models: Sequence[str | os.PathLike | tuple[str, str | os.PathLike]] = (),
    tasks: Mapping[str, str | os.PathLike] | None = None,
    metrics: Sequence[str] = ("loss",),
    max_examples: int | None = None,
    device: str = "cpu",
    batch_size: int = 16,
    max_length: int = DEFAULT_MAX_LENGTH,
    include_base: bool = True,
    progress: bool = False,
) -> EvalReport:
    """Score the base, each adapter and each merged checkpoint on each task.

    Args:
        base: the base model folder (or a cached Hub id) with its tokenizer; adapters are applied to it.
        models: adapter folders (also Trainer checkpoints) and merged checkpoint folders, as paths (named by
            folder), ``"NAME=PATH"`` strings or ``(name, path)`` pairs. An adapter named like a task is
            that task's own adapter (the reference for retention).
        tasks: ``{task name: JSONL file}`` (rows as for ``train``).
        metrics: any of ``loss``, ``exact``, ``char`` (see the module docstring for the definitions).
        max_examples: use the first N rows of each task file.
        device: ``cpu`` or ``cuda``.
        batch_size: examples per forward pass / generation batch.
        max_length: longest tokenized example.
        include_base: add the base as the first row.
        progress: progress bar on stderr.

    Returns:
        An :class:`EvalReport` (``.table()``, ``.to_dict()``; :func:`adaptermerge.plot.plot_report` for a PNG).

    Example:
        >>> import adaptermerge
        >>> rep = adaptermerge.evaluate("base", ["adapters/math", "merged"], {"math": "math.jsonl"})  # doctest: +SKIP
        >>> print(rep.table())  # doctest: +SKIP
    """
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise UsageError(f"unknown metric {bad or metrics}; choose from {', '.join(METRICS)}")
    from adaptermerge.dtypes import resolve_device

    dev = str(resolve_device(device))
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers' own "Loading weights" bars
    named = parse_named(models)
    if not named and not include_base:
        raise UsageError("nothing to evaluate: give models, or keep the base row")
    for name, path in named:
        if not path.is_dir():
            raise UsageError(f"{path} (model {name}) is not a folder")
        if name in (tasks or {}) and not is_adapter_folder(path):
            raise UsageError(f"{name} is a task name but {path} is not an adapter folder")
    rows = _load_tasks(tasks or {}, max_examples)
    base_p = resolve_base(base)
    tok = load_tokenizer(base_p)
    kinds = {"base": "base"} if include_base else {}
    paths = {"base": str(base_p)} if include_base else {}
    if include_base and "base" in dict(named):
        raise UsageError("'base' names the base row; name that model differently (NAME=PATH)")
    scores: dict[str, dict[str, dict[str, float]]] = {m: {} for m in metrics}
    bar = _bar(len(named) + include_base, progress)
    adapters = [(n, p) for n, p in named if is_adapter_folder(p)]
    checkpoints = [(n, p) for n, p in named if not is_adapter_folder(p)]
    with _adapters_on_base(base_p, adapters, dev) as switch:
        for name, ctx in switch(include_base):
            with ctx:
                _store(scores, name, score_model(ctx.model, tok, rows, metrics, batch_size, max_length))
            kinds[name] = "base" if name == "base" else "adapter"
            bar.update(1)
    for name, path in checkpoints:
        model = load_causal_lm(path, device=dev)
        _store(scores, name, score_model(model, tok, rows, metrics, batch_size, max_length))
        kinds[name] = "checkpoint"
        del model
        bar.update(1)
    bar.close()
    paths.update({n: str(p) for n, p in named})
    order = [m for m in ["base", *(n for n, _ in named)] if m in kinds]
    report = EvalReport(list(metrics), list(rows), order, kinds, scores, paths=paths)
    report.examples = {t: len(r) for t, r in rows.items()}
    _retention(report)
    return report


def _store(scores: dict, name: str, res: dict[str, dict[str, float]]) -> None:
    for metric, per_task in res.items():
        scores[metric][name] = per_task


class _Active:
    """A context in which ``model`` computes with one adapter active (or none, for the base row)."""

    def __init__(self, model: Any, adapter: str | None):
        self.model, self.adapter, self._cm = model, adapter, None

    def __enter__(self) -> _Active:
        if self.adapter is None:
            self._cm = self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else None
            if self._cm is not None:
                self._cm.__enter__()
        else:
            self.model.set_adapter(self.adapter)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._cm is not None:
            self._cm.__exit__(*exc)


@contextmanager
def _adapters_on_base(base: Path, adapters: Sequence[tuple[str, Path]], device: str) -> Iterator[Any]:
    """Load the base once and every adapter onto it (PEFT ``load_adapter``), and yield a row iterator."""
    model = load_causal_lm(base, device=device)
    internal = {}
    for i, (name, path) in enumerate(adapters):
        key = f"a{i}"  # PEFT adapter names become module keys: no dots or slashes
        internal[name] = key
        try:
            if i == 0:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, str(path), adapter_name=key, is_trainable=False)
            else:
                model.load_adapter(str(path), adapter_name=key, is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as e:
            raise IncompatibleAdapters(
                f"adapter {path} does not fit the base {base}: {' '.join(str(e).split())[:300]}"
            ) from None
        except OSError as e:
            raise InvalidCheckpoint(f"cannot read adapter {path}: {' '.join(str(e).split())[:300]}") from None
    model.to(device)

    def rows(include_base: bool) -> Iterator[tuple[str, _Active]]:
        if include_base:
            yield "base", _Active(model, None)
        for name, key in internal.items():
            yield name, _Active(model, key)

    yield rows


def report_from_scores(
    metrics: Sequence[str],
    tasks: Sequence[str],
    scores: Mapping[str, Mapping[str, Mapping[str, float]]],
    kinds: Mapping[str, str],
    examples: Mapping[str, int] | None = None,
) -> EvalReport:
    """An :class:`EvalReport` from ``scores[model][metric][task]`` computed elsewhere (models in insertion order),
    with retention filled in as :func:`evaluate` fills it (a model named like a task is that task's own adapter)."""
    models = list(scores)
    by_metric = {m: {name: dict(scores[name][m]) for name in models} for m in metrics}
    report = EvalReport(list(metrics), list(tasks), models, dict(kinds), by_metric, examples=dict(examples or {}))
    _retention(report)
    return report


def _retention(r: EvalReport) -> None:
    """Fill ``own`` (task -> adapter of the same name) and ``retention`` per metric."""
    r.own = {t: t for t in r.tasks if r.kinds.get(t) == "adapter"}
    for metric in r.metrics:
        r.retention[metric] = {m: {} for m in r.models}
        for t, own in r.own.items():
            for m in r.models:
                r.retention[metric][m][t] = _ret(r, metric, m, t, own)


def _ret(r: EvalReport, metric: str, model: str, task: str, own: str) -> float | None:
    s = r.scores[metric]
    if metric == "loss":
        if "base" not in s:
            return None
        gain = s["base"][task] - s[own][task]
        return (s["base"][task] - s[model][task]) / gain if gain > 0 and math.isfinite(gain) else None
    return s[model][task] / s[own][task] if s[own][task] > 0 else None


def _bar(total: int, enabled: bool) -> Any:
    from adaptermerge.progress import bar

    return bar(total, "evaluating", "model", enabled, leave=False)
