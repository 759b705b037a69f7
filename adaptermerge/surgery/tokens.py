"""Fold trained token rows (PEFT TrainableTokens) into a checkpoint, as PEFT's ``merge_and_unload`` does.

PEFT's merge writes the saved rows over the base rows (``index_copy``; ``peft/tuners/trainable_tokens/layer.py``
``TrainableTokensLayer.merge``), so the folded weight is the base weight with those rows replaced, rounded once to
the stored dtype. Which tensors receive them:

* the module's own weight (the input embedding, or a head named in the dict form on an untied model);
* a head tied to the input embedding shares that tensor: a tied checkpoint stores it once, and transformers ties
  the head to it again when loading. PEFT puts a *tied* token wrapper on the head
  (``peft/utils/other.py``: ``set_additional_trainable_modules``), so the head's rows change with the embedding's.
  When a tied checkpoint nevertheless stores the head too, that copy gets the same rows, so both stay equal.

Refused, because folding them would need the head to differ from the embedding (untying, which means writing
``tie_word_embeddings: false`` and a new head tensor): rows for a head tied to the embedding with other ids than
the embedding's, or without the embedding's. PEFT's own ``merge_and_unload`` is not equal to its unmerged outputs
there (it writes both row sets into the one shared matrix).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from adaptermerge.adapter import Adapter
from adaptermerge.dtypes import FLOAT_DTYPES
from adaptermerge.errors import IncompatibleAdapters
from adaptermerge.io.checkpoint import Checkpoint
from adaptermerge.io.stream import read_rows
from adaptermerge.tokens import BaseRows, TokenRows


@dataclass(frozen=True)
class EmbeddingKeys:
    """The input embedding's and the output head's weight keys, in checkpoint naming, and whether transformers
    shares one tensor between them when it loads this checkpoint (``tie_word_embeddings`` with the class default)."""

    input: str | None
    head: str | None
    tied: bool


def embedding_keys(ckpt: Checkpoint) -> EmbeddingKeys | None:
    """What transformers' model class (built on the meta device from ``config.json``) says; None when it cannot
    build one."""
    from adaptermerge.surgery.arch import meta_model

    model = meta_model(ckpt)
    if model is None:  # an architecture transformers does not know
        return None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {id(m): n for n, m in model.named_modules()}
    keys = [names[id(m)] + ".weight" if m is not None and id(m) in names else None for m in (emb, head)]
    prefix = getattr(model, "base_model_prefix", "") + "."
    if not any(k in ckpt.weight_map for k in keys if k):  # a checkpoint of the bare model: no prefix
        keys = [k[len(prefix) :] if k and k.startswith(prefix) else k for k in keys]
    tied = emb is not None and head is not None and head.weight is emb.weight
    return EmbeddingKeys(keys[0], keys[1], tied)


def checkpoint_rows(ckpt: Checkpoint) -> BaseRows:
    """A reader of the base model's rows for :func:`adaptermerge.tokens.combine_token_rows`: module path (adapter
    naming, mapped across ``base_model_prefix`` as for merges) and row ids -> fp32 rows, read straight from the
    file."""
    from adaptermerge.io.checkpoint import choose_prefix_map

    keys = set(ckpt.weight_map)

    def read(module: str, ids: Sequence[int]) -> torch.Tensor:
        pm = choose_prefix_map([module], keys)
        if pm is None:
            raise IncompatibleAdapters(
                f"token rows of {module}: the base checkpoint {ckpt.path} has no {module}.weight (with or without a "
                "model prefix); it is not the base the adapters were trained on"
            )
        key = pm[1] + module[len(pm[0]) :] + ".weight"
        info = ckpt.info(key)
        if info.dtype not in FLOAT_DTYPES or key in ckpt.bnb_4bit_modules():
            raise IncompatibleAdapters(
                f"token rows of {module}: the base's {key} is stored as {info.dtype}"
                f"{' (4-bit)' if key in ckpt.bnb_4bit_modules() else ''}, not as plain floats whose rows can be read"
            )
        _check_fits(module, key, info.shape, ids, None)
        with open(ckpt.path / ckpt.weight_map[key], "rb") as fh:
            return torch.cat([read_rows(fh, info, i, i + 1).float() for i in ids])

    return read


def plan_token_targets(
    ckpt: Checkpoint,
    adapter: Adapter,
    key_of: Callable[[str], str],
    taken: dict[str, str],
) -> dict[str, str]:
    """Checkpoint key -> token module whose rows are written over that tensor.

    Args:
        key_of: adapter module path -> checkpoint weight key (the planner's prefix mapping).
        taken: checkpoint keys that other jobs already write, with what writes them (LoRA merges, modules_to_save
            copies, 4-bit groups); a key that would receive rows as well is refused.

    Raises:
        IncompatibleAdapters: a module the checkpoint lacks, ids beyond its rows, a width that differs, rows for a
            head tied to the embedding (untying), a tensor that something else writes too.
    """
    if not adapter.token_rows:
        return {}
    ek = _embedding_keys_or_refuse(ckpt)
    keys = set(ckpt.weight_map)
    targets: dict[str, str] = {}
    for name, tr in adapter.token_rows.items():
        key = key_of(name)
        if ek.tied and key == ek.head:
            raise IncompatibleAdapters(
                f"token rows of {name}: this checkpoint ties the head to the input embedding, so rows for the head "
                "alone would need untying (tie_word_embeddings: false and a separate head), which adaptermerge does "
                "not do; PEFT's own merge_and_unload differs from the adapter's outputs here. Train the rows on the "
                "embedding (list form), or merge with PEFT on an untied copy of the base"
            )
        if key not in keys:
            raise IncompatibleAdapters(
                f"token rows of {name}: the checkpoint has no {key}; the adapter was made for another architecture "
                f"than {ckpt.path}"
            )
        if tr.input_embedding and ek.input is not None and key != ek.input:
            raise IncompatibleAdapters(
                f"token rows of {name}: the config's list form means the input embedding ({ek.input}), where PEFT "
                f"puts them, but the file saves them for {name}; write trainable_token_indices as a map naming it"
            )
        shared = [key] + ([ek.head] if ek.tied and key == ek.input and ek.head is not None else [])
        for k in shared:
            if k in taken or k in targets:
                raise IncompatibleAdapters(
                    f"{k} would receive both the token rows of {name} and {taken.get(k) or targets[k]}; PEFT cannot "
                    "run such an adapter on this model (one wrapper per module), so there is no merge to match"
                )
        _check_fits(name, key, ckpt.info(key).shape, tr.indices, tr)
        # a tied checkpoint that also stores the head: the copy gets the same rows, so the two stay equal
        targets.update({k: name for k in shared if k in keys})
    return targets


def _embedding_keys_or_refuse(ckpt: Checkpoint) -> EmbeddingKeys:
    ek = embedding_keys(ckpt)
    if ek is not None:
        return ek
    if ckpt.config.get("tie_word_embeddings") is False:
        return EmbeddingKeys(None, None, False)
    raise IncompatibleAdapters(
        f"transformers cannot build the model of {ckpt.path / 'config.json'}, so whether its head shares the "
        "embedding's rows is unknown; set tie_word_embeddings explicitly in config.json (false only if the head is "
        "stored separately), or merge with PEFT"
    )


def _check_fits(name: str, key: str, shape: tuple[int, ...], ids: Sequence[int], tr: TokenRows | None) -> None:
    if len(shape) != 2:
        raise IncompatibleAdapters(f"token rows of {name}: {key} has shape {list(shape)}, not a 2-D weight")
    if ids and max(ids) >= shape[0]:
        raise IncompatibleAdapters(
            f"token rows of {name}: id {max(ids)} is beyond the {shape[0]} rows of {key}; the adapter was trained "
            "with a larger (resized) vocabulary: resize the base's embeddings first"
        )
    if tr is not None and tr.dim != shape[1]:
        raise IncompatibleAdapters(
            f"token rows of {name} have width {tr.dim} but {key} has rows of width {shape[1]}; the adapter was made "
            "for a different base model"
        )


def fold_rows(w: torch.Tensor, tr: TokenRows, want: torch.dtype) -> tuple[torch.Tensor, float]:
    """``w`` in ``want`` with the trained rows written over its rows, and ``||rows - W[ids]|| / ||W||``.

    The rows are rounded once to ``want`` (PEFT casts them to the weight's dtype and ``index_copy``-s them). ``w``
    is a fresh tensor of the caller's (read from the file) and is reused when it already has dtype ``want``.
    """
    ids = torch.tensor(tr.indices, dtype=torch.long)
    change = float(torch.linalg.vector_norm(tr.rows.float() - w[ids].float()))
    norm = float(torch.linalg.vector_norm(w, dtype=torch.float32))
    out = w if w.dtype == want else w.to(want)
    out.index_copy_(0, ids, tr.rows.to(want))
    return out, change / norm if norm else float("inf")
