"""Checks of a (merged) checkpoint folder: headers, finiteness, every base tensor present with its dtype,
and that transformers loads it with no missing or unexpected weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from adaptermerge.dtypes import ST_TO_TORCH, dtype_name
from adaptermerge.io.stream import read_tensor
from adaptermerge.recipe import RECIPE_NAME
from adaptermerge.validation.base_checks import Base, open_base
from adaptermerge.validation.report import Check


def open_checkpoint_check(path: Path) -> tuple[Check, Base | None]:
    """checkpoint.open: headers (and 4-bit statistics) read."""
    check, ckpt = open_base(path)
    check.name = "checkpoint.open"
    return check, ckpt


def merge_recipe_of(path: Path) -> dict[str, Any] | None:
    """The merge recipe beside a checkpoint written by ``adaptermerge merge``, if any."""
    f = path / RECIPE_NAME
    if not f.is_file():
        return None
    try:
        r = yaml.safe_load(f.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return r if isinstance(r, dict) and r.get("operation") == "merge" else None


def _data_tensors(ck: Base) -> list[str]:
    """Tensors holding numbers: not packed 4-bit codes (their bytes are codes, even in a float storage dtype)
    and not quant-state JSON."""
    packed = set(ck.groups)
    return [
        n for n in ck.ckpt.weight_map
        if n not in packed and ".quant_state." not in n and ST_TO_TORCH[ck.ckpt.info(n).dtype].is_floating_point
    ]  # fmt: skip


def check_finite(ck: Base, progress: bool = False) -> Check:
    """checkpoint.finite: every floating tensor free of NaN/Inf, read one at a time."""
    from adaptermerge.io.files import SourceFiles
    from adaptermerge.progress import iterate

    names = _data_tensors(ck)
    bad: list[str] = []
    with SourceFiles(ck.path) as files:
        for n in iterate(names, "scanning", "tensor", progress):
            t = read_tensor(files.get(ck.ckpt.weight_map[n]), ck.ckpt.info(n))
            if t.numel() and not bool(torch.isfinite(t.float() if t.element_size() == 1 else t).all()):
                bad.append(n)
    if bad:
        return Check(
            "checkpoint.finite", "fail", f"{len(bad)} tensors hold NaN or Inf (first: {bad[0]})",
            {"nonfinite_tensors": bad}, hint="re-run the merge from intact inputs; the file is damaged or the merge overflowed",
        )  # fmt: skip
    return Check(
        "checkpoint.finite", "pass", f"no NaN or Inf in {len(names)} floating tensors", {"tensors": len(names)}
    )


def _prefix(base_keys: list[str], merged: set[str]) -> str | None:
    """The prefix the merged checkpoint adds to every base key ('' or a task model's, e.g. 'bert.')."""
    if all(k in merged for k in base_keys):
        return ""
    for p in sorted({k.split(".", 1)[0] + "." for k in merged}):
        if all(p + k in merged for k in base_keys):
            return p
    return None


def check_tensors(merged: Base, base: Base, recipe: dict[str, Any] | None) -> Check:
    """checkpoint.tensors: every base tensor present with its shape; dtypes kept unless the recipe converted them."""
    members = {m for ms in base.groups.values() for m in ms if m not in base.groups}
    keys = [k for k in base.ckpt.weight_map if k not in members]  # a 4-bit group is judged by its weight
    mkeys = set(merged.ckpt.weight_map)
    p = _prefix(keys, mkeys)
    missing = [k for k in keys if k not in mkeys] if p is None else []
    if missing:
        return Check(
            "checkpoint.tensors", "fail",
            f"{len(missing)} base tensors are missing from the merged checkpoint (first: {missing[0]})",
            {"missing": missing}, hint="re-run the merge; a checkpoint without them loads with random weights there",
        )  # fmt: skip
    shapes, dtypes = [], []
    for k in keys:
        (bs, bd), (ms, md) = _shape_dtype(base, k), _shape_dtype(merged, p + k)
        if bs != ms:
            shapes.append(f"{k}: {list(bs)} -> {list(ms)}")
        if bd != md:
            dtypes.append(f"{k}: {bd} -> {md}")
    added = sorted(k for k in mkeys if not any(k.startswith(g) for g in merged.groups) and k[len(p):] not in base.ckpt.weight_map)  # fmt: skip
    figures = {
        "base_tensors": len(keys),
        "prefix_added": p,
        "shape_changes": shapes,
        "dtype_changes": dtypes,
        "added": added,
    }
    if shapes:
        return Check("checkpoint.tensors", "fail", f"{len(shapes)} tensors changed shape (first: {shapes[0]})", figures)
    msg = f"all {len(keys)} base tensors present with their shapes" + (
        f"; {len(added)} added ({added[0]}...)" if added else ""
    )
    if not dtypes:
        return Check("checkpoint.tensors", "pass", msg + "; dtypes kept", figures)
    params = (recipe or {}).get("parameters") or {}
    if (recipe or {}).get("dtype") or params.get("quantize") or params.get("dequantize"):
        return Check(
            "checkpoint.tensors", "pass", msg + f"; {len(dtypes)} dtypes converted as the recipe asked", figures
        )
    return Check(
        "checkpoint.tensors", "warn", msg + f"; {len(dtypes)} tensors changed dtype (first: {dtypes[0]})", figures,
        hint="a merge normally keeps the base's dtypes; make sure the precision change was intended",
    )  # fmt: skip


def _shape_dtype(ck: Base, key: str) -> tuple[tuple[int, ...], str]:
    """Logical shape and dtype: a 4-bit weight's dense shape and ``nf4``/``fp4``."""
    if key in ck.specs:
        s = ck.specs[key]
        return tuple(s.shape), s.quant_type
    info = ck.ckpt.info(key)
    return tuple(info.shape), dtype_name(ST_TO_TORCH[info.dtype])


def check_loads(ck: Base, target: str) -> Check:
    """serving.<target> for a checkpoint: transformers builds the model and finds every weight it needs."""
    from adaptermerge.validation.faithfulness import load_model

    name = f"serving.{target}"
    try:
        model, info = load_model(ck, torch.float32)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds of errors for unloadable folders
        return Check(name, "fail", f"transformers cannot load it: {' '.join(str(e).split())[:300]}")
    del model
    missing, unexpected = info.get("missing_keys", []), info.get("unexpected_keys", [])
    figures = {"missing_keys": sorted(missing), "unexpected_keys": sorted(unexpected)}
    if missing:
        return Check(name, "fail", f"transformers finds no weight for {len(missing)} parameters (first: {sorted(missing)[0]}); they would be random", figures)  # fmt: skip
    if unexpected:
        return Check(name, "warn", f"transformers ignores {len(unexpected)} tensors (first: {sorted(unexpected)[0]})", figures)  # fmt: skip
    return Check(name, "pass", "transformers loads it with no missing or unexpected weights", figures)


def check_recipe_base(recipe: dict[str, Any], base: Base) -> Check:
    """base.identity for a merged checkpoint: the base files' SHA-256 in its recipe against the base given."""
    from adaptermerge.io.files import sha256_files

    recorded = recipe.get("base_sha256") or {}
    now = sha256_files(base.path, recorded)
    figures = {"recorded": recorded, "given": now, "recipe_base": recipe.get("base")}
    if not recorded:
        return Check(
            "base.identity", "warn", "the merge recipe records no base hashes", figures, subject=str(base.path)
        )
    differ = sorted(f for f in recorded if now.get(f) != recorded[f])
    if differ:
        return Check(
            "base.identity", "warn",
            f"{', '.join(differ)} of the base given differ from the base the recipe records ({recipe.get('base')})",
            figures, hint="validate against the base it was merged into", subject=str(base.path),
        )  # fmt: skip
    return Check("base.identity", "pass", f"{', '.join(sorted(recorded))} match the recipe's base (SHA-256)", figures, subject=str(base.path))  # fmt: skip
