"""``tune``: find the merge that keeps every task, from a few examples per task, with a gradient-free search.

For each method asked for, CMA-ES (the ``cma`` package, as mergekit-evolve uses) searches the adapters' weights
(one per adapter, or one per adapter and layer group: embeddings / early / middle / late thirds of the blocks, see
:mod:`adaptermerge.layers`) and the method's own numeric parameters. A candidate is merged in factored form in
memory (:func:`adaptermerge.combine`) and scored with its deltas set in place on the base, loaded once
(:class:`adaptermerge.live.LiveModel`), so it costs milliseconds of merging plus the forward passes.

The objective (lower is better) is LoraHub's, on the tuning part of every task file::

    objective = mean over tasks of badness(task) + l1 * mean |w|,   badness = loss, or 1 - accuracy (exact, char)

The small pull towards zero weights (``l1``, LoraHub's 0.05) prefers the simpler of two merges that score alike.

``objective="worst"`` scores a candidate by the task it serves worst instead, which is what "keep every task"
asks for. Each task's own adapter and the base are scored once on the tuning rows first, and a task's kept share is
``score / own`` for an accuracy and ``(base - loss) / (base - own)`` for the loss (the share of the adapter's
improvement over the base; 1 when the adapter does not improve on the base there and the merge is no worse)::

    objective = 1 - min over tasks of kept(task) + l1 * mean |w|

The mean lets a search trade one task for another (a winner that keeps 91% of one task and 69% of another);
the worst-task objective does not.

Search space, in coordinates scaled to [0, 1] for CMA-ES (``sigma0 = 0.25``, starting from the method's defaults):

- weights in ``[0, 1.5]`` (LoraHub searches ``[-1.5, 1.5]``; a negative weight subtracts a task's skill, which a
  merge meant to keep every task never wants, and RegMean's weights weigh squared errors, so they are >= 0); for a
  method that only sees their ratios (RegMean) they are used as shares summing to 1;
- a float parameter with a declared finite range (``density``, ``gamma``, ``epsilon``, ``common_fraction``,
  ``alpha``) in that range; ``lambda`` (the global scale) in ``[0, 2]``; every other parameter (seeds, switches,
  spaces, ``keep`` whose default depends on the task count) stays at its default.

The budget (``budget`` evaluations) is split evenly between the methods; each search first scores the method's
defaults. Part of each task file (``holdout``, default 0.3) is never seen by the search (nor by RegMean's
statistics): the winner, each method's defaults, the single adapters and the base are scored on it, so the
held-out table shows whether the search overfit its handful of examples. Deterministic per seed.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adaptermerge.adapter import Adapter
from adaptermerge.combination import combine
from adaptermerge.data import TaskData, format_lines, named_tasks, read_task_file
from adaptermerge.distillation import DistillSettings, distill_recipe, distill_summary, refine
from adaptermerge.errors import AdapterMergeError, UsageError
from adaptermerge.evaluation import (
    DEFAULT_MAX_LENGTH,
    LOWER_IS_BETTER,
    METRICS,
    EvalReport,
    report_from_scores,
    score_model,
)
from adaptermerge.layers import LayerGroup, groups_used, layer_groups, layer_index
from adaptermerge.live import LiveModel, live_adapters
from adaptermerge.methods.registry import Method, get_method

DEFAULT_METHODS = ("linear", "ties", "regmean")
OBJECTIVES = ("mean", "worst")
GRANULARITIES = ("adapter", "layer-group")
DEFAULT_BUDGET = 120
DEFAULT_HOLDOUT = 0.3
DEFAULT_L1 = 0.05
WEIGHT_RANGE = (0.0, 1.5)
LAMBDA_RANGE = (0.0, 2.0)
SIGMA0 = 0.25
FAILED = 1e9  # what CMA-ES is told for a candidate the method refuses (its log entry says why)
SPLIT_SEED = "adaptermerge-holdout"  # the held-out split does not depend on --seed: seeds compare on the same rows


@dataclass(frozen=True)
class Variable:
    """One searched number: a weight (of ``adapter`` in ``group``) or a method parameter."""

    name: str
    low: float
    high: float
    start: float
    adapter: int | None = None
    group: str | None = None

    def value(self, u: float) -> float:
        """The value at the scaled coordinate ``u`` in [0, 1]."""
        return self.low + min(max(u, 0.0), 1.0) * (self.high - self.low)

    def scaled(self, v: float) -> float:
        return (v - self.low) / (self.high - self.low)


@dataclass
class Candidate:
    """One evaluated merge: its method, weights and parameters, per-task scores and objective."""

    index: int
    method: str
    weights: list[Any]
    params: dict[str, Any]
    scores: dict[str, float]
    objective: float
    seconds: float
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index, "method": self.method, "weights": self.weights, "params": self.params,
            "scores": self.scores, "objective": self.objective, "seconds": round(self.seconds, 4), "error": self.error,
        }  # fmt: skip


@dataclass
class TuneResult:
    """The winner and everything needed to judge it.

    Attributes:
        best: the winning candidate (method, weights, parameters, tuning scores).
        adapter: the winning merge as an :class:`Adapter` (what :attr:`output` holds): the search's winner, refined
            when ``distill`` was given.
        searched: the search's winner before any distillation (``adapter`` itself without ``distill``).
        report: the held-out table (rows: base, each task's adapter, each method's defaults, the winner); on the
            tuning rows when ``holdout`` is 0 (``report_split``).
        candidates: every evaluated candidate, in order.
        settings: the call's settings (methods, budget, metric, seed, ...).
        seconds: wall time of the whole call; ``search_seconds`` of the search alone.
        output: the written folder, if any.
    """

    best: Candidate
    adapter: Adapter
    report: EvalReport
    report_split: str
    candidates: list[Candidate]
    settings: dict[str, Any]
    seconds: float = 0.0
    search_seconds: float = 0.0
    output: Path | None = None
    split: dict[str, dict[str, Any]] = field(default_factory=dict)
    searched: Adapter | None = None

    @property
    def distilled(self) -> bool:
        """The winner was refined by distillation (``adapter`` is the refined merge)."""
        return bool(self.settings.get("distill"))

    @property
    def tuned_name(self) -> str:
        """The report's row of the written merge (the refined one when the winner was distilled)."""
        return f"tuned ({self.best.method})" + (" + distill" if self.distilled else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "best": self.best.to_dict(), "settings": self.settings, "split": self.split,
            "report_split": self.report_split, "report": self.report.to_dict(), "seconds": round(self.seconds, 2),
            "search_seconds": round(self.search_seconds, 2), "evaluations": len(self.candidates),
            "output": None if self.output is None else str(self.output),
        }  # fmt: skip


