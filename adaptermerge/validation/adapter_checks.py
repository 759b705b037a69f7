"""Checks of one adapter folder on its own: files, finiteness, structure, dtype, config, norms, effective rank.

The structure check is :func:`adaptermerge.load_adapter` itself (one home for what a consistent adapter is:
ranks against the config, factor shapes, keys, bias and magnitude sizes). Because it refuses NaN/Inf
tensors, the raw tensors are scanned first, one at a time, so that a diverged adapter still gets a report
that names its bad tensors.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from adaptermerge.adapter import Adapter
from adaptermerge.dtypes import ST_TO_TORCH, dtype_name
from adaptermerge.errors import AdapterMergeError
from adaptermerge.guidelines import anti_patterns, scaling_ratio
from adaptermerge.io.adapter import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME, load_adapter
from adaptermerge.io.peft_config import changes_base, check_config, init_refusal
from adaptermerge.io.safetensors_header import Header, HeaderError, read_header
from adaptermerge.io.stream import read_tensor
from adaptermerge.lowrank import energy_rank, factored_svd
from adaptermerge.validation.report import Check

OUTLIER_FACTOR = 10.0  # a module's ||delta|| this many times the median of its kind is flagged
ENERGY = 0.99  # effective rank: singular values holding this fraction of ||delta||_F^2
UNUSED_RANK = 0.5  # hint to resize when the effective ranks sum to less than this fraction of the ranks
_LAYER = re.compile(r"\.\d+\.")


def check_adapter(folder: Path, compute_dtype: torch.dtype | None = None) -> tuple[list[Check], Adapter | None]:
    """Every single-adapter check; the loaded adapter when it is consistent enough for the checks that follow."""
    checks, adapter = _run_checks(folder, compute_dtype)
    for c in checks:
        c.subject = str(folder)
    return checks, adapter


def _run_checks(folder: Path, compute_dtype: torch.dtype | None) -> tuple[list[Check], Adapter | None]:
    files, header = _files(folder)
    if header is None:
        return [files], None
    finite = _finite(folder, header)
    checks = [files, finite, _dtypes(header)]
    if finite.status == "fail":
        return checks, None
    fields = _config_fields(folder)
    if fields is not None:
        return [*checks, fields], None
    try:
        adapter = load_adapter(folder, raw_init=True)  # base-changing inits are reported by _config below
    except AdapterMergeError as e:
        return [*checks, Check("adapter.structure", "fail", str(e), hint=_STRUCTURE_HINT)], None
    checks += [
        _structure(adapter),
        _config(adapter),
        _norms(adapter),
        _effective_rank(adapter),
        _anti_patterns(adapter, compute_dtype),
    ]
    return checks, adapter


def _config_fields(folder: Path) -> Check | None:
    """adapter.config, when a config field is one adaptermerge refuses (the allow-list load_adapter applies)."""
    try:
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
        if isinstance(config, dict):
            check_config(config, raw_init=True)
    except (OSError, ValueError):
        return None  # unreadable: load_adapter names it as a structure failure
    except AdapterMergeError as e:
        return Check("adapter.config", "fail", str(e), hint="load and merge it with PEFT (merge_and_unload)")
    return None


_STRUCTURE_HINT = "re-save the adapter from the training run (PeftModel.save_pretrained) or fix adapter_config.json"


def _files(folder: Path) -> tuple[Check, Header | None]:
    """adapter.files: a JSON config and a readable safetensors file (pickles are never read)."""
    cfg = folder / CONFIG_NAME
    st = folder / WEIGHTS_NAME
    problem = None
    if not cfg.is_file():
        problem = f"{CONFIG_NAME} is missing: not a PEFT adapter folder"
    else:
        try:
            if not isinstance(json.loads(cfg.read_text(encoding="utf-8")), dict):
                problem = f"{CONFIG_NAME} does not hold a JSON object"
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            problem = f"{CONFIG_NAME} is not valid JSON ({e})"
    if problem is None and not st.is_file():
        problem = (
            f"only {PICKLE_NAME} is present, a pickle that can run code when loaded; it is not read"
            if (folder / PICKLE_NAME).is_file()
            else f"{WEIGHTS_NAME} is missing"
        )
    header = None
    if problem is None:
        try:
            header = read_header(st)
        except (HeaderError, OSError) as e:
            problem = f"{WEIGHTS_NAME} is corrupt or truncated ({e})"
    if problem is not None:
        hint = (
            "convert it once in a trusted environment: PeftModel.from_pretrained(base, path).save_pretrained(new_path)"
        )
        return Check("adapter.files", "fail", problem, hint=hint if "pickle" in problem else None), None
    figures = {"tensors": len(header.tensors), "size_bytes": header.file_size}
    return Check("adapter.files", "pass", f"{CONFIG_NAME} and {WEIGHTS_NAME} readable", figures), header


def _finite(folder: Path, header: Header) -> Check:
    """adapter.finite: every floating tensor free of NaN/Inf (read one tensor at a time)."""
    bad: list[str] = []
    with open(folder / WEIGHTS_NAME, "rb") as fh:
        for name, info in header.tensors.items():
            dt = ST_TO_TORCH.get(info.dtype)
            if dt is None or not dt.is_floating_point or info.numel == 0:
                continue
            t = read_tensor(fh, info)
            if not bool(torch.isfinite(t.float() if t.element_size() == 1 else t).all()):
                bad.append(name)
    if bad:
        return Check(
            "adapter.finite",
            "fail",
            f"{len(bad)} tensors hold NaN or Inf (first: {bad[0]}); the training run diverged or the file is "
            "damaged (the adapter's other checks need finite tensors and were not run)",
            {"nonfinite_tensors": bad},
            hint="retrain from the last good checkpoint (lower the learning rate or use bf16/fp32 instead of fp16)",
        )
    return Check("adapter.finite", "pass", "no NaN or Inf")


def _dtypes(header: Header) -> Check:
    """adapter.dtype: storage dtypes of the floating tensors; mixed dtypes are flagged."""
    counts = Counter(
        dtype_name(ST_TO_TORCH[i.dtype])
        for i in header.tensors.values()
        if i.dtype in ST_TO_TORCH and ST_TO_TORCH[i.dtype].is_floating_point
    )
    figures = {"dtypes": dict(sorted(counts.items()))}
    if len(counts) > 1:
        return Check("adapter.dtype", "warn", f"tensors are stored in several dtypes {sorted(counts)}", figures)
    return Check("adapter.dtype", "pass", f"tensors stored in {next(iter(counts), 'no floating dtype')}", figures)


def _structure(adapter: Adapter) -> Check:
    """adapter.structure: load_adapter's consistency rules held; its warnings are shown."""
    ranks = Counter(m.rank for m in adapter.modules.values())
    layouts = Counter(m.layout for m in adapter.modules.values())
    figures = {
        "modules": len(adapter.modules),
        "ranks": {str(r): n for r, n in sorted(ranks.items())},
        "layouts": dict(sorted(layouts.items())),
        "parameters": adapter.num_parameters(),
        "extra_tensors": sorted(adapter.extra_tensors),
    }
    msg = f"{len(adapter.modules)} modules, ranks {sorted(ranks)}: config, keys and shapes agree"
    if adapter.warnings:
        return Check("adapter.structure", "warn", msg + "; " + "; ".join(adapter.warnings), figures)
    return Check("adapter.structure", "pass", msg, figures)


