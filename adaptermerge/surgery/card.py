"""Model card of a merged checkpoint."""

from __future__ import annotations

from typing import Any

from adaptermerge.adapter import Adapter
from adaptermerge.io.checkpoint import Checkpoint
from adaptermerge.outputs import base_model_text, card_metadata, front_matter, inputs_table
from adaptermerge.recipe import RECIPE_NAME


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
        f"adaptermerge merge --recipe {RECIPE_NAME} -o OUT",
        "```",
        "",
    ]
    return "\n".join(lines)
