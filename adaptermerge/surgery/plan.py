"""Plan a merge from headers alone: which output tensor comes from where, and what happens to it.

The planner reads no tensor data, so it is cheap and testable. Adapter module names are mapped to
checkpoint keys the way transformers maps them across ``base_model_prefix``: an adapter made on a task
model (``bert.encoder...``) fits a checkpoint saved from the bare model (``encoder...``) and the other
way round.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adaptermerge.adapter import Adapter
from adaptermerge.dtypes import FLOAT_DTYPES
from adaptermerge.errors import IncompatibleAdapters, InvalidCheckpoint, UnsupportedArchitecture
from adaptermerge.io.adapter import PEFT_PREFIX
from adaptermerge.io.checkpoint import Checkpoint, choose_prefix_map, map_name
from adaptermerge.io.safetensors_header import TensorInfo
from adaptermerge.io.stream import PlannedTensor
from adaptermerge.lowrank import LowRank
from adaptermerge.surgery.tokens import plan_token_targets

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class Action(str, enum.Enum):
    """What a job does to produce its output tensor; each has one handler in :mod:`adaptermerge.surgery.executor`."""

    COPY = "copy"  # bytes unchanged
    CONVERT = "convert"  # dtype change only
    MERGE = "merge"  # W + delta of ``module`` (W: the adapter's saved base layer when ``extra_key`` is set)
    BIAS = "bias"  # b + bias delta of ``module``
    TOKENS = "tokens"  # W with the trained token rows of ``module`` written over its rows
    REPLACE = "replace"  # an adapter tensor (a modules_to_save copy) in place of the base's
    ADD = "add"  # an adapter tensor the base lacks (a modules_to_save head)
    QUANT = "quant"  # a member of a 4-bit group re-quantized after its weight ``group`` was merged
    DEQUANT = "dequant"  # a 4-bit group written dense (``--dequantize``)
    NEWQUANT = "newquant"  # a member of a group ``--quantize`` creates from a dense weight


@dataclass
class Job:
    """One output tensor: its :class:`Action`, its source tensor, and the adapter entries it uses."""

    out: PlannedTensor
    action: Action
    src_file: str | None = None
    src: TensorInfo | None = None
    module: str | None = None
    extra_key: str | None = None
    group: str | None = None


@dataclass
class ShardPlan:
    file: str
    jobs: list[Job]
    metadata: dict[str, str]

    @property
    def nbytes(self) -> int:
        return sum(j.out.nbytes for j in self.jobs)


@dataclass
class MergePlan:
    shards: list[ShardPlan]
    modules: dict[str, str]  # adapter module -> checkpoint weight key (output naming)
    rename: tuple[str, str]  # (strip, add) prefix applied to every checkpoint key
    quantized: dict[str, str] = field(default_factory=dict)  # output weight key -> quant type of touched 4-bit modules
    warnings: list[str] = field(default_factory=list)
    untie: bool = False  # write tie_word_embeddings: false (tied members now differ)
    adapter: Adapter | None = None  # the adapter as planned: each module's layout is its layer's (see _fix_layouts)

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)


def _fix_layouts(ckpt: Checkpoint, adapter: Adapter, keys: dict[str, str], quantized: set[str]) -> Adapter:
    """Each module's Linear/Conv1D layout from the layer it updates (``keys``: module -> checkpoint weight key).

    PEFT's ``fan_in_fan_out`` is one flag for the whole adapter, but PEFT applies it per layer type (a GPT-2
    adapter on Conv1D blocks and the Linear ``lm_head``), and it records the type of the last layer it
    wrapped. A bitsandbytes 4-bit weight is ``out x in`` whatever the dense layer was (transformers transposes
    ``Conv1D`` weights before quantizing them, and PEFT merges into 4-bit layers with ``fan_in_fan_out`` off),
    so its delta goes in the Linear layout.
    """
    from dataclasses import replace

    layers = None
    fixed = {}
    for n, m in adapter.modules.items():
        key = keys[n]
        if m.layout == "embedding":
            layout = m.layout
        elif key in quantized:
            layout = "linear"
        else:
            if layers is None:
                from adaptermerge.surgery.arch import weight_layouts

                layers = weight_layouts(ckpt)
            layout = _dense_layout(ckpt, key, m, layers)
        fixed[n] = m if layout == m.layout else replace(m, layout=layout)
    return replace(adapter, modules=fixed)


def _dense_layout(ckpt: Checkpoint, key: str, lr, layers) -> str:
    """The model's layer type; for a layer the model class does not tell (custom code), the stored shape when it
    is not square, else PEFT's record (``fan_in_fan_out`` off: that adapter wrapped nn.Linear layers)."""
    kind = layers.kind(key)
    if kind in ("linear", "conv1d"):
        return kind
    if key == layers.head_key:  # a tied head is not stored, but it is an nn.Linear
        return "linear"
    if key not in ckpt.weight_map:
        return lr.layout  # refused by the planner's shape check
    shape = tuple(ckpt.info(key).shape)
    out, inn = lr.shape
    if out != inn and shape in ((out, inn), (inn, out)):
        return "linear" if shape == (out, inn) else "conv1d"
    if lr.layout == "linear" or shape != (out, inn):  # a wrong shape is refused by the planner's check
        return lr.layout
    raise UnsupportedArchitecture(
        f"cannot tell whether {key} is a Conv1D or a Linear layer: its weight is square, the adapter's "
        f"fan_in_fan_out is recorded once per adapter, not per layer, and {layers.source}; use a checkpoint whose "
        "config.json names a transformers class"
    )


