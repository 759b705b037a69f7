"""What each checkpoint weight is, from the model class that ``config.json`` names, built on the meta device.

Names cannot tell these facts apart: GPT-2's ``Conv1D`` stores ``in x out`` where ``nn.Linear`` stores
``out x in`` (square layers look the same either way), and which layers transformers' bitsandbytes
integration quantizes follows its own rules (exact ``nn.Linear`` and ``Conv1D`` types only, not the output
head, tied or last module, nor ``_keep_in_fp32_modules``). So the answers come from the class itself:

* the class is the one ``architectures`` names (or, without it, the default causal-LM / base class of
  ``model_type``), imported alone through transformers' lazy module. That model module takes about 0.1 s;
  transformers' core (``modeling_utils`` and what it pulls in: torch._dynamo, torch.distributed.tensor) takes
  the rest, 2.5-3 s on an idle 2-core machine and 5-6 s on a busy one (``benchmarks/bench_layouts.py``). So
  the answers a merge needs (layer kinds, output head, tied weights) are kept in the on-disk cache of
  :mod:`adaptermerge.io.cache`, keyed by the transformers version, ``config.json`` and the stored weight
  names: later merges onto the same base do not import the class at all;
* it is built on the meta device (no memory, no weight initialisation);
* transformers' own quantizer (``Bnb4BitHfQuantizer.preprocess_model``) then says which layers it turns
  into 4-bit ones.

A class transformers does not ship (custom code, which is never run) leaves the layouts unknown; callers
refuse what they cannot do without them.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from adaptermerge.errors import UnsupportedArchitecture
from adaptermerge.io.cache import cached_json
from adaptermerge.io.checkpoint import Checkpoint

KINDS = ("linear", "conv1d", "embedding")


@dataclass(frozen=True)
class Layers:
    """Layer kinds of a checkpoint's 2-D weights, as the model class defines them.

    ``kinds`` maps checkpoint weight keys (only keys the checkpoint stores) to ``linear`` / ``conv1d`` /
    ``embedding``; ``head_key`` is the output head's weight key in checkpoint naming (also when a tied
    checkpoint does not store it); ``source`` names the class, or says why none could be built.
    """

    known: bool
    source: str
    kinds: dict[str, str] = field(default_factory=dict)
    head_key: str | None = None

    def kind(self, key: str) -> str | None:
        return self.kinds.get(key)

    def require_known(self, what: str) -> None:
        if not self.known:
            raise UnsupportedArchitecture(
                f"{what} needs each weight's layer type (Linear, Conv1D or Embedding), which only the model class "
                f"defines, but {self.source}; use a checkpoint whose config.json names a transformers class"
            )


@dataclass(frozen=True)
class Bnb4bitChoice:
    """What transformers does when it loads this checkpoint with a 4-bit ``BitsAndBytesConfig``.

    ``converted``: checkpoint weight key -> ``linear`` / ``conv1d`` for every layer it makes 4-bit (a
    ``Conv1D`` weight is transposed to ``out x in`` before quantization). ``upcast``: keys it loads in
    float32 whatever the checkpoint's dtype (``_keep_in_fp32_modules`` for float16, ``..._strict`` also for
    bfloat16). ``skipped``: the module patterns it keeps dense (its ``modules_to_not_convert``).
    """

    cls_name: str
    converted: dict[str, str]
    upcast: list[str]
    skipped: list[str]


def weight_layouts(ckpt: Checkpoint) -> Layers:
    """The layer kind of every 2-D layer weight of ``ckpt`` and its output head's key (see :class:`Layers`).

    Example:
        >>> layers = weight_layouts(open_checkpoint("gpt2"))  # doctest: +SKIP
        >>> layers.kind("transformer.h.0.attn.c_attn.weight"), layers.head_key  # doctest: +SKIP
        ('conv1d', 'lm_head.weight')
    """
    facts = _facts(_config_key(ckpt), frozenset(ckpt.weight_map))
    if isinstance(facts, str):
        return Layers(False, facts)
    return Layers(True, facts.source, dict(facts.kinds), facts.head_key)


def bnb_4bit_choice(ckpt: Checkpoint, quant_type: str, dtype: torch.dtype) -> Bnb4bitChoice:
    """Which weights transformers quantizes (and upcasts) when it loads ``ckpt`` as ``dtype`` in 4-bit.

    Asks transformers itself: the class named by ``architectures`` is built on the meta device and handed to
    the quantizer ``from_pretrained`` uses (``Bnb4BitHfQuantizer.preprocess_model``: ``get_keys_to_not_convert``,
    ``_keep_in_fp32_modules``, then ``replace_with_bnb_linear``); the layers it replaced are the answer.

    Raises:
        UnsupportedArchitecture: transformers cannot build the class, or converts a layer whose weight the
            checkpoint does not store under that layer's name (it would rename it on load).
    """
    return _bnb_choice(_config_key(ckpt), frozenset(ckpt.weight_map), quant_type, dtype)


def _config_key(ckpt: Checkpoint) -> str:
    cfg = {k: v for k, v in ckpt.config.items() if k != "transformers_version"}
    return json.dumps(cfg, sort_keys=True, default=str)


class _NoModel(Exception):
    """transformers cannot build the checkpoint's class; the message says why."""


