"""Distillation: refine a merge until, on each task's examples, it behaves like that task's own adapter.

Every merge method in the registry decides each module's update from that module alone (RegMean from its inputs
too), so none of them sees what the merged network does end to end: module errors add up through the layers, and
on conflicting tasks a merge keeps one task's skill at another's expense. RegMean's objective, taken to the whole
network, is the distillation objective: train the merged adapter's factors so that, on task ``i``'s examples, the
model with the merge predicts what the model with adapter ``i`` predicts::

    minimise  mean over tasks i of  mean over the real tokens t of task i's rows of  KL( p_i(. | t) || p(. | t) )

where ``p_i`` is the base with adapter ``i`` (the teacher of task ``i``) and ``p`` the base with the merge (the
student). The student starts from a merge (``init``: a registry method, RegMean by default, or a merge that
``combine``/``tune`` made) and keeps its rank: only the merged factors ``B`` and ``A`` (and a merged ``lora_bias``)
are trained, with Adam, the base never changes. Every position of the prompt and the completion counts, not just
the completion: the teachers' whole distributions are the signal, far more of it than the completions' tokens.

Why distil rather than fine-tune the merge on the rows' completions: on a handful of rows per task the
completions are few tokens and a fine-tune overfits them (on the demo's tasks it lost ground as it trained, 84% ->
79% of the weakest task's score, where distillation rose to 90%; docs/distill.md). The teachers' distributions at
every token carry what each adapter learnt, including where it is unsure.

Cost: per step and task, one forward pass of the teacher (no gradients) and one forward and backward pass of the
student, on ``batch_size`` rows: the base is loaded once and the adapters are swapped in place
(:class:`adaptermerge.live.LiveModel`). Teachers' outputs are computed on the fly, never stored, and each task's
graph is freed by its backward pass before the next task runs, so memory is one task's batch: its activations and
the logits of its real tokens. Deterministic per seed on the same hardware, device and torch build.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptermerge.data import TaskData, named_tasks, read_task_file
from adaptermerge.errors import NumericalError, UsageError
from adaptermerge.evaluation import DEFAULT_MAX_LENGTH, pad_batch

if TYPE_CHECKING:  # torch and the model code load on first use: the CLI reads DistillSettings for its --help
    import torch

    from adaptermerge.adapter import Adapter
    from adaptermerge.live import LiveModel
    from adaptermerge.lowrank import LowRank

DEFAULT_INIT = "regmean"


@dataclass(frozen=True)
class DistillSettings:
    """How a merge is refined.

    Attributes:
        steps: optimiser steps; each step takes one batch from every task.
        lr: Adam's learning rate on the merged factors.
        batch_size: rows per task per step.
        seed: seed of the batch order (the result is the same for the same seed).
        max_length: tokens kept per row (as ``evaluate`` truncates them).
    """

    steps: int = 300
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0
    max_length: int = DEFAULT_MAX_LENGTH

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UsageError(f"distillation `{name}` must be a positive integer, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UsageError(f"distillation `seed` must be a non-negative integer, got {self.seed!r}")
        if not (isinstance(self.lr, int | float) and 0 < self.lr <= 1):
            raise UsageError(f"distillation `lr` must be in (0, 1], got {self.lr!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> DistillSettings:
        """Settings from a recipe's ``distill`` mapping: every setting must be there (a default could differ from
        the one that made the merge), and unknown keys are refused, not dropped."""
        known = set(cls.__dataclass_fields__)
        if unknown := sorted(set(d) - known):
            raise UsageError(f"{where}: distillation has no setting {unknown[0]!r} (it has {', '.join(sorted(known))})")
        if missing := sorted(known - set(d)):
            raise UsageError(f"{where}: the distill settings lack {missing[0]!r}; the recipe is not complete")
        return cls(**dict(d))


# ----------------------------------------------------------------------------------------------- the call


def distill(
    base: str | os.PathLike,
    adapters: Sequence[str | os.PathLike | Adapter],
    tasks: Mapping[str, str | os.PathLike] | Sequence[tuple[str, str | os.PathLike | TaskData]],
    init: str | Adapter = DEFAULT_INIT,
    weights: Sequence[float] | None = None,
    settings: DistillSettings | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> Adapter:
    """Merge ``adapters`` with ``init`` and refine the merge by distillation from each task's own adapter.

    Args:
        base: the base model folder the adapters were trained on (loaded once).
        adapters: two or more adapter folders (or :class:`Adapter` objects read from folders): the teachers.
        tasks: one task per adapter, in the adapters' order: ``{name: file.jsonl}`` or ``(name, file or TaskData)``
            pairs (rows as ``evaluate`` reads them). Every row is used (but one whose completion lies wholly beyond
            ``max_length``); the files are read and checked before any model is loaded.
        init: the merge to start from: a registry method name (combined here at its defaults with ``weights``;
            RegMean reads ``tasks``), or an :class:`Adapter` that :func:`adaptermerge.combine` made from the same
            adapters (and, for a data-aware method, the same task rows).
        weights: the init method's weights (default: its own default).
        settings: steps, learning rate, batch size, seed (:class:`DistillSettings`).
        device: ``cpu`` or ``cuda``.
        progress: progress bar with the loss on stderr.

    Returns:
        The refined merge, at the init's ranks; its ``provenance`` records the init merge and a ``distill`` entry
        (settings, task rows, first and last loss, time), so :func:`distill_recipe` replays it.

    Example:
        >>> import adaptermerge
        >>> m = adaptermerge.distill("base", ["a", "b"], {"a": "a.jsonl", "b": "b.jsonl"})  # doctest: +SKIP
        >>> adaptermerge.save_distilled(m, "ab-distilled")  # doctest: +SKIP
    """
    from adaptermerge.combination import combine
    from adaptermerge.live import LiveModel, live_adapters
    from adaptermerge.methods.registry import get_method

    settings = settings or DistillSettings()
    if len(adapters) < 2:
        raise UsageError("give at least two adapters to distil a merge of")
    data = read_tasks(tasks, len(adapters))
    _check_rows(base, data)
    if isinstance(init, str):
        spec = get_method(init)  # an unknown name fails before anything is read
    elif weights is not None:
        raise UsageError("`weights` are for an init method; an init merge already has its weights")
    loaded = live_adapters(adapters, base, "distill")
    if isinstance(init, str):
        extra = {"base": base, "tasks": data} if spec.data else {}
        start = combine(loaded, weights, method=spec.name, **extra)
    else:
        start = init
    check_init(start, loaded, data, base)
    modules = sorted({m for a in [*loaded, start] for m in a.modules})
    with LiveModel(base, modules, device=device, progress=progress) as live:
        return refine(live, loaded, start, data, settings, progress)


def read_tasks(tasks: Any, n_adapters: int) -> list[tuple[str, TaskData]]:
    """``(name, TaskData)`` per task, files read and checked (line-numbered errors), one task per adapter."""
    pairs = named_tasks(tasks)
    if len(pairs) != n_adapters:
        raise UsageError(
            f"give one task per adapter, in the adapters' order: got {len(pairs)} tasks for {n_adapters} adapters"
        )
    return [(n, d if isinstance(d, TaskData) else read_task_file(d)) for n, d in pairs]


def _check_rows(base: Any, tasks: Sequence[tuple[str, TaskData]]) -> None:
    """Rows the base's tokenizer cannot render (chat rows without a chat template) are refused before the model
    loads."""
    from adaptermerge.data import check_tokenizer
    from adaptermerge.models import load_tokenizer, resolve_base

    tok = load_tokenizer(resolve_base(base))
    for _, data in tasks:
        check_tokenizer(data, tok)


def check_init(start: Adapter, teachers: Sequence[Adapter], tasks: Sequence[tuple[str, TaskData]], base: Any) -> None:
    """Refuse an init merge whose recipe could not be replayed beside the distillation: one not made by ``combine``
    (or already distilled, resized, dense), made from other adapters, or, for a data-aware method, from statistics
    given in place of task rows, from other task rows or on another base."""
    from adaptermerge.lowrank import LowRank
    from adaptermerge.methods.registry import get_method
    from adaptermerge.recipe import task_entries

    prov = start.provenance
    if "method" not in prov or "inputs" not in prov or "distill" in prov or "operation" in prov:
        raise UsageError(
            "the init merge must be one that adaptermerge.combine returned (not distilled, resized or loaded): "
            "its recipe is the first stage of the distilled merge's"
        )
    if not all(isinstance(m, LowRank) for m in start.modules.values()):
        raise UsageError("the init merge holds dense modules (combine(dense=True)); distillation trains LoRA factors")
    if [_where(p) for p in prov["inputs"]] != [_where(a.source) for a in teachers]:
        raise UsageError("the init merge was made from other adapters than the ones given to distil from")
    if get_method(prov["method"]).data:
        if not prov.get("tasks"):
            raise UsageError(
                f"the init {prov['method']} merge was made from statistics given in place of task rows; its recipe "
                "could not replay it: make it with `tasks` (the rows distilled on)"
            )
        if prov["tasks"] != task_entries(tasks):
            raise UsageError("the init merge read other task rows than the ones given to distil on; use the same rows")
        if _where(prov.get("base")) != _where(base):
            raise UsageError(
                f"the init merge read its statistics on the base {prov.get('base')}, not {base}; use the same base"
            )


def _where(p: Any) -> str | None:
    """A local path, resolved (the same folder named two ways compares equal)."""
    return str(Path(p).resolve()) if p else None


# ----------------------------------------------------------------------------------------------- training


def refine(
    live: LiveModel,
    teachers: Sequence[Adapter],
    start: Adapter,
    tasks: Sequence[tuple[str, TaskData]],
    settings: DistillSettings,
    progress: bool = False,
) -> Adapter:
    """Train ``start``'s factors on ``live`` so that on task ``i``'s rows the model matches ``teachers[i]`` (see
    the module docstring); returns the refined merge. ``start``, the teachers and the base are unchanged, and the
    live model is left with no adapter active, also when the training fails."""
    import torch

    from adaptermerge.data import tokenize_task
    from adaptermerge.progress import bar
    from adaptermerge.recipe import task_entries

    t0 = time.perf_counter()
    rows = [tokenize_task(d, live.tokenizer, settings.max_length)[0] for _, d in tasks]
    student, params = _trainable(start, live.device)
    on_device = [{n: lr.to(dtype=live.dtype, device=live.device) for n, lr in t.modules.items()} for t in teachers]
    opt = torch.optim.Adam(params, lr=settings.lr)
    gen = torch.Generator().manual_seed(settings.seed)
    order = [_Sampler(len(r), settings.batch_size, gen) for r in rows]
    losses: list[float] = []
    try:
        with _frozen(live.model), torch.enable_grad(), bar(settings.steps, "distil", "step", enabled=progress) as pbar:
            for step in range(settings.steps):
                opt.zero_grad(set_to_none=True)
                loss = 0.0
                for teacher, items, sampler in zip(on_device, rows, order, strict=True):
                    # one task's graph at a time: memory is one batch's, whatever the number of tasks
                    task_loss = _task_loss(live, teacher, student, [items[j] for j in sampler.next()]) / len(rows)
                    _check_finite(float(task_loss.detach()), step, settings)
                    task_loss.backward()
                    loss += float(task_loss.detach())
                opt.step()
                losses.append(loss)
                pbar.set_postfix_str(f"loss {loss:.4f}", refresh=False)
                pbar.update(1)
    finally:
        live.use(None)
    record = {
        **asdict(settings), "base": _where(live.path), "tasks": task_entries(tasks),
        "rows": {name: len(r) for (name, _), r in zip(tasks, rows, strict=True)}, "loss_first": losses[0],
        "loss_last": losses[-1], "seconds": round(time.perf_counter() - t0, 2),
    }  # fmt: skip
    return _result(start, student, record)


def _check_finite(value: float, step: int, settings: DistillSettings) -> None:
    if not math.isfinite(value):
        raise NumericalError(
            f"distillation diverged at step {step + 1} (loss {value}); lower its learning rate (now {settings.lr:g})"
        )


class _Sampler:
    """Batches of row indices: each pass over the rows takes every row once, in a fresh order, and a batch that
    spans two passes never holds a row twice (the new pass's rows that the batch already has wait for the next)."""

    def __init__(self, n: int, size: int, gen: torch.Generator):
        self.n, self.size, self.gen = n, min(size, n), gen
        self.queue: list[int] = []

    def next(self) -> list[int]:
        import torch

        batch, self.queue = self.queue[: self.size], self.queue[self.size :]
        if len(batch) < self.size:
            self.queue = torch.randperm(self.n, generator=self.gen).tolist()
            take = [i for i in self.queue if i not in batch][: self.size - len(batch)]
            self.queue = [i for i in self.queue if i not in take]
            batch += take
        return batch


def _trainable(start: Adapter, device: Any) -> tuple[dict[str, LowRank], list[torch.Tensor]]:
    """fp32 leaf copies of the init's factors (and merged bias), on the model's device, that the optimiser updates."""
    import torch

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device=device, dtype=torch.float32).clone().requires_grad_(True)

    student, params = {}, []
    for name, lr in start.modules.items():
        A, B = leaf(lr.A), leaf(lr.B)
        bias = None if lr.bias is None else leaf(lr.bias)
        student[name] = replace(lr, A=A, B=B, bias=bias)
        params += [A, B] + ([bias] if bias is not None else [])
    return student, params


