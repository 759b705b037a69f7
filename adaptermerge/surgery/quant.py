"""4-bit (bitsandbytes NF4/FP4) glue for the merge executor: plan changes and per-group computation.

* 4-bit base: each touched weight is dequantized, merged in fp32 and re-quantized with the same quant type,
  block size, double quantization and storage; untouched groups are copied byte for byte. A 4-bit weight is
  ``out x in`` even where the dense layer is a GPT-2 ``Conv1D`` (transformers transposes it before
  quantizing), so deltas are added in the Linear layout.
* ``--dequantize``: every 4-bit weight becomes a dense tensor ``dequant(W4) (+ delta)``, in the dense layer's
  layout (``Conv1D`` weights transposed back to ``in x out``), so the model class loads it.
* ``--quantize nf4|fp4``: the layers transformers' bitsandbytes integration quantizes for the checkpoint's
  model class (:func:`adaptermerge.surgery.arch.bnb_4bit_choice`) are written 4-bit, after merging: the merged
  weight is rounded to its stored dtype (the dense checkpoint a plain merge writes) and quantized the way
  ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` quantizes that checkpoint.

The output header is fixed before any data is written. The quant-state JSON of a re-quantized weight keeps
the source's length: it is written compactly and padded with spaces (JSON ignores trailing whitespace). A new
weight's JSON is planned to its exact length, which depends on the double-quantization offset: the planner
computes that offset from the merged weight in a first pass (one merge more per layer, no quantization).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from adaptermerge.errors import InvalidCheckpoint, NumericalError, UnsupportedArchitecture, UsageError
from adaptermerge.io import bnb4
from adaptermerge.io.checkpoint import Checkpoint
from adaptermerge.io.stream import ST_TO_TORCH, TORCH_TO_ST, PlannedTensor, read_tensor
from adaptermerge.surgery.plan import Job, ShardPlan
from adaptermerge.surgery.report import ModuleResult

if TYPE_CHECKING:
    from adaptermerge.surgery.merge import MergeReport, _Executor

LOST_DELTA_THRESHOLD = 0.5  # warn when less than half of a module's delta survives re-quantization
NEW_BLOCKSIZE = 64


def checkpoint_groups(ckpt: Checkpoint) -> tuple[dict[str, list[str]], dict[str, bnb4.QuantSpec]]:
    """The 4-bit groups of a checkpoint and their specs (reads only the small stats tensors)."""
    names = list(ckpt.weight_map)
    if not any(bnb4.STATE_MARKER in n for n in names):
        q = ckpt.quantization or {}
        if q.get("quant_method") == "bitsandbytes" and q.get("load_in_4bit"):
            raise InvalidCheckpoint(
                f"{ckpt.path}/config.json declares 4-bit bitsandbytes weights but no quant states were found"
            )
        if q and q.get("quant_method") not in (None, "bitsandbytes"):
            raise InvalidCheckpoint(
                f"{ckpt.path} is quantized with {q.get('quant_method')!r}, which adaptermerge cannot merge into; "
                "use a 16-bit or bitsandbytes 4-bit base"
            )
        return {}, {}
    groups = bnb4.group_quantized(names)
    specs: dict[str, bnb4.QuantSpec] = {}
    handles: dict[str, Any] = {}
    try:
        for w, members in groups.items():
            small = {}
            for m in members:
                f = ckpt.weight_map[m]
                if f not in handles:
                    handles[f] = open(ckpt.path / f, "rb")  # noqa: SIM115
                info = ckpt.info(m)
                small[m] = (
                    read_tensor(handles[f], info) if m != w else torch.empty(info.shape, dtype=ST_TO_TORCH[info.dtype])
                )
            specs[w] = bnb4.read_spec(small, w)
    finally:
        for h in handles.values():
            h.close()
    return groups, specs


def new_spec(quant_type: str, shape: tuple[int, ...], dtype: torch.dtype) -> bnb4.QuantSpec:
    return bnb4.QuantSpec(quant_type, NEW_BLOCKSIZE, True, 256, dtype, tuple(shape), torch.uint8)


def _new_group_tensors(key: str, spec: bnb4.QuantSpec, state_len: int) -> list[PlannedTensor]:
    blocks = spec.num_blocks
    return [
        PlannedTensor(key, "U8", (-(-spec.numel // 2), 1)),
        PlannedTensor(key + ".absmax", "U8", (blocks,)),
        PlannedTensor(key + ".quant_map", "F32", (16,)),
        PlannedTensor(key + ".nested_absmax", "F32", (-(-blocks // 256),)),
        PlannedTensor(key + ".nested_quant_map", "F32", (256,)),
        PlannedTensor(f"{key}{bnb4.STATE_MARKER}{spec.quant_type}", "U8", (state_len,)),
    ]


@dataclass(frozen=True)
class NewQuant:
    """A weight ``--quantize`` writes 4-bit: its spec (``out x in``) and whether the dense layer is a Conv1D."""

    spec: bnb4.QuantSpec
    conv1d: bool


def adjust_plan(ex: _Executor) -> list[ShardPlan]:
    """Apply --dequantize / --quantize to the plan; re-quantized groups keep their planned tensors."""
    if ex.dequantize:
        return _dequantize_plan(ex)
    if ex.quantize:
        return _quantize_plan(ex)
    return ex.plan.shards


def _dequantize_plan(ex: _Executor) -> list[ShardPlan]:
    """Each 4-bit group becomes one dense tensor in its layer's layout (a Conv1D's ``in x out``)."""
    from adaptermerge.surgery.arch import weight_layouts

    layers = weight_layouts(ex.ckpt)
    layers.require_known("--dequantize")
    rename = ex.plan.rename[1]
    out = []
    for s in ex.plan.shards:
        jobs = []
        for j in s.jobs:
            if j.group is None:
                jobs.append(j)
            elif j.src is not None and j.out.name == rename + j.group:
                kind = layers.kind(j.group)
                if kind not in ("linear", "conv1d"):
                    raise UnsupportedArchitecture(
                        f"--dequantize cannot tell which layer of {layers.source} the 4-bit weight {j.group} belongs "
                        "to, so not whether to write it as Linear (out x in) or Conv1D (in x out)"
                    )
                spec = ex.specs[j.group]
                shape = tuple(reversed(spec.shape)) if kind == "conv1d" else spec.shape
                if kind == "conv1d":
                    ex.transposed.add(j.group)
                dt = TORCH_TO_ST[ex_dtype(ex, spec)]
                jobs.append(
                    Job(
                        PlannedTensor(j.out.name, dt, shape),
                        "dequant",
                        j.src_file,
                        j.src,
                        j.module,
                        j.extra_key,
                        group=j.group,
                    )
                )
        out.append(ShardPlan(s.file, jobs, s.metadata))
    return out


def _quantize_plan(ex: _Executor) -> list[ShardPlan]:
    """The layers transformers quantizes become 4-bit groups; everything else is planned as before."""
    from adaptermerge.surgery.arch import bnb_4bit_choice

    if ex.plan.rename[1] or any(j.action == "add" for s in ex.plan.shards for j in s.jobs):
        raise UsageError(
            "--quantize cannot add a modules_to_save head that the base lacks: config.json's architectures would "
            "not name the model the output holds; merge without --quantize, then quantize with transformers"
        )
    choice = bnb_4bit_choice(ex.ckpt, ex.quantize, _load_dtype(ex))
    if not choice.converted:
        raise UnsupportedArchitecture(
            f"transformers' bitsandbytes integration makes no layer of {choice.cls_name} 4-bit (it converts modules "
            "whose type is exactly nn.Linear or Conv1D), so --quantize has nothing to write; merge without it"
        )
    if choice.upcast:
        raise UnsupportedArchitecture(
            f"transformers loads {choice.upcast[0]} in float32 from a {str(_load_dtype(ex)).replace('torch.', '')} "
            f"checkpoint ({choice.cls_name}._keep_in_fp32_modules), which --quantize does not mirror; "
            "pass --dtype bfloat16 or float32 with it"
        )
    out = []
    for s in ex.plan.shards:
        jobs = []
        for j in s.jobs:
            kind = choice.converted.get(j.src.name) if j.src is not None else None
            if kind is None or j.action not in ("copy", "convert", "merge", "replace"):
                jobs.append(j)
                continue
            shape = tuple(j.src.shape) if kind == "linear" else tuple(reversed(j.src.shape))
            nq = NewQuant(new_spec(ex.quantize, shape, ST_TO_TORCH[j.out.dtype]), kind == "conv1d")
            ex.new_quant[j.src.name] = nq
            offset = bnb4.double_quant_offset(_new_target(ex, nq, j), nq.spec.blocksize)
            for t in _new_group_tensors(j.out.name, nq.spec, bnb4.state_length(nq.spec, offset)):
                jobs.append(Job(t, "newquant", j.src_file, j.src, j.module, j.extra_key, group=j.src.name))
        out.append(ShardPlan(s.file, jobs, s.metadata))
    return out


def _load_dtype(ex: _Executor) -> torch.dtype:
    """The dtype ``from_pretrained`` loads the merged dense checkpoint as (``dtype="auto"``): config.json's."""
    if ex.out_dtype is not None:
        return ex.out_dtype
    name = ex.ckpt.config.get("dtype") or ex.ckpt.config.get("torch_dtype")
    dt = getattr(torch, str(name), None) if name else None
    return dt if isinstance(dt, torch.dtype) else torch.float32


