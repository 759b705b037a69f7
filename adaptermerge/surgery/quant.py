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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from adaptermerge.dtypes import ST_TO_TORCH, TORCH_TO_ST, dtype_name
from adaptermerge.errors import InvalidCheckpoint, NumericalError, UnsupportedArchitecture, UsageError
from adaptermerge.io import bnb4
from adaptermerge.io.checkpoint import Checkpoint
from adaptermerge.io.files import SourceFiles
from adaptermerge.io.stream import PlannedTensor, read_tensor
from adaptermerge.surgery.plan import Action, Job, MergePlan, ShardPlan
from adaptermerge.surgery.report import MergeReport, ModuleResult

if TYPE_CHECKING:
    from adaptermerge.surgery.executor import Executor

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
    with SourceFiles(ckpt.path) as files:
        for w, members in groups.items():
            small = {}
            for m in members:
                info = ckpt.info(m)
                small[m] = (
                    read_tensor(files.get(ckpt.weight_map[m]), info)
                    if m != w
                    else torch.empty(info.shape, dtype=ST_TO_TORCH[info.dtype])
                )
            specs[w] = bnb4.read_spec(small, w)
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


@dataclass
class FourBit:
    """The 4-bit side of one merge: the base's 4-bit groups, ``--quantize``/``--dequantize``, and the group tensors
    computed so far. The executor hands it its services (reading tensors, forming ``W + delta``) as an argument.

    Attributes:
        groups, specs: the base's 4-bit groups (weight key -> member tensor names) and their specs.
        quantize: ``nf4``/``fp4`` to write the layers transformers quantizes 4-bit (16-bit bases).
        dequantize: write every 4-bit group dense.
        optimize: error-minimising block scales when (re-)quantizing.
        out_dtype: the ``--dtype`` of the merge, if any.
    """

    ckpt: Checkpoint
    groups: dict[str, list[str]]
    specs: dict[str, bnb4.QuantSpec]
    quantize: str | None = None
    dequantize: bool = False
    optimize: bool = False
    out_dtype: torch.dtype | None = None
    new_quant: dict[str, NewQuant] = field(default_factory=dict)  # --quantize: source weight key -> its new group
    transposed: set[str] = field(default_factory=set)  # --dequantize: groups written back as Conv1D (in x out)
    _pending: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # group -> computed member tensors
    _rename: str = ""
    _decoded: torch.Tensor | None = None  # the reused buffer of _dequantized
    # compute the per-module error figures of (re-)quantization; benchmarks/bench_merge4.py switches them off to
    # measure what they cost
    report: ClassVar[bool] = True

    @classmethod
    def open(
        cls, ckpt: Checkpoint, quantize: str | None, dequantize: bool, optimize: bool, out_dtype: torch.dtype | None
    ) -> FourBit:
        """Read the base's 4-bit groups and check the 4-bit options against them."""
        groups, specs = checkpoint_groups(ckpt)
        if groups and quantize:
            raise UsageError(
                "the base is already 4-bit; `quantize` applies to 16-bit bases (it re-quantizes 4-bit ones anyway)"
            )
        if dequantize and not groups:
            raise UsageError("`dequantize` needs a 4-bit (bitsandbytes) base")
        if out_dtype is None and dequantize:
            dts = {s.dtype for s in specs.values()}
            out_dtype = dts.pop() if len(dts) == 1 else torch.bfloat16
        return cls(ckpt, groups, specs, quantize, dequantize, optimize, out_dtype)

    @property
    def active(self) -> bool:
        return bool(self.groups or self.quantize)

    @property
    def quant_specs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """What the planner needs: each group's dense shape and quant type."""
        return {k: (s.shape, s.quant_type) for k, s in self.specs.items()}

    def output_plan(self, plan: MergePlan, ex: Executor) -> list[ShardPlan]:
        """The plan with ``--dequantize`` / ``--quantize`` applied; re-quantized groups keep their planned tensors,
        each group's members written together (:func:`_members_together`)."""
        self._rename = plan.rename[1]
        if self.dequantize:
            return self._dequantize_plan(plan)
        if self.quantize:
            return self._quantize_plan(plan, ex)
        return [ShardPlan(s.file, _members_together(s.jobs), s.metadata) for s in plan.shards]

    def member(self, ex: Executor, job: Job) -> tuple[torch.Tensor, ModuleResult | None]:
        """The output tensor of one member job, and the module's figures when this job computed its group."""
        result = None
        if job.group not in self._pending:
            self._pending[job.group], result = self._compute_group(ex, job)
        out = self._pending[job.group]
        t = out.pop(job.out.name)
        if not out:
            del self._pending[job.group]
        if bnb4.STATE_MARKER in job.out.name:
            t = _fit_state(t, job.out.shape[0], job.out.name)
        return t, result

    def quantization_config(self) -> dict[str, Any]:
        """The ``quantization_config`` transformers writes for a 4-bit bitsandbytes model (``--quantize``)."""
        from transformers import BitsAndBytesConfig

        dtypes = {nq.spec.dtype for nq in self.new_quant.values()}
        compute = dtypes.pop() if len(dtypes) == 1 else torch.bfloat16
        cfg = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quantize,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=torch.uint8,
        ).to_dict()
        return json.loads(json.dumps(cfg, default=str))

    # ------------------------------------------------------------------------------------------- plans

    def _dequantize_plan(self, plan: MergePlan) -> list[ShardPlan]:
        """Each 4-bit group becomes one dense tensor in its layer's layout (a Conv1D's ``in x out``)."""
        from adaptermerge.surgery.arch import weight_layouts

        layers = weight_layouts(self.ckpt)
        layers.require_known("`dequantize`")
        out = []
        for s in plan.shards:
            jobs = []
            for j in s.jobs:
                if j.group is None:
                    jobs.append(j)
                elif j.src is not None and j.out.name == self._rename + j.group:
                    kind = layers.kind(j.group)
                    if kind not in ("linear", "conv1d"):
                        raise UnsupportedArchitecture(
                            f"`dequantize` cannot tell which layer of {layers.source} the 4-bit weight {j.group} "
                            "belongs to, so not whether to write it as Linear (out x in) or Conv1D (in x out)"
                        )
                    spec = self.specs[j.group]
                    shape = tuple(reversed(spec.shape)) if kind == "conv1d" else spec.shape
                    if kind == "conv1d":
                        self.transposed.add(j.group)
                    out_t = PlannedTensor(j.out.name, TORCH_TO_ST[self._dense_dtype(spec)], shape)
                    jobs.append(Job(out_t, Action.DEQUANT, j.src_file, j.src, j.module, j.extra_key, group=j.group))
            out.append(ShardPlan(s.file, jobs, s.metadata))
        return out

    def _quantize_plan(self, plan: MergePlan, ex: Executor) -> list[ShardPlan]:
        """The layers transformers quantizes become 4-bit groups; everything else is planned as before."""
        from adaptermerge.surgery.arch import bnb_4bit_choice

        if plan.rename[1] or any(j.action is Action.ADD for s in plan.shards for j in s.jobs):
            raise UsageError(
                "`quantize` cannot add a modules_to_save head that the base lacks: config.json's architectures "
                "would not name the model the output holds; merge without `quantize`, then quantize with transformers"
            )
        choice = bnb_4bit_choice(self.ckpt, self.quantize, self._load_dtype())
        if not choice.converted:
            raise UnsupportedArchitecture(
                f"transformers' bitsandbytes integration makes no layer of {choice.cls_name} 4-bit (it converts "
                "modules whose type is exactly nn.Linear or Conv1D), so `quantize` has nothing to write; merge without it"
            )
        if choice.upcast:
            raise UnsupportedArchitecture(
                f"transformers loads {choice.upcast[0]} in float32 from a {dtype_name(self._load_dtype())} "
                f"checkpoint ({choice.cls_name}._keep_in_fp32_modules), which `quantize` does not mirror; "
                "store the output as bfloat16 or float32 (`dtype`) with it"
            )
        out = []
        movable = (Action.COPY, Action.CONVERT, Action.MERGE, Action.REPLACE)
        for s in plan.shards:
            jobs = []
            for j in s.jobs:
                kind = choice.converted.get(j.src.name) if j.src is not None else None
                if kind is None or j.action not in movable:
                    jobs.append(j)
                    continue
                shape = tuple(j.src.shape) if kind == "linear" else tuple(reversed(j.src.shape))
                nq = NewQuant(new_spec(self.quantize, shape, ST_TO_TORCH[j.out.dtype]), kind == "conv1d")
                self.new_quant[j.src.name] = nq
                offset = bnb4.double_quant_offset(self._new_target(ex, nq, j)[0], nq.spec.blocksize)
                for t in _new_group_tensors(j.out.name, nq.spec, bnb4.state_length(nq.spec, offset)):
                    jobs.append(Job(t, Action.NEWQUANT, j.src_file, j.src, j.module, j.extra_key, group=j.src.name))
            out.append(ShardPlan(s.file, jobs, s.metadata))
        return out

    def _load_dtype(self) -> torch.dtype:
        """The dtype ``from_pretrained`` loads the merged dense checkpoint as (``dtype="auto"``): config.json's."""
        if self.out_dtype is not None:
            return self.out_dtype
        name = self.ckpt.config.get("dtype") or self.ckpt.config.get("torch_dtype")
        dt = getattr(torch, str(name), None) if name else None
        return dt if isinstance(dt, torch.dtype) else torch.float32

    def _dense_dtype(self, spec: bnb4.QuantSpec) -> torch.dtype:
        return self.out_dtype or spec.dtype

    # ------------------------------------------------------------------------------------------- groups

    def _compute_group(self, ex: Executor, job: Job) -> tuple[dict[str, torch.Tensor], ModuleResult | None]:
        if job.action is Action.NEWQUANT:
            return self._quantize_new(ex, job)
        group, module = job.group, job.module
        spec = self.specs[group]
        w = self._dequantized(ex, group)
        base = w if job.extra_key is None else self._replacement(ex, job, w)
        if module is not None:
            want = self._dense_dtype(spec) if job.action is Action.DEQUANT else torch.float32
            target, res = ex.merged_weight(module, base, want)
        else:
            target = base
            rel = float((base - w).norm()) / max(float(w.norm()), 1e-30)
            res = ModuleResult(job.extra_key or group, self._rename + group, rel)
        if job.action is Action.DEQUANT:
            dense = (target.T if group in self.transposed else target).cpu()
            return {self._rename + group: dense}, res if (module or job.extra_key) else None
        tensors, rep = bnb4.quantize_with_report(
            target, spec, group, self.optimize, measure=self.report, reference=w if self.report else None
        )
        res.quant_type = spec.quant_type
        if rep is not None and self.report:
            _requant_figures(res, rep)
        # the statistics are numbers; the packed codes are not, even when bnb_4bit_quant_storage makes them floats
        if not all(bool(torch.isfinite(tensors[group + s]).all()) for s in bnb4.STAT_SUFFIXES if group + s in tensors):
            raise NumericalError(f"module {module}: re-quantization produced NaN/Inf")
        return {self._rename + k: v.cpu() for k, v in tensors.items()}, res

    def _dequantized(self, ex: Executor, group: str) -> torch.Tensor:
        """The group's dense float32 weight, decoded into one buffer reused for every group (grown to the largest
        weight), so that each module does not fault in fresh pages. Valid until the next call."""
        tensors = {m: ex.read(m).to(ex.dev) for m in self.groups[group]}
        size, dev = 2 * -(-self.specs[group].numel // 2), tensors[group].device
        if self._decoded is None or self._decoded.numel() < size or self._decoded.device != dev:
            self._decoded = None  # the old buffer is freed before the larger one is allocated
            self._decoded = torch.empty(size, dtype=torch.float32, device=dev)
        return bnb4.dequantize(tensors, group, torch.float32, out=self._decoded)

    def _replacement(self, ex: Executor, job: Job, w: torch.Tensor) -> torch.Tensor:
        """An adapter tensor that replaces a 4-bit weight (a ``modules_to_save`` head, a saved base layer), in the
        4-bit layout (``out x in``: a Conv1D weight is transposed, as transformers quantizes it)."""
        t = ex.adapter.extra_tensors[job.extra_key].to(ex.dev, torch.float32)
        if self._is_conv1d(job.group):
            t = t.T
        if tuple(t.shape) != tuple(w.shape):
            raise InvalidCheckpoint(
                f"adapter tensor {job.extra_key} has shape {list(t.shape)} but the 4-bit weight {job.group} holds "
                f"{list(w.shape)}; the adapter was made for a different base model"
            )
        return t.contiguous()

    def _is_conv1d(self, group: str) -> bool:
        """Whether the dense layer of a 4-bit weight is a GPT-2 Conv1D (its dense tensors are ``in x out``)."""
        from adaptermerge.surgery.arch import weight_layouts

        return group in self.transposed or weight_layouts(self.ckpt).kind(group) == "conv1d"

    def _quantize_new(self, ex: Executor, job: Job) -> tuple[dict[str, torch.Tensor], ModuleResult | None]:
        """``--quantize``: one layer transformers quantizes, from the dense weight a plain merge would store."""
        nq = self.new_quant[job.group]
        target, res = self._new_target(ex, nq, job)
        tensors, rep = bnb4.quantize_with_report(target, nq.spec, job.group, self.optimize)  # names unchanged
        if res is not None:
            res.quant_type = nq.spec.quant_type
            res.requant_rel_error = rep.rel_error
        return {k: v.cpu() for k, v in tensors.items()}, res

    def _new_target(self, ex: Executor, nq: NewQuant, job: Job) -> tuple[torch.Tensor, ModuleResult | None]:
        """The float32 ``out x in`` weight to quantize: merged (or replaced by a modules_to_save tensor), rounded to
        the stored dtype as the dense checkpoint holds it, transposed for a Conv1D as transformers does."""
        stored = nq.spec.dtype
        res = None
        if job.extra_key is not None:
            dense = ex.adapter.extra_tensors[job.extra_key].to(ex.dev, stored)
        elif job.module is not None:
            merged, res = ex.merged_weight(job.module, ex.source(job), stored)
            dense = merged.to(stored)
        else:
            dense = ex.source(job).to(ex.dev, stored)
        target = dense.to(torch.float32)
        return (target.T if nq.conv1d else target), res


def _members_together(jobs: list[Job]) -> list[Job]:
    """The jobs with each 4-bit group's members next to its first one, the rest in planned order.

    A group is computed whole when its first member is written (the statistics depend on the codes), and its
    other members wait in memory until their turn. safetensors writes tensors by dtype size, then name, so a
    checkpoint saved by transformers holds every group's float32 statistics first and the uint8 codes much later:
    kept in that order, the codes of every group would wait at once (memory growing with the model). Tensor order
    inside a file carries no meaning for loaders (the header maps names to offsets), so members are written
    together and at most one group waits.
    """
    slots: dict[str | None, list[Job]] = {}
    order: list[list[Job]] = []
    for j in jobs:
        if j.group is None:
            order.append([j])
        elif j.group in slots:
            slots[j.group].append(j)
        else:
            slots[j.group] = [j]
            order.append(slots[j.group])
    return [j for run in order for j in run]


def _requant_figures(res: ModuleResult, rep: bnb4.QuantReport) -> None:
    """How far the stored 4-bit weights are from ``W + delta``, and how much of the delta they carry (the
    codec measured both while quantizing: no further pass over the weight)."""
    res.requant_rel_error = rep.rel_error
    res.plain_requant_rel_error = rep.plain_rel_error
    res.delta_survival = rep.change_kept


def _fit_state(t: torch.Tensor, length: int, name: str) -> torch.Tensor:
    """Re-encode a quant-state JSON compactly and pad it with spaces to the planned byte length."""
    raw = bytes(t.tolist())
    if len(raw) == length:
        return t
    compact = json.dumps(json.loads(raw.decode("utf-8")), separators=(",", ":")).encode("utf-8")
    if len(compact) > length:
        raise NumericalError(f"{name}: the quant state needs {len(compact)} bytes but {length} were planned")
    return torch.tensor(list(compact + b" " * (length - len(compact))), dtype=torch.uint8)


def warn_lost_deltas(report: MergeReport) -> None:
    lost = [m for m in report.modules if m.delta_survival is not None and m.delta_survival < LOST_DELTA_THRESHOLD]
    if lost:
        worst = min(lost, key=lambda m: m.delta_survival)
        report.warnings.append(
            f"{len(lost)} of {len(report.modules)} modules keep less than {LOST_DELTA_THRESHOLD:.0%} of their delta after "
            f"4-bit re-quantization (worst {worst.module}: {worst.delta_survival:.1%}); the merge mostly changes "
            "quantization noise: serve base + adapter, or merge into a --dequantize'd 16-bit base"
        )