def _config(adapter: Adapter) -> Check:
    """adapter.config: the flags that change what the adapter computes, understood or refused."""
    cfg = adapter.config
    figures: dict[str, Any] = {
        "scaling": scaling_ratio(cfg),
        "use_rslora": bool(cfg.get("use_rslora", False)),
        "use_dora": adapter.uses_dora,
        "fan_in_fan_out": bool(cfg.get("fan_in_fan_out", False)),
        "lora_bias": adapter.uses_bias,
        "bias": cfg.get("bias", "none"),
        "modules_to_save": adapter.modules_to_save,
        "rank_pattern": bool(cfg.get("rank_pattern")),
        "alpha_pattern": bool(cfg.get("alpha_pattern")),
        "task_type": adapter.task_type,
    }
    try:  # one home for what adaptermerge models: the allow-list load_adapter applies
        check_config(cfg, raw_init=True)
        why = init_refusal(cfg["init_lora_weights"]) if changes_base(cfg) else None
    except AdapterMergeError as e:
        why = str(e)
    if why:
        return Check(
            "adapter.config",
            "fail",
            f"{why}; the deltas it holds are not what PEFT computes",
            figures,
            hint="convert it (adaptermerge convert), or load and merge it with PEFT (merge_and_unload)",
        )
    understood = [
        "rsLoRA scaling alpha/sqrt(r)" if figures["use_rslora"] else "scaling alpha/r",
        *(
            ["DoRA magnitudes (merged per output row as PEFT does; not combinable linearly)"]
            if adapter.uses_dora
            else []
        ),
        *(["GPT-2 Conv1D layout"] if figures["fan_in_fan_out"] else []),
        *(["rank/alpha patterns"] if figures["rank_pattern"] or figures["alpha_pattern"] else []),
        *(["LoRA biases"] if adapter.uses_bias else []),
        *([f"modules_to_save {adapter.modules_to_save}"] if adapter.modules_to_save else []),
    ]
    return Check("adapter.config", "pass", "understood: " + ", ".join(understood), figures)