@dataclass
class _Change:
    """What a merge does to one checkpoint key: replace it with an adapter tensor, then add a module's delta."""

    replace: str | None = None  # adapter extra-tensor key (modules_to_save copy, or a saved base layer)
    module: str | None = None  # adapter module whose delta is added
    tokens: str | None = None  # adapter token module whose trained rows are written over the tensor's rows

    def same_as(self, other: _Change, adapter: Adapter) -> bool:
        """Whether both changes give the same tensor from the same base tensor."""
        if (self.replace is None) != (other.replace is None) or (self.module is None) != (other.module is None):
            return False
        if self.tokens != other.tokens:
            return False
        if self.replace is not None and not _equal(
            adapter.extra_tensors[self.replace], adapter.extra_tensors[other.replace]
        ):
            return False
        if self.module is not None:
            a, b = adapter.modules[self.module], adapter.modules[other.module]
            if not (isinstance(a, LowRank) and isinstance(b, LowRank)):
                return a is b  # dense method results: equal only when they are one
            same = _equal(a.A, b.A) and _equal(a.B, b.B) and a.weight_shape == b.weight_shape
            return same and a.bias is None and b.bias is None and a.magnitude is None and b.magnitude is None
        return True


def _equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.shape == y.shape and x.dtype == y.dtype and bool(torch.equal(x, y))


@dataclass
class _Ties:
    """transformers' tied-weight groups of a checkpoint, as a merge must treat them."""

    groups: list[list[str]]  # each: keys loaded as one tensor; at least one stored
    alias: dict[str, str]  # absent member -> the stored member whose bytes it shares

    @classmethod
    def of(cls, ckpt: Checkpoint) -> _Ties:
        from adaptermerge.surgery.arch import tie_groups

        keys = set(ckpt.weight_map)
        groups, alias = [], {}
        for g in tie_groups(ckpt):
            stored = [k for k in g if k in keys]
            if not stored or not _stored_equal(ckpt, stored):
                continue  # nothing to tie to, or transformers itself unties differing stored tensors
            groups.append(g)
            alias.update({k: stored[0] for k in g if k not in keys})
        return cls(groups, alias)


def _stored_equal(ckpt: Checkpoint, stored: list[str]) -> bool:
    """transformers ties stored members only when their values are equal (compares bytes, 8 MiB at a time)."""
    infos = [ckpt.info(k) for k in stored]
    if len({(i.dtype, tuple(i.shape)) for i in infos}) > 1:
        return False
    if len(infos) == 1:
        return True
    handles = [open(ckpt.path / ckpt.weight_map[k], "rb") for k in stored]  # noqa: SIM115 - closed below
    try:
        for off in range(0, infos[0].nbytes, 8 << 20):
            n = min(8 << 20, infos[0].nbytes - off)
            blocks = []
            for h, i in zip(handles, infos, strict=True):
                h.seek(i.start + off)
                blocks.append(h.read(n))
            if any(b != blocks[0] for b in blocks[1:]):
                return False
        return True
    finally:
        for h in handles:
            h.close()


