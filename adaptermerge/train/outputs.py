"""The training run's model card and recipe (``operation: train``), and the recipe checks on replay/resume."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from adaptermerge.data import TaskData
from adaptermerge.errors import InvalidData, UsageError
from adaptermerge.outputs import adapter_usage
from adaptermerge.recipe import RECIPE_NAME, dump_recipe
from adaptermerge.train.config import TrainConfig

SUMMARY_NAME = "training_summary.json"
__all__ = ["RECIPE_NAME", "SUMMARY_NAME", "train_recipe", "write_recipe", "load_train_recipe", "train_card"]


def train_recipe(
    base: str | os.PathLike, base_dir: Path, train: TaskData, eval_data: TaskData | None, cfg: TrainConfig
) -> dict[str, Any]:
    """Everything that decides the run: base, data files (with SHA-256) and every setting."""
    from adaptermerge import __version__

    given = Path(base)
    return {
        "adaptermerge_version": __version__,
        "operation": "train",
        "base_model": str(given.resolve()) if given.is_dir() else str(base),
        "data": _data_entry(train),
        "eval_data": _data_entry(eval_data) if eval_data is not None else None,
        "parameters": cfg.as_dict(),
    }


def _data_entry(d: TaskData) -> dict[str, Any]:
    s = d.summary()
    return {"file": str(d.path.resolve()), "sha256": s["sha256"], "rows": s["rows"]}


def write_recipe(path: Path, recipe: dict[str, Any]) -> None:
    path.write_text(dump_recipe(recipe, "train"), encoding="utf-8")


def load_train_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Keyword arguments for :func:`adaptermerge.train_adapter` that replay a recipe.

    Raises:
        UsageError: not a train recipe, or unreadable.
        InvalidData: a data file changed since the recipe was written (its SHA-256 differs).
    """
    p = Path(path)
    try:
        recipe = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"cannot read recipe {p}: {' '.join(str(e).split())}") from None
    if not isinstance(recipe, dict) or recipe.get("operation") != "train" or not isinstance(recipe.get("data"), dict):
        raise UsageError(f"{p} is not an adaptermerge training recipe (operation: train)")
    from adaptermerge.io.files import sha256_file

    files = {}
    for key in ("data", "eval_data"):
        entry = recipe.get(key)
        if not entry:
            continue
        f = Path(entry["file"])
        if not f.is_file() or sha256_file(f) != entry.get("sha256"):
            raise InvalidData(f"{f} is missing or changed since the recipe was written (sha256 differs)")
        files[key] = str(f)
    return {
        "base": recipe["base_model"],
        "data": files["data"],
        "eval_data": files.get("eval_data"),
        "config": TrainConfig.from_dict(dict(recipe.get("parameters") or {})),
    }


def check_resume_recipe(ckpt: Path, recipe: dict[str, Any]) -> None:
    """Refuse to resume checkpoints that another base, other data or other settings produced."""
    try:
        old = yaml.safe_load((ckpt / RECIPE_NAME).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        raise UsageError(
            f"{ckpt} has checkpoints but no {RECIPE_NAME}, so it cannot be checked that they belong to this run; "
            "start over with `overwrite`"
        ) from None
    diffs = []
    for key in ("base_model", "data", "eval_data"):
        if old.get(key) != recipe[key]:
            diffs.append(key)
    params = old.get("parameters") or {}
    diffs += [k for k, v in recipe["parameters"].items() if params.get(k) != v]
    if diffs:
        raise UsageError(
            f"the checkpoints in {ckpt} were made with different {', '.join(diffs)}; resume with the same "
            "settings and data, or start over with `overwrite`"
        )


def train_card(recipe: dict[str, Any], result: Any, peft_model: Any) -> str:
    """README.md: Hub metadata, data summary, hyperparameters, final losses, how to replay and use it."""
    from adaptermerge import __version__

    p = recipe["parameters"]
    kind = "QLoRA" if p["quantize"] else "LoRA"
    meta = {
        "base_model": recipe["base_model"],
        "library_name": "peft",
        "tags": ["adaptermerge", "lora", *(["qlora"] if p["quantize"] else []), "trained"],
    }
    trainable, total = peft_model.get_nb_trainable_parameters()
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# {kind} adapter trained with adaptermerge {__version__}", "",
        f"Base model: `{recipe['base_model']}`. Trained with transformers' Trainer on PEFT "
        f"(`get_peft_model`{', 4-bit base via prepare_model_for_kbit_training' if p['quantize'] else ''}) "
        f"on {result.world_size} process{'es' if result.world_size > 1 else ''}.", "",
        "## Data", "",
        "| split | file | rows | kinds | sha256 |", "|---|---|---|---|---|",
    ]  # fmt: skip
    for split in ("train", "eval"):
        d = result.data.get(split)
        if d:
            lines.append(f"| {split} | `{d['file']}` | {d['rows']} | {d['kinds']} | `{d['sha256'][:16]}…` |")
    lines += ["", f"Loss on completions / assistant turns only; max length {result.data['max_length']} tokens.", ""]
    lines += ["## Hyperparameters", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in p.items()]
    lines += [f"| trainable parameters | {trainable:,} of {total:,} |", ""]
    lines += [
        "## Results", "",
        f"- optimizer steps: {result.steps}; input tokens seen: {result.tokens:,}; runtime {result.train_runtime:.1f} s",
        f"- final train loss (last logging window): {_fmt(result.train_loss)}",
        f"- final eval loss: {_fmt(result.eval_loss)}",
        *[f"- warning: {w}" for w in result.warnings],
        "", *adapter_usage("train"),
    ]  # fmt: skip
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"
