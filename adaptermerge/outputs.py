"""Model cards of output folders: the one place where Hub metadata (the card's YAML front matter) is written.

Every folder adaptermerge writes carries ``README.md`` that ``huggingface_hub.ModelCard`` parses:

* ``library_name``: ``peft`` for adapter folders, ``transformers`` for checkpoints;
* ``tags``: ``adaptermerge`` first, then the operation and method (``merge``, ``svd``, ``extract``...);
* ``base_model``: only when the base is named by a Hub model id. A local path in metadata would make the Hub
  reject or mislink the card, and it changes from machine to machine, so paths go in the card's text instead.

The inputs and their weights are a table in the text; the recipe beside the card replays the output.
:func:`render_card` builds a whole card for new outputs (training runs use it); :func:`write_card` replaces
the card of an existing folder in one rename (``validate --write-card``).

Example:
    >>> print(front_matter(card_metadata("peft", ["merge", "svd"], "meta-llama/Llama-3.1-8B")).strip())
    ---
    library_name: peft
    tags:
    - adaptermerge
    - merge
    - svd
    base_model: meta-llama/Llama-3.1-8B
    ---
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

CARD_NAME = "README.md"
LIBRARY_TAG = "adaptermerge"
VALIDATION_BEGIN = "<!-- adaptermerge:validation:begin -->"
VALIDATION_END = "<!-- adaptermerge:validation:end -->"


def hub_model_id(name: str | None) -> str | None:
    """``name`` when it reads as a Hugging Face Hub model id (``org/name`` or ``name``), else None.

    Uses huggingface_hub's own id rules (``validate_repo_id``); absolute, home-relative and ``./`` paths are
    paths. A bare word such as ``gpt2`` counts as an id, as the Hub's legacy models are named that way.
    """
    if not name or not isinstance(name, str):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name:
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def base_model_text(name: str | None) -> str:
    """How a card's text names the base: the Hub id linked, a local path quoted, or '(not recorded)'."""
    if not name:
        return "(not recorded)"
    hub = hub_model_id(name)
    return f"[{hub}](https://huggingface.co/{hub})" if hub else f"`{name}` (a local path)"


def card_metadata(library_name: str, tags: Sequence[str], base_model: str | None = None) -> dict[str, Any]:
    """Hub metadata for a card: ``library_name``, ``tags`` (``adaptermerge`` first, no repeats), ``base_model``
    when it is a Hub id."""
    if library_name not in ("peft", "transformers"):
        raise ValueError(f"library_name must be 'peft' or 'transformers', got {library_name!r}")
    uniq = list(dict.fromkeys([LIBRARY_TAG, *(str(t) for t in tags if t)]))
    meta: dict[str, Any] = {"library_name": library_name, "tags": uniq}
    hub = hub_model_id(base_model)
    if hub:
        meta["base_model"] = hub
    return meta


def front_matter(meta: dict[str, Any]) -> str:
    """The YAML block a card starts with (``---`` lines included, trailing newline)."""
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def inputs_table(inputs: Sequence[tuple[str | None, Any]], heading: str = "input") -> list[str]:
    """Markdown rows naming each input and its weight (``-`` when the input has none; a weight per layer group is
    listed group by group)."""
    from adaptermerge.layers import describe_weight

    rows = [f"| {heading} | weight |", "|---|---|"]
    for name, w in inputs:
        rows.append(f"| `{name or '(in memory)'}` | {'-' if w is None else describe_weight(w)} |")
    return rows


def render_card(
    *,
    library_name: str,
    tags: Sequence[str],
    title: str,
    summary: str,
    base_model: str | None = None,
    inputs: Sequence[tuple[str | None, float | None]] = (),
    sections: Sequence[tuple[str, str]] = (),
) -> str:
    """A whole model card: metadata, title, summary, base model, inputs and weights, then ``sections``.

    Example:
        >>> card = render_card(library_name="peft", tags=["train"], title="My adapter", summary="Trained on X.",
        ...                    base_model="/models/llama", inputs=[("data.jsonl", None)])
        >>> "base_model" in card.split("---")[1], "`/models/llama` (a local path)" in card
        (False, True)
    """
    from adaptermerge import __version__

    lines = [front_matter(card_metadata(library_name, tags, base_model)), f"# {title}", "", summary, ""]
    lines += [f"- Made with adaptermerge {__version__}", f"- Base model: {base_model_text(base_model)}", ""]
    if inputs:
        lines += [*inputs_table(inputs), ""]
    for heading, body in sections:
        lines += [f"## {heading}", "", body.rstrip(), ""]
    return "\n".join(lines)


def adapter_usage(command: str) -> list[str]:
    """The card's closing sections for an adapter folder: how to remake it (``adaptermerge COMMAND --recipe``) and
    how to load it in PEFT."""
    from adaptermerge.recipe import RECIPE_NAME

    return [
        "## Reproduce", "", "```bash", f"adaptermerge {command} --recipe {RECIPE_NAME} -o OUT", "```", "",
        "## Use", "", "```python", "from peft import PeftModel",
        "model = PeftModel.from_pretrained(base_model, 'THIS_FOLDER')", "```", "",
    ]  # fmt: skip


def with_validation(card: str, section: str) -> str:
    """``card`` with its validation section replaced by ``section`` (appended when it has none)."""
    block = f"{VALIDATION_BEGIN}\n{section.rstrip()}\n{VALIDATION_END}\n"
    pattern = re.compile(re.escape(VALIDATION_BEGIN) + r".*?" + re.escape(VALIDATION_END) + r"\n?", re.S)
    if pattern.search(card):
        return pattern.sub(lambda _: block, card, count=1)
    return card.rstrip("\n") + "\n\n" + block


def write_card(folder: str | os.PathLike, text: str) -> Path:
    """Write ``folder/README.md`` in one rename (a crash leaves the old card or the new one, never half)."""
    p = Path(folder)
    fd, tmp = tempfile.mkstemp(prefix=f".{CARD_NAME}.", dir=p)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, p / CARD_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p / CARD_NAME
