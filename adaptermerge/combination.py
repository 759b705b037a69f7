"""Combine several adapters into one: validation, per-module method calls, batched re-factoring.

The dense ``out x in`` delta is never formed: methods return stacked factors and the re-factoring
step runs a thin QR of each stack and an SVD of the small ``R x R`` core, batched over modules of
equal shape.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from adaptermerge.adapter import Adapter
from adaptermerge.dtypes import dtype_name, resolve_device, resolve_dtype
from adaptermerge.errors import IncompatibleAdapters, UsageError
from adaptermerge.io.adapter import natural_key
from adaptermerge.io.atomic import check_output_path
from adaptermerge.io.checkpoint import Checkpoint, open_checkpoint
from adaptermerge.layers import Weight, check_weight, module_weight
from adaptermerge.lowrank import LowRank, energy_rank, factored_svd, kept_energy, numerical_rank
from adaptermerge.methods.registry import BaseMerge, Kind, Method, RankRule, get_method
from adaptermerge.recipe import task_entries
from adaptermerge.tokens import combine_token_rows

BATCH = 32  # modules per batched QR/SVD


@dataclass
class ModuleReport:
    """What happened to one module."""

    name: str
    input_ranks: list[int]
    rank: int
    kept_energy: float
    rel_error_vs_exact: float | None = None


def normalize_weights(weights: Sequence[Weight] | None, n: int) -> list[Weight]:
    """Default to equal weights summing to 1; refuse a count mismatch or non-finite values.

    A weight is a number or a mapping of layer groups to numbers (:mod:`adaptermerge.layers`): each module then
    takes the value of the group that covers it.
    """
    if weights is None:
        return [1.0 / n] * n
    w = [check_weight(x) for x in weights]
    if len(w) != n:
        raise UsageError(f"got {_count(len(w), 'weight')} for {_count(n, 'adapter')}; give one weight per adapter")
    flat = [v for x in w for v in (x.values() if isinstance(x, Mapping) else [x])]
    if not all(torch.isfinite(torch.tensor(flat, dtype=torch.float64)).tolist()):
        raise UsageError(f"weights must be finite numbers, got {w}")
    return w


def _per_adapter(w: list[Weight], what: str) -> list[float]:
    """The weights as one number per adapter, for what takes no weight per layer group."""
    if any(isinstance(x, Mapping) for x in w):
        raise UsageError(f"{what} take one weight per adapter; weights per layer group apply to the LoRA modules only")
    return [float(x) for x in w]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _norm_base(b: str | None) -> str | None:
    return None if not b else b.rstrip("/")


def check_compatible(adapters: Sequence[Adapter], names: Sequence[str], allow_different_base: bool) -> None:
    """Refuse DoRA, different bases, and modules whose shapes or layouts disagree."""
    for a, n in zip(adapters, names, strict=True):
        if a.uses_dora:
            raise IncompatibleAdapters(
                f"{n} is a DoRA adapter: its magnitude vector renormalises each row of W + delta, so DoRA updates "
                "do not add linearly; merge it into the base on its own (adaptermerge merge) or combine plain LoRA adapters"
            )
    bases = {_norm_base(a.base_model) for a in adapters} - {None}
    if len(bases) > 1 and not allow_different_base:
        raise IncompatibleAdapters(
            f"adapters were trained on different bases ({', '.join(sorted(bases))}); pass `allow_different_base` if they share weights"
        )
    roots = [{_module_root(m) for m in a.modules} for a in adapters]
    for i in range(1, len(adapters)):
        if not roots[i] & roots[0]:
            raise IncompatibleAdapters(
                f"{names[0]} and {names[i]} share no module paths ({', '.join(sorted(roots[0]))} vs {', '.join(sorted(roots[i]))}): "
                "they were made on different model architectures"
            )
    seen: dict[str, tuple[str, tuple[int, int], str]] = {}
    for a, n in zip(adapters, names, strict=True):
        for mod, m in a.modules.items():
            key = (m.layout, m.shape)
            if mod in seen and seen[mod][:2] != (m.layout, m.shape):
                lay0, shp0, n0 = seen[mod]
                raise IncompatibleAdapters(
                    f"module {mod}: {n0} has a {lay0} delta of shape {shp0} but {n} has a {m.layout} delta of shape {m.shape}; "
                    "the adapters were made on different base models"
                )
            seen.setdefault(mod, (*key, n))


def _module_root(name: str) -> str:
    """The first component of a module path: ``model.layers.3.mlp.up_proj`` -> ``model``."""
    return name.split(".", 1)[0]


def _combine_extras(
    adapters: Sequence[Adapter], names: Sequence[str], w: list[Weight]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``modules_to_save`` tensors: the weight-normalised average where every adapter has them."""
    keys = [set(a.extra_tensors) for a in adapters]
    union = set().union(*keys)
    if not union:
        return {}, []
    weights = _per_adapter(w, "modules_to_save tensors")
    # copies of base weights that PEFT saves beside embedding adapters (save_embedding_layers): keep one
    base_copies = {k for k in union if k.endswith(".base_layer.weight")}
    out: dict[str, torch.Tensor] = {}
    for k in sorted(base_copies):
        out[k] = next(a.extra_tensors[k] for a in adapters if k in a.extra_tensors).clone()
    union -= base_copies
    if not union:
        return out, []
    missing = [(k, n) for k in sorted(union) for a, n in zip(adapters, names, strict=True) if k not in a.extra_tensors]
    if missing:
        k, n = missing[0]
        raise IncompatibleAdapters(
            f"tensor {k} (modules_to_save) is in some adapters but not in {n}; full-weight modules can only be "
            "averaged when every adapter carries them"
        )
    total = sum(weights)
    if abs(total) < 1e-12:
        raise IncompatibleAdapters("weights sum to zero, so the modules_to_save tensors cannot be averaged")
    for k in sorted(union):
        ts = [a.extra_tensors[k] for a in adapters]
        if not all(t.shape == ts[0].shape for t in ts):
            raise IncompatibleAdapters(f"tensor {k} has different shapes across adapters")
        if not ts[0].is_floating_point() or all(torch.equal(t, ts[0]) for t in ts):
            out[k] = ts[0].clone()
            continue
        acc = sum(w * t.double() for w, t in zip(weights, ts, strict=True)) / total
        out[k] = acc.to(ts[0].dtype)
    note = f"modules_to_save tensors ({len(out)}) were averaged with the normalised weights"
    return out, [note]


