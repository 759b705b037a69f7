"""PEFT TrainableTokens (LoRA's ``trainable_token_indices``): trained rows of an embedding, saved beside the factors.

What PEFT 0.21.2 saves and computes (read in its source, checked on tiny models in ``tests/surgery/test_trainable_tokens.py``):

* ``trainable_token_indices=[i, ...]`` (list form) wraps the model's input embedding, found with
  ``model.get_input_embeddings()`` (``peft/utils/other.py``: ``set_additional_trainable_modules``,
  ``_get_input_embeddings_name``). The dict form ``{name: [i, ...]}`` wraps every module whose path ends with
  ``name`` (``_set_trainable``), an embedding or an ``nn.Linear`` head.
* One tensor per wrapped module: ``base_model.model.<module>.token_adapter.trainable_tokens_delta``,
  ``len(indices) x dim``, in the model's dtype (``TrainableTokensWrapper.adapter_state_dict``). Despite the name it
  holds the trained rows themselves, not a difference: the forward pass and ``merge`` write them over the base
  rows with ``index_copy`` (``peft/tuners/trainable_tokens/layer.py``: ``get_merged_weights``, ``merge``).
* A head tied to the input embedding gets a *tied* wrapper that shares the embedding's rows and saves nothing
  (``_tied_adapter``); with the dict form, an entry for the tied head with the same indices as the embedding is
  skipped for the same reason, so it has no tensor in the file.
* PEFT refuses a token wrapper on a module that also carries LoRA factors (``AuxiliaryTrainingWrapper.check_module``)
  and on a module in ``modules_to_save`` (``set_additional_trainable_modules``).

Here the rows are read into :class:`adaptermerge.tokens.TokenRows` (what the file says, checked) and written back
the way PEFT writes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from adaptermerge.errors import InvalidAdapter, UnsupportedAdapter
from adaptermerge.tokens import TokenRows

CONFIG_KEY = "trainable_token_indices"
TOKEN_SUFFIX = ".token_adapter.trainable_tokens_delta"


# ----------------------------------------------------------------------------------------------- reading


def split_token_tensors(
    tensors: dict[str, torch.Tensor], prefix: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(module path -> saved rows, the other tensors)``; module paths lose ``prefix`` (``base_model.model.``).

    Raises:
        UnsupportedAdapter: a full copy of a token-wrapped layer (``...token_adapter.base_layer.weight``), which
            PEFT saves with ``save_embedding_layers``, after a vocabulary resize, or for a ``modules_to_save`` head
            that its tied token wrapper wraps; it would replace the base's layer, which is not modeled.
    """
    rows, rest = {}, {}
    for key, t in tensors.items():
        if ".token_adapter." in key and not key.endswith(TOKEN_SUFFIX):
            raise UnsupportedAdapter(
                f"tensor {key} is a full copy of a layer that carries trainable tokens (PEFT writes one with "
                "save_embedding_layers, after a vocabulary resize, or for modules_to_save on a tied head, which PEFT "
                "itself cannot run); replacing the base's layer is not modeled: re-save without it, or merge with PEFT"
            )
        if key.endswith(TOKEN_SUFFIX):
            name = key[: -len(TOKEN_SUFFIX)]
            rows[name[len(prefix) :] if name.startswith(prefix) else name] = t
        else:
            rest[key] = t
    return rows, rest


def check_token_config(value: Any, config: dict[str, Any]) -> str | None:
    """Why a ``trainable_token_indices`` value is not one PEFT accepts (``peft_config`` rule), or None."""
    if value is None or value == [] or value == {}:
        return None
    if isinstance(value, list):
        return None if _indices_ok(value) else f"{CONFIG_KEY} must list non-negative token ids, got {_short(value)}"
    if isinstance(value, dict) and value and all(isinstance(k, str) and k for k in value):
        bad = next((k for k, v in value.items() if not (isinstance(v, list) and _indices_ok(v))), None)
        return None if bad is None else f"{CONFIG_KEY}[{bad!r}] must list non-negative token ids"
    return f"{CONFIG_KEY} must be a list of token ids or a map from module names to lists, got {_short(value)}"


def _indices_ok(v: list) -> bool:
    return bool(v) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)


def read_token_rows(config: dict[str, Any], saved: dict[str, torch.Tensor], where: str) -> dict[str, TokenRows]:
    """The token rows an adapter file holds, checked against its config.

    Args:
        config: ``adapter_config.json`` (already checked by :func:`check_token_config`).
        saved: module path -> ``trainable_tokens_delta`` tensor (from :func:`split_token_tensors`).
        where: the adapter file, for messages.

    Raises:
        InvalidAdapter: tensors the config does not name, names without tensors, rows whose count or values do
            not fit their indices, a repeated index with different rows.
    """
    value = config.get(CONFIG_KEY)
    if not value:
        if saved:
            raise InvalidAdapter(
                f"{where}: tensor {next(iter(saved))}{TOKEN_SUFFIX} holds trainable token rows but adapter_config.json "
                f"has no {CONFIG_KEY}, so PEFT would ignore them; fix the config or remove the tensor"
            )
        return {}
    if not saved:
        raise InvalidAdapter(
            f"{where}: adapter_config.json sets {CONFIG_KEY} but the file holds no *{TOKEN_SUFFIX} tensor; "
            "the adapter file is incomplete (re-save it with PEFT)"
        )
    if isinstance(value, list):
        if len(saved) != 1:
            raise InvalidAdapter(
                f"{where}: {CONFIG_KEY} is a list (the input embedding only) but the file holds token rows for "
                f"{len(saved)} modules ({', '.join(sorted(saved))}); write it as a map from module names to ids"
            )
        ((name, t),) = saved.items()
        return {name: _rows(name, list(value), t, where, input_embedding=True)}
    return _rows_from_map(value, saved, where)


