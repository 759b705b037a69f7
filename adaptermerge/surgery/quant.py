"""4-bit (bitsandbytes NF4/FP4) glue for the merge executor: plan changes and per-group computation.

* 4-bit base: each touched weight is dequantized, merged in fp32 and re-quantized with the same quant type,
  block size, double quantization and storage; untouched groups are copied byte for byte.
* ``--dequantize``: every 4-bit weight becomes a dense tensor ``dequant(W4) (+ delta)``.
* ``--quantize nf4|fp4``: every ``nn.Linear`` weight of a 16-bit base (but the output head) is written
  4-bit, after merging, in the layout transformers writes.

The quant-state JSON of a re-quantized weight is written compactly and padded with spaces to the planned
length (JSON ignores trailing whitespace), so the output header is fixed before any data is written.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import torch

from adaptermerge.errors import InvalidCheckpoint, NumericalError
from adaptermerge.io import bnb4
from adaptermerge.io.checkpoint import Checkpoint
from adaptermerge.io.stream import ST_TO_TORCH, TORCH_TO_ST, PlannedTensor, read_tensor
from adaptermerge.surgery.plan import Job, ShardPlan

if TYPE_CHECKING:
    from adaptermerge.surgery.merge import MergeReport, _Executor

LOST_DELTA_THRESHOLD = 0.5  # warn when less than half of a module's delta survives re-quantization
NEW_STATE_LEN = 320  # planned byte length of a new quant-state JSON (about 170 used)
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


def _linear_weight_keys(ckpt: Checkpoint) -> set[str]:
    """Keys of ``nn.Linear`` weights (not the output head), as transformers quantizes them."""
    from adaptermerge.surgery.arch import weight_layouts

    layouts, head = weight_layouts(ckpt)
    return {k for k, v in layouts.items() if v == "linear" and k != head}  # layouts holds stored keys only


def new_spec(quant_type: str, shape: tuple[int, ...], dtype: torch.dtype) -> bnb4.QuantSpec:
    return bnb4.QuantSpec(quant_type, NEW_BLOCKSIZE, True, 256, dtype, tuple(shape), torch.uint8)


def _new_group_tensors(key: str, spec: bnb4.QuantSpec) -> list[PlannedTensor]:
    blocks = spec.num_blocks
    return [
        PlannedTensor(key, "U8", (-(-spec.numel // 2), 1)),
        PlannedTensor(key + ".absmax", "U8", (blocks,)),
        PlannedTensor(key + ".quant_map", "F32", (16,)),
        PlannedTensor(key + ".nested_absmax", "F32", (-(-blocks // 256),)),
        PlannedTensor(key + ".nested_quant_map", "F32", (256,)),
        PlannedTensor(f"{key}{bnb4.STATE_MARKER}{spec.quant_type}", "U8", (NEW_STATE_LEN,)),
    ]


def adjust_plan(ex: _Executor) -> list[ShardPlan]:
    """Apply --dequantize / --quantize to the plan; re-quantized groups keep their planned tensors."""
    shards = ex.plan.shards
    rename = ex.plan.rename[1]
    if ex.dequantize:
        out = []
        for s in shards:
            jobs = []
            for j in s.jobs:
                if j.group is None:
                    jobs.append(j)
                elif j.src is not None and j.out.name == rename + j.group:
                    spec = ex.specs[j.group]
                    dt = TORCH_TO_ST[ex_dtype(ex, spec)]
                    jobs.append(
                        Job(
                            PlannedTensor(j.out.name, dt, spec.shape),
                            "dequant",
                            j.src_file,
                            j.src,
                            j.module,
                            group=j.group,
                        )
                    )
            out.append(ShardPlan(s.file, jobs, s.metadata))
        return out
    if ex.quantize:
        linear = _linear_weight_keys(ex.ckpt)
        out = []
        for s in shards:
            jobs = []
            for j in s.jobs:
                src_key = j.src.name if j.src is not None else None
                if src_key in linear and j.action in ("copy", "convert", "merge"):
                    dtype = ST_TO_TORCH[j.out.dtype]
                    spec = new_spec(ex.quantize, tuple(j.src.shape), dtype)
                    ex.new_quant[src_key] = spec
                    for t in _new_group_tensors(j.out.name, spec):
                        jobs.append(Job(t, "newquant", j.src_file, j.src, j.module, group=src_key))
                else:
                    jobs.append(j)
            out.append(ShardPlan(s.file, jobs, s.metadata))
        if not ex.new_quant:
            raise InvalidCheckpoint("--quantize found no Linear weights to quantize in this checkpoint")
        return out
    return shards


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
    rename = ex.plan.rename[1]
    group = job.group
    module = job.module
    if job.action == "newquant":
        w = read_tensor(ex.fh(job.src_file), job.src)
        target = ex.merged_weight(module, w) if module is not None else w.to(ex.dev, torch.float32)
        spec = ex.new_quant[group]
        tensors, rep = bnb4.quantize_with_report(target, spec, rename + group, ex.optimize)
        if module is not None:
            ex.last.quant_type = spec.quant_type
            ex.last.requant_rel_error = rep.rel_error
            ex.report.modules.append(ex.last)
        return {k: v.cpu() for k, v in tensors.items()}
    src = _load_group(ex, group)
    spec = ex.specs[group]
    w = bnb4.dequantize(src, group, torch.float32).to(ex.dev)
    if module is not None:
        target = ex.merged_weight(module, w, ex_dtype(ex, spec) if job.action == "dequant" else torch.float32)
    else:
        target = w
    if job.action == "dequant":
        if module is not None:
            ex.report.modules.append(ex.last)
        return {rename + group: target.cpu()}
    tensors, rep = bnb4.quantize_with_report(target, spec, group, ex.optimize)
    res = ex.last
    res.quant_type = spec.quant_type
    deq = bnb4.dequantize(tensors, group, torch.float32).to(ex.dev)
    delta = (target - w).double()
    dn2 = float((delta * delta).sum())
    res.requant_rel_error = float((deq - target).norm()) / max(float(target.norm()), 1e-30)
    res.plain_requant_rel_error = rep.plain_rel_error
    # the part of the intended change that the stored weights really carry (projection on delta)
    res.delta_survival = float(((deq - w).double() * delta).sum()) / dn2 if dn2 > 0 else 1.0
    ex.report.modules.append(res)
    if not all(bool(torch.isfinite(v).all()) for v in tensors.values() if v.is_floating_point()):
        raise NumericalError(f"module {module}: re-quantization produced NaN/Inf")
    return {rename + k: v.cpu() for k, v in tensors.items()}


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

    dtypes = {s.dtype for s in ex.new_quant.values()}
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