def _untie(ties: _Ties, changes: dict[str, _Change], adapter: Adapter) -> bool:
    """Whether the merged model must untie: some group's members change differently.

    In the trained PEFT model a tied group is one tensor ``W``; a LoRA or a ``modules_to_save`` copy on one member
    (say the input embedding) changes only that member's use of ``W`` (the output head still reads ``W``). A tied
    checkpoint keeps that behaviour only while every member's change is the same (e.g. the same delta on the
    embedding and on the head, as ``ensure_weight_tying`` trains it); otherwise every member is written with its
    own change and ``tie_word_embeddings`` is set to false, as transformers unties.
    """
    for g in ties.groups:
        first = changes.get(g[0], _Change())
        if any(not changes.get(k, _Change()).same_as(first, adapter) for k in g[1:]):
            return True
    return False


def plan_merge(
    ckpt: Checkpoint,
    adapter: Adapter,
    out_dtype: str | None = None,
    quantized_members: dict[str, list[str]] | None = None,
    quant_specs: dict[str, tuple[tuple[int, ...], str]] | None = None,
) -> MergePlan:
    """Plan which tensors are copied, merged, converted, replaced or added, shard by shard.

    Args:
        ckpt: the base checkpoint (headers).
        adapter: the adapter to fold in (already combined if several were given).
        out_dtype: safetensors dtype for every floating tensor (``F32``/``F16``/``BF16``) or None to keep.
        quantized_members: 4-bit groups of the checkpoint (weight key -> member tensor names).
        quant_specs: for those groups, weight key -> (original shape, quant type).

    Raises:
        IncompatibleAdapters: an adapter module or shape that the checkpoint does not have.
    """
    keys = set(ckpt.weight_map)
    groups = quantized_members or {}
    ties = _Ties.of(ckpt)
    pm = choose_prefix_map(adapter.modules, keys | set(ties.alias))
    if pm is None:
        missing = next(n for n in adapter.modules if f"{n}.weight" not in keys)
        raise IncompatibleAdapters(
            f"adapter module {missing} has no weight in the base checkpoint (looked for {missing}.weight, with and "
            f"without a model prefix); the adapter was made for another architecture than {ckpt.path}"
        )
    strip, add = pm
    adapter = _fix_layouts(
        ckpt, adapter, {m: map_name(m, strip, add) + ".weight" for m in adapter.modules}, set(groups)
    )
    extras = _extra_keys(adapter, strip, add)
    rename = ("", "")
    if strip and any(n not in keys and n not in ties.alias for n in extras):
        # A head the bare checkpoint lacks: write the output with the task model's naming so that
        # transformers finds both the head and the backbone.
        rename = ("", strip)
    modules = {m: map_name(m, strip, add) + ".weight" for m in adapter.modules}
    changes = _changes(adapter, modules, extras)
    _add_token_changes(ckpt, adapter, changes, ties, groups, lambda n: map_name(n, strip, add) + ".weight")
    quantized = _check_shapes(ckpt, adapter, modules, groups, quant_specs or {}, ties)
    untie = _untie(ties, changes, adapter)
    shards = _shard_jobs(_Decided(ckpt, adapter, changes, extras, ties, untie, rename, groups, out_dtype))
    warnings = [f"added {j.out.name} from the adapter's modules_to_save (the base has no such tensor)"
                for s in shards for j in s.jobs if j.action is Action.ADD]  # fmt: skip
    if untie:
        warnings.append(
            "the base ties its input embedding and output head, but the adapter changes them differently (as the "
            "trained PEFT model uses them): the merged checkpoint stores both and sets tie_word_embeddings: false"
        )
    modules = {m: rename[1] + k for m, k in modules.items()}
    quantized = {rename[1] + k: v for k, v in quantized.items()}
    return MergePlan(shards, modules, rename, quantized, warnings, untie, adapter)


def _extra_keys(adapter: Adapter, strip: str, add: str) -> dict[str, str]:
    """Checkpoint key -> adapter tensor key for the non-LoRA tensors (``modules_to_save``, saved base layers)."""
    extras: dict[str, str] = {}
    for k in adapter.extra_tensors:
        name = k[len(PEFT_PREFIX) :] if k.startswith(PEFT_PREFIX) else k
        extras[map_name(name.replace(".base_layer.", "."), strip, add)] = k
    return extras