def _model_class(cfg: dict[str, Any]) -> type:
    """The class ``architectures`` names; without it, the default causal-LM (else base) class of ``model_type``."""
    import transformers

    names = cfg.get("architectures") or []
    names = [names] if isinstance(names, str) else names
    if names:
        name = str(names[0])
    else:
        from transformers.models.auto import modeling_auto

        mt = cfg.get("model_type")
        name = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(mt) or modeling_auto.MODEL_MAPPING_NAMES.get(mt)
        if not name:
            raise _NoModel(
                "config.json names no architectures and transformers has no class for model_type "
                f"{mt!r} (custom code is never run)"
            )
    try:
        cls = getattr(transformers, name)  # imports that model's module only
    except Exception:  # noqa: BLE001 - no such class, or its module needs a package that is not installed
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise _NoModel(
            f"transformers {transformers.__version__} has no model class {name!r} (custom code is never run)"
        )
    return cls


def _meta_model(config_key: str) -> torch.nn.Module:
    """A fresh instance of the checkpoint's class on the meta device."""
    cfg = json.loads(config_key)
    cls = _model_class(cfg)
    try:
        config = cls.config_class.from_dict({k: v for k, v in cfg.items() if k != "quantization_config"})
        with torch.device("meta"), _quiet_transformers():
            return cls._from_config(config)
    except Exception as e:  # noqa: BLE001 - any failure of transformers to build the class from this config
        raise _NoModel(
            f"transformers cannot build {cls.__name__} from config.json ({type(e).__name__}: {str(e)[:120]})"
        ) from None


def _to_checkpoint(model: torch.nn.Module, names: dict[str, Any], present: frozenset[str]) -> dict[str, Any]:
    """Model parameter names -> checkpoint keys: unchanged, or without ``base_model_prefix`` when the
    checkpoint was saved from the bare model (as transformers maps them when loading)."""
    params = {n for n, _ in model.named_parameters()}
    if params & present:
        return dict(names)
    prefix = getattr(model, "base_model_prefix", "") + "."
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in names.items()}


@dataclass(frozen=True)
class _Facts:
    """What the class says of a checkpoint, in checkpoint naming: layer kinds (stored keys), head key, ties."""

    source: str
    kinds: dict[str, str]
    head_key: str | None
    ties: list[list[str]]


@functools.lru_cache(maxsize=8)
def _facts(config_key: str, present: frozenset[str]) -> _Facts | str:
    """The class's facts (kept in the on-disk cache, see ``adaptermerge.io.cache``), or why there is no class.

    A class transformers cannot build is not cached: installing a package it needs changes the answer without
    changing the key.
    """
    from importlib.metadata import version

    key = ["model-facts/1", version("transformers"), config_key, sorted(present)]
    try:
        return cached_json(
            "model-facts", key, lambda: _facts_of(_built_meta_model(config_key), present), _encode, _decode
        )
    except _NoModel as e:
        return str(e)


def _facts_of(model: torch.nn.Module, present: frozenset[str]) -> _Facts:
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found: dict[str, str] = {}
    head_name = None
    for name, mod in model.named_modules():
        if isinstance(mod, Conv1D):
            found[name + ".weight"] = "conv1d"
        elif isinstance(mod, torch.nn.Linear):
            found[name + ".weight"] = "linear"
        elif isinstance(mod, torch.nn.Embedding):
            found[name + ".weight"] = "embedding"
        if head is not None and mod is head:
            head_name = name + ".weight"
    mapped = _to_checkpoint(model, found, present)
    head_key = next(iter(_to_checkpoint(model, {head_name: None}, present))) if head_name else None
    kinds = {k: v for k, v in mapped.items() if k in present}
    return _Facts(type(model).__name__, kinds, head_key, _ties_of(model, present))


def _ties_of(model: torch.nn.Module, present: frozenset[str]) -> list[list[str]]:
    if not hasattr(model, "get_expanded_tied_weights_keys"):
        return []
    try:
        mapping: dict[str, str] = model.get_expanded_tied_weights_keys(all_submodels=True)
    except Exception:  # noqa: BLE001 - a class whose tying transformers itself cannot expand
        return []
    names = _to_checkpoint(model, {k: k for k in set(mapping) | set(mapping.values())}, present)
    to_ckpt = {v: k for k, v in names.items()}
    groups: dict[str, list[str]] = {}
    for target, source in mapping.items():
        groups.setdefault(to_ckpt[source], [to_ckpt[source]]).append(to_ckpt[target])
    return list(groups.values())


