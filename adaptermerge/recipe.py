"""Recipes: YAML files that replay a merge, in mergekit's vocabulary plus what adapters need.

Schema (``adaptermerge_recipe.yaml``)::

    adaptermerge_version: 0.1.0      # version that wrote it
    operation: combine               # what to replay
    merge_method: svd                # a registry name (adaptermerge.methods)
    base_model: meta-llama/Llama-3-8B
    dtype: float32                   # output storage dtype
    compute_dtype: float32
    parameters:                      # method-wide parameters
      rank: 32
      energy: null
      allow_different_base: false
      base: /abs/path/to/base        # only when token rows needed the base checkpoint's rows
    models:
      - model: /abs/path/to/adapter  # relative paths resolve against the recipe's folder
        parameters: {weight: 0.7}
        sha256: {adapter_config.json: ..., adapter_model.safetensors: ...}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from adaptermerge.adapter import Adapter
from adaptermerge.errors import IncompatibleAdapters, UsageError
from adaptermerge.io.adapter import CONFIG_NAME, WEIGHTS_NAME, file_sha256

RECIPE_NAME = "adaptermerge_recipe.yaml"


def input_hashes(folder: str | os.PathLike) -> dict[str, str]:
    """SHA-256 of the files that define an adapter."""
    p = Path(folder)
    return {f: file_sha256(p / f) for f in (CONFIG_NAME, WEIGHTS_NAME) if (p / f).is_file()}


def combine_recipe(result: Adapter) -> dict[str, Any]:
    """The recipe that reproduces a :func:`adaptermerge.combine` result."""
    from adaptermerge import __version__

    prov = result.provenance
    models = []
    for path, w in zip(prov["inputs"], prov["weights"], strict=True):
        entry: dict[str, Any] = {"model": path, "parameters": {"weight": w}}
        if path is not None:
            entry["sha256"] = input_hashes(path)
        models.append(entry)
    return {
        "adaptermerge_version": __version__,
        "operation": "combine",
        "merge_method": prov["method"],
        "base_model": result.base_model,
        "dtype": prov["dtype"],
        "compute_dtype": prov["compute_dtype"],
        "parameters": {
            "rank": prov["rank"],
            "energy": prov["energy"],
            "allow_different_base": bool(prov.get("allow_different_base", False)),
        },
        "models": models,
        **_base_entry(prov.get("base")),
    }


def _base_entry(base: str | None) -> dict[str, Any]:
    """The base a combine read (to convert PiSSA/OLoRA inputs, or for token rows), with hashes of its config and
    index."""
    if not base:
        return {}
    files = ("config.json", "model.safetensors.index.json")
    return {"base": base, "base_sha256": {f: file_sha256(Path(base) / f) for f in files if (Path(base) / f).is_file()}}


def dump_recipe(recipe: dict[str, Any], operation: str = "combine") -> str:
    """The recipe as YAML with a comment that says how to replay it."""
    head = f"# adaptermerge recipe: replay with `adaptermerge {operation} --recipe THIS_FILE -o OUT`\n"
    return head + yaml.safe_dump(recipe, sort_keys=False)


def load_recipe(path: str | os.PathLike, check_hashes: bool = True) -> dict[str, Any]:
    """Read and check a recipe; model paths come back absolute.

    Raises:
        UsageError: unreadable file or a field of the wrong form.
        IncompatibleAdapters: an input changed since the recipe was written.
    """
    p = Path(path)
    try:
        recipe = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"cannot read recipe {p}: {' '.join(str(e).split())}") from None
    if not isinstance(recipe, dict) or recipe.get("operation", "combine") != "combine":
        raise UsageError(f"{p} is not an adaptermerge combine recipe (operation: combine)")
    models = recipe.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, dict) and m.get("model") for m in models):
        raise UsageError(f"{p}: 'models' must be a list of {{model: PATH, parameters: {{weight: W}}}}")
    for m in models:
        mp = Path(m["model"])
        if not mp.is_absolute():
            mp = (p.parent / mp).resolve()
        m["model"] = str(mp)
        if check_hashes and m.get("sha256"):
            now = input_hashes(mp) if mp.is_dir() else {}
            for f, h in m["sha256"].items():
                if now.get(f) != h:
                    raise IncompatibleAdapters(
                        f"{mp / f} changed since the recipe was written (sha256 differs); the merge would not replay"
                    )
    if (
        check_hashes
        and recipe.get("base")
        and _base_entry(recipe["base"]).get("base_sha256") != recipe.get("base_sha256")
    ):
        raise IncompatibleAdapters(f"{recipe['base']} changed since the recipe was written; the merge would not replay")
    return recipe


def recipe_arguments(recipe: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for :func:`adaptermerge.combine` from a loaded recipe."""
    params = recipe.get("parameters") or {}
    models = recipe["models"]
    return {
        "adapters": [m["model"] for m in models],
        "weights": [float((m.get("parameters") or {}).get("weight", 1.0 / len(models))) for m in models],
        "method": recipe.get("merge_method", "linear"),
        "rank": params.get("rank"),
        "energy": params.get("energy"),
        "dtype": recipe.get("dtype"),
        "compute_dtype": recipe.get("compute_dtype", "float32"),
        "allow_different_base": bool(params.get("allow_different_base", False)),
        "base": recipe.get("base"),
    }
