"""Checks of an adapter against the base it will run on: modules and shapes, identity, vocabulary.

"Does every adapter module have a weight of the right shape in the base" is answered by the merge planner
(:func:`adaptermerge.surgery.plan.plan_merge`, headers only), so validate and merge can never disagree on
what fits: it maps module names across ``base_model_prefix``, handles 4-bit weights and tied heads, and
names the first module that does not fit.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adaptermerge.adapter import Adapter
from adaptermerge.dtypes import ST_TO_TORCH, dtype_name
from adaptermerge.errors import AdapterMergeError
from adaptermerge.io.adapter import PEFT_PREFIX
from adaptermerge.io.checkpoint import Checkpoint, open_checkpoint
from adaptermerge.io.peft_config import targets_module
from adaptermerge.outputs import CARD_NAME, hub_model_id
from adaptermerge.validation.report import Check

_EMBED_TENSOR = re.compile(
    r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in|embed_out|lm_head|shared)(\.base_layer)?\.weight$"
)


@dataclass
class Base:
    """A base checkpoint opened for validation: headers, 4-bit groups and their specs, compute dtype."""

    path: Path
    ckpt: Checkpoint
    groups: dict[str, list[str]] = field(default_factory=dict)
    specs: dict[str, Any] = field(default_factory=dict)

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The dtype the base computes in: ``bnb_4bit_compute_dtype`` for 4-bit bases, else the config's dtype."""
        cfg = self.ckpt.config
        q = self.ckpt.quantization or {}
        name = q.get("bnb_4bit_compute_dtype") if self.groups else (cfg.get("dtype") or cfg.get("torch_dtype"))
        dt = getattr(torch, dtype_name(name), None) if name else None
        if isinstance(dt, torch.dtype):
            return dt
        floats = [ST_TO_TORCH[i.dtype] for i in (self.ckpt.info(k) for k in self.ckpt.weight_map)]
        floats = [d for d in floats if d.is_floating_point]
        return max(set(floats), key=floats.count) if floats else None


def open_base(path: Path) -> tuple[Check, Base | None]:
    """base.open: the base checkpoint's headers (and 4-bit stats) read."""
    from adaptermerge.surgery.quant import checkpoint_groups

    try:
        ckpt = open_checkpoint(path)
        groups, specs = checkpoint_groups(ckpt)
    except AdapterMergeError as e:
        return Check("base.open", "fail", str(e), subject=str(path)), None
    base = Base(path, ckpt, groups, specs)
    dt = base.compute_dtype
    figures = {
        "tensors": len(ckpt.weight_map),
        "quantized_4bit_modules": len(groups),
        "compute_dtype": None if dt is None else dtype_name(dt),
        "model_type": ckpt.config.get("model_type"),
    }
    msg = f"{len(ckpt.weight_map)} tensors" + (f", {len(groups)} 4-bit modules" if groups else "")
    return Check("base.open", "pass", msg, figures, subject=str(path)), base


def check_against_base(adapter: Adapter, base: Base, subject: str) -> list[Check]:
    """base.modules, base.targets, base.identity and base.vocab for one adapter."""
    modules = _modules(adapter, base)
    targets = [_targets(adapter, base)] if modules.status == "pass" else []  # no layer map to compare against
    checks = [modules, *targets, _identity(adapter, base), _vocab(adapter, base)]
    for c in checks:
        c.subject = subject
    return checks


def _modules(adapter: Adapter, base: Base) -> Check:
    from adaptermerge.surgery.plan import plan_merge

    try:
        plan = plan_merge(
            base.ckpt,
            adapter,
            quantized_members=base.groups,
            quant_specs={k: (s.shape, s.quant_type) for k, s in base.specs.items()},
        )
    except AdapterMergeError as e:
        return Check("base.modules", "fail", str(e), hint="validate the adapter against the base it was trained on")
    figures = {"modules": len(plan.modules), "quantized": len(plan.quantized), "notes": plan.warnings}
    msg = f"all {len(plan.modules)} adapter modules have a base weight of the same shape"
    return Check(
        "base.modules", "pass", msg + (f" ({len(plan.quantized)} of them 4-bit)" if plan.quantized else ""), figures
    )


