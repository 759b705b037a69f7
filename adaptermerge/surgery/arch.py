"""What kind of layer each checkpoint weight belongs to, from the model class built on the meta device."""

from __future__ import annotations

import re

import torch

from adaptermerge.io.checkpoint import Checkpoint

_EMBED_NAME = re.compile(r"(embed|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|shared)(\.|$)")


def weight_layouts(ckpt: Checkpoint) -> tuple[dict[str, str], str | None]:
    """Checkpoint weight key -> ``linear`` / ``conv1d`` / ``embedding`` for every 2-D layer weight, and the
    output head's key. Falls back to names when transformers cannot build the model from ``config.json``.

    Returns:
        (layouts, head_key); layouts only lists keys present in the checkpoint; head_key is the output
        head's weight key in checkpoint naming even when the checkpoint does not store it (tied).
    """
    present = set(ckpt.weight_map)
    try:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
        from transformers.pytorch_utils import Conv1D

        cfg = {k: v for k, v in ckpt.config.items() if k != "transformers_version"}
        config = AutoConfig.for_model(**cfg)
        with torch.device("meta"):
            try:
                model = AutoModelForCausalLM.from_config(config)
            except ValueError:
                model = AutoModel.from_config(config)
    except Exception:  # noqa: BLE001 - unknown architecture: fall back to names below
        model = None
    out: dict[str, str] = {}
    head_key = None
    if model is not None:
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
        if not (set(found) & present):
            prefix = getattr(model, "base_model_prefix", "") + "."
            found = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in found.items()}
            if head_key and head_key.startswith(prefix):
                head_key = head_key[len(prefix) :]
        out = {k: v for k, v in found.items() if k in present}
    if not out:
        for k in present:
            info = ckpt.info(k)
            if k.endswith(".weight") and len(info.shape) == 2:
                out[k] = "embedding" if _EMBED_NAME.search(k) else "linear"
    return out, head_key
