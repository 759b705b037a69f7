"""Recipes: YAML files that replay an output, in mergekit's vocabulary plus what adapters need. One home.

Every output folder carries ``adaptermerge_recipe.yaml``; ``adaptermerge <operation> --recipe FILE -o OUT`` replays
it. A recipe records each input with the SHA-256 of every file the operation reads, and a replay refuses inputs
that changed since. The method's parameters are checked against its declaration in the registry.

Combine / merge schema::

    adaptermerge_version: 0.1.0      # version that wrote it
    operation: combine               # or merge
    merge_method: ties               # a registry name (adaptermerge.methods)
    base_model: meta-llama/Llama-3-8B
    dtype: float32                   # output storage dtype
    compute_dtype: float32           # combine only
    parameters:                      # rank/energy, the method's own parameters, and the operation's options
      rank: 32
      energy: null
      density: 0.5
      allow_different_base: false
      quantize: null                 # merge only
      dequantize: false              # merge only
    base: /abs/path/to/base          # merge; combine when it read a base (PiSSA inputs, token rows, regmean)
    base_sha256: {config.json: ..., model.safetensors: ...}
    tasks:                           # data-aware methods (regmean): one task per model, in order
      - name: math
        file: /abs/path/to/math.jsonl
        sha256: ...
        lines: 1-2,5,7-9             # only when a part of the file was used (tune's search split)
    models:
      - model: /abs/path/to/adapter  # relative paths resolve against the recipe's folder
        parameters: {weight: 0.7}    # or a weight per layer group: {embeddings: 0.2, layers 0-10: 0.5, ...}
        sha256: {adapter_config.json: ..., adapter_model.safetensors: ...}
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from adaptermerge.errors import IncompatibleAdapters, InvalidData, UsageError
from adaptermerge.io.files import sha256_file, sha256_files

RECIPE_NAME = "adaptermerge_recipe.yaml"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
OPTION_KEYS = ("rank", "energy", "allow_different_base", "quantize", "dequantize")


# ----------------------------------------------------------------------------------------------- inputs


def adapter_hashes(folder: str | os.PathLike) -> dict[str, str]:
    """SHA-256 of the files that define an adapter."""
    return sha256_files(folder, ADAPTER_FILES)


def checkpoint_hashes(folder: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, str]:
    """SHA-256 of the files of a checkpoint that an operation reads or copies (default: every top-level file)."""
    p = Path(folder)
    if names is None:
        names = [f.name for f in p.iterdir() if f.is_file() and not f.name.startswith(".")]
    return sha256_files(p, names)


def check_unchanged(folder: str | os.PathLike, recorded: dict[str, str] | None) -> None:
    """Refuse a replay whose input changed: every recorded file must exist with the recorded SHA-256."""
    if not recorded:
        return
    now = sha256_files(folder, recorded)
    for name, h in recorded.items():
        if now.get(name) != h:
            raise IncompatibleAdapters(
                f"{Path(folder) / name} changed since the recipe was written (sha256 differs); it would not replay"
            )


def model_entries(sources: Sequence[str | os.PathLike | None], weights: Sequence[float]) -> list[dict[str, Any]]:
    entries = []
    for src, w in zip(sources, weights, strict=True):
        entry: dict[str, Any] = {"model": str(src) if src else None, "parameters": {"weight": w}}
        if src:
            entry["sha256"] = adapter_hashes(src)
        entries.append(entry)
    return entries


def task_entries(tasks: Sequence[tuple[str, Any]]) -> list[dict[str, Any]]:
    """Recipe entries of the task data a data-aware method read: ``(name, TaskData)`` pairs, with the file's SHA-256
    and, for a selection of its rows, their line numbers."""
    from adaptermerge.data import format_lines

    out = []
    for name, data in tasks:
        entry: dict[str, Any] = {"name": name, "file": str(Path(data.path).resolve()), "sha256": data.sha256}
        if data.selected:
            entry["lines"] = format_lines(data.lines)
        out.append(entry)
    return out


def recipe_tasks(recipe: dict[str, Any], path: str | os.PathLike) -> list[tuple[str, Any]] | None:
    """The task data a recipe records (``None`` for data-free merges): each file checked against its SHA-256 and
    read (only the recorded lines, when a selection was used)."""
    from adaptermerge.data import parse_lines, read_task_file, read_task_lines

    entries = recipe.get("tasks")
    if not entries:
        return None
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and e.get("name") and e.get("file") for e in entries
    ):
        raise UsageError(f"{path}: 'tasks' must be a list of {{name: NAME, file: FILE.jsonl}}")
    out = []
    for e in entries:
        f = _absolute(Path(path), str(e["file"]))
        if e.get("sha256") and (not f.is_file() or sha256_file(f) != e["sha256"]):
            raise InvalidData(
                f"{f} is missing or changed since the recipe was written (sha256 differs); it would not replay"
            )
        lines = e.get("lines")
        out.append((str(e["name"]), read_task_lines(f, parse_lines(lines)) if lines else read_task_file(f)))
    return out


def _weight(value: Any, n: int) -> Any:
    """A model entry's weight: a number, or a mapping of layer groups to numbers (see :mod:`adaptermerge.layers`)."""
    from adaptermerge.layers import check_weight

    if value is None:
        return 1.0 / n
    if isinstance(value, dict):
        return check_weight(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UsageError(f"a model's weight must be a number or a mapping of layer groups, got {value!r}") from None


# ----------------------------------------------------------------------------------------------- writing


def method_recipe(
    operation: str,
    method: str,
    models: list[dict[str, Any]],
    parameters: dict[str, Any],
    base_model: str | None,
    dtype: str | None,
    **extra: Any,
) -> dict[str, Any]:
    """The common shape of combine and merge recipes."""
    from adaptermerge import __version__

    return {
        "adaptermerge_version": __version__,
        "operation": operation,
        "merge_method": method,
        "base_model": base_model,
        "dtype": dtype,
        **extra,
        "parameters": parameters,
        "models": models,
    }


def combine_recipe(result: Any) -> dict[str, Any]:
    """The recipe that reproduces a :func:`adaptermerge.combine` result (an :class:`~adaptermerge.Adapter`)."""
    prov = result.provenance
    params = {"rank": prov["rank"], "energy": prov["energy"], **prov.get("params", {})}
    params["allow_different_base"] = bool(prov.get("allow_different_base", False))
    extra: dict[str, Any] = {"compute_dtype": prov["compute_dtype"]}
    if prov.get("base"):
        extra.update(base=prov["base"], base_sha256=checkpoint_hashes(prov["base"]))
    if prov.get("tasks"):
        extra["tasks"] = prov["tasks"]
    models = model_entries(prov["inputs"], prov["weights"])
    return method_recipe("combine", prov["method"], models, params, result.base_model, prov["dtype"], **extra)


def dump_recipe(recipe: dict[str, Any], operation: str | None = None) -> str:
    """The recipe as YAML with a comment that says how to replay it."""
    op = operation or recipe.get("operation", "combine")
    head = f"# adaptermerge recipe: replay with `adaptermerge {op} --recipe THIS_FILE -o OUT`\n"
    return head + yaml.safe_dump(recipe, sort_keys=False)


# ----------------------------------------------------------------------------------------------- reading


def read_recipe(path: str | os.PathLike, operation: str) -> dict[str, Any]:
    """Parse a recipe of ``operation`` (YAML, no code), with model and base paths made absolute.

    Raises:
        UsageError: unreadable file, another operation's recipe, or a field of the wrong form.
    """
    p = Path(path)
    try:
        recipe = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"cannot read recipe {p}: {' '.join(str(e).split())}") from None
    if not isinstance(recipe, dict) or recipe.get("operation", "combine") != operation:
        raise UsageError(f"{p} is not an adaptermerge {operation} recipe (operation: {operation})")
    models = recipe.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, dict) and m.get("model") for m in models):
        raise UsageError(f"{p}: 'models' must be a list of {{model: PATH, parameters: {{weight: W}}}}")
    if not isinstance(recipe.get("parameters") or {}, dict):
        raise UsageError(f"{p}: 'parameters' must be a mapping")
    for m in models:
        m["model"] = str(_absolute(p, m["model"]))
    if recipe.get("base"):
        recipe["base"] = str(_absolute(p, recipe["base"]))
    if recipe.get("tasks") is not None and not isinstance(recipe["tasks"], list):
        raise UsageError(f"{p}: 'tasks' must be a list of {{name: NAME, file: FILE.jsonl}}")
    return recipe