def ex_dtype(ex: _Executor, spec: bnb4.QuantSpec) -> torch.dtype:
    return ex.out_dtype or spec.dtype


def _load_group(ex: _Executor, group: str) -> dict[str, torch.Tensor]:
    return {m: ex.read(m) for m in ex.groups[group]}


def member_tensor(ex: _Executor, job: Job) -> torch.Tensor:
    """The output tensor of one member job; computes (and caches) the whole group on first use."""
    group = job.group
    if group not in ex.pending:
        ex.pending[group] = _compute_group(ex, job)
    out = ex.pending[group]
    t = out.pop(job.out.name)
    if not out:
        del ex.pending[group]
    if bnb4.STATE_MARKER in job.out.name:
        t = _fit_state(t, job.out.shape[0], job.out.name)
    return t


def _compute_group(ex: _Executor, job: Job) -> dict[str, torch.Tensor]:
    if job.action == "newquant":
        return _quantize_new(ex, job)
    rename = ex.plan.rename[1]
    group = job.group
    module = job.module
    src = _load_group(ex, group)
    spec = ex.specs[group]
    w = bnb4.dequantize(src, group, torch.float32).to(ex.dev)
    base = w if job.extra_key is None else _replacement(ex, job, w)
    if module is not None:
        target = ex.merged_weight(module, base, ex_dtype(ex, spec) if job.action == "dequant" else torch.float32)
        res = ex.last
    else:
        target = base
        res = ModuleResult(
            job.extra_key or group, rename + group, float((base - w).norm()) / max(float(w.norm()), 1e-30)
        )
    if job.action == "dequant":
        if module is not None or job.extra_key is not None:
            ex.report.modules.append(res)
        return {rename + group: (target.T if group in ex.transposed else target).cpu()}
    tensors, rep = bnb4.quantize_with_report(target, spec, group, ex.optimize)
    res.quant_type = spec.quant_type
    deq = bnb4.dequantize(tensors, group, torch.float32).to(ex.dev)
    delta = (target - w).double()
    dn2 = float((delta * delta).sum())
    res.requant_rel_error = float((deq - target).norm()) / max(float(target.norm()), 1e-30)
    res.plain_requant_rel_error = rep.plain_rel_error
    # the part of the intended change that the stored weights really carry (projection on delta)
    res.delta_survival = float(((deq - w).double() * delta).sum()) / dn2 if dn2 > 0 else 1.0
    ex.report.modules.append(res)
    # the statistics are numbers; the packed codes are not, even when bnb_4bit_quant_storage makes them a float tensor
    if not all(bool(torch.isfinite(tensors[group + s]).all()) for s in bnb4.STAT_SUFFIXES if group + s in tensors):
        raise NumericalError(f"module {module}: re-quantization produced NaN/Inf")
    return {rename + k: v.cpu() for k, v in tensors.items()}


