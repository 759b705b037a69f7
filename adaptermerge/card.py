"""Model cards (README.md with Hub metadata) for every output folder."""

from __future__ import annotations

from typing import Any

import yaml

from adaptermerge.adapter import Adapter
from adaptermerge.methods.registry import get_method
from adaptermerge.recipe import RECIPE_NAME


def combine_card(result: Adapter, recipe: dict[str, Any]) -> str:
    """README.md for a combined adapter: Hub metadata, method and paper, inputs and weights, ranks."""
    from adaptermerge import __version__

    spec = get_method(result.provenance["method"])
    meta: dict[str, Any] = {"library_name": "peft", "tags": ["adaptermerge", "lora", "merge", spec.name]}
    if result.base_model:
        meta["base_model"] = result.base_model
    reports = result.provenance.get("modules", [])
    ranks = sorted({r["rank"] for r in reports})
    worst = min((r["kept_energy"] for r in reports), default=1.0)
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).strip(),
        "---",
        "",
        f"# Merged LoRA adapter ({spec.name})",
        "",
        f"Made with adaptermerge {__version__}: **{spec.name}** — {spec.title}.",
        "",
        f"- Formula: `{spec.formula}`",
    ]
    if spec.paper:
        lines.append(f"- Reference: {spec.paper}" + (f" ({spec.url})" if spec.url else ""))
    lines += [
        f"- Base model: {result.base_model or '(not recorded)'}",
        f"- Output ranks: {', '.join(map(str, ranks))}; lowest kept energy {worst:.6f}",
        *(f"- Trained token rows of `{n}`: {len(t.indices)} ids (exact)" for n, t in result.token_rows.items()),
        "",
        "| input adapter | weight |",
        "|---|---|",
    ]
    for m in recipe["models"]:
        lines.append(f"| `{m['model']}` | {m['parameters']['weight']:g} |")
    lines += [
        "",
        "## Reproduce",
        "",
        "```bash",
        f"adaptermerge combine --recipe {RECIPE_NAME} -o OUT",
        "```",
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "model = PeftModel.from_pretrained(base_model, 'THIS_FOLDER')",
        "```",
        "",
    ]
    return "\n".join(lines)
