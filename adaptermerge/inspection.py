"""What an adapter or a checkpoint is: the facts behind ``adaptermerge inspect``."""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

from adaptermerge.adapter import Adapter
from adaptermerge.errors import InvalidAdapter
from adaptermerge.io.adapter import WEIGHTS_NAME, load_adapter, module_scaling
from adaptermerge.io.checkpoint import Checkpoint, is_checkpoint, open_checkpoint

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def scaling_warnings(r: float, alpha: float, use_rslora: bool = False) -> list[str]:
    """The LoRA guidelines' alpha/r anti-patterns (shared by ``inspect`` and ``train``)."""
    ratio = alpha / (math.sqrt(r) if use_rslora else r)
    if ratio > 4:
        return [
            f"lora_alpha/r scaling is {ratio:g} (alpha={alpha}, r={r}); alpha much larger than r makes training unstable (alpha = r or 2r is usual)"
        ]
    if ratio < 0.25:
        return [f"lora_alpha/r scaling is {ratio:g}; updates this small often mean a mis-set alpha"]
    return []


def rank_warnings(rank: int) -> list[str]:
    """The LoRA guidelines' rank anti-patterns (shared by ``inspect`` and ``train``)."""
    if rank > 64:
        return [f"rank {rank} is high: rarely needed above 64, risks overfitting and slows serving"]
    if rank < 4:
        return [f"rank {rank} is very low: the adapter may be too weak for its task"]
    return []


def adapter_warnings(adapter: Adapter) -> list[str]:
    """Unusual or risky properties, including the anti-patterns of the LoRA guidelines."""
    w = list(adapter.warnings)
    cfg = adapter.config
    ranks = [m.rank for m in adapter.modules.values()]
    if cfg:
        r, alpha = cfg.get("r"), cfg.get("lora_alpha")
        if isinstance(r, (int, float)) and isinstance(alpha, (int, float)) and r > 0:
            w += scaling_warnings(r, alpha, bool(cfg.get("use_rslora")))
    if ranks:
        w += rank_warnings(max(ranks))
    if ranks and max(ranks) > 512:
        w.append(f"rank {max(ranks)} exceeds vLLM's largest max_lora_rank (512)")
    if adapter.uses_dora:
        w.append("DoRA adapter: cannot be combined linearly; some serving engines do not support it")
    if adapter.modules_to_save:
        w.append(f"modules_to_save {adapter.modules_to_save}: full module copies; vLLM refuses such adapters")
    if adapter.uses_bias or (cfg.get("bias", "none") not in (None, "none")):
        w.append("adapter trains biases; vLLM refuses bias != 'none' and lora_bias")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        w.append(
            "rank_pattern/alpha_pattern are set; vLLM ignores them (re-save with adaptermerge to fold the scaling)"
        )
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
        "dtype": str(adapter.dtype).replace("torch.", ""),
        "num_modules": len(adapter.modules),
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "use_rslora": bool(cfg.get("use_rslora", False)),
        "use_dora": adapter.uses_dora,
        "fan_in_fan_out": any(m.layout == "conv1d" for m in adapter.modules.values()),
        "modules_to_save": adapter.modules_to_save,
        "extra_tensors": sorted(adapter.extra_tensors),
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
        "path": str(ckpt.path),
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
