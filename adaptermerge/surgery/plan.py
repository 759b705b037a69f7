"""Plan a merge from headers alone: which output tensor comes from where, and what happens to it.

The planner reads no tensor data, so it is cheap and testable. Adapter module names are mapped to
checkpoint keys the way transformers maps them across ``base_model_prefix``: an adapter made on a task
model (``bert.encoder...``) fits a checkpoint saved from the bare model (``encoder...``) and the other
way round.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adaptermerge.adapter import Adapter
from adaptermerge.errors import IncompatibleAdapters, InvalidCheckpoint, UnsupportedArchitecture
from adaptermerge.io.adapter import PEFT_PREFIX
from adaptermerge.io.checkpoint import Checkpoint
from adaptermerge.io.safetensors_header import TensorInfo
from adaptermerge.io.stream import FLOAT_DTYPES, PlannedTensor

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class Job:
    """One output tensor.

    ``action``: ``copy`` (bytes unchanged), ``convert`` (dtype change only), ``merge`` (W + delta of
    ``module``), ``bias`` (b + bias delta of ``module``), ``replace``/``add`` (an adapter tensor, e.g. a
    ``modules_to_save`` head), ``quant`` (a member of a 4-bit group whose weight is ``group``).
    """

    out: PlannedTensor
    action: str
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
    adapter: Adapter | None = None  # the adapter as planned: each module's layout is its layer's (see _fix_layouts)

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)


def _first(name: str) -> str:
    return name.split(".", 1)[0]


def choose_prefix_map(names: Iterable[str], keys: set[str]) -> tuple[str, str] | None:
    """A ``(strip, add)`` prefix pair such that every ``add + name[len(strip):] + '.weight'`` is a key.

    Tries, in order: no change; stripping a shared first component (task-model adapter on a bare-model
    checkpoint); adding a first component that checkpoint keys use (bare-model adapter on a task-model
    checkpoint).
    """
    names = list(names)
    if not names:
        return ("", "")
    options: list[tuple[str, str]] = [("", "")]
    firsts = {_first(n) for n in names}
    if len(firsts) == 1:
        options.append((firsts.pop() + ".", ""))
    for p in sorted({_first(k) for k in keys}):
        options.append(("", p + "."))
    for strip, add in options:
        if all(n.startswith(strip) and f"{add}{n[len(strip) :]}.weight" in keys for n in names):
            return strip, add
    return None


def _map(name: str, strip: str, add: str) -> str:
    return add + name[len(strip) :] if name.startswith(strip) else name


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


def _drop_tied_head_copy(ckpt: Checkpoint, adapter: Adapter, keys: set[str]) -> Adapter:
    """A tied checkpoint stores the head and the input embedding as one tensor: a head module that carries
    exactly the embedding module's delta (as ``extract`` writes for tied models) is merged once, through the
    embedding."""
    if not ckpt.config.get("tie_word_embeddings", True):
        return adapter
    embs = [m for m in adapter.modules.values() if m.layout == "embedding"]
    drop = [
        n for n, m in adapter.modules.items()
        if m.layout != "embedding" and not any(k.endswith(n.split(".")[-1] + ".weight") for k in keys)
        and any(torch.equal(m.A, e.A) and torch.equal(m.B, e.B) for e in embs)
    ]  # fmt: skip
    if not drop:
        return adapter
    from dataclasses import replace

    return replace(adapter, modules={n: m for n, m in adapter.modules.items() if n not in drop})


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
    adapter = _drop_tied_head_copy(ckpt, adapter, keys)
    member_of = {m: w for w, ms in groups.items() for m in ms}
    pm = choose_prefix_map(adapter.modules, keys)
    if pm is None:
        missing = next(n for n in adapter.modules if f"{n}.weight" not in keys)
        raise IncompatibleAdapters(
            f"adapter module {missing} has no weight in the base checkpoint (looked for {missing}.weight, with and "
            f"without a model prefix); the adapter was made for another architecture than {ckpt.path}"
        )
    strip, add = pm
    # modules_to_save tensors: adapter keys -> checkpoint naming
    extras: dict[str, str] = {}
    for k in adapter.extra_tensors:
        name = k[len(PEFT_PREFIX) :] if k.startswith(PEFT_PREFIX) else k
        name = name.replace(".base_layer.", ".")
        extras[_map(name, strip, add)] = k
    rename = ("", "")
    new_heads = [n for n in extras if n not in keys]
    if new_heads and strip:
        # A head the bare checkpoint lacks: write the output with the task model's naming so that
        # transformers finds both the head and the backbone.
        rename = ("", strip)
        extras = {strip + n: k for n, k in extras.items()}
    adapter = _fix_layouts(ckpt, adapter, {m: _map(m, strip, add) + ".weight" for m in adapter.modules}, set(groups))
    modules = {m: rename[1] + _map(m, strip, add) + ".weight" for m in adapter.modules}
    by_key = {v: m for m, v in modules.items()}
    bias_of = {v[: -len("weight")] + "bias": m for m, v in modules.items() if adapter.modules[m].bias is not None}

    tie = bool(ckpt.config.get("tie_word_embeddings", False))
    warnings: list[str] = []
    quantized: dict[str, str] = {}
    for m, key in modules.items():
        src_key = key[len(rename[1]) :]
        lr = adapter.modules[m]
        if src_key in groups:
            shape, quantized[key] = (quant_specs or {})[src_key]
        else:
            shape = ckpt.info(src_key).shape
        if tuple(shape) != tuple(lr.weight_shape):
            raise IncompatibleAdapters(
                f"module {m}: the adapter's delta has shape {list(lr.weight_shape)} ({lr.layout}) but the checkpoint's "
                f"{src_key} has shape {list(shape)}; the adapter was made for a different base model"
            )
        if lr.bias is not None and (src_key[: -len("weight")] + "bias") not in keys:
            raise IncompatibleAdapters(f"module {m} trains a bias (lora_bias) but the base layer {src_key} has none")
    if tie and any(m.endswith("lm_head") for m in adapter.modules) and "lm_head.weight" not in keys:
        raise IncompatibleAdapters(
            "the adapter changes lm_head, but this checkpoint ties lm_head to the input embeddings (no lm_head.weight); "
            "merging would change both"
        )

    shards: list[ShardPlan] = []
    added = set()
    files = list(ckpt.shards)
    for fi, f in enumerate(files):
        header = ckpt.shards[f]
        jobs: list[Job] = []
        for name, info in header.tensors.items():
            out_name = rename[1] + name
            dtype = info.dtype
            if out_dtype and dtype in FLOAT_DTYPES and name not in member_of:
                dtype = out_dtype
            out = PlannedTensor(out_name, dtype, info.shape)
            if name in member_of:
                action = "quant" if (rename[1] + member_of[name]) in by_key else "copy"
                jobs.append(Job(out, action, f, info, by_key.get(rename[1] + member_of[name]), group=member_of[name]))
            elif out_name in by_key:
                jobs.append(Job(out, "merge", f, info, by_key[out_name]))
            elif out_name in bias_of:
                jobs.append(Job(out, "bias", f, info, bias_of[out_name]))
            elif out_name in extras:
                t = adapter.extra_tensors[extras[out_name]]
                if tuple(t.shape) != tuple(info.shape):
                    raise IncompatibleAdapters(
                        f"modules_to_save tensor {extras[out_name]} has shape {list(t.shape)} but the checkpoint's {name} has {list(info.shape)}"
                    )
                jobs.append(
                    Job(PlannedTensor(out_name, dtype, info.shape), "replace", f, info, extra_key=extras[out_name])
                )
                added.add(out_name)
            else:
                jobs.append(Job(out, "copy" if dtype == info.dtype else "convert", f, info))
        if fi == len(files) - 1:
            from adaptermerge.io.stream import TORCH_TO_ST

            for out_name, k in extras.items():
                if out_name in added or out_name[len(rename[1]) :] in keys:
                    continue
                t = adapter.extra_tensors[k]
                dtype = out_dtype if (out_dtype and t.is_floating_point()) else TORCH_TO_ST[t.dtype]
                jobs.append(Job(PlannedTensor(out_name, dtype, tuple(t.shape)), "add", extra_key=k))
                warnings.append(f"added {out_name} from the adapter's modules_to_save (the base has no such tensor)")
        shards.append(ShardPlan(f, jobs, dict(header.metadata) or {"format": "pt"}))
    return MergePlan(shards, modules, rename, quantized, warnings, adapter)


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