# ----------------------------------------------------------------------------------------------- the call


def tune(
    base: str | os.PathLike,
    adapters: Sequence[str | os.PathLike | Adapter],
    tasks: Mapping[str, str | os.PathLike] | Sequence[tuple[str, str | os.PathLike]],
    methods: Sequence[str] = DEFAULT_METHODS,
    granularity: str = "adapter",
    budget: int = DEFAULT_BUDGET,
    metric: str = "loss",
    seed: int = 0,
    holdout: float = DEFAULT_HOLDOUT,
    l1: float = DEFAULT_L1,
    objective: str = "mean",
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    max_examples: int | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    progress: bool = False,
    distill: DistillSettings | None = None,
) -> TuneResult:
    """Search merge methods, weights and parameters for the merge that scores best on every task.

    Args:
        base: the base model folder the adapters were trained on (loaded once).
        adapters: two or more adapter folders (or :class:`Adapter` objects read from folders).
        tasks: one task per adapter, in the adapters' order: ``{name: file.jsonl}`` or ``(name, file)`` pairs
            (rows as ``evaluate`` reads them; ``name`` labels the task in tables).
        methods: registry methods to search (the budget is split evenly between them).
        granularity: ``adapter`` (one weight per adapter) or ``layer-group`` (one per adapter and layer group).
        budget: candidate evaluations in all.
        metric: ``loss`` (lower is better), ``exact`` or ``char`` (higher is better).
        seed: the search's seed (the result is the same for the same seed).
        holdout: fraction of each task file kept out of the search and scored at the end (0: none).
        l1: weight of the pull towards small weights in the objective.
        objective: ``mean`` (the mean badness over the tasks, LoraHub's) or ``worst`` (1 - the smallest share of
            its own adapter's score that any task keeps; see the module docstring).
        out: write the winner (``out/adapter``: adapter folder with card and replayable recipe), the log of every
            candidate (``out/tune_log.json``) and the held-out table and chart (``out/tune_report.json``,
            ``out/tune_report.png``), atomically.
        overwrite: replace a non-empty ``out``.
        max_examples: use the first N rows of each task file.
        batch_size: examples per forward pass while scoring.
        device: ``cpu`` or ``cuda``.
        progress: progress bar (with the best objective so far) on stderr.
        distill: refine the winner by distillation on the tuning rows (:mod:`adaptermerge.distillation`); the held-out
            table then shows the winner before and after, the written adapter is the refined one and its recipe
            replays both stages (``adaptermerge distill --recipe``).

    Example:
        >>> import adaptermerge
        >>> res = adaptermerge.tune("base", ["a", "b"], {"a": "a.jsonl", "b": "b.jsonl"}, out="ab-tuned")  # doctest: +SKIP
        >>> res.best.method, res.best.weights, res.report.table()  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    specs = _check_call(methods, granularity, budget, metric, holdout, l1, adapters, tasks, seed, objective)
    pairs = _task_pairs(tasks)
    _check_output(out, base, adapters, overwrite)
    tuning, held = _split(pairs, holdout, max_examples, metric)
    loaded = live_adapters(adapters, base, "tune")
    settings = {
        "methods": [s.name for s in specs], "granularity": granularity, "budget": budget, "metric": metric,
        "seed": seed, "holdout": holdout, "l1": l1, "objective": objective, "max_examples": max_examples,
        "weight_range": list(WEIGHT_RANGE), "lambda_range": list(LAMBDA_RANGE), "optimizer": "cma-es",
        "distill": None if distill is None else asdict(distill),
    }  # fmt: skip
    modules = sorted({m for a in loaded for m in a.modules})
    with LiveModel(base, modules, device=device, progress=progress) as live:
        stats = _statistics(live, specs, loaded, tuning, progress)
        groups = _groups(live, modules) if granularity == "layer-group" else None
        ctx = _Context(live, loaded, stats, {n: d.rows for n, d in tuning}, metric, l1, batch_size, progress)
        if objective == "worst":
            ctx.references = _references(ctx)
            settings["references"] = ctx.references
        t_search = time.perf_counter()
        candidates = _search_all(ctx, specs, groups, budget, seed)
        search_seconds = time.perf_counter() - t_search
        best = _winner(candidates)
        found = _final_merge(base, loaded, tuning, best)
        finals = {f"tuned ({best.method})": found}
        if distill is not None:
            finals[f"tuned ({best.method}) + distill"] = refine(live, loaded, found, tuning, distill, progress)
        report_rows = {n: d.rows for n, d in (held if holdout > 0 else tuning)}
        report = _report(ctx, specs, finals, report_rows)
    split = {
        n: {"tune": len(d.rows), "held_out": len(h.rows), "tune_lines": format_lines(d.lines),
            "held_out_lines": format_lines(h.lines)}
        for (n, d), (_, h) in zip(tuning, held, strict=True)
    }  # fmt: skip
    result = TuneResult(
        best, list(finals.values())[-1], report, "held-out" if holdout > 0 else "tuning (no held-out rows)", candidates, settings,
        search_seconds=search_seconds, split=split, searched=found,
    )  # fmt: skip
    result.seconds = time.perf_counter() - t0
    if out is not None:
        result.output = write_tune_output(result, out, overwrite)
    return result


def _check_call(
    methods: Sequence[str],
    granularity: str,
    budget: int,
    metric: str,
    holdout: float,
    l1: float,
    adapters: Sequence[Any],
    tasks: Any,
    seed: int,
    objective: str = "mean",
) -> list[Method]:
    """Refuse impossible settings before anything is read."""
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    if not methods:
        raise UsageError("give at least one method to search (`methods` linear,ties,...)")
    specs = [get_method(m) for m in dict.fromkeys(methods)]
    if granularity not in GRANULARITIES:
        raise UsageError(f"`granularity` must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    if metric not in METRICS:
        raise UsageError(f"`metric` must be one of {', '.join(METRICS)}, got {metric!r}")
    if int(budget) != budget or budget < len(specs):
        raise UsageError(
            f"`budget` must be an integer of at least one evaluation per method ({len(specs)}), got {budget}"
        )
    if not (0.0 <= holdout < 1.0):
        raise UsageError(f"`holdout` must be in [0, 1), got {holdout}")
    if not (l1 >= 0.0 and math.isfinite(l1)):
        raise UsageError(f"`l1` must be a finite number >= 0, got {l1}")
    if objective not in OBJECTIVES:
        raise UsageError(f"`objective` must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if int(seed) != seed or seed < 0:
        raise UsageError(f"`seed` must be a non-negative integer, got {seed}")
    if len(adapters) < 2:
        raise UsageError("give at least two adapters to tune a merge of")
    n_tasks = len(tasks)
    if n_tasks != len(adapters):
        raise UsageError(
            f"give one `tasks` entry per adapter, in the adapters' order: got {n_tasks} tasks for {len(adapters)} adapters"
        )
    return specs


def _task_pairs(tasks: Any) -> list[tuple[str, Path]]:
    return [(n, Path(p)) for n, p in named_tasks(tasks)]


def _check_output(out: Any, base: Any, adapters: Sequence[Any], overwrite: bool) -> None:
    if out is None:
        return
    from adaptermerge.io.atomic import check_output_path

    inputs = [base, *(a.source if isinstance(a, Adapter) else a for a in adapters)]
    check_output_path(out, [p for p in inputs if p is not None and Path(p).exists()], overwrite=overwrite)


def _split(
    pairs: list[tuple[str, Path]], holdout: float, max_examples: int | None, metric: str
) -> tuple[list[tuple[str, TaskData]], list[tuple[str, TaskData]]]:
    """Each task file read and checked (line-numbered errors, before any model is loaded) and split into the rows
    the search sees and the held-out rows: a fixed shuffle per task, the last ``holdout`` share held out (at least
    one row each way when ``holdout`` > 0)."""
    if max_examples is not None and max_examples < 1:
        raise UsageError(f"`max_examples` must be positive, got {max_examples}")
    tuning, held = [], []
    for name, path in pairs:
        data = read_task_file(path, max_rows=max_examples)
        if metric != "loss" and any(r.kind == "text" for r in data.rows):
            line = next(r.line for r in data.rows if r.kind == "text")
            raise UsageError(f"{path} line {line}: `metric` {metric} needs prompt/completion or chat rows; use loss")
        rows = list(data.rows)
        random.Random(f"{SPLIT_SEED}:{name}").shuffle(rows)
        n_held = 0 if holdout == 0 else min(len(rows) - 1, max(1, round(holdout * len(rows))))
        if holdout > 0 and len(rows) < 2:
            raise UsageError(f"task {name}: {path} has one row; a held-out split needs two (or `holdout` 0)")
        keep, out = rows[: len(rows) - n_held], rows[len(rows) - n_held :]
        tuning.append((name, data.select(sorted(keep, key=lambda r: r.line))))
        held.append((name, data.select(sorted(out, key=lambda r: r.line))))
    return tuning, held


def _statistics(live: LiveModel, specs: list[Method], loaded: list[Adapter], tuning: list, progress: bool) -> Any:
    """RegMean's statistics, collected once on the tuning rows (never the held-out ones)."""
    if not any(s.data for s in specs):
        return None
    from adaptermerge.statistics import collect_statistics

    return collect_statistics(live, loaded, [(n, d.rows) for n, d in tuning], progress=progress)