@dataclass
class _Terms:
    """One module's inputs: the weighted LowRanks of the adapters that touch it."""

    terms: list[tuple[float, LowRank]]
    layout: str
    bias: torch.Tensor | None
    sources: list[int]  # the index of each term's adapter
    weights: list[float]  # every adapter's weight for this module (data methods weigh all tasks)

    @property
    def ranks(self) -> list[int]:
        return [m.rank for _, m in self.terms]

    @property
    def shape(self) -> tuple[int, int]:
        return self.terms[0][1].shape


@dataclass
class _Call:
    """A validated combine call: the method, its resolved parameters, and where and how the algebra runs."""

    spec: Method
    params: dict[str, Any]
    rank: int | None
    energy: float | None
    device: torch.device
    compute_dtype: torch.dtype
    keep_factors: bool
    progress: bool
    statistics: Any = None  # TaskStatistics, for methods that declare data

    def context(self) -> dict[str, Any]:
        """What a method function receives: its own parameters plus the device and compute dtype."""
        return {**self.params, "device": self.device, "compute_dtype": self.compute_dtype}


def combine(
    adapters: Sequence[Adapter | str | os.PathLike],
    weights: Sequence[float] | None = None,
    method: str = "linear",
    rank: int | None = None,
    energy: float | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    compute_dtype: str | torch.dtype = torch.float32,
    allow_different_base: bool = False,
    progress: bool = False,
    base: str | os.PathLike | Checkpoint | None = None,
    *,
    tasks: Any = None,
    statistics: Any = None,
    keep_factors: bool = False,
    dense: bool = False,
    **method_params: Any,
) -> Adapter:
    """Combine adapters into one new adapter.

    Args:
        adapters: loaded :class:`Adapter` objects or adapter folders.
        weights: one weight per adapter (default: equal, summing to 1); a weight may be a mapping of layer groups to
            numbers (``{"embeddings": 0.2, "layers 0-10": 0.5, ...}``, see :mod:`adaptermerge.layers`).
        method: a registered method (``adaptermerge.methods.registry.method_names()``): ``linear`` (exact weighted
            sum), ``cat``, ``svd``, ``factor-linear`` (PEFT's linear), ...; docs/methods.md lists them all.
        rank: output rank, as the method's rank rule says (``svd``: default the largest input rank; ``linear``:
            optional truncation; methods that keep their factors refuse it).
        energy: keep the smallest rank per module holding this fraction of ``||delta||_F^2``, capped by ``rank``
            when both are given.
        device: where the algebra runs (``cpu`` or ``cuda``).
        dtype: storage dtype of the output factors (default: the inputs' dtype when they agree, else fp32).
        compute_dtype: ``float32`` (default) or ``float64``.
        allow_different_base: accept adapters whose ``base_model_name_or_path`` differ.
        progress: show a progress bar.
        base: the base checkpoint folder (or an open :class:`~adaptermerge.io.checkpoint.Checkpoint`) the adapters
            were trained on. Needed only (1) for adapters whose ``init_lora_weights`` changed the base (PiSSA, OLoRA):
            they are converted to plain LoRA against it first (:func:`adaptermerge.convert_to_plain_lora`), and
            (2) for trained token rows (PEFT ``trainable_token_indices``) whose weights do not sum to 1: their
            combined row ``base + sum_i w_i (row_i - base)`` contains the base row. Without it such inputs are refused.
            (3) for data-aware methods (``regmean``): the task inputs are collected on it.
        tasks: data-aware methods only: one task per adapter, in the adapters' order, as ``{name: file.jsonl}``, a
            list of ``(name, file)`` pairs, or :class:`~adaptermerge.data.TaskData` in place of files. Every file is
            read and checked before any model is loaded; each task's inputs are collected on its adapter's model
            (:mod:`adaptermerge.statistics`).
        statistics: data-aware methods: already collected :class:`~adaptermerge.statistics.TaskStatistics`, in place
            of ``tasks`` (what ``tune`` passes for every candidate).
        keep_factors: return the method's factors without re-ranking them (what a merge into a base adds for a
            method whose declaration says ``BaseMerge.STACKED``: the exact sum, never decomposed).
        dense: for a method declared ``BaseMerge.DENSE`` in the delta space, return :class:`DenseModule` entries
            whose merged delta is computed when a merge into a base reads it (nothing lost to re-factoring; only
            :func:`adaptermerge.merge_into_base` takes such an adapter).
        **method_params: the method's own parameters (``density=0.5``...), as its declaration lists them.

    Returns:
        The combined :class:`Adapter`; ``adapter.provenance["modules"]`` holds a per-module report
        (ranks, kept energy, and for methods that report it the relative error against the exact sum).

    Example:
        >>> import torch, adaptermerge
        >>> from adaptermerge import Adapter, LowRank
        >>> a = Adapter({"q": LowRank(torch.randn(2, 8), torch.randn(6, 2))})
        >>> b = Adapter({"q": LowRank(torch.randn(3, 8), torch.randn(6, 3))})
        >>> m = adaptermerge.combine([a, b], [0.7, 0.3], method="linear")
        >>> exact = 0.7 * a.modules["q"].delta() + 0.3 * b.modules["q"].delta()
        >>> bool(torch.allclose(m.modules["q"].delta(), exact, atol=1e-5))
        True
    """
    if not adapters:
        raise UsageError("give at least one adapter to combine")
    call = _validate_call(method, rank, energy, device, compute_dtype, keep_factors, progress, method_params)
    task_data = _task_data(call.spec, base, tasks, statistics, len(adapters))  # bad files fail before any model
    from adaptermerge.surgery.init_conversion import plain_adapters

    loaded = plain_adapters(adapters, base=base, device=device)
    names = [str(a.source) if a.source is not None else f"adapter #{i + 1}" for i, a in enumerate(loaded)]
    w = normalize_weights(weights, len(loaded))
    check_compatible(loaded, names, allow_different_base)
    out_dtype = resolve_dtype(dtype) or _common_dtype(loaded)
    token_rows = _combine_tokens(loaded, w, base, out_dtype)  # cheap, and refusals come before the algebra

    inputs = _module_terms(loaded, w, call)
    if call.spec.data:
        call.statistics = statistics or _collect(base, loaded, task_data, list(inputs), call)
        _check_statistics(call.statistics, inputs, len(loaded))
    if dense and call.spec.base_merge is BaseMerge.DENSE and call.params.get("space") == "delta":
        modules, reports, warnings = _dense_modules(inputs, call)
    else:
        results, reports = _RUNNERS[call.spec.kind](inputs, call)
        if call.spec.reports_error:
            _measure_error(results, reports, inputs, call)
        modules, warnings = _assemble(results, inputs)
    extras, notes = _combine_extras(loaded, names, w)
    warnings += notes + _method_notes(call, reports) + _bias_notes(modules, list(inputs))
    task_types = {a.task_type for a in loaded} - {None}
    if len(task_types) > 1:
        warnings.append(f"adapters have different task types {sorted(task_types)}; the first is kept")
    mts = [m for a in loaded for m in (a.modules_to_save or [])]
    return Adapter(
        modules=modules,
        base_model=next((a.base_model for a in loaded if a.base_model), None),
        task_type=loaded[0].task_type,
        extra_tensors=extras,
        modules_to_save=sorted(set(mts)) if mts else None,
        token_rows=token_rows,
        dtype=out_dtype,
        warnings=warnings,
        provenance={
            "method": call.spec.name,
            "weights": w,
            "rank": rank,
            "energy": energy,
            "params": call.params,
            "allow_different_base": allow_different_base,
            **(
                {"base": _base_path(base)}
                if base is not None and (token_rows or _converted(loaded) or task_data)
                else {}
            ),
            **({"tasks": task_entries(task_data)} if task_data else {}),
            "inputs": [str(a.source) if a.source else None for a in loaded],
            "compute_dtype": dtype_name(call.compute_dtype),
            "dtype": dtype_name(out_dtype),
            "modules": [asdict(reports[m]) for m in inputs],
        },
    )


