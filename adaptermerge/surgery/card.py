"""Model card and recipe of a merged checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import yaml

from adaptermerge.adapter import Adapter
from adaptermerge.errors import IncompatibleAdapters, UsageError
from adaptermerge.io.adapter import file_sha256
from adaptermerge.io.checkpoint import INDEX_NAME, Checkpoint
from adaptermerge.outputs import base_model_text, card_metadata, front_matter, inputs_table
from adaptermerge.recipe import input_hashes


def merge_recipe(
    base: Path,
    loaded: list[Adapter],
    adapter: Adapter,
    weights: list[float] | None,
    method: str,
    rank: int | None,
    energy: float | None,
    out_dtype: torch.dtype | None,
    quantize: str | None,
    dequantize: bool,
) -> dict[str, Any]:
    """The recipe that replays a merge (``adaptermerge merge --recipe FILE -o OUT``)."""
    from adaptermerge import __version__

    w = list(weights) if weights is not None else ([1.0] if len(loaded) == 1 else [1.0 / len(loaded)] * len(loaded))
    base_hashes = {f: file_sha256(base / f) for f in ("config.json", INDEX_NAME) if (base / f).is_file()}
    return {
        "adaptermerge_version": __version__,
        "operation": "merge",
        "merge_method": method,
        "base": str(base.resolve()),
        "base_sha256": base_hashes,
        "base_model": adapter.base_model,
        "dtype": None if out_dtype is None else str(out_dtype).replace("torch.", ""),
        "parameters": {"rank": rank, "energy": energy, "quantize": quantize, "dequantize": dequantize},
        "models": [
            {
                "model": str(a.source) if a.source else None,
                "parameters": {"weight": wi},
                **({"sha256": input_hashes(a.source)} if a.source else {}),
            }
            for a, wi in zip(loaded, w, strict=True)
        ],
    }


def load_merge_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Keyword arguments for :func:`merge_into_base` from a merge recipe (inputs checked by hash)."""
    p = Path(path)
    try:
        r = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"cannot read recipe {p}: {' '.join(str(e).split())}") from None
    if not isinstance(r, dict) or r.get("operation") != "merge" or not r.get("models") or not r.get("base"):
        raise UsageError(f"{p} is not an adaptermerge merge recipe (operation: merge, base, models)")
    base = Path(r["base"])
    for f, h in (r.get("base_sha256") or {}).items():
        if not (base / f).is_file() or file_sha256(base / f) != h:
            raise IncompatibleAdapters(f"{base / f} changed since the recipe was written; the merge would not replay")
    models = []
    for m in r["models"]:
        mp = Path(m["model"])
        for f, h in (m.get("sha256") or {}).items():
            if not (mp / f).is_file() or file_sha256(mp / f) != h:
                raise IncompatibleAdapters(f"{mp / f} changed since the recipe was written; the merge would not replay")
        models.append(str(mp))
    params = r.get("parameters") or {}
    weights = [float((m.get("parameters") or {}).get("weight", 1.0)) for m in r["models"]]
    return {
        "base": str(base),
        "adapters": models,
        "weights": None if weights == [1.0] else weights,
        "method": r.get("merge_method", "linear"),
        "rank": params.get("rank"),
        "energy": params.get("energy"),
        "dtype": r.get("dtype"),
        "quantize": params.get("quantize"),
        "dequantize": bool(params.get("dequantize", False)),
    }


def merge_card(ckpt: Checkpoint, adapter: Adapter, report: Any, recipe: dict[str, Any]) -> str:
    """README.md for a merged checkpoint."""
    from adaptermerge import __version__

    tags = ["merge", "lora", recipe["merge_method"]]
    if recipe["parameters"].get("quantize") or ckpt.bnb_4bit_modules():
        tags.append("4-bit")
    weights = [(m["model"], m["parameters"]["weight"]) for m in recipe["models"]]
    lines = [
        front_matter(card_metadata("transformers", tags, adapter.base_model)),
        "# Merged model",
        "",
        f"LoRA adapter(s) folded into `{recipe['base']}` with adaptermerge {__version__} "
        f"(method `{recipe['merge_method']}`). Load it with `AutoModelForCausalLM.from_pretrained` like the base.",
        "",
        f"- Base model: {base_model_text(adapter.base_model)}",
        "",
        *inputs_table(weights, "adapter"),
    ]
    q = [m for m in report.modules if m.requant_rel_error is not None]
    lines += ["", f"- Modules merged: {len(report.modules)}"]
    if q:
        worst = max(m.requant_rel_error for m in q)
        lines.append(f"- 4-bit re-quantization: relative error at most {worst:.4f} of W + delta")
        surv = [m.delta_survival for m in q if m.delta_survival is not None]
        if surv:
            lines.append(
                f"- Fraction of the delta carried by the stored 4-bit weights: mean {sum(surv) / len(surv):.2f}"
            )
    for w in report.warnings:
        lines.append(f"- Warning: {w}")
    lines += [
        "",
        "## Reproduce",
        "",
        "```bash",
        "adaptermerge merge --recipe adaptermerge_recipe.yaml -o OUT",
        "```",
        "",
    ]
    return "\n".join(lines)