def _groups(live: LiveModel, modules: list[str]) -> list[LayerGroup]:
    cfg = live.model.config
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    if not n:
        n = 1 + max((layer_index(m) or 0) for m in modules)
    return groups_used(layer_groups(int(n)), modules)


# ----------------------------------------------------------------------------------------------- search


@dataclass
class _Context:
    """What scoring a candidate needs."""

    live: LiveModel
    adapters: list[Adapter]
    statistics: Any
    rows: dict[str, list]
    metric: str
    l1: float
    batch_size: int
    progress: bool
    candidates: list[Candidate] = field(default_factory=list)
    references: dict[str, dict[str, float]] | None = None  # objective "worst": each task's base and own scores


def _references(ctx: _Context) -> dict[str, dict[str, float]]:
    """Each task's score on its tuning rows with the base alone and with the task's own adapter."""
    base = score_candidate(ctx.live, None, ctx.rows, ctx.metric, ctx.batch_size)
    refs = {}
    for (name, rows), adapter in zip(ctx.rows.items(), ctx.adapters, strict=True):
        own = score_candidate(ctx.live, adapter, {name: rows}, ctx.metric, ctx.batch_size)[name]
        refs[name] = {"base": base[name], "own": own}
    return refs


def search_space(spec: Method, n_adapters: int, groups: list[LayerGroup] | None) -> list[Variable]:
    """The searched variables of one method: the weights, then its tunable parameters (see the module docstring)."""
    start = 1.0 / n_adapters
    keys = [g.key for g in groups] if groups else [None]
    out = [
        Variable(f"w{i}" + (f"[{k}]" if k else ""), *WEIGHT_RANGE, start, adapter=i, group=k)
        for i in range(n_adapters)
        for k in keys
    ]
    for p in spec.all_params:
        if p.type is not float or p.default is None:
            continue
        if p.name == "lambda":
            low, high = LAMBDA_RANGE
        elif p.low is not None and p.high is not None:
            pad = 0.01 * (p.high - p.low)
            low, high = p.low + (pad if p.open_low else 0.0), p.high - (pad if p.open_high else 0.0)
        else:
            continue
        out.append(Variable(p.name, low, high, min(max(float(p.default), low), high)))
    return out