def _validate_call(
    method: str,
    rank: int | None,
    energy: float | None,
    device: str | torch.device,
    compute_dtype: str | torch.dtype,
    keep_factors: bool,
    progress: bool,
    method_params: dict[str, Any],
) -> _Call:
    """Refuse impossible arguments before any adapter is read; resolve the method's parameters."""
    spec = get_method(method)
    if rank is not None and (int(rank) != rank or rank < 1):
        raise UsageError(f"`rank` must be a positive integer, got {rank}")
    if energy is not None and not (0.0 < energy <= 1.0):
        raise UsageError(f"`energy` must be in (0, 1], got {energy}")
    if not spec.takes_rank and (rank is not None or energy is not None):
        raise UsageError(f"method {spec.name} keeps its factors as they are; `rank`/`energy` do not apply to it")
    params = spec.resolve_params(method_params)
    cdtype = resolve_dtype(compute_dtype) or torch.float32
    return _Call(spec, params, rank, energy, resolve_device(device), cdtype, keep_factors, progress)


def _common_dtype(loaded: Sequence[Adapter]) -> torch.dtype:
    dts = {a.dtype for a in loaded}
    return dts.pop() if len(dts) == 1 else torch.float32


def _module_terms(loaded: Sequence[Adapter], w: list[Weight], call: _Call) -> dict[str, _Terms]:
    """Module -> the weighted terms of the adapters that touch it (an adapter that does not is not counted)."""
    out: dict[str, _Terms] = {}
    for mod in sorted({m for a in loaded for m in a.modules}, key=natural_key):
        ws = [module_weight(wi, mod) for wi in w]
        sources = [i for i, a in enumerate(loaded) if mod in a.modules]
        terms = [(ws[i], loaded[i].modules[mod]) for i in sources]
        bs = [(wi, m.bias) for wi, m in terms if m.bias is not None]
        bias = sum(wi * b.to(call.device, call.compute_dtype) for wi, b in bs) if bs else None
        out[mod] = _Terms(terms, terms[0][1].layout, bias, sources, ws)
    return out


