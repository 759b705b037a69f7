"""Read and write PEFT LoRA adapter folders.

Reading folds ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA, per module through ``rank_pattern`` and
``alpha_pattern`` exactly as PEFT matches them) into the factors and converts embedding factors to
the weight layout. Writing does the reverse with a config whose scaling is 1 (``lora_alpha == r``),
which every loader, vLLM included, reads correctly.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from adaptermerge.adapter import Adapter
from adaptermerge.errors import InvalidAdapter, UnsafeFormat, UnsupportedAdapter, UsageError
from adaptermerge.io.atomic import atomic_dir, check_output_path
from adaptermerge.io.peft_config import changes_base, check_config, targets_module, training_only_tensor
from adaptermerge.io.safetensors_header import read_header
from adaptermerge.io.tokens import (
    check_token_modules,
    read_token_rows,
    split_token_tensors,
    token_config_value,
    token_state_dict,
)
from adaptermerge.lowrank import LowRank

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "bias",
    ".lora_embedding_A": "emb_A",
    ".lora_embedding_B": "emb_B",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
}


def get_pattern_key(pattern_keys: list[str], module_name: str) -> str | None:
    """The first pattern key matching ``module_name`` the way PEFT matches rank/alpha patterns.

    PEFT (``peft.utils.other.get_pattern_key``) takes the first key ``k`` in dict order for which
    ``re.match(rf"(.*\\.)?({k})$", module_name)`` succeeds.
    """
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def module_scaling(config: dict[str, Any], module_name: str) -> tuple[int, float, float]:
    """``(r, alpha, scaling)`` PEFT uses for ``module_name`` under ``config``."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    try:
        rk = get_pattern_key(list(rank_pattern), module_name)
        ak = get_pattern_key(list(alpha_pattern), module_name)
        r = int(rank_pattern[rk]) if rk is not None else int(config["r"])
        alpha = float(alpha_pattern[ak]) if ak is not None else float(config.get("lora_alpha", 8))
    except (ValueError, TypeError, AttributeError, re.error) as e:
        raise InvalidAdapter(
            f"{CONFIG_NAME}: r/lora_alpha/rank_pattern/alpha_pattern cannot be read for {module_name} ({e}); "
            "patterns map regexes to numbers"
        ) from None
    if r <= 0:
        raise InvalidAdapter(f"module {module_name}: rank r={r} must be positive; fix r/rank_pattern in {CONFIG_NAME}")
    if alpha <= 0 or not math.isfinite(alpha):
        raise InvalidAdapter(
            f"module {module_name}: lora_alpha={alpha} must be a positive number; fix lora_alpha/alpha_pattern in {CONFIG_NAME}"
        )
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return r, alpha, scale


def _is_saved_base_tensor(config: dict[str, Any], name: str) -> bool:
    """Whether a non-LoRA tensor is one PEFT saves beside the factors under ``config``.

    ``modules_to_save`` copies (``score.weight``), base layers saved with embedding adapters
    (``embed_tokens.base_layer.weight``, ``save_embedding_layers``), and trained biases (``bias="lora_only"``:
    the targeted layers' ``base_layer.bias``; ``bias="all"``: every bias).
    """
    if name.endswith(".base_layer.weight"):
        return True
    bias_mode = config.get("bias") or "none"
    if bias_mode == "all" and name.endswith(".bias"):
        return True
    if bias_mode == "lora_only" and name.endswith(".base_layer.bias"):
        return True
    mts = config.get("modules_to_save") or []
    return any(re.search(rf"(^|\.){re.escape(m)}(\.|$)", name) for m in mts)