def decode(
    space: list[Variable], u: Sequence[float], n_adapters: int, relative: bool = False
) -> tuple[list[Any], dict[str, float]]:
    """``(weights, params)`` at scaled coordinates ``u``: per adapter a number, or ``{group key: number}``.

    ``relative``: the method only sees the weights' ratios (RegMean), so they are returned as shares summing to 1
    (per layer group): the reported weights are the merge's, and the pull towards small weights does not drive
    them all to zero along a direction that changes nothing.
    """
    weights: list[Any] = [None] * n_adapters
    params: dict[str, float] = {}
    for var, x in zip(space, u, strict=True):
        v = var.value(float(x))
        if var.adapter is None:
            params[var.name] = round(v, 6)
        elif var.group is None:
            weights[var.adapter] = v
        else:
            weights[var.adapter] = {**(weights[var.adapter] or {}), var.group: v}
    if relative:
        weights = _shares(weights)
    rounded = [{k: round(x, 6) for k, x in w.items()} if isinstance(w, dict) else round(w, 6) for w in weights]
    return rounded, params


def _shares(weights: list[Any]) -> list[Any]:
    """Weights divided by their sum over the adapters (per group); equal shares when they sum to zero."""
    keys = list(weights[0]) if isinstance(weights[0], dict) else [None]
    col = {k: [w[k] if k is not None else w for w in weights] for k in keys}
    share = {k: [x / sum(v) if sum(v) > 0 else 1.0 / len(v) for x in v] for k, v in col.items()}
    if keys == [None]:
        return share[None]
    return [{k: share[k][i] for k in keys} for i in range(len(weights))]