def _task_data(spec: Method, base: Any, tasks: Any, statistics: Any, n: int) -> list[tuple[str, Any]]:
    """The task data a data-aware method reads, checked (files read, line-numbered errors) before any model is
    loaded; refuses task data for data-free methods and missing data for data-aware ones."""
    if not spec.data:
        if tasks or statistics is not None:
            raise UsageError(f"method {spec.name} uses no task data; `tasks` is for data-aware methods (regmean)")
        return []
    if statistics is not None:
        return []
    if base is None or not tasks:
        raise UsageError(
            f"method {spec.name} needs the base (`base`) and one task file per adapter (`tasks` NAME=FILE.jsonl, in "
            "the adapters' order): it collects each task's inputs on the model"
        )
    from adaptermerge.data import TaskData, read_task_file

    pairs = list(tasks.items()) if isinstance(tasks, Mapping) else [tuple(t) for t in tasks]
    if len(pairs) != n:
        raise UsageError(f"method {spec.name} needs one `tasks` entry per adapter, in order: got {len(pairs)} for {n}")
    return [(str(name), d if isinstance(d, TaskData) else read_task_file(d)) for name, d in pairs]


def _collect(
    base: Any, loaded: Sequence[Adapter], tasks: list[tuple[str, Any]], modules: list[str], call: _Call
) -> Any:
    from adaptermerge.statistics import task_statistics

    folder = base.path if isinstance(base, Checkpoint) else base
    rows = [(name, d.rows) for name, d in tasks]
    return task_statistics(folder, loaded, rows, modules, device=str(call.device), progress=call.progress)