def _absolute(recipe_path: Path, path: str) -> Path:
    mp = Path(path)
    return mp if mp.is_absolute() else (recipe_path.parent / mp).resolve()


def check_inputs(recipe: dict[str, Any]) -> None:
    """Refuse a replay whose adapters or base changed since the recipe was written."""
    for m in recipe["models"]:
        check_unchanged(m["model"], m.get("sha256"))
    if recipe.get("base"):
        check_unchanged(recipe["base"], recipe.get("base_sha256"))


def _method_arguments(recipe: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """The method, rank/energy and the method's own parameters, checked against its declaration."""
    from adaptermerge.methods.registry import get_method

    params = dict(recipe.get("parameters") or {})
    spec = get_method(str(recipe.get("merge_method", "linear")))
    own = {k: v for k, v in params.items() if k not in OPTION_KEYS}
    unknown = sorted(k for k in own if spec.param(k) is None)
    if unknown:
        raise UsageError(f"{path}: method {spec.name} has no parameter {unknown[0]!r}; the recipe is not valid")
    return {"method": spec.name, "rank": params.get("rank"), "energy": params.get("energy"), **spec.resolve_params(own)}


def load_recipe(path: str | os.PathLike, check_hashes: bool = True) -> dict[str, Any]:
    """Read and check a combine recipe; model paths come back absolute.

    Raises:
        UsageError: unreadable file or a field of the wrong form.
        IncompatibleAdapters: an input changed since the recipe was written.
    """
    recipe = read_recipe(path, "combine")
    if check_hashes:
        check_inputs(recipe)
    return recipe


def recipe_arguments(recipe: dict[str, Any], path: str | os.PathLike = RECIPE_NAME) -> dict[str, Any]:
    """Keyword arguments for :func:`adaptermerge.combine` from a loaded combine recipe."""
    models = recipe["models"]
    params = recipe.get("parameters") or {}
    tasks = recipe_tasks(recipe, path)
    return {
        "adapters": [m["model"] for m in models],
        "weights": [_weight((m.get("parameters") or {}).get("weight"), len(models)) for m in models],
        **_method_arguments(recipe, path),
        "dtype": recipe.get("dtype"),
        "compute_dtype": recipe.get("compute_dtype", "float32"),
        "allow_different_base": bool(params.get("allow_different_base", False)),
        "base": recipe.get("base"),
        **({"tasks": tasks} if tasks is not None else {}),
    }


def load_merge_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Keyword arguments for :func:`adaptermerge.merge_into_base` from a merge recipe (every input file checked)."""
    recipe = read_recipe(path, "merge")
    if not recipe.get("base"):
        raise UsageError(f"{path} is not an adaptermerge merge recipe (it names no base)")
    check_inputs(recipe)
    params = recipe.get("parameters") or {}
    weights = [_weight((m.get("parameters") or {}).get("weight", 1.0), 1) for m in recipe["models"]]
    tasks = recipe_tasks(recipe, path)
    return {
        "base": recipe["base"],
        "adapters": [m["model"] for m in recipe["models"]],
        "weights": None if weights == [1.0] else weights,
        **({"tasks": tasks} if tasks is not None else {}),
        **_method_arguments(recipe, path),
        "dtype": recipe.get("dtype"),
        "quantize": params.get("quantize"),
        "dequantize": bool(params.get("dequantize", False)),
        "allow_different_base": bool(params.get("allow_different_base", False)),
    }


# ----------------------------------------------------------------------------------------------- extract


def extract_recipe(prov: dict[str, Any]) -> dict[str, Any]:
    """The recipe of an extracted adapter: both checkpoints with the SHA-256 of every file, and the options."""
    from adaptermerge import __version__

    return {
        "adaptermerge_version": __version__,
        "operation": "extract",
        "base": str(Path(prov["base"]).resolve()),
        "base_sha256": checkpoint_hashes(prov["base"]),
        "tuned": str(Path(prov["tuned"]).resolve()),
        "tuned_sha256": checkpoint_hashes(prov["tuned"]),
        "parameters": {
            "rank": prov["rank"],
            "energy": prov["energy"],
            "skip_undecomposable": bool(prov.get("skip_undecomposable", False)),
            "dtype": prov.get("dtype"),
        },
    }


def load_extract_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Keyword arguments for :func:`adaptermerge.extract_lora` from an extract recipe (every input file checked)."""
    p = Path(path)
    try:
        recipe = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"cannot read recipe {p}: {' '.join(str(e).split())}") from None
    if not isinstance(recipe, dict) or recipe.get("operation") != "extract" or not recipe.get("base"):
        raise UsageError(f"{p} is not an adaptermerge extract recipe (operation: extract)")
    for key in ("base", "tuned"):
        recipe[key] = str(_absolute(p, recipe[key]))
        check_unchanged(recipe[key], recipe.get(f"{key}_sha256"))
    params = recipe.get("parameters") or {}
    return {
        "base": recipe["base"],
        "tuned": recipe["tuned"],
        "rank": params.get("rank"),
        "energy": params.get("energy"),
        "skip_undecomposable": bool(params.get("skip_undecomposable", False)),
        "dtype": params.get("dtype"),
    }