def _search_all(ctx: _Context, specs: list[Method], groups: list[LayerGroup] | None, budget: int, seed: int) -> list:
    from adaptermerge.progress import bar

    shares = [budget // len(specs) + (1 if i < budget % len(specs) else 0) for i in range(len(specs))]
    pbar = bar(budget, "tuning", "merge", ctx.progress)
    for i, (spec, share) in enumerate(zip(specs, shares, strict=True)):
        space = search_space(spec, len(ctx.adapters), groups)
        _cma(ctx, spec, space, share, 1000 * (seed + 1) + i, pbar)
    pbar.close()
    return ctx.candidates


def _cma(ctx: _Context, spec: Method, space: list[Variable], budget: int, seed: int, pbar: Any) -> None:
    """CMA-ES in scaled coordinates, starting from (and first scoring) the method's defaults."""
    import cma

    x0 = [v.scaled(v.start) for v in space]
    evaluate = _evaluator(ctx, spec, space, pbar)
    evaluate(x0)
    left = budget - 1
    if left <= 0:
        return
    opts = {"bounds": [0.0, 1.0], "seed": seed, "verbose": -9, "maxfevals": left}
    es = cma.CMAEvolutionStrategy(x0, SIGMA0, opts)
    while left > 0:
        xs = es.ask()
        if len(xs) > left:  # the last generation is cut at the budget and not told (CMA needs whole ones)
            for x in xs[:left]:
                evaluate(list(x))
            return
        es.tell(xs, [evaluate(list(x)) for x in xs])
        left -= len(xs)


def _evaluator(ctx: _Context, spec: Method, space: list[Variable], pbar: Any) -> Callable[[list[float]], float]:
    def evaluate(u: list[float]) -> float:
        t = time.perf_counter()
        weights, params = decode(space, u, len(ctx.adapters), spec.relative_weights)
        try:
            merged = combine(
                ctx.adapters, weights, method=spec.name, statistics=ctx.statistics if spec.data else None, **params
            )
            scores = score_candidate(ctx.live, merged, ctx.rows, ctx.metric, ctx.batch_size)
            obj, err = objective(scores, weights, ctx.metric, ctx.l1, ctx.references), None
        except AdapterMergeError as e:  # a parameter combination the method refuses (della's density - epsilon...)
            scores, obj, err = {}, FAILED, " ".join(str(e).split())
        c = Candidate(len(ctx.candidates), spec.name, weights, params, scores, obj, time.perf_counter() - t, err)
        ctx.candidates.append(c)
        best = min(x.objective for x in ctx.candidates)
        pbar.set_postfix_str(f"{spec.name} best {best:.4f}", refresh=False)
        pbar.update(1)
        return obj

    return evaluate


def score_candidate(
    live: LiveModel, merged: Adapter | None, rows: dict[str, list], metric: str, batch_size: int
) -> dict[str, float]:
    """Per-task scores of ``merged`` (``None``: the base) with its deltas set in place on the live base."""
    live.use(merged)
    return score_model(live.model, live.tokenizer, rows, [metric], batch_size, DEFAULT_MAX_LENGTH)[metric]


def objective(
    scores: Mapping[str, float],
    weights: Sequence[Any],
    metric: str,
    l1: float,
    references: Mapping[str, Mapping[str, float]] | None = None,
) -> float:
    """Lower is better: the mean badness over the tasks (loss, or 1 - accuracy), or with ``references`` (each
    task's ``base`` and ``own`` scores) 1 - the smallest kept share (:func:`kept_share`); plus ``l1`` times the
    mean |weight|."""
    if references is None:
        bad = [s if LOWER_IS_BETTER[metric] else 1.0 - s for s in scores.values()]
        value = sum(bad) / len(bad)
    else:
        value = 1.0 - min(kept_share(s, references[n]["base"], references[n]["own"], metric) for n, s in scores.items())
    flat = [abs(float(v)) for w in weights for v in (w.values() if isinstance(w, Mapping) else [w])]
    return value + l1 * sum(flat) / len(flat)


def kept_share(score: float, base: float, own: float, metric: str) -> float:
    """The share of its own adapter's score a task keeps: ``score / own`` for an accuracy, the share of the
    adapter's improvement over the base for the loss. Where the own adapter has nothing to keep (accuracy 0, or a
    loss no better than the base's), a merge that is no worse than it keeps everything."""
    if not LOWER_IS_BETTER[metric]:
        return score / own if own > 0 else (1.0 if score >= own else 0.0)
    gain = base - own
    if gain > 1e-12:
        return (base - score) / gain
    return 1.0 if score <= max(base, own) else 1.0 - (score - max(base, own)) / max(abs(base), 1e-12)


def _winner(candidates: list[Candidate]) -> Candidate:
    ok = [c for c in candidates if c.error is None]
    if not ok:
        raise UsageError(f"every candidate was refused by its method (first: {candidates[0].error})")
    return min(ok, key=lambda c: (c.objective, c.index))


# ----------------------------------------------------------------------------------------------- results


def _final_merge(base: Any, loaded: list[Adapter], tuning: list[tuple[str, TaskData]], best: Candidate) -> Adapter:
    """The winner made again the way its recipe replays it (RegMean re-collects its statistics from the recorded
    tuning rows: the same rows in the same batches give the same numbers)."""
    spec = get_method(best.method)
    data = {"base": base, "tasks": tuning} if spec.data else {}
    return combine(loaded, best.weights, method=best.method, **data, **best.params)


def _report(ctx: _Context, specs: list[Method], finals: dict[str, Adapter], rows: dict[str, list]) -> EvalReport:
    """The base, each task's own adapter, each method's defaults and the winner (before and after distillation),
    scored on ``rows``."""
    metrics = [ctx.metric] + (["loss"] if ctx.metric != "loss" else [])
    models: dict[str, Adapter | None] = {"base": None}
    kinds = {"base": "base"}
    for name, a in zip(ctx.rows, ctx.adapters, strict=True):
        models[name], kinds[name] = a, "adapter"
    for spec in specs:
        try:
            merged = combine(ctx.adapters, method=spec.name, statistics=ctx.statistics if spec.data else None)
        except AdapterMergeError:
            continue
        models[f"{spec.name} defaults"], kinds[f"{spec.name} defaults"] = merged, "adapter"
    for name, a in finals.items():
        models[name], kinds[name] = a, "adapter"
    scores = {}
    for name, a in models.items():
        ctx.live.use(a)
        scores[name] = score_model(
            ctx.live.model, ctx.live.tokenizer, rows, metrics, ctx.batch_size, DEFAULT_MAX_LENGTH
        )
    ctx.live.use(None)
    return report_from_scores(metrics, list(rows), scores, kinds, {n: len(r) for n, r in rows.items()})


def write_tune_output(result: TuneResult, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """``out/adapter`` (the winner, with card and recipe), ``out/tune_log.json``, ``out/tune_report.json`` and
    ``out/tune_report.png``, in one atomic folder."""
    import json

    from adaptermerge.card import combine_card
    from adaptermerge.io.adapter import save_adapter
    from adaptermerge.io.atomic import atomic_dir
    from adaptermerge.plot import plot_report
    from adaptermerge.recipe import RECIPE_NAME, combine_recipe, dump_recipe

    sections = [("Tuning", tune_summary(result))]
    if result.distilled:
        recipe = distill_recipe(result.adapter)
        sections.append(("Distillation", distill_summary(result.adapter)))
    else:
        recipe = combine_recipe(result.adapter)
    card = combine_card(result.adapter, recipe, sections=sections, tags=["tune"])
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_adapter(result.adapter, tmp / "adapter", extra_files={"README.md": card, RECIPE_NAME: dump_recipe(recipe)})
        log = {
            "settings": result.settings,
            "split": result.split,
            "candidates": [c.to_dict() for c in result.candidates],
        }
        (tmp / "tune_log.json").write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")
        (tmp / "tune_report.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
        plot_report(result.report, tmp / "tune_report.png", title=f"adaptermerge tune: {result.report_split} rows")
    return Path(out).resolve()


def tune_summary(result: TuneResult) -> str:
    """What the search did and found, for the card and the CLI: settings, the winner, the held-out table."""
    from adaptermerge.layers import describe_weight

    s, b = result.settings, result.best
    lines = [
        f"Searched {', '.join(s['methods'])} ({s['granularity']} weights) with CMA-ES: {len(result.candidates)} "
        f"evaluations, seed {s['seed']}, metric {s['metric']}, objective = {_objective_text(s)}; "
        f"search {result.search_seconds:.1f} s, total {result.seconds:.1f} s.",
        "",
        f"Winner: **{b.method}**, objective {b.objective:.4f} on the tuning rows; weights "
        + "; ".join(describe_weight(w) for w in b.weights)
        + ("; " + ", ".join(f"{k} {v:g}" for k, v in b.params.items()) if b.params else ""),
        "",
        *(
            [f"Then distilled (row `{result.tuned_name}`, the written merge): {distill_summary(result.adapter)}", ""]
            if result.distilled
            else []
        ),
        f"Scores on the {result.report_split} rows ({', '.join(f'{t}: {n}' for t, n in result.report.examples.items())}):",
        "",
        "```",
        result.report.table(),
        "```",
    ]
    if worse := below_base(result.report, result.tuned_name, s["metric"]):
        lines += [
            "",
            f"**Worse than the base** on the {result.report_split} rows ({s['metric']}): {', '.join(worse)}. The "
            "merge gives up these tasks for the others; check them before you ship it.",
        ]
    return "\n".join(lines)


def _objective_text(settings: Mapping[str, Any]) -> str:
    """The objective's formula as the module docstring states it, for the summary line."""
    metric, l1 = settings["metric"], settings["l1"]
    if settings.get("objective") == "worst":
        return f"1 - min over tasks of the kept share of its own adapter's {metric} + {l1:g} * mean |w|"
    return f"mean {'loss' if metric == 'loss' else '(1 - ' + metric + ')'} + {l1:g} * mean |w|"


def below_base(report: EvalReport, model: str, metric: str) -> list[str]:
    """The tasks on which ``model`` scores worse than the base in ``report`` (``"task (model vs base)"``): a merge
    can meet a per-task retention target and still be worse than doing nothing on a task the base already did."""
    scores = report.scores[metric]
    if "base" not in scores or model not in scores:
        return []
    worse = []
    for task in report.tasks:
        got, base = scores[model].get(task), scores["base"].get(task)
        if got is None or base is None:
            continue
        if got > base if LOWER_IS_BETTER[metric] else got < base:
            worse.append(f"{task} ({got:.4g} vs base {base:.4g})")
    return worse


__all__ = [
    "Candidate", "TuneResult", "Variable", "below_base", "decode", "objective", "search_space", "tune",
    "write_tune_output",
]  # fmt: skip
