"""Pre-deploy validation: one call that says "safe to deploy" or exactly what is wrong.

Which checks run depends on what ``path`` is and what else is given:

* an adapter folder: files, NaN/Inf, structure (ranks, shapes, keys), dtype, config flags, delta norms and
  outliers, effective rank, the guidelines' anti-patterns; with ``base``: modules and shapes in the base,
  base identity, vocabulary; with other ``adapters``: whether they combine and how much they interfere;
  with ``target``: what vLLM / PEFT / transformers accept;
* a checkpoint folder: headers, NaN/Inf; with ``base``: every base tensor present with its dtype; with
  ``base`` and ``adapters`` (or the merge recipe beside it): faithfulness of the merged model to base +
  adapters run unmerged in PEFT.

Example:
    >>> import adaptermerge
    >>> report = adaptermerge.validate("merged", base="Llama-3-8B", adapters=["my-adapter"])  # doctest: +SKIP
    >>> report.ok, [c.name for c in report.failed]  # doctest: +SKIP
    (True, [])
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adaptermerge.errors import AdapterMergeError, UsageError
from adaptermerge.guidelines import SERVING_TARGETS
from adaptermerge.io.adapter import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME
from adaptermerge.io.checkpoint import is_checkpoint
from adaptermerge.validation.report import SCHEMA, Check, ValidationReport

__all__ = ["SCHEMA", "Check", "ValidationReport", "validate"]


def validate(
    path: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    adapters: Sequence[str | os.PathLike] = (),
    weights: Sequence[float] | None = None,
    probe: str | os.PathLike | None = None,
    tolerance: float | None = None,
    target: str | None = None,
    compute_dtype: str = "float32",
    write_card: bool = False,
    progress: bool = False,
) -> ValidationReport:
    """Validate an adapter folder or a (merged) checkpoint folder before it ships.

    Args:
        path: the adapter folder or checkpoint folder to validate.
        base: the base checkpoint folder it runs on.
        adapters: with an adapter ``path``: other adapters to be combined with it; with a checkpoint ``path``:
            the adapters that were merged into ``base`` to make it (default: from its merge recipe).
        weights: one weight per adapter (``path`` first for adapters); default: the merge recipe's, else
            equal weights summing to 1 (what combine and merge use).
        probe: JSONL file of probe prompts (``{"text"}``, ``{"prompt"}`` or ``{"input_ids"}`` per line);
            default: deterministic random token ids.
        tolerance: largest accepted relative logit error of a merged checkpoint; default by stored dtype
            (1e-4 fp32, 1e-2 fp16, 5e-2 bf16); 4-bit merges get a drift warning instead unless given.
        target: ``vllm``, ``peft`` or ``transformers``: also check what that serving target accepts.
        compute_dtype: dtype both models run in for the faithfulness check (``float32`` or ``float64``).
        write_card: add the validation summary to ``path``'s README.md (written in one rename).
        progress: progress bars on stderr.

    Returns:
        A :class:`ValidationReport`; ``report.ok`` is False when a check failed.

    Raises:
        UsageError: options that do not fit (unknown target, weights count, ``adapters`` for a checkpoint
            without ``base``, an unreadable probe file). Problems with the data are reported as failed checks.
    """
    import torch

    p = Path(path)
    folders = [Path(a) for a in adapters]
    _check_options(target, tolerance, compute_dtype)
    report = ValidationReport(str(p.resolve()), _kind(p), _inputs(base, folders, weights, probe, tolerance, target))
    if report.kind == "unknown":
        report.add(Check("path", "fail", _why_unknown(p), subject=str(p)))
        return report
    base_obj = None
    if base is not None:
        from adaptermerge.validation.base_checks import open_base

        check, base_obj = open_base(Path(base))
        report.add(check)
    dtype = getattr(torch, compute_dtype)
    if (probe is not None or tolerance is not None) and (report.kind == "adapter" or not (folders or _has_recipe(p))):
        raise UsageError(
            "`probe` and `tolerance` apply to the faithfulness of a merged checkpoint: give the checkpoint with "
            "`base` and `adapter` (or one with its merge recipe)"
        )
    if report.kind == "adapter":
        _adapters(report, [p, *folders], base_obj, weights, target)
    else:
        _checkpoint(report, p, base_obj, folders, weights, probe, tolerance, target, dtype, progress)
    if write_card:
        _write_card(p, report)
    return report


def _check_options(target: str | None, tolerance: float | None, compute_dtype: str) -> None:
    if target is not None and target not in SERVING_TARGETS:
        raise UsageError(f"`target` must be one of {', '.join(SERVING_TARGETS)}, got {target!r}")
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance > 0):
        raise UsageError(f"`tolerance` must be a positive number, got {tolerance}")
    if compute_dtype not in ("float32", "float64"):
        raise UsageError(f"compute_dtype must be float32 or float64, got {compute_dtype!r}")


def _inputs(base, folders, weights, probe, tolerance, target) -> dict[str, Any]:
    return {
        "base": None if base is None else str(Path(base).resolve()),
        "adapters": [str(f.resolve()) for f in folders],
        "weights": None if weights is None else [float(w) for w in weights],
        "probe": None if probe is None else str(Path(probe).resolve()),
        "tolerance": tolerance,
        "target": target,
    }


def _kind(p: Path) -> str:
    if p.is_dir() and any((p / f).exists() for f in (CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME)):
        return "adapter"
    return "checkpoint" if is_checkpoint(p) else "unknown"


def _has_recipe(p: Path) -> bool:
    from adaptermerge.validation.checkpoint_checks import merge_recipe_of

    return merge_recipe_of(p) is not None


def _why_unknown(p: Path) -> str:
    if not p.exists():
        return f"{p} does not exist"
    if not p.is_dir():
        return f"{p} is a file; pass the adapter or checkpoint folder"
    return f"{p} is neither a PEFT adapter folder ({CONFIG_NAME}) nor a checkpoint folder (*.safetensors)"


def _adapters(report: ValidationReport, folders: list[Path], base, weights, target) -> None:
    from adaptermerge.combination import normalize_weights
    from adaptermerge.validation.adapter_checks import check_adapter
    from adaptermerge.validation.base_checks import check_against_base
    from adaptermerge.validation.interference import check_combinable, check_interference
    from adaptermerge.validation.serving import check_adapter_target

    w = normalize_weights(weights, len(folders))
    loaded = []
    for f in folders:
        checks, adapter = check_adapter(f, base.compute_dtype if base is not None else None)
        report.add(*checks)
        if adapter is None:
            continue
        loaded.append(adapter)
        if base is not None:
            report.add(*check_against_base(adapter, base, str(f)))
        if target is not None:
            report.add(check_adapter_target(adapter, f, target))
    if len(folders) > 1 and len(loaded) == len(folders):
        names = [str(f) for f in folders]
        compat = check_combinable(loaded, names)
        report.add(compat)
        if compat.status == "pass":
            report.add(check_interference(loaded, names, w))


def _checkpoint(report, p: Path, base, folders, weights, probe, tolerance, target, dtype, progress) -> None:
    from adaptermerge.validation.checkpoint_checks import (
        check_finite,
        check_loads,
        check_recipe_base,
        check_tensors,
        merge_recipe_of,
        open_checkpoint_check,
    )

    check, merged = open_checkpoint_check(p)
    report.add(check)
    if merged is None:
        return
    report.add(check_finite(merged, progress))
    recipe = merge_recipe_of(p)
    if base is None and not folders and recipe is not None:
        base, folders, weights = _from_recipe(report, p, recipe, weights)
    elif base is not None and recipe is not None:
        report.add(check_recipe_base(recipe, base))
    if folders and base is None:
        raise UsageError("`adapter` with a checkpoint needs `base` (the checkpoint they were merged into)")
    if base is not None:
        report.add(check_tensors(merged, base, recipe))
    ran = False
    if base is not None and folders:
        ran = _faithfulness(report, p, merged, base, folders, weights, probe, tolerance, dtype, recipe)
    if target is not None:
        loads = report.check("checkpoint.loads") if ran else None
        if loads is not None:
            report.add(Check(f"serving.{target}", loads.status, loads.message, loads.figures, loads.hint))
        else:
            report.add(check_loads(merged, target))


def _from_recipe(report: ValidationReport, p: Path, recipe: dict[str, Any], weights) -> tuple[Any, list[Path], Any]:
    """Base, adapters and weights of a merged checkpoint, from its recipe (inputs checked by hash)."""
    from adaptermerge.recipe import RECIPE_NAME, load_merge_recipe
    from adaptermerge.validation.base_checks import open_base

    try:
        kw = load_merge_recipe(p / RECIPE_NAME)
    except AdapterMergeError as e:
        report.add(Check("faithfulness.inputs", "warn", f"the merge recipe's inputs cannot be used: {e}",
                         hint="give --base and --adapter to check faithfulness"))  # fmt: skip
        return None, [], weights
    check, base = open_base(Path(kw["base"]))
    report.add(check)
    report.inputs.update(base=kw["base"], adapters=kw["adapters"], from_recipe=True)
    report.add(Check("faithfulness.inputs", "pass", f"base and {len(kw['adapters'])} adapters from the merge recipe (hashes match)"))  # fmt: skip
    return base, [Path(a) for a in kw["adapters"]], weights if weights is not None else kw["weights"]


def _faithfulness(report, p, merged, base, folders, weights, probe, tolerance, dtype, recipe) -> bool:
    from adaptermerge.combination import normalize_weights
    from adaptermerge.validation.adapter_checks import check_adapter
    from adaptermerge.validation.faithfulness import check_faithfulness, load_probes

    w = normalize_weights(weights, len(folders))
    healthy = True
    for f in folders:
        checks, adapter = check_adapter(f, base.compute_dtype)
        report.add(*checks)
        healthy &= adapter is not None
    if not healthy:
        report.add(Check("faithfulness.logits", "fail", "not measured: an adapter it was merged from is broken (see above)"))  # fmt: skip
        return False
    cfg = merged.ckpt.config
    vocab = int(cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size") or 0)
    if vocab <= 0:
        report.add(Check("faithfulness.logits", "fail", "not measured: config.json gives no vocab_size for probe token ids"))  # fmt: skip
        return False
    probes = load_probes(None if probe is None else Path(probe), [p, base.path], vocab)
    method = (recipe or {}).get("merge_method")
    report.add(*check_faithfulness(merged, base, folders, w, probes, tolerance, dtype, method))
    return True


def _write_card(p: Path, report: ValidationReport) -> None:
    from adaptermerge.outputs import CARD_NAME, render_card, with_validation, write_card

    card = p / CARD_NAME
    if card.is_file():
        text = card.read_text(encoding="utf-8")
    else:
        text = render_card(
            library_name="peft" if report.kind == "adapter" else "transformers",
            tags=["lora" if report.kind == "adapter" else "merge"],
            title="LoRA adapter" if report.kind == "adapter" else "Merged model",
            summary="Validated with adaptermerge.",
            base_model=_recorded_base(p) if report.kind == "adapter" else None,
        )
    write_card(p, with_validation(text, report.to_markdown()))


def _recorded_base(p: Path) -> str | None:
    import json

    try:
        return json.loads((p / CONFIG_NAME).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