def _encode(facts: _Facts) -> dict[str, Any]:
    return {"source": facts.source, "kinds": facts.kinds, "head_key": facts.head_key, "ties": facts.ties}


def _decode(data: Any) -> _Facts | None:
    """Stored facts, or None when they are not exactly the shape ``_encode`` writes."""
    try:
        source, kinds, head, ties = data["source"], data["kinds"], data["head_key"], data["ties"]
    except (TypeError, KeyError):
        return None
    ok = (
        isinstance(source, str)
        and isinstance(kinds, dict)
        and all(isinstance(k, str) and v in KINDS for k, v in kinds.items())
        and (head is None or isinstance(head, str))
        and isinstance(ties, list)
        and all(isinstance(g, list) and all(isinstance(k, str) for k in g) for g in ties)
    )
    return _Facts(source, kinds, head, ties) if ok else None


@functools.lru_cache(maxsize=8)
def _bnb_choice(config_key: str, present: frozenset[str], quant_type: str, dtype: torch.dtype) -> Bnb4bitChoice:
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.auto import AutoHfQuantizer

    try:
        model = _meta_model(config_key)
    except _NoModel as e:
        raise UnsupportedArchitecture(
            f"`quantize` follows transformers' 4-bit rules for the model class, but {e}; merge without `quantize`"
        ) from None
    cls_name = type(model).__name__
    bnb_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=True)
    try:
        upcast = _upcast_keys(model, dtype, present)
        quantizer = AutoHfQuantizer.from_config(bnb_cfg, pre_quantized=False)
        with _quiet_transformers():  # it warns (naming eetq) when it converts nothing; the caller says it better
            quantizer.preprocess_model(model=model, dtype=dtype, device_map={"": "cpu"})
    except Exception as e:  # noqa: BLE001 - transformers' own quantizer fails on this class
        raise UnsupportedArchitecture(
            f"transformers' 4-bit quantizer fails on {cls_name} ({type(e).__name__}: {str(e)[:120]}); "
            "merge without `quantize`"
        ) from None
    converted = {
        name + ".weight": "conv1d" if issubclass(mod.source_cls, Conv1D) else "linear"
        for name, mod in model.named_modules()
        if isinstance(mod, bnb.nn.Linear4bit)
    }
    mapped = _to_checkpoint(model, converted, present)
    missing = sorted(k for k in mapped if k not in present)
    if missing:
        raise UnsupportedArchitecture(
            f"transformers quantizes the layer {missing[0][: -len('.weight')]} of {cls_name}, but the checkpoint does "
            "not store its weight under that name (transformers renames it when loading); `quantize` cannot "
            "mirror that: quantize with transformers (from_pretrained with a BitsAndBytesConfig) instead"
        )
    return Bnb4bitChoice(cls_name, mapped, upcast, sorted(quantizer.modules_to_not_convert))


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _upcast_keys(model: Any, dtype: torch.dtype, present: frozenset[str]) -> list[str]:
    """Checkpoint keys transformers loads in float32 when the model is loaded as ``dtype``.

    Mirrors ``PreTrainedModel._get_dtype_plan`` and its use in ``core_model_loading`` (a regex search of
    each key for the ``_keep_in_fp32_modules`` patterns).
    """
    plan = model._get_dtype_plan(dtype)
    if not plan:
        return []
    from transformers.core_model_loading import build_glob_alternation

    alternation, _, _ = build_glob_alternation(list(plan))
    return sorted(k for k in present if alternation.search(k))


@functools.lru_cache(maxsize=8)
def _built_meta_model(config_key: str) -> torch.nn.Module:
    return _meta_model(config_key)  # raises _NoModel (not cached: lru_cache keeps only results)


def _shared_meta_model(config_key: str) -> torch.nn.Module | None:
    try:
        return _built_meta_model(config_key)
    except _NoModel:
        return None


def meta_model(ckpt: Checkpoint) -> torch.nn.Module | None:
    """The checkpoint's class on the meta device, shared between callers (read it, never change it); None when
    transformers cannot build it."""
    return _shared_meta_model(_config_key(ckpt))


def tie_groups(ckpt: Checkpoint) -> list[list[str]]:
    """Groups of checkpoint keys that transformers loads as ONE tensor, in checkpoint naming, source first.

    Taken from the class's own ``get_expanded_tied_weights_keys(all_submodels=True)`` under the checkpoint's
    config: it is empty when ``tie_word_embeddings`` (with the class's default when config.json omits it) is
    false. A group's keys need not all be stored: a tied checkpoint usually stores only the source.
    """
    facts = _facts(_config_key(ckpt), frozenset(ckpt.weight_map))
    return [] if isinstance(facts, str) else [list(g) for g in facts.ties]