def _check_statistics(stats: Any, inputs: dict[str, _Terms], n: int) -> None:
    missing = [m for m in inputs if m not in stats.modules]
    if missing or len(stats.tasks) != n:
        raise UsageError(
            f"the statistics hold {len(stats.tasks)} tasks and lack module {missing[0] if missing else '-'}; "
            "collect them for these adapters (one task per adapter)"
        )


def _data_terms(t: _Terms, mod: str, call: _Call) -> list[tuple[float, LowRank | None, Any]]:
    """A data method's terms: one ``(w, LowRank or None, the task's inputs to the module)`` per task."""
    by_source = dict(zip(t.sources, (m for _, m in _on_device(t.terms, call)), strict=True))
    inputs = call.statistics.modules[mod]
    return [(w, by_source.get(i), inputs[i]) for i, w in enumerate(t.weights)]


Results = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _run_factored(inputs: dict[str, _Terms], call: _Call) -> tuple[Results, dict[str, ModuleReport]]:
    """Factored methods: the method's stacked factors per module, then its rank rule."""
    spec = call.spec
    if spec.params_cls is None:  # the function takes the context (device, compute dtype) and moves the factors
        params, prepared = call.context(), (lambda m, t: t.terms)
    elif spec.data:
        params, prepared = spec.make_params(call.params), (lambda m, t: _data_terms(t, m, call))
    else:
        params, prepared = spec.make_params(call.params), (lambda m, t: _on_device(t.terms, call))
    if call.keep_factors or spec.rank_rule is RankRule.KEEP:
        results = {m: spec.fn(prepared(m, t), params) for m, t in inputs.items()}
        return results, {m: ModuleReport(m, t.ranks, int(results[m][1].shape[0]), 1.0) for m, t in inputs.items()}
    return _rerank_batched(inputs, call, lambda mod: spec.fn(prepared(mod, inputs[mod]), params))


def _on_device(terms: list[tuple[float, LowRank]], call: _Call) -> list[tuple[float, LowRank]]:
    return [(w, m.to(dtype=call.compute_dtype, device=call.device)) for w, m in terms]


def _run_elementwise(inputs: dict[str, _Terms], call: _Call) -> tuple[Results, dict[str, ModuleReport]]:
    """Elementwise methods, module by module: the tasks' representations in the chosen space, the method, then back
    to factors (exactly from the core/KnOTS spaces; re-factored from a dense delta-space result)."""
    from adaptermerge.methods.spaces import merge_module

    params = call.spec.make_params(call.params)
    results: Results = {}
    reports: dict[str, ModuleReport] = {}
    bar = _progress(len(inputs), call.progress, f"{call.spec.name} ({call.params['space']} space)")
    for mod, t in inputs.items():
        r = merge_module(
            _on_device(t.terms, call), call.spec, params, call.params["space"], _generator(call, mod),
            call.rank, call.energy, dtype=call.compute_dtype,
        )  # fmt: skip
        results[mod] = (r.B, r.A)
        reports[mod] = ModuleReport(mod, t.ranks, r.rank, r.kept_energy)
        bar.update(1)
    bar.close()
    return results, reports


def _generator(call: _Call, module: str) -> Any:
    """Each module's own random stream for stochastic methods (identical in any order and on every run)."""
    if not call.spec.stochastic:
        return None
    from adaptermerge.methods.sparsify import module_generator

    return module_generator(call.params["seed"], module, call.device)


