"""Model cards (README.md with Hub metadata) for every output folder."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from adaptermerge.adapter import Adapter
from adaptermerge.data import parse_lines
from adaptermerge.methods.registry import get_method
from adaptermerge.outputs import adapter_usage, base_model_text, card_metadata, front_matter, inputs_table


def combine_card(
    result: Adapter, recipe: dict[str, Any], sections: Sequence[tuple[str, str]] = (), tags: Sequence[str] = ()
) -> str:
    """README.md for a combined adapter: Hub metadata, method and paper, inputs and weights, ranks; then
    ``sections`` (heading, markdown body) and extra ``tags`` (``tune`` adds how the merge was found)."""
    from adaptermerge import __version__

    spec = get_method(result.provenance["method"])
    operation = result.provenance.get("operation", "merge")  # resize_adapter marks its results "resize"
    meta = card_metadata("peft", ["lora", operation, *tags, spec.name], result.base_model)
    reports = result.provenance.get("modules", [])
    ranks = sorted({r["rank"] for r in reports})
    worst = min((r["kept_energy"] for r in reports), default=1.0)
    title = "Resized LoRA adapter" if operation == "resize" else "Merged LoRA adapter"
    lines = [
        front_matter(meta),
        f"# {title} ({spec.name})",
        "",
        f"Made with adaptermerge {__version__}: **{spec.name}** — {spec.title}.",
        "",
        f"- Formula: `{spec.formula}`",
    ]
    if spec.paper:
        lines.append(f"- Reference: {spec.paper}" + (f" ({spec.url})" if spec.url else ""))
    lines += [
        f"- Base model: {base_model_text(result.base_model)}",
        f"- Output ranks: {', '.join(map(str, ranks))}; lowest kept energy {worst:.6f}",
        *(f"- Trained token rows of `{n}`: {len(t.indices)} ids (exact)" for n, t in result.token_rows.items()),
        *(
            f"- Task `{t['name']}`: inputs collected from `{t['file']}`"
            + (f" ({len(parse_lines(t['lines']))} rows)" if t.get("lines") else "")
            for t in recipe.get("tasks") or []
        ),
        "",
        *inputs_table([(m["model"], m["parameters"]["weight"]) for m in recipe["models"]], "input adapter"),
        "",
        *adapter_usage("distill" if recipe.get("operation") == "distill" else "combine"),  # the command that replays it
    ]
    for heading, body in sections:
        lines += [f"## {heading}", "", body.rstrip(), ""]
    return "\n".join(lines)