class _frozen:
    """The base's own parameters take no gradients while the merge trains (restored afterwards)."""

    def __init__(self, model: torch.nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __enter__(self) -> None:
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc: Any) -> None:
        for p in self.params:
            p.requires_grad_(True)


def _task_loss(
    live: LiveModel, teacher: dict[str, LowRank], student: dict[str, LowRank], batch: list[Any]
) -> torch.Tensor:
    """Mean over the batch's real tokens of KL(teacher || student) of the next-token distributions (padding is
    dropped before the softmax, so memory is the real tokens' logits only)."""
    import torch

    ids, _, mask = pad_batch(batch, live.tokenizer.pad_token_id)
    ids, mask = ids.to(live.device), mask.to(live.device)
    real = mask.bool()
    live.use(teacher)
    with torch.no_grad():
        target = torch.log_softmax(live.model(input_ids=ids, attention_mask=mask).logits[real].float(), dim=-1)
    live.use(student)
    out = torch.log_softmax(live.model(input_ids=ids, attention_mask=mask).logits[real].float(), dim=-1)
    return (target.exp() * (target - out)).sum(-1).mean()


def _result(start: Adapter, student: dict[str, LowRank], record: dict[str, Any]) -> Adapter:
    """The refined merge in the init's dtypes and device, with the init's provenance plus the ``distill`` record;
    refused when a factor is no longer finite (the last step's update is not covered by the loss checks)."""
    modules = {}
    for name, lr in student.items():
        old = start.modules[name]

        def back(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device=like.device, dtype=like.dtype)

        modules[name] = replace(
            lr, A=back(lr.A, old.A), B=back(lr.B, old.B), bias=None if lr.bias is None else back(lr.bias, old.bias)
        )
        if not modules[name].is_finite():
            raise NumericalError(
                f"distillation made module {name} non-finite; lower its learning rate (now {record['lr']:g})"
            )
    prov = {**start.provenance, "distill": record}
    return replace(start, modules=modules, provenance=prov, warnings=list(start.warnings))