def _read_config(folder: Path, raw_init: bool = False) -> dict[str, Any]:
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise InvalidAdapter(
            f"{folder} has no {CONFIG_NAME}: not a PEFT adapter folder (point to the folder PEFT's save_pretrained wrote)"
        )
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidAdapter(f"{cfg_path} is not valid JSON ({e}); restore it from the training run") from None
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{cfg_path} must hold a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise UnsupportedAdapter(f"{folder} is a {peft_type} adapter; adaptermerge handles LoRA adapters only")
    check_config(config, str(cfg_path), raw_init=raw_init)
    if "r" not in config:
        raise InvalidAdapter(f"{cfg_path} has no 'r' (LoRA rank)")
    for key in ("r", "lora_alpha"):
        v = config.get(key, 1)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0 or not math.isfinite(v):
            raise InvalidAdapter(f"{cfg_path}: {key}={v!r} is impossible; it must be a positive number")
    return config


def _read_tensors(folder: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    st = folder / WEIGHTS_NAME
    if st.is_file():
        try:
            read_header(st)
            return load_file(str(st))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise InvalidAdapter(f"{st} is corrupt or truncated ({e}); re-save the adapter") from None
    if (folder / PICKLE_NAME).is_file():
        if not allow_pickle:
            raise UnsafeFormat(
                f"{folder} holds only {PICKLE_NAME}, a pickle that can run code when loaded, so it is not read; "
                "convert it once in a trusted environment: PeftModel.from_pretrained(base, path).save_pretrained(new_path, safe_serialization=True)"
            )
        try:
            sd = torch.load(folder / PICKLE_NAME, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types here
            raise InvalidAdapter(f"{folder / PICKLE_NAME} could not be read with weights_only=True ({e})") from None
        return dict(sd)
    raise InvalidAdapter(f"{folder} has no {WEIGHTS_NAME}; a PEFT adapter folder holds it beside {CONFIG_NAME}")


def load_adapter(path: str | os.PathLike, allow_pickle: bool = False, raw_init: bool = False) -> Adapter:
    """Read a PEFT LoRA adapter folder into canonical form.

    Args:
        path: folder holding ``adapter_config.json`` and ``adapter_model.safetensors``.
        allow_pickle: read an ``adapter_model.bin`` with ``torch.load(weights_only=True)`` when no
            safetensors file exists. Off by default: pickles can execute code.
        raw_init: read an adapter whose ``init_lora_weights`` changed the base (PiSSA, OLoRA, ...) as its stored
            factors. Such an Adapter is not the trained model (the init term is missing) and cannot be saved,
            combined or merged; :func:`adaptermerge.convert_to_plain_lora` folds the term in.

    Raises:
        InvalidAdapter: missing/corrupt files, impossible values, NaN/Inf, shape or rank mismatches.
        UnsafeFormat: only a pickle is present and ``allow_pickle`` is False.
        UnsupportedAdapter: a non-LoRA PEFT adapter.

    Example:
        >>> import adaptermerge
        >>> adapter = adaptermerge.load_adapter("path/to/adapter")  # doctest: +SKIP
        >>> adapter.ranks  # doctest: +SKIP
        {'model.layers.0.self_attn.q_proj': 16, ...}
    """
    folder = Path(path)
    if not folder.exists():
        raise InvalidAdapter(f"{folder} does not exist")
    if not folder.is_dir():
        raise InvalidAdapter(f"{folder} is not a folder; pass the adapter folder, not a file in it")
    config = _read_config(folder, raw_init)
    token_tensors, tensors = split_token_tensors(_read_tensors(folder, allow_pickle), PEFT_PREFIX)
    token_rows = read_token_rows(config, token_tensors, str(folder / WEIGHTS_NAME))
    parts, extra = _split_tensors(tensors, config)
    modules = {name: _module_lowrank(name, parts[name], config) for name in sorted(parts, key=natural_key)}
    if not modules:
        raise InvalidAdapter(
            f"{folder / WEIGHTS_NAME} holds no LoRA factors (no *.lora_A.weight / *.lora_B.weight keys)"
        )
    _check_targets(config, modules)
    _check_extras(config, extra, folder)
    mts = config.get("modules_to_save") or []
    check_token_modules(token_rows, list(modules), list(mts), str(folder / WEIGHTS_NAME))
    first = next(iter(parts.values()))
    dtype = next(t.dtype for t in first.values())
    return Adapter(
        modules=modules,
        base_model=config.get("base_model_name_or_path"),
        task_type=config.get("task_type"),
        extra_tensors=extra,
        modules_to_save=list(mts) if mts else None,
        token_rows=token_rows,
        dtype=dtype,
        config=config,
        source=folder.resolve(),
        warnings=[],
    )


def _split_tensors(
    tensors: dict[str, torch.Tensor], config: dict[str, Any]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """LoRA parts per module (``A``, ``B``, ``bias``, ``magnitude``, ``emb_A``, ``emb_B``) and the other tensors
    (training-only buffers such as VeLoRA's are dropped)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        for suf, role in _SUFFIXES.items():
            if name.endswith(suf):
                parts.setdefault(name[: -len(suf)], {})[role] = t
                break
        else:
            if not training_only_tensor(config, name):
                extra[key] = t
    return parts, extra


def _module_lowrank(name: str, p: dict[str, torch.Tensor], config: dict[str, Any]) -> LowRank:
    """One module's factors in canonical form, scaling folded in, checked for shape, rank and finiteness."""
    r_cfg, _, scale = module_scaling(config, name)
    if "emb_A" in p or "emb_B" in p:
        if not ("emb_A" in p and "emb_B" in p):
            raise InvalidAdapter(f"module {name}: lora_embedding_A and lora_embedding_B must both be present")
        if "magnitude" in p:
            raise UnsupportedAdapter(
                f"module {name}: DoRA on an embedding layer is not supported yet; train the adapter without "
                "use_dora on embeddings, or merge it with PEFT"
            )
        ea, eb = p["emb_A"], p["emb_B"]  # r x num_embeddings, dim x r
        _check_pair(name, ea, eb, r_cfg)
        lr = LowRank(A=eb.float().T.contiguous() * scale, B=ea.float().T.contiguous(), layout="embedding", scale=scale)
    else:
        if not ("A" in p and "B" in p):
            missing = "lora_B" if "A" in p else "lora_A"
            raise InvalidAdapter(f"module {name}: {missing} weight is missing; the adapter file is incomplete")
        a, b = p["A"], p["B"]
        _check_pair(name, a, b, r_cfg)
        bias = p.get("bias")
        if bias is not None and bias.shape != (b.shape[0],):
            raise InvalidAdapter(f"module {name}: lora_B.bias has shape {tuple(bias.shape)}, expected ({b.shape[0]},)")
        mag = p.get("magnitude")
        if mag is not None and mag.numel() != b.shape[0]:
            raise InvalidAdapter(f"module {name}: DoRA magnitude has {mag.numel()} entries, expected {b.shape[0]}")
        lr = LowRank(
            A=a.float() * scale,
            B=b.float(),
            layout="conv1d" if config.get("fan_in_fan_out") else "linear",
            bias=None if bias is None else bias.float() * scale,
            magnitude=None if mag is None else mag.float().reshape(-1),
            scale=scale,
        )
    if not lr.is_finite():
        raise InvalidAdapter(
            f"module {name}: tensors contain NaN or Inf; the training run diverged or the file is damaged"
        )
    return lr


def _tied_copy(config: dict[str, Any], t: Any, candidates: list[Any], same) -> bool:
    """With ``ensure_weight_tying`` PEFT saves the tied partner of a targeted embedding (its LoRA factors, or its
    ``modules_to_save`` copy) as well: such a tensor is exactly equal to one it is tied to."""
    return bool(config.get("ensure_weight_tying")) and any(same(t, c) for c in candidates)


def _same_lowrank(x: LowRank, y: LowRank) -> bool:
    return x.A.shape == y.A.shape and x.B.shape == y.B.shape and torch.equal(x.A, y.A) and torch.equal(x.B, y.B)


def _check_targets(config: dict[str, Any], modules: dict[str, LowRank]) -> None:
    """Refuse factors of modules PEFT would not create a LoRA layer for (it would ignore them when loading)."""
    targeted = {n for n in modules if targets_module(config, n)}
    for name, lr in modules.items():
        if name in targeted or _tied_copy(config, lr, [modules[t] for t in targeted], _same_lowrank):
            continue
        raise InvalidAdapter(
            f"module {name} has LoRA factors but {CONFIG_NAME} does not target it (target_modules, "
            "exclude_modules, layers_to_transform): PEFT would ignore them when loading, so they are not merged "
            "either; fix the config or remove the tensors"
        )


def _check_extras(config: dict[str, Any], extra: dict[str, torch.Tensor], folder: Path) -> None:
    """Every non-LoRA tensor must be one the config saves (or its tied copy), and finite."""
    known = {
        k for k in extra if _is_saved_base_tensor(config, k[len(PEFT_PREFIX) :] if k.startswith(PEFT_PREFIX) else k)
    }
    for key, t in extra.items():
        same = lambda x, y: x.shape == y.shape and torch.equal(x, y)  # noqa: E731
        if key not in known and not _tied_copy(config, t, [extra[k] for k in known], same):
            raise UnsupportedAdapter(
                f"{folder / WEIGHTS_NAME}: tensor {key} is neither a LoRA factor nor a module or bias that "
                f"{CONFIG_NAME} saves (modules_to_save, bias); adaptermerge does not know what it computes"
            )
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InvalidAdapter(f"tensor {key}: contains NaN or Inf; the file is damaged")


def _check_pair(name: str, a: torch.Tensor, b: torch.Tensor, r_cfg: int) -> None:
    if a.ndim != 2 or b.ndim != 2:
        raise InvalidAdapter(f"module {name}: LoRA factors must be 2-D, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] != b.shape[1]:
        raise InvalidAdapter(
            f"module {name}: lora_A has rank {a.shape[0]} but lora_B has rank {b.shape[1]} "
            f"(shapes {tuple(a.shape)} and {tuple(b.shape)}); the factors do not belong together"
        )
    if a.shape[0] != r_cfg:
        raise InvalidAdapter(
            f"module {name}: tensors have rank {a.shape[0]} but the config gives r={r_cfg} for it "
            "(check r / rank_pattern in adapter_config.json)"
        )
    if not (a.is_floating_point() and b.is_floating_point()):
        raise InvalidAdapter(f"module {name}: LoRA factors must be floating point, got {a.dtype} and {b.dtype}")


def natural_key(name: str) -> list:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def adapter_config_for(adapter: Adapter) -> dict[str, Any]:
    """The ``adapter_config.json`` that :func:`save_adapter` writes: scaling 1 everywhere."""
    ranks = [m.rank for m in adapter.modules.values() if m.rank > 0]
    counts = Counter(ranks)
    top = max(counts, key=lambda r: (counts[r], r)) if counts else 1
    pattern = {re.escape(n): m.rank for n, m in adapter.modules.items() if m.rank > 0 and m.rank != top}
    src = adapter.config
    return {
        "peft_type": "LORA",
        "task_type": adapter.task_type,
        "base_model_name_or_path": adapter.base_model,
        "r": top,
        "lora_alpha": top,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "use_rslora": False,
        "target_modules": [n for n, m in adapter.modules.items() if m.rank > 0],
        "fan_in_fan_out": any(m.layout == "conv1d" for m in adapter.modules.values()),
        "use_dora": adapter.uses_dora,
        "lora_bias": adapter.uses_bias,
        "bias": _bias_mode(adapter),
        "modules_to_save": adapter.modules_to_save,
        "trainable_token_indices": token_config_value(adapter.token_rows),
        "lora_dropout": float(src.get("lora_dropout", 0.0) or 0.0),
        "layers_to_transform": None,
        "layers_pattern": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": src.get("revision"),
    }


def _bias_mode(adapter: Adapter) -> str:
    """PEFT's ``bias`` setting: kept from the source, or ``lora_only`` when base-layer biases travel."""
    src = adapter.config.get("bias", "none")
    if src in ("all", "lora_only"):
        return src
    return "lora_only" if any(k.endswith(".base_layer.bias") for k in adapter.extra_tensors) else "none"


def adapter_state_dict(adapter: Adapter, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors PEFT expects, keyed as PEFT writes them, in ``dtype`` (default: the adapter's)."""
    dtype = dtype or adapter.dtype
    sd: dict[str, torch.Tensor] = {}
    for name, m in adapter.modules.items():
        if m.rank == 0:
            continue
        key = PEFT_PREFIX + name
        if m.layout == "embedding":
            sd[key + ".lora_embedding_A"] = m.B.T.to(dtype).contiguous()
            sd[key + ".lora_embedding_B"] = m.A.T.to(dtype).contiguous()
            continue
        sd[key + ".lora_A.weight"] = m.A.to(dtype).contiguous()
        sd[key + ".lora_B.weight"] = m.B.to(dtype).contiguous()
        if m.bias is not None:  # only where an input had one: PEFT starts the others at zero, as we read them
            sd[key + ".lora_B.bias"] = m.bias.to(dtype).contiguous()
        if m.magnitude is not None:
            sd[key + ".lora_magnitude_vector"] = m.magnitude.to(dtype).contiguous()
    for key, t in adapter.extra_tensors.items():
        sd[key] = t.contiguous()
    sd.update(token_state_dict(adapter.token_rows, PEFT_PREFIX, dtype))
    return sd


def save_adapter(
    adapter: Adapter,
    path: str | os.PathLike,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write ``adapter`` as a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``) at ``path``.

    The scaling is already folded into the factors, so the config says ``lora_alpha == r`` (scaling 1),
    ``use_rslora: false``, with ``rank_pattern``/``alpha_pattern`` for modules whose rank differs from the most
    common one. The folder is written atomically; an existing non-empty folder is refused unless ``overwrite``.

    Example:
        >>> import adaptermerge, tempfile, torch
        >>> from adaptermerge import Adapter, LowRank
        >>> a = Adapter({"layers.0.q": LowRank(torch.ones(2, 8), torch.ones(4, 2))})
        >>> out = adaptermerge.save_adapter(a, tempfile.mkdtemp() + "/out")
        >>> adaptermerge.load_adapter(out).ranks
        {'layers.0.q': 2}
    """
    inputs = [adapter.source] if adapter.source is not None else []
    out = check_output_path(path, inputs, overwrite=overwrite)
    dense = [n for n, m in adapter.modules.items() if not isinstance(m, LowRank)]
    if dense:
        raise UsageError(
            f"module {dense[0]} holds a method's dense result (combine(..., dense=True)), which only a merge into a "
            "base takes; combine without `dense` to write an adapter"
        )
    if changes_base(adapter.config):
        raise UnsupportedAdapter(
            f"the adapter holds the raw factors of an init_lora_weights={adapter.config['init_lora_weights']!r} "
            "adapter, which are not the trained model; convert it first (adaptermerge.convert_to_plain_lora)"
        )
    for name, m in adapter.modules.items():
        if not m.is_finite():
            raise InvalidAdapter(f"module {name}: NaN or Inf in the result; nothing was written")
    for name, tr in adapter.token_rows.items():
        if not bool(torch.isfinite(tr.rows).all()):
            raise InvalidAdapter(f"token rows of {name}: NaN or Inf in the result; nothing was written")
    if not any(m.rank > 0 for m in adapter.modules.values()):
        raise InvalidAdapter("the adapter has no non-zero module (the deltas cancel or are empty); nothing was written")
    sd = adapter_state_dict(adapter, dtype)
    config = adapter_config_for(adapter)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file(sd, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text, encoding="utf-8")
    return out
