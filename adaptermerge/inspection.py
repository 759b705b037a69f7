"""What an adapter or a checkpoint is: the facts behind ``adaptermerge inspect``."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from adaptermerge.adapter import Adapter
from adaptermerge.dtypes import dtype_name
from adaptermerge.errors import InvalidAdapter
from adaptermerge.guidelines import anti_patterns, serving_findings
from adaptermerge.io.adapter import WEIGHTS_NAME, load_adapter, module_scaling
from adaptermerge.io.checkpoint import Checkpoint, is_checkpoint, open_checkpoint


def adapter_warnings(adapter: Adapter) -> list[str]:
    """Unusual or risky properties: the guidelines' anti-patterns and what vLLM would refuse or ignore.

    The rules and their thresholds live in :mod:`adaptermerge.guidelines` (``validate`` reports the same
    findings as checks).
    """
    w = list(adapter.warnings)
    w += [f.message for f in anti_patterns(adapter)]
    if adapter.uses_dora:
        w.append("DoRA adapter: cannot be combined linearly; some serving engines do not support it")
    w += [f.message for f in serving_findings(adapter, "vllm") if f.level == "fail" and f.code != "vllm_dora"]
    return w


def describe_adapter(adapter: Adapter, norms: bool = True) -> dict[str, Any]:
    """A JSON-ready description of an adapter (see ``adaptermerge inspect``)."""
    modules = []
    cfg = adapter.config
    for name, m in adapter.modules.items():
        entry: dict[str, Any] = {
            "name": name,
            "layout": m.layout,
            "rank": m.rank,
            "shape": list(m.weight_shape),
        }
        if cfg and "r" in cfg:
            r, alpha, scale = module_scaling(cfg, name)
            entry.update(alpha=alpha, scaling=scale)
        if norms:
            entry["delta_norm"] = m.frobenius_norm()
        if m.bias is not None:
            entry["bias"] = True
        if m.magnitude is not None:
            entry["dora"] = True
        modules.append(entry)
    size = 0
    if adapter.source is not None and (adapter.source / WEIGHTS_NAME).is_file():
        size = (adapter.source / WEIGHTS_NAME).stat().st_size
    ranks = Counter(m.rank for m in adapter.modules.values())
    return {
        "kind": "adapter",
        "path": str(adapter.source) if adapter.source else None,
        "base_model": adapter.base_model,
        "task_type": adapter.task_type,
        "dtype": dtype_name(adapter.dtype),
        "num_modules": len(adapter.modules),
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "use_rslora": bool(cfg.get("use_rslora", False)),
        "use_dora": adapter.uses_dora,
        "fan_in_fan_out": any(m.layout == "conv1d" for m in adapter.modules.values()),
        "modules_to_save": adapter.modules_to_save,
        "extra_tensors": sorted(adapter.extra_tensors),
        "trainable_tokens": {n: len(tr.indices) for n, tr in adapter.token_rows.items()},
        "num_parameters": adapter.num_parameters(),
        "size_bytes": size,
        "modules": modules,
        "warnings": adapter_warnings(adapter),
    }


def describe_checkpoint(ckpt: Checkpoint) -> dict[str, Any]:
    """A JSON-ready description of a checkpoint folder (headers only, no tensor data read)."""
    dtypes: Counter[str] = Counter()
    params = 0
    largest = ("", 0)
    for name, _shard in ckpt.weight_map.items():
        ti = ckpt.info(name)
        dtypes[ti.dtype] += ti.numel
        params += ti.numel
        if ti.nbytes > largest[1]:
            largest = (name, ti.nbytes)
    q = ckpt.quantization
    bnb = ckpt.bnb_4bit_modules()
    warnings = []
    if q and not bnb and q.get("quant_method") == "bitsandbytes":
        warnings.append("config declares bitsandbytes quantization but no 4-bit quant states were found")
    return {
        "kind": "checkpoint",
        "path": str(ckpt.path.resolve()),
        "model_type": ckpt.config.get("model_type"),
        "architectures": ckpt.config.get("architectures"),
        "num_shards": len(ckpt.shards),
        "shards": {f: h.file_size for f, h in ckpt.shards.items()},
        "num_tensors": len(ckpt.weight_map),
        "num_elements": params,
        "elements_by_dtype": dict(dtypes),
        "size_bytes": ckpt.total_bytes,
        "largest_tensor": {"name": largest[0], "bytes": largest[1]},
        "quantization": q,
        "quantized_4bit_modules": len(bnb),
        "quant_types": sorted(set(bnb.values())),
        "warnings": warnings,
    }


def describe(path: str | os.PathLike, norms: bool = True) -> dict[str, Any]:
    """Describe an adapter folder or a checkpoint folder, whichever ``path`` is."""
    p = Path(path)
    if (p / "adapter_config.json").exists() or (p / WEIGHTS_NAME).exists() or (p / "adapter_model.bin").exists():
        return describe_adapter(load_adapter(p), norms=norms)
    if is_checkpoint(p):
        return describe_checkpoint(open_checkpoint(p))
    if not p.exists():
        raise InvalidAdapter(f"{p} does not exist")
    raise InvalidAdapter(
        f"{p} is neither a PEFT adapter folder (adapter_config.json) nor a checkpoint folder (*.safetensors)"
    )