def _rows_from_map(value: dict[str, list[int]], saved: dict[str, torch.Tensor], where: str) -> dict[str, TokenRows]:
    """Dict form: each saved module belongs to the one entry its path ends with (PEFT's ``_set_trainable`` match)."""
    out: dict[str, TokenRows] = {}
    used: set[str] = set()
    for name, t in saved.items():
        keys = [k for k in value if name.endswith(k)]
        if len(keys) != 1:
            why = "none of its entries" if not keys else f"several entries ({', '.join(keys)})"
            raise InvalidAdapter(
                f"{where}: token rows of {name}: {CONFIG_KEY} matches {why}; PEFT matches one entry per module"
            )
        used.add(keys[0])
        out[name] = _rows(name, list(value[keys[0]]), t, where)
    for key in value.keys() - used:
        # PEFT skips an entry for a head tied to the embedding when its ids equal the embedding's: the tied head
        # shares the embedding's rows and saves nothing. The same config without that entry computes the same.
        if not any(value[key] == value[k] for k in used):
            raise InvalidAdapter(
                f"{where}: {CONFIG_KEY} names {key!r} but the file holds no token rows for it; the adapter file is "
                "incomplete (re-save it with PEFT)"
            )
    return out


def _rows(name: str, indices: list[int], t: torch.Tensor, where: str, input_embedding: bool = False) -> TokenRows:
    if t.ndim != 2 or not t.is_floating_point():
        raise InvalidAdapter(
            f"{where}: token rows of {name} must be a 2-D float tensor, got {t.dtype} of shape {tuple(t.shape)}"
        )
    if t.shape[0] != len(indices):
        raise InvalidAdapter(
            f"{where}: token rows of {name} have {t.shape[0]} rows but {CONFIG_KEY} lists {len(indices)} ids; "
            "the file and the config do not belong together"
        )
    if not bool(torch.isfinite(t).all()):
        raise InvalidAdapter(f"{where}: token rows of {name} contain NaN or Inf; the file is damaged")
    first: dict[int, int] = {}
    for pos, i in enumerate(indices):
        if i in first and not torch.equal(t[first[i]], t[pos]):
            raise InvalidAdapter(
                f"{where}: {CONFIG_KEY} repeats token {i} for {name} with different rows; which one PEFT uses is "
                "undefined (torch index_copy with repeated indices); keep each id once"
            )
        first.setdefault(i, pos)
    keep = sorted(first.values())  # a repeat with equal rows changes nothing: keep each id once
    return TokenRows(tuple(indices[p] for p in keep), t[keep].contiguous(), input_embedding)


def check_token_modules(
    token_rows: dict[str, TokenRows], lora_modules: Sequence[str], modules_to_save: Sequence[str], where: str
) -> None:
    """Refuse what PEFT itself refuses: token rows on a module that carries LoRA factors or is in modules_to_save."""
    for name in token_rows:
        if name in lora_modules:
            raise UnsupportedAdapter(
                f"{where}: {name} carries both LoRA factors and trainable token rows; PEFT refuses this combination "
                f"(a token wrapper around a LoRA layer), so its meaning is undefined; drop one of them"
            )
        mts = next((m for m in modules_to_save if name.endswith(m)), None)
        if mts is not None:
            raise UnsupportedAdapter(
                f"{where}: {name} is both in modules_to_save ({mts!r}) and in {CONFIG_KEY}; PEFT refuses or breaks on "
                "this combination; train the full module or its token rows, not both"
            )


# ----------------------------------------------------------------------------------------------- writing


def token_config_value(token_rows: dict[str, TokenRows]) -> list[int] | dict[str, list[int]] | None:
    """``trainable_token_indices`` as PEFT reads it back: the list form for the input embedding alone, else a map
    from full module paths (PEFT matches entries by suffix, so a full path names exactly its module)."""
    if not token_rows:
        return None
    if len(token_rows) == 1:
        ((_, tr),) = token_rows.items()
        if tr.input_embedding:
            return list(tr.indices)
    return {name: list(tr.indices) for name, tr in token_rows.items()}


def token_state_dict(
    token_rows: dict[str, TokenRows], prefix: str, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The tensors PEFT saves for the rows, keyed as it writes them, in ``dtype`` (None: the rows' own)."""
    return {
        f"{prefix}{name}{TOKEN_SUFFIX}": tr.rows.to(dtype or tr.rows.dtype).contiguous()
        for name, tr in token_rows.items()
    }


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