def _replacement(ex: _Executor, job: Job, w: torch.Tensor) -> torch.Tensor:
    """An adapter tensor that replaces a 4-bit weight (a ``modules_to_save`` head, a saved base layer), in the 4-bit
    layout (``out x in``: a Conv1D weight is transposed, as transformers quantizes it)."""
    t = ex.adapter.extra_tensors[job.extra_key].to(ex.dev, torch.float32)
    if job.group in ex.transposed:
        t = t.T
    if tuple(t.shape) != tuple(w.shape):
        raise InvalidCheckpoint(
            f"adapter tensor {job.extra_key} has shape {list(t.shape)} but the 4-bit weight {job.group} holds "
            f"{list(w.shape)}; the adapter was made for a different base model"
        )
    return t.contiguous()


def _quantize_new(ex: _Executor, job: Job) -> dict[str, torch.Tensor]:
    """``--quantize``: one layer transformers quantizes, from the dense weight a plain merge would store."""
    nq: NewQuant = ex.new_quant[job.group]
    target = _new_target(ex, nq, job)
    tensors, rep = bnb4.quantize_with_report(target, nq.spec, job.group, ex.optimize)  # names unchanged: no rename
    if job.module is not None:
        ex.last.quant_type = nq.spec.quant_type
        ex.last.requant_rel_error = rep.rel_error
        ex.report.modules.append(ex.last)
    return {k: v.cpu() for k, v in tensors.items()}