def _targets(adapter: Adapter, base: Base) -> Check:
    """Base layers that the config's target_modules selects but the adapter file has no factors for."""
    from adaptermerge.io.checkpoint import choose_prefix_map
    from adaptermerge.surgery.arch import weight_layouts

    cfg = adapter.config
    layers = weight_layouts(base.ckpt)
    names = [k[: -len(".weight")] for k in layers.kinds]
    pm = choose_prefix_map(adapter.modules, set(base.ckpt.weight_map)) or ("", "")
    mapped = {pm[1] + m[len(pm[0]) :] if m.startswith(pm[0]) else m for m in adapter.modules}
    try:  # PEFT's own matcher: target_modules, exclude_modules, layers_to_transform/layers_pattern
        wanted = [n for n in names if n + ".weight" != layers.head_key and targets_module(cfg, n)]
    except AdapterMergeError as e:
        return Check("base.targets", "fail", str(e))
    missing = [n for n in wanted if n not in mapped]
    figures = {"selected": len(wanted), "missing": missing}
    if isinstance(cfg.get("target_modules"), str) or not missing:
        return Check(
            "base.targets", "pass", f"target_modules selects {len(wanted)} base layers, all in the file", figures
        )
    return Check(
        "base.targets",
        "warn",
        f"target_modules selects {len(missing)} base layers the adapter file has no factors for (e.g. {missing[0]}); "
        "PEFT leaves them at their initialisation",
        figures,
        hint="check that the file is the adapter that was trained (a partial save or a filtered copy)",
    )


def _identity(adapter: Adapter, base: Base) -> Check:
    """base.identity: the base named in the adapter's config and card against the base given."""
    recorded = {"adapter_config": adapter.base_model, "card": _card_base_model(adapter.source)}
    recorded = {k: v for k, v in recorded.items() if v}
    figures = {"recorded": recorded, "given": str(base.path.resolve())}
    if not recorded:
        return Check("base.identity", "warn", "the adapter does not record its base model", figures,
                     hint="set base_model_name_or_path in adapter_config.json so others can check")  # fmt: skip
    matches = {k: v for k, v in recorded.items() if same_base(v, base.path)}
    if matches:
        return Check("base.identity", "pass", f"recorded base {next(iter(matches.values()))!r} matches", figures)
    names = ", ".join(repr(v) for v in dict.fromkeys(recorded.values()))
    return Check(
        "base.identity",
        "warn",
        f"the adapter records base {names}, which does not name {base.path.name}; make sure they hold the same weights",
        figures,
        hint="validate against the base the adapter was trained on, or fix base_model_name_or_path",
    )


def same_base(recorded: str, path: Path) -> bool:
    """Whether a recorded base name designates the folder ``path`` (same path, or same final name)."""
    rec = recorded.rstrip("/\\")
    if not hub_model_id(rec) and Path(os.path.expanduser(rec)).resolve() == path.resolve():
        return True
    return rec.replace("\\", "/").split("/")[-1].lower() == path.resolve().name.lower()


def _card_base_model(folder: Path | None) -> str | None:
    if folder is None or not (folder / CARD_NAME).is_file():
        return None
    try:
        from huggingface_hub import ModelCard

        bm = ModelCard.load(folder / CARD_NAME, ignore_metadata_errors=True).data.base_model
    except Exception:  # noqa: BLE001 - a broken card is not this check's business (publish checks cards)
        return None
    return bm if isinstance(bm, str) and bm else None


def _vocab(adapter: Adapter, base: Base) -> Check:
    """base.vocab: embedding rows the adapter expects against the base's vocabulary."""
    cfg = base.ckpt.config
    vocab = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    rows: dict[str, int] = {n: m.shape[0] for n, m in adapter.modules.items() if m.layout == "embedding"}
    for k, t in adapter.extra_tensors.items():
        name = k[len(PEFT_PREFIX) :] if k.startswith(PEFT_PREFIX) else k
        if t.ndim == 2 and _EMBED_TENSOR.search(name):
            rows[name] = int(t.shape[0])
    figures = {"base_vocab_size": vocab, "adapter_embedding_rows": rows}
    wrong = {n: r for n, r in rows.items() if vocab is not None and r != vocab}
    if wrong:
        n, r = next(iter(wrong.items()))
        return Check(
            "base.vocab",
            "fail",
            f"{n} has {r} embedding rows but the base vocabulary has {vocab}: the tokenizer was resized for training",
            figures,
            hint=f"resize the base's embeddings to {r} (model.resize_token_embeddings({r})), save it, and use that base",
        )
    what = f"{len(rows)} embedding tensors match" if rows else "the adapter does not touch the embeddings"
    return Check("base.vocab", "pass", f"{what}; base vocabulary {vocab}", figures)
