"""What the model class makes of a checkpoint's weights, learned from the class built on the meta device.

Layer kinds (Linear, GPT-2 ``Conv1D``, Embedding) and tied weights are facts of the model class and its config,
not of tensor names; the meta device gives them without allocating any weight.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from adaptermerge.io.checkpoint import Checkpoint

_EMBED_NAME = re.compile(r"(embed|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|shared)(\.|$)")
_MODEL_ATTR = "_adaptermerge_meta_model"


def meta_model(ckpt: Checkpoint) -> Any | None:
    """The checkpoint's model class instantiated on the meta device (None when transformers cannot build it).

    Built once per :class:`Checkpoint` and cached on it.
    """
    if hasattr(ckpt, _MODEL_ATTR):
        return getattr(ckpt, _MODEL_ATTR)
    try:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        cfg = {k: v for k, v in ckpt.config.items() if k != "transformers_version"}
        config = AutoConfig.for_model(**cfg)
        with torch.device("meta"):
            try:
                model = AutoModelForCausalLM.from_config(config)
            except ValueError:
                model = AutoModel.from_config(config)
    except Exception:  # noqa: BLE001 - unknown architecture: callers fall back or refuse
        model = None
    setattr(ckpt, _MODEL_ATTR, model)
    return model


def _to_checkpoint_names(model: Any, names: set[str], present: set[str]) -> dict[str, str]:
    """Model parameter name -> checkpoint key: strips ``base_model_prefix`` when the checkpoint is a bare model."""
    if names & present:
        return {n: n for n in names}
    prefix = getattr(model, "base_model_prefix", "") + "."
    return {n: n[len(prefix) :] if n.startswith(prefix) else n for n in names}


def weight_layouts(ckpt: Checkpoint) -> tuple[dict[str, str], str | None]:
    """Checkpoint weight key -> ``linear`` / ``conv1d`` / ``embedding`` for every 2-D layer weight, and the
    output head's key. Falls back to names when transformers cannot build the model from ``config.json``.

    Returns:
        (layouts, head_key); layouts only lists keys present in the checkpoint; head_key is the output
        head's weight key in checkpoint naming even when the checkpoint does not store it (tied).
    """
    present = set(ckpt.weight_map)
    model = meta_model(ckpt)
    out: dict[str, str] = {}
    head_key = None
    if model is not None:
        from transformers.pytorch_utils import Conv1D

        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        found: dict[str, str] = {}
        for name, mod in model.named_modules():
            key = name + ".weight"
            if isinstance(mod, Conv1D):
                found[key] = "conv1d"
            elif isinstance(mod, torch.nn.Linear):
                found[key] = "linear"
            elif isinstance(mod, torch.nn.Embedding):
                found[key] = "embedding"
            if head is not None and mod is head:
                head_key = key
        names = _to_checkpoint_names(model, set(found) | ({head_key} if head_key else set()), present)
        out = {names[k]: v for k, v in found.items() if names[k] in present}
        head_key = names[head_key] if head_key else None
    if not out:
        for k in present:
            info = ckpt.info(k)
            if k.endswith(".weight") and len(info.shape) == 2:
                out[k] = "embedding" if _EMBED_NAME.search(k) else "linear"
    return out, head_key


def tie_groups(ckpt: Checkpoint) -> list[list[str]]:
    """Groups of checkpoint keys that transformers loads as ONE tensor, in checkpoint naming, source first.

    Taken from the class's own ``get_expanded_tied_weights_keys(all_submodels=True)`` under the checkpoint's
    config: it is empty when ``tie_word_embeddings`` (with the class's default when config.json omits it) is
    false. A group's keys need not all be stored: a tied checkpoint usually stores only the source.
    """
    model = meta_model(ckpt)
    if model is None or not hasattr(model, "get_expanded_tied_weights_keys"):
        return []
    try:
        mapping: dict[str, str] = model.get_expanded_tied_weights_keys(all_submodels=True)
    except Exception:  # noqa: BLE001 - a class whose tying transformers itself cannot expand
        return []
    names = _to_checkpoint_names(model, set(mapping) | set(mapping.values()), set(ckpt.weight_map))
    groups: dict[str, list[str]] = {}
    for target, source in mapping.items():
        groups.setdefault(names[source], [names[source]]).append(names[target])
    return list(groups.values())


def ties_word_embeddings(ckpt: Checkpoint) -> bool:
    """Whether transformers ties the word embeddings of this checkpoint (config value or the class default)."""
    model = meta_model(ckpt)
    if model is not None:
        return bool(getattr(model.config, "tie_word_embeddings", False))
    return bool(ckpt.config.get("tie_word_embeddings", False))