def _changes(adapter: Adapter, modules: dict[str, str], extras: dict[str, str]) -> dict[str, _Change]:
    """Checkpoint key -> its change. A key with both a saved base layer and a delta gets the delta added to the
    saved base (PEFT loads the saved base layer over the model's, e.g. after a vocabulary resize)."""
    changes: dict[str, _Change] = {k: _Change(replace=e) for k, e in extras.items()}
    for m, key in modules.items():
        changes.setdefault(key, _Change()).module = m
        if adapter.modules[m].bias is not None:
            changes.setdefault(key[: -len("weight")] + "bias", _Change()).module = m
    return changes


def _add_token_changes(
    ckpt: Checkpoint,
    adapter: Adapter,
    changes: dict[str, _Change],
    ties: _Ties,
    groups: dict[str, list[str]],
    key_of,
) -> None:
    """Trained token rows as changes. PEFT wraps a head tied to the embedding with a *tied* token wrapper that shares
    the embedding's rows, so every member of the embedding's tie group gets them (and the group stays tied)."""
    taken = {
        k: f"the LoRA factors of {c.module}" if c.module else f"the adapter tensor {c.replace}"
        for k, c in changes.items()
    }
    taken.update({w: "its 4-bit re-quantization" for w in groups})
    for key, name in plan_token_targets(ckpt, adapter, key_of, taken).items():
        group = next((g for g in ties.groups if key in g), [key])
        for k in group:
            if k not in ckpt.weight_map and k in changes:
                raise IncompatibleAdapters(
                    f"{k} shares the tensor of {key}, so it would receive both the token rows of {name} and "
                    f"{taken[k]}; PEFT cannot run such an adapter (one wrapper per module)"
                )
            changes.setdefault(k, _Change()).tokens = name


def _check_shapes(
    ckpt: Checkpoint,
    adapter: Adapter,
    modules: dict[str, str],
    groups: dict[str, list[str]],
    specs: dict[str, tuple[tuple[int, ...], str]],
    ties: _Ties,
) -> dict[str, str]:
    """Refuse deltas whose shape differs from the checkpoint's weight; returns the touched 4-bit keys' quant types."""
    keys = set(ckpt.weight_map)
    quantized: dict[str, str] = {}
    for m, key in modules.items():
        lr = adapter.modules[m]
        stored = ties.alias.get(key, key)
        if stored in groups:
            shape, quantized[key] = specs[stored]
        else:
            shape = ckpt.info(stored).shape
        if tuple(shape) != tuple(lr.weight_shape):
            raise IncompatibleAdapters(
                f"module {m}: the adapter's delta has shape {list(lr.weight_shape)} ({lr.layout}) but the checkpoint's "
                f"{key} has shape {list(shape)}; the adapter was made for a different base model"
            )
        if lr.bias is not None and (stored[: -len("weight")] + "bias") not in keys:
            raise IncompatibleAdapters(f"module {m} trains a bias (lora_bias) but the base layer {key} has none")
    return quantized


@dataclass(frozen=True)
class _Decided:
    """What the planner has decided before it lays out the jobs: each checkpoint key's change, the tie groups and
    whether they are untied, the output's naming (``rename``), the 4-bit groups and the output dtype."""

    ckpt: Checkpoint
    adapter: Adapter
    changes: dict[str, _Change]
    extras: dict[str, str]
    ties: _Ties
    untie: bool
    rename: tuple[str, str]
    groups: dict[str, list[str]]
    out_dtype: str | None

    def stored(self, name: str, dtype: str, shape: tuple[int, ...], convert: bool = True) -> PlannedTensor:
        """The output tensor for checkpoint key ``name``: renamed, and converted to ``out_dtype`` if floating."""
        if convert and self.out_dtype and dtype in FLOAT_DTYPES:
            dtype = self.out_dtype
        return PlannedTensor(self.rename[1] + name, dtype, shape)