# ----------------------------------------------------------------------------------------------- outputs


def distill_recipe(adapter: Adapter) -> dict[str, Any]:
    """The recipe that replays a distilled merge: the init merge's combine recipe with ``operation: distill``,
    the base and task rows it trained on, and the ``distill`` settings."""
    from adaptermerge.recipe import checkpoint_hashes, combine_recipe

    record = adapter.provenance.get("distill")
    if not record:
        raise UsageError("this adapter was not made by distillation (its provenance has no `distill` entry)")
    recipe = combine_recipe(adapter)
    recipe["operation"] = "distill"
    if recipe.get("base") != record["base"]:  # a data-aware init recorded (and hashed) the same base already
        recipe["base"], recipe["base_sha256"] = record["base"], checkpoint_hashes(record["base"])
    recipe["tasks"] = record["tasks"]
    recipe["distill"] = {k: record[k] for k in DistillSettings.__dataclass_fields__}
    return recipe


def distill_summary(adapter: Adapter) -> str:
    """One paragraph for the card and the CLI: the init, the settings, the loss before and after."""
    r = adapter.provenance["distill"]
    tasks = ", ".join(f"{t['name']} ({r['rows'][t['name']]} rows of {Path(t['file']).name})" for t in r["tasks"])
    return (
        f"Started from a **{adapter.provenance['method']}** merge and trained its factors for {r['steps']} steps "
        f"(Adam, lr {r['lr']:g}, {r['batch_size']} rows per task per step, seed {r['seed']}) to match each task "
        f"adapter's next-token distributions on its task's rows: mean KL {r['loss_first']:.4f} -> "
        f"{r['loss_last']:.4f} in {r['seconds']:.1f} s. Tasks: {tasks}."
    )