def _rerank_batched(inputs: dict[str, _Terms], call: _Call, stack) -> tuple[Results, dict[str, ModuleReport]]:
    """Thin QR of each module's stacked factors and an SVD of the small core, batched over modules whose stacks
    have equal shapes; each chunk's stacks are built just before its QR, so memory holds the inputs, the outputs
    and one chunk, not a second copy of all."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for mod, t in inputs.items():
        groups[(*t.shape, sum(t.ranks))].append(mod)
    results: Results = {}
    reports: dict[str, ModuleReport] = {}
    bar = _progress(len(inputs), call.progress, "re-ranking modules")
    for mods in groups.values():
        for c in range(0, len(mods), BATCH):
            chunk = mods[c : c + BATCH]
            stacks = [stack(m) for m in chunk]
            fs = factored_svd(torch.stack([b for b, _ in stacks]), torch.stack([a for _, a in stacks]))
            del stacks
            for i, mod in enumerate(chunk):
                k = _output_rank(fs.S[i], inputs[mod], call)
                results[mod] = fs.factors(k, i)
                reports[mod] = ModuleReport(mod, inputs[mod].ranks, k, kept_energy(fs.S[i], k))
                bar.update(1)
            del fs
    bar.close()
    return results, reports


def _output_rank(s: torch.Tensor, t: _Terms, call: _Call) -> int:
    """The number of singular triplets to keep, by the method's rank rule (see :class:`RankRule`)."""
    rule, rank, energy = call.spec.rank_rule, call.rank, call.energy
    if rule is RankRule.EXACT and rank is None and energy is None:
        scale = sum(abs(wi) * m.frobenius_norm() for wi, m in t.terms)
        return numerical_rank(s, sum(t.ranks), scale)
    default = max(t.ranks) if rule is RankRule.BEST_RANK else min(sum(t.ranks), *t.shape)
    k = rank if rank is not None else (default if energy is None else s.numel())
    if energy is not None:
        k = min(k, energy_rank(s, energy))
    return min(k, s.numel())


_RUNNERS = {Kind.FACTORED: _run_factored, Kind.ELEMENTWISE: _run_elementwise}


@dataclass
class DenseModule:
    """A module whose merged delta is computed, dense, when a merge into a base reads it (``BaseMerge.DENSE``).

    It plans like a :class:`LowRank` (``layout``, ``shape``, ``weight_shape``; no bias or magnitude): the merge
    executor asks for :meth:`weight_delta` while it writes that one tensor, so memory holds a few dense modules at
    most, and the base receives the method's exact result rather than a re-factored approximation.
    """

    terms: list[tuple[float, LowRank]]
    layout: str
    call: _Call
    module: str
    bias: torch.Tensor | None = None  # the weighted sum of the inputs' lora_B biases
    magnitude: None = None
    _norm: float | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.terms[0][1].shape

    @property
    def weight_shape(self) -> tuple[int, int]:
        out, inn = self.shape
        return (inn, out) if self.layout == "conv1d" else (out, inn)

    @property
    def rank(self) -> int:
        return min(sum(m.rank for _, m in self.terms), *self.shape)

    def weight_delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The method's dense result in the base weight's stored layout (transposed for Conv1D)."""
        from adaptermerge.methods.spaces import delta_space

        call = self.call
        proj = delta_space([m for _, m in _on_device(self.terms, call)], call.compute_dtype)
        fn_params = call.spec.make_params(call.params)
        d = call.spec.fn(proj.reps, [w for w, _ in self.terms], fn_params, _generator(call, self.module))
        self._norm = float(torch.linalg.vector_norm(d))
        d = d.to(dtype)
        return d.T if self.layout == "conv1d" else d

    def frobenius_norm(self) -> float:
        if self._norm is None:
            self.weight_delta()
        return float(self._norm)


def _dense_modules(inputs: dict[str, _Terms], call: _Call) -> tuple[dict, dict[str, ModuleReport], list[str]]:
    modules = {
        m: DenseModule(t.terms, t.layout, call, m, None if t.bias is None else t.bias.cpu()) for m, t in inputs.items()
    }
    reports = {m: ModuleReport(m, t.ranks, modules[m].rank, 1.0) for m, t in inputs.items()}
    return modules, reports, []


def _measure_error(results: Results, reports: dict[str, ModuleReport], inputs: dict[str, _Terms], call: _Call) -> None:
    """Each module's relative error against the exact weighted sum, in factored form."""
    from adaptermerge.methods.basic import weighted_stack

    ctx = call.context()
    for mod, (b, a) in results.items():
        eb, ea = weighted_stack(inputs[mod].terms, ctx)
        diff = LowRank(A=torch.cat([a, ea]), B=torch.cat([b, -eb], dim=1))
        denom = LowRank(A=ea, B=eb).frobenius_norm()
        reports[mod].rel_error_vs_exact = diff.frobenius_norm() / denom if denom > 0 else 0.0