def _new_target(ex: _Executor, nq: NewQuant, job: Job) -> torch.Tensor:
    """The float32 ``out x in`` weight to quantize: merged (or replaced by a modules_to_save tensor), rounded to
    the stored dtype as the dense checkpoint holds it, transposed for a Conv1D as transformers does."""
    stored = nq.spec.dtype
    if job.extra_key is not None:
        dense = ex.adapter.extra_tensors[job.extra_key].to(ex.dev, stored)
    elif job.module is not None:
        dense = ex.merged_weight(job.module, read_tensor(ex.fh(job.src_file), job.src), stored).to(stored)
    else:
        dense = read_tensor(ex.fh(job.src_file), job.src).to(ex.dev, stored)
    target = dense.to(torch.float32)
    return target.T if nq.conv1d else target


def _fit_state(t: torch.Tensor, length: int, name: str) -> torch.Tensor:
    """Re-encode a quant-state JSON compactly and pad it with spaces to the planned byte length."""
    raw = bytes(t.tolist())
    if len(raw) == length:
        return t
    compact = json.dumps(json.loads(raw.decode("utf-8")), separators=(",", ":")).encode("utf-8")
    if len(compact) > length:
        raise NumericalError(f"{name}: the quant state needs {len(compact)} bytes but {length} were planned")
    return torch.tensor(list(compact + b" " * (length - len(compact))), dtype=torch.uint8)


def quantization_config(quant_type: str, ex: _Executor) -> dict[str, Any]:
    """The ``quantization_config`` transformers writes for a 4-bit bitsandbytes model."""
    from transformers import BitsAndBytesConfig

    dtypes = {nq.spec.dtype for nq in ex.new_quant.values()}
    compute = dtypes.pop() if len(dtypes) == 1 else torch.bfloat16
    cfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=torch.uint8,
    ).to_dict()
    return json.loads(json.dumps(cfg, default=str))


def warn_lost_deltas(report: MergeReport) -> None:
    lost = [m for m in report.modules if m.delta_survival is not None and m.delta_survival < LOST_DELTA_THRESHOLD]
    if lost:
        worst = min(lost, key=lambda m: m.delta_survival)
        report.warnings.append(
            f"{len(lost)} of {len(report.modules)} modules keep less than {LOST_DELTA_THRESHOLD:.0%} of their delta after "
            f"4-bit re-quantization (worst {worst.module}: {worst.delta_survival:.1%}); the merge mostly changes "
            "quantization noise: serve base + adapter, or merge into a --dequantize'd 16-bit base"
        )