def save_distilled(adapter: Adapter, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a distilled merge with its model card (README.md) and the recipe that replays it, atomically."""
    from adaptermerge.card import combine_card
    from adaptermerge.io.adapter import save_adapter
    from adaptermerge.io.atomic import check_output_path
    from adaptermerge.recipe import RECIPE_NAME, dump_recipe

    recipe = distill_recipe(adapter)
    inputs = [p for p in [*adapter.provenance.get("inputs", []), recipe["base"]] if p]
    check_output_path(out, inputs, overwrite=overwrite)
    card = combine_card(adapter, recipe, sections=[("Distillation", distill_summary(adapter))], tags=["distill"])
    return save_adapter(
        adapter, out, overwrite=overwrite, extra_files={"README.md": card, RECIPE_NAME: dump_recipe(recipe)}
    )


def load_distill_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Keyword arguments for :func:`distill` from a distill recipe: every input file checked against its SHA-256,
    the init merge made again from the recipe's combine part."""
    from adaptermerge.combination import combine
    from adaptermerge.live import live_adapters
    from adaptermerge.methods.registry import get_method
    from adaptermerge.recipe import check_inputs, read_recipe, recipe_arguments

    recipe = read_recipe(path, "distill")
    if not recipe.get("base") or not recipe.get("tasks") or not isinstance(recipe.get("distill"), dict):
        raise UsageError(f"{path} is not an adaptermerge distill recipe (it needs base, tasks and distill)")
    check_inputs(recipe)
    settings = DistillSettings.from_dict(recipe["distill"], str(path))
    args = recipe_arguments(recipe, path)
    tasks = args.pop("tasks")
    if not get_method(args["method"]).data:
        args["base"] = None
    else:
        args["tasks"] = tasks
    adapters = live_adapters(args.pop("adapters"), recipe["base"], "distill")
    init = combine(adapters, **args)
    return {"base": recipe["base"], "adapters": adapters, "tasks": tasks, "init": init, "settings": settings}


__all__ = ["DistillSettings", "distill", "distill_recipe", "load_distill_recipe", "refine", "save_distilled"]