def _assemble(results: Results, inputs: dict[str, _Terms]) -> tuple[dict[str, LowRank], list[str]]:
    """The output modules on the CPU; a module whose combined delta is zero is dropped and named."""
    modules: dict[str, LowRank] = {}
    warnings: list[str] = []
    for mod, t in inputs.items():
        b, a = results[mod]
        if a.shape[0] == 0:
            warnings.append(f"module {mod}: the combined delta is zero and was dropped")
            continue
        modules[mod] = LowRank(
            A=a.to("cpu").contiguous(),
            B=b.to("cpu").contiguous(),
            layout=t.layout,
            bias=None if t.bias is None else t.bias.to("cpu"),
        )
    return modules, warnings


def _method_notes(call: _Call, reports: dict[str, ModuleReport]) -> list[str]:
    errs = [r.rel_error_vs_exact for r in reports.values() if r.rel_error_vs_exact is not None]
    if not errs or max(errs) <= 1e-3:
        return []
    return [
        f"{call.spec.name} is not the weighted sum of the deltas: relative error against the exact sum is "
        f"{sum(errs) / len(errs):.3f} on average, {max(errs):.3f} at worst; use --method linear for the exact sum"
    ]


def _base_path(base: str | os.PathLike | Checkpoint) -> str:
    return str(Path(base.path if isinstance(base, Checkpoint) else base).resolve())


def _converted(loaded: Sequence[Adapter]) -> bool:
    return any("converted" in a.provenance for a in loaded)


def _bias_notes(modules: dict[str, LowRank], module_names: list[str]) -> list[str]:
    """Say what PEFT does with ``lora_bias`` when only some modules carry a bias."""
    with_bias = [m for m in module_names if m in modules and modules[m].bias is not None]
    if not with_bias or len(with_bias) == len(modules):
        return []
    return [
        f"lora_bias: {len(with_bias)} of {len(modules)} modules carry a lora_B bias (from the inputs that trained one); "
        "the config says lora_bias: true, so PEFT gives the other modules a zero bias when loading (it reports them "
        "as missing keys). PEFT's merge_and_unload, and adaptermerge merge, need a base layer with a bias for every "
        "module that carries one"
    ]


def _combine_tokens(
    loaded: Sequence[Adapter], weights: list[Weight], base: str | os.PathLike | Checkpoint | None, dtype: torch.dtype
) -> dict:
    """The weighted sum of the inputs' trained token rows (exact for every method; see :mod:`adaptermerge.tokens`)."""
    if not any(a.token_rows for a in loaded):
        return {}
    w = _per_adapter(weights, "trained token rows")
    from adaptermerge.io.tokens import check_token_modules

    every = {n: tr for a in loaded for n, tr in a.token_rows.items()}
    mts = [m for a in loaded for m in (a.modules_to_save or [])]
    check_token_modules(every, [m for a in loaded for m in a.modules], mts, "the combined adapter")
    base_rows = None
    if base is not None:
        from adaptermerge.surgery.tokens import checkpoint_rows  # maps names as merges do (surgery imports us)

        base_rows = checkpoint_rows(base if isinstance(base, Checkpoint) else open_checkpoint(base))
    return combine_token_rows([a.token_rows for a in loaded], w, base_rows, dtype)


def save_combined(result: Adapter, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a combined adapter with its model card (README.md) and replayable recipe."""
    from adaptermerge.card import combine_card
    from adaptermerge.io.adapter import save_adapter
    from adaptermerge.recipe import RECIPE_NAME, combine_recipe, dump_recipe

    inputs = [p for p in result.provenance.get("inputs", []) if p]
    check_output_path(out, inputs, overwrite=overwrite)
    recipe = combine_recipe(result)
    files = {"README.md": combine_card(result, recipe), RECIPE_NAME: dump_recipe(recipe)}
    return save_adapter(result, out, overwrite=overwrite, extra_files=files)


def _progress(total: int, enabled: bool, desc: str) -> Any:
    from adaptermerge.progress import bar

    return bar(total, desc, "module", enabled, leave=False)