def module_kind(name: str) -> str:
    """A module path with its layer index blanked: modules of one kind across layers compare."""
    return _LAYER.sub(".*.", name)


def _norms(adapter: Adapter) -> Check:
    """adapter.norms: ||B A||_F per module (from r x r Grams); outliers against the median of their kind."""
    norms = {n: m.frobenius_norm() for n, m in adapter.modules.items()}
    by_kind: dict[str, list[float]] = {}
    for n, v in norms.items():
        by_kind.setdefault(module_kind(n), []).append(v)
    medians = {k: statistics.median(v) for k, v in by_kind.items() if len(v) >= 3}
    outliers = {
        n: round(v / medians[module_kind(n)], 3)
        for n, v in norms.items()
        if module_kind(n) in medians and medians[module_kind(n)] > 0 and v > OUTLIER_FACTOR * medians[module_kind(n)]
    }
    zero = [n for n, v in norms.items() if v == 0.0]
    figures = {
        "min": min(norms.values()),
        "median": statistics.median(norms.values()),
        "max": max(norms.values()),
        "outlier_factor": OUTLIER_FACTOR,
        "outliers": outliers,
        "zero": zero,
        "modules": norms,
    }
    if outliers or zero:
        parts = []
        if outliers:
            n0 = next(iter(outliers))
            parts.append(
                f"{len(outliers)} modules exceed {OUTLIER_FACTOR:g}x the median norm of their kind "
                f"(e.g. {n0}: {outliers[n0]:g}x)"
            )
        if zero:
            parts.append(f"{len(zero)} modules carry no update (e.g. {zero[0]})")
        return Check(
            "adapter.norms",
            "warn",
            "; ".join(parts),
            figures,
            hint="inspect those modules' training (a diverging layer, a frozen B); an outlier dominates any merge",
        )
    return Check(
        "adapter.norms",
        "pass",
        f"||delta||_F from {figures['min']:.4g} to {figures['max']:.4g} (median {figures['median']:.4g}), no outliers",
        figures,
    )


def _effective_rank(adapter: Adapter) -> Check:
    """adapter.effective_rank: per module, how many singular values hold 99% of ||delta||_F^2 (factored SVD)."""
    per: dict[str, list[int]] = {}
    for n, m in adapter.modules.items():
        s = factored_svd(m.B.double(), m.A.double()).S
        per[n] = [energy_rank(s, ENERGY), m.rank]
    used, total = sum(v[0] for v in per.values()), sum(v[1] for v in per.values())
    half = [n for n, (k, r) in per.items() if k <= r // 2]
    figures = {"energy": ENERGY, "effective": used, "stored": total, "modules": per}
    msg = (
        f"{used} of {total} stored rank dimensions hold {ENERGY:.0%} of the update energy"
        f"; {len(half)} of {len(per)} modules use at most half their rank"
    )
    hint = None
    if total and used < UNUSED_RANK * total:
        hint = f"adaptermerge resize ADAPTER --energy {ENERGY} -o OUT keeps {ENERGY:.0%} of the energy at the smaller ranks"
    return Check("adapter.effective_rank", "pass", msg, figures, hint=hint)


def _anti_patterns(adapter: Adapter, compute_dtype: torch.dtype | None) -> Check:
    """adapter.anti_patterns: the guidelines' anti-patterns (warnings) and notes."""
    found = anti_patterns(adapter, compute_dtype)
    figures = {"findings": [{"code": f.code, "level": f.level, "message": f.message} for f in found]}
    warns = [f for f in found if f.level != "note"]
    if warns:
        hint = "; ".join(f.hint for f in warns if f.hint) or None
        return Check("adapter.anti_patterns", "warn", "; ".join(f.message for f in warns), figures, hint=hint)
    notes = "; ".join(f.message for f in found)
    return Check(
        "adapter.anti_patterns",
        "pass",
        "none of the guidelines' anti-patterns" + (f" (note: {notes})" if notes else ""),
        figures,
    )