def _shard_jobs(d: _Decided) -> list[ShardPlan]:
    """One job per output tensor, in the source order; tensors the base lacks go at the end of the last shard."""
    keys = set(d.ckpt.weight_map)
    member_of = {m: w for w, ms in d.groups.items() for m in ms}
    tied_stored = {k for g in d.ties.groups for k in g if k in keys}
    shards: list[ShardPlan] = []
    files = list(d.ckpt.shards)
    for fi, f in enumerate(files):
        header = d.ckpt.shards[f]
        jobs: list[Job] = []
        for name, info in header.tensors.items():
            out = d.stored(name, info.dtype, info.shape, convert=name not in member_of)
            if name in member_of:
                w = member_of[name]
                ch = d.changes.get(w) or _Change()
                action = Action.QUANT if (ch.module or ch.replace) else Action.COPY
                jobs.append(Job(out, action, f, info, ch.module, extra_key=ch.replace, group=w))
                continue
            change = d.changes.get(name)
            if name in tied_stored and not d.untie:
                change = _tied_change(name, d.ties, d.changes)
            jobs.append(_job(out, f, info, change, d.adapter, name))
        if fi == len(files) - 1:
            jobs += _added_jobs(d)
        shards.append(ShardPlan(f, jobs, dict(header.metadata) or {"format": "pt"}))
    return shards


def _tied_change(name: str, ties: _Ties, changes: dict[str, _Change]) -> _Change | None:
    """In a group that stays tied every member's change is the same: the stored member takes any member's."""
    group = next(g for g in ties.groups if name in g)
    return next((changes[k] for k in group if k in changes), None)


def _job(
    out: PlannedTensor, f: str | None, info: TensorInfo, change: _Change | None, adapter: Adapter, key: str
) -> Job:
    """The job that writes ``out`` from the source tensor ``info`` with ``change`` applied."""
    if change is None:
        return Job(out, Action.COPY if out.dtype == info.dtype else Action.CONVERT, f, info)
    if change.tokens is not None:
        return Job(out, Action.TOKENS, f, info, change.tokens)
    if change.module is not None and key.endswith(".bias"):
        return Job(out, Action.BIAS, f, info, change.module)
    if change.replace is not None:
        t = adapter.extra_tensors[change.replace]
        if tuple(t.shape) != tuple(info.shape):
            raise IncompatibleAdapters(
                f"adapter tensor {change.replace} has shape {list(t.shape)} but the checkpoint's {key} has "
                f"{list(info.shape)}; the adapter was made for a different base model"
            )
    if change.module is not None:
        return Job(out, Action.MERGE, f, info, change.module, extra_key=change.replace)
    return Job(out, Action.REPLACE, f, info, extra_key=change.replace)


def _added_jobs(d: _Decided) -> list[Job]:
    """Tensors the base does not store: untied members of tied groups, and heads from ``modules_to_save``."""
    from adaptermerge.dtypes import TORCH_TO_ST

    keys = set(d.ckpt.weight_map)
    jobs: list[Job] = []
    if d.untie:
        for absent, stored in d.ties.alias.items():
            info = d.ckpt.info(stored)
            out = d.stored(absent, info.dtype, info.shape)
            jobs.append(_job(out, d.ckpt.weight_map[stored], info, d.changes.get(absent), d.adapter, absent))
    for name, k in d.extras.items():
        if name in keys or name in d.ties.alias:
            continue
        t = d.adapter.extra_tensors[k]
        dtype = d.out_dtype if (d.out_dtype and t.is_floating_point()) else TORCH_TO_ST[t.dtype]
        jobs.append(Job(PlannedTensor(d.rename[1] + name, dtype, tuple(t.shape)), Action.ADD, extra_key=k))
    return jobs


def non_weight_files(folder: Path, weight_files: Iterable[str]) -> tuple[list[Path], list[str]]:
    """Top-level files to copy unchanged (config, tokenizer, generation config...), and skipped pickles."""
    skip = set(weight_files) | {"model.safetensors.index.json", "README.md"}
    copy, skipped = [], []
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name in skip or p.name.startswith("."):
            continue
        if p.suffix in PICKLE_SUFFIXES:
            skipped.append(p.name)
            continue
        if p.suffix == ".safetensors":
            raise InvalidCheckpoint(
                f"{p.name} is a safetensors file that the index does not name; remove it or fix the index"
            )
        copy.append(p)
    return copy, skipped
