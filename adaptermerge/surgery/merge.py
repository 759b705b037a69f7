"""Fold adapters into a base checkpoint, streaming tensor by tensor: ``merge_into_base``.

The phases: open the inputs (the base's headers, the adapters combined as the method declares, the base's 4-bit
groups), plan every output tensor from headers alone (:mod:`adaptermerge.surgery.plan`), carry the plan out shard
by shard (:mod:`adaptermerge.surgery.executor`), then write the config, index, model card and recipe, all inside
one atomic output folder. Peak memory is the largest tensor being merged (plus the adapter), never a shard or the
model.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from adaptermerge.adapter import Adapter
from adaptermerge.combination import combine
from adaptermerge.dtypes import TORCH_TO_ST, dtype_name, resolve_device, resolve_dtype
from adaptermerge.errors import IncompatibleAdapters, InvalidCheckpoint, UsageError
from adaptermerge.io.atomic import Staging, atomic_dir, check_output_path
from adaptermerge.io.checkpoint import INDEX_NAME, Checkpoint, open_checkpoint
from adaptermerge.io.files import fsync_file
from adaptermerge.methods.registry import BaseMerge, get_method
from adaptermerge.recipe import (
    RECIPE_NAME,
    adapter_hashes,
    checkpoint_hashes,
    dump_recipe,
    method_recipe,
    model_entries,
)
from adaptermerge.surgery.executor import Executor, check_narrowing, check_range
from adaptermerge.surgery.plan import MergePlan, ShardPlan, non_weight_files, plan_merge
from adaptermerge.surgery.quant import FourBit, warn_lost_deltas
from adaptermerge.surgery.report import MergeReport, ModuleResult

QUANT_CHOICES = ("nf4", "fp4")

__all__ = [
    "MergeOptions",
    "MergeReport",
    "ModuleResult",
    "check_narrowing",
    "check_range",
    "merge_into_base",
]


@dataclass
class MergeOptions:
    """How :func:`merge_into_base` combines the adapters and writes the output (all but inputs and output).

    Attributes:
        weights, method, rank, energy, method_params: how several adapters are combined (see
            :func:`adaptermerge.combine`). A method declared ``BaseMerge.STACKED`` (``linear``, ``cat``) adds the exact
            stacked factors unless ``rank``/``energy`` is given (then its rank rule applies, as in ``combine``).
        dtype: convert every floating tensor to ``float32``/``bfloat16``/``float16`` (default: keep).
        quantize: ``nf4``/``fp4`` to write a 4-bit checkpoint of the merged weights (16-bit bases): the layers
            transformers' bitsandbytes integration quantizes for the model class in ``config.json``, exactly as
            ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` quantizes the merged checkpoint.
        dequantize: on a 4-bit base, write a 16-bit checkpoint of ``dequant(W4) + delta`` (GPT-2 ``Conv1D``
            weights in their dense ``in x out`` layout).
        optimize_scales: when (re-)quantizing, choose each block's scale to minimise the error of
            ``W + delta`` (never worse than absmax scaling; about 7% lower error, about 10x slower on CPU).
        device: where the per-module arithmetic runs.
        overwrite: replace a non-empty output folder.
        progress: show a progress bar (bytes and modules).
        threads: CPU threads for the arithmetic of a 16-bit/fp32 merge. Default: one fewer than torch's
            current setting (at least 1), because a writer thread moves the bytes meanwhile and idle OpenMP
            threads spinning at their barriers would take its core (measured: 1.3-1.7x faster on 2 cores).
            4-bit work: one thread by default (cache-sized chunks and thin matrix products, where waiting for a
            second thread costs more than it brings; measured on 2 shared cores: 3x faster than with two).
        allow_different_base: merge adapters whose recorded ``base_model_name_or_path`` differ from each other.
        force: merge an adapter that the base's own recipe says is already merged into it (its delta is then
            added a second time).
        tasks: for data-aware methods (``regmean``): one task file per adapter, in order (see
            :func:`adaptermerge.combine`); the inputs are collected on this base.
    """

    weights: Sequence[float] | None = None
    method: str = "linear"
    rank: int | None = None
    energy: float | None = None
    method_params: dict[str, Any] = field(default_factory=dict)
    dtype: str | torch.dtype | None = None
    quantize: str | None = None
    dequantize: bool = False
    optimize_scales: bool = False
    device: str = "cpu"
    overwrite: bool = False
    progress: bool = False
    threads: int | None = None
    allow_different_base: bool = False
    force: bool = False
    tasks: Any = None

    @classmethod
    def from_kwargs(cls, options: MergeOptions | None, kwargs: dict[str, Any]) -> MergeOptions:
        """Options from an object and/or keyword arguments; keywords that are no option are method parameters."""
        names = {f.name for f in fields(cls)}
        base = {f.name: getattr(options, f.name) for f in fields(cls)} if options is not None else {}
        base.update({k: v for k, v in kwargs.items() if k in names})
        extra = {k: v for k, v in kwargs.items() if k not in names}
        opts = cls(**base)
        opts.method_params = {**opts.method_params, **extra}
        return opts


@dataclass
class _Inputs:
    """The opened inputs of a merge."""

    base: Path
    out: Path
    ckpt: Checkpoint
    adapter: Adapter  # the combined adapter that is folded in
    loaded: list[Adapter]  # the adapters as given (for the recipe)
    four_bit: FourBit
    out_dtype: torch.dtype | None
    device: torch.device
    warnings: list[str]


def merge_into_base(
    base: str | os.PathLike,
    adapters: Sequence[Adapter | str | os.PathLike] | Adapter | str | os.PathLike,
    out: str | os.PathLike,
    options: MergeOptions | None = None,
    **kwargs: Any,
) -> MergeReport:
    """Merge one or more adapters into a checkpoint folder and write a new checkpoint folder.

    Args:
        base: Hugging Face checkpoint folder (``config.json`` + ``*.safetensors`` [+ index]); 16-bit, fp32,
            or bitsandbytes 4-bit (NF4/FP4) as transformers saves it.
        adapters: one or several adapter folders or :class:`Adapter` objects.
        out: output folder: same tensor names, dtypes and sharding; non-weight files copied; model card
            and recipe added. Written atomically.
        options: a :class:`MergeOptions`; its fields can also be given as keyword arguments
            (``dtype="bfloat16"``, ``quantize="nf4"``...), and other keywords are the method's own parameters
            (``method="svd", rank=8``).

    Returns:
        A :class:`MergeReport` with per-module figures (relative delta size; for 4-bit, requantization
        error and how much of the delta survives).

    Example:
        >>> import adaptermerge
        >>> adaptermerge.merge_into_base("Llama-3-8B", "my-adapter", "merged")  # doctest: +SKIP
    """
    opts = MergeOptions.from_kwargs(options, kwargs)
    inputs = _open_inputs(base, adapters, out, opts)
    plan = plan_merge(
        inputs.ckpt,
        inputs.adapter,
        out_dtype=TORCH_TO_ST[inputs.out_dtype] if inputs.out_dtype is not None else None,
        quantized_members=inputs.four_bit.groups,
        quant_specs=inputs.four_bit.quant_specs,
    )
    report = MergeReport(output=str(inputs.out), warnings=inputs.warnings + list(inputs.adapter.warnings))
    report.warnings += plan.warnings
    _write(inputs, plan, opts, report)
    warn_lost_deltas(report)
    return report


# ----------------------------------------------------------------------------------------------- inputs


def _open_inputs(base: str | os.PathLike, adapters: Any, out: str | os.PathLike, opts: MergeOptions) -> _Inputs:
    """Check the call, open the base's headers, combine the adapters, read the base's 4-bit groups."""
    base_p = Path(base)
    if not base_p.is_dir():
        raise InvalidCheckpoint(f"{base_p} is not a folder; pass a Hugging Face checkpoint folder")
    items = list(adapters) if isinstance(adapters, (list, tuple)) else [adapters]
    folders = [Path(a) for a in items if not isinstance(a, Adapter)]
    if (base_p / "adapter_config.json").is_file():
        raise UsageError(f"{base_p} is an adapter folder, not a base checkpoint: give the base first, then adapters")
    out_p = check_output_path(out, [base_p, *folders], overwrite=opts.overwrite)
    if opts.quantize is not None and opts.quantize not in QUANT_CHOICES:
        raise UsageError(f"`quantize` must be one of {', '.join(QUANT_CHOICES)}")
    if opts.threads is not None and opts.threads < 1:
        raise UsageError(f"`threads` must be at least 1, got {opts.threads}")
    device = resolve_device(opts.device)
    out_dtype = resolve_dtype(opts.dtype)
    ckpt = open_checkpoint(base_p)
    warnings = _already_merged(base_p, folders, opts.force)
    adapter, loaded = _combined(items, ckpt, opts)
    warnings += _base_identity(ckpt, loaded)
    four_bit = FourBit.open(ckpt, opts.quantize, opts.dequantize, opts.optimize_scales, out_dtype)
    return _Inputs(base_p, out_p, ckpt, adapter, loaded, four_bit, four_bit.out_dtype, device, warnings)


def _combined(items: list[Any], ckpt: Checkpoint, opts: MergeOptions) -> tuple[Adapter, list[Adapter]]:
    """The adapter to fold in: one adapter as it is, or several combined as the method declares."""
    from adaptermerge.surgery.init_conversion import plain_adapters

    loaded = plain_adapters(items, base=ckpt)  # PiSSA/OLoRA: W0 - init + s*B@A, init recomputed from this base
    base_merge = get_method(opts.method).base_merge
    untruncated = opts.rank is None and opts.energy is None
    exact = untruncated and base_merge is BaseMerge.STACKED
    if len(loaded) == 1 and opts.weights is None and exact and not opts.method_params and not opts.tasks:
        return loaded[0], loaded
    # a STACKED method adds its exact stacked factors (the dense delta is formed per module, never decomposed); a
    # DENSE one its dense result per module, computed while that tensor is written; otherwise the combined adapter,
    # with the method's rank rule, exactly as combine makes it
    combined = combine(
        loaded,
        opts.weights,
        method=opts.method,
        rank=opts.rank,
        energy=opts.energy,
        base=ckpt,
        allow_different_base=opts.allow_different_base,
        tasks=opts.tasks,
        keep_factors=exact,
        dense=untruncated and base_merge is BaseMerge.DENSE,
        **opts.method_params,
    )
    return combined, loaded


def _base_identity(ckpt: Checkpoint, loaded: list[Adapter]) -> list[str]:
    """A warning for each adapter whose recorded base is not this checkpoint (by Hub id, path or folder name)."""
    names = {ckpt.path.resolve().name.lower(), str(ckpt.path.resolve()).lower()}
    for key in ("_name_or_path", "name_or_path"):
        if ckpt.config.get(key):
            names |= {str(ckpt.config[key]).rstrip("/").lower(), Path(str(ckpt.config[key])).name.lower()}
    out = []
    for a in loaded:
        recorded = (a.base_model or "").rstrip("/")
        if recorded and recorded.lower() not in names and Path(recorded).name.lower() not in names:
            out.append(
                f"{a.source or 'an adapter'} records base_model_name_or_path {recorded!r}, which does not look like "
                f"{ckpt.path.name}; check that it was trained on this base"
            )
    return out


def _already_merged(base: Path, folders: list[Path], force: bool) -> list[str]:
    """Refuse (unless ``force``) adapters the base's own merge recipe says it already contains."""
    from adaptermerge.recipe import read_recipe

    if not (base / RECIPE_NAME).is_file() or not folders:
        return []
    try:
        recipe = read_recipe(base / RECIPE_NAME, "merge")
    except UsageError:
        return []  # not one of our merge recipes: nothing recorded
    merged = [m.get("sha256") for m in recipe["models"] if m.get("sha256")]
    hits = [f for f in folders if adapter_hashes(f) in merged]
    if not hits:
        return []
    what = f"{hits[0]} is already merged into {base} (its {RECIPE_NAME} records it)"
    if not force:
        raise IncompatibleAdapters(f"{what}; merging it again adds its delta twice. Pass `force` to do it anyway")
    return [f"{what}: merged again (force), so its delta is added twice"]


# ----------------------------------------------------------------------------------------------- writing


def _write(inputs: _Inputs, plan: MergePlan, opts: MergeOptions, report: MergeReport) -> None:
    """Every output file, inside one atomic folder: shards (synced in the background while the next is computed),
    the base's other files, config, index, model card and recipe. The base's files are hashed for the recipe
    meanwhile (hashlib releases the GIL)."""
    copy_files, skipped = non_weight_files(inputs.base, inputs.ckpt.shards)
    if skipped:
        report.warnings.append(
            f"skipped pickle files {skipped} (never loaded or copied; the merged weights are in safetensors)"
        )
    read = [*inputs.ckpt.shards, INDEX_NAME, *(f.name for f in copy_files)]
    executor = Executor(inputs.ckpt, plan, inputs.device, inputs.four_bit if inputs.four_bit.active else None)
    with (
        torch_threads(_threads(opts, inputs)),
        atomic_dir(inputs.out, overwrite=opts.overwrite) as tmp,
        ThreadPoolExecutor(max_workers=2) as background,
    ):
        hashes = background.submit(checkpoint_hashes, inputs.base, read)
        out_plan = inputs.four_bit.output_plan(plan, executor)
        _write_shards(executor, out_plan, tmp, background, opts.progress)
        report.modules = executor.results
        report.bytes_written = sum(s.nbytes for s in out_plan)
        for f in copy_files:
            shutil.copy2(f, tmp / f.name)
        _write_config(tmp, inputs, plan)
        if len(inputs.ckpt.shards) > 1 or (inputs.base / INDEX_NAME).is_file():
            _write_index(tmp, inputs.ckpt, out_plan, plan.rename[1])
        recipe = _recipe(inputs, opts, hashes.result())
        from adaptermerge.surgery.card import merge_card

        (tmp / "README.md").write_text(merge_card(inputs.ckpt, inputs.adapter, report, recipe), encoding="utf-8")
        (tmp / RECIPE_NAME).write_text(dump_recipe(recipe), encoding="utf-8")


def _threads(opts: MergeOptions, inputs: _Inputs) -> int:
    if opts.threads is not None:
        return opts.threads
    if inputs.four_bit.active:
        return 1  # 4-bit work is cache-sized chunks and thin products (see MergeOptions.threads)
    cpu_stream = inputs.device.type == "cpu"
    return max(1, torch.get_num_threads() - 1) if cpu_stream else torch.get_num_threads()


def _write_shards(
    executor: Executor, out_plan: list[ShardPlan], tmp: Staging, background: ThreadPoolExecutor, progress: bool
) -> None:
    """Each finished shard is flushed to disk in the background while the next one is computed."""
    from adaptermerge.progress import bar as progress_bar

    bar = progress_bar(sum(s.nbytes for s in out_plan), "merging", "B", progress, unit_scale=True)

    def advance(nbytes: int, modules: int) -> None:
        bar.update(nbytes)
        bar.set_postfix(modules=modules, refresh=False)

    executor.progress = advance
    synced: list[Future] = []
    for shard in out_plan:
        executor.write_shard(tmp / shard.file, shard)
        synced.append(background.submit(fsync_file, tmp / shard.file))
        tmp.mark_synced(tmp / shard.file)
    for f in synced:
        f.result()
    bar.close()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` torch CPU threads, restoring the previous setting afterwards."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _write_config(tmp: Path, inputs: _Inputs, plan: MergePlan) -> None:
    cfg_path = tmp / "config.json"
    if not cfg_path.is_file():
        return
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if plan.untie:
        cfg["tie_word_embeddings"] = False
    if inputs.out_dtype is not None:
        for k in ("torch_dtype", "dtype"):
            if k in cfg or k == "dtype":
                cfg[k] = dtype_name(inputs.out_dtype)
    if inputs.four_bit.dequantize:
        cfg.pop("quantization_config", None)
    if inputs.four_bit.quantize:
        cfg["quantization_config"] = inputs.four_bit.quantization_config()
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_index(tmp: Path, ckpt: Checkpoint, shards: list[ShardPlan], prefix: str) -> None:
    meta = dict(ckpt.index_metadata)
    meta["total_size"] = sum(s.nbytes for s in shards)
    if isinstance(meta.get("total_parameters"), int):
        # transformers counts logical parameters (4-bit packed weights twice), so re-quantizing changes
        # nothing; only tensors the base lacked (a head from modules_to_save, an untied copy of a tied
        # tensor) add to the count
        meta["total_parameters"] += sum(
            math.prod(j.out.shape) for s in shards for j in s.jobs if j.src is None or j.out.name != prefix + j.src.name
        )
    weight_map = {j.out.name: s.file for s in shards for j in s.jobs}
    (tmp / INDEX_NAME).write_text(
        json.dumps({"metadata": meta, "weight_map": weight_map}, indent=2) + "\n", encoding="utf-8"
    )


def _recipe(inputs: _Inputs, opts: MergeOptions, base_hashes: dict[str, str]) -> dict[str, Any]:
    """The recipe that replays this merge (``adaptermerge merge --recipe FILE -o OUT``): every file of the base
    that the merge read or copied is recorded with its SHA-256."""
    n = len(inputs.loaded)
    w = list(opts.weights) if opts.weights is not None else ([1.0] if n == 1 else [1.0 / n] * n)
    params = {
        "rank": opts.rank,
        "energy": opts.energy,
        **get_method(opts.method).resolve_params(opts.method_params),
        "allow_different_base": opts.allow_different_base,
        "quantize": opts.quantize,
        "dequantize": opts.dequantize,
    }
    return method_recipe(
        "merge",
        opts.method,
        model_entries([a.source for a in inputs.loaded], w),
        params,
        inputs.adapter.base_model,
        None if inputs.out_dtype is None or not opts.dtype else dtype_name(inputs.out_dtype),
        base=str(inputs.base.resolve()),
        base_sha256=base_hashes,
        **({"tasks": inputs.adapter.provenance["tasks"]} if inputs.adapter.provenance.get("tasks") else {}),
    )
