"""Combine several adapters into one: validation, per-module method calls, batched re-factoring.

The dense ``out x in`` delta is never formed: methods return stacked factors and the re-factoring
step runs a thin QR of each stack and an SVD of the small ``R x R`` core, batched over modules of
equal shape.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from adaptermerge.adapter import Adapter
from adaptermerge.errors import IncompatibleAdapters, UsageError
from adaptermerge.io.atomic import check_output_path
from adaptermerge.io.checkpoint import Checkpoint, open_checkpoint
from adaptermerge.lowrank import LowRank, energy_rank, factored_svd, kept_energy, numerical_rank
from adaptermerge.methods.registry import get_method
from adaptermerge.tokens import combine_token_rows

BATCH = 32  # modules per batched QR/SVD
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class ModuleReport:
    """What happened to one module."""

    name: str
    input_ranks: list[int]
    rank: int
    kept_energy: float
    rel_error_vs_exact: float | None = None


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device, refusing ``cuda`` where torch has no usable GPU."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    return dev


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name)]
    except KeyError:
        raise UsageError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def normalize_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Default to equal weights summing to 1; refuse a count mismatch or non-finite values."""
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise UsageError(f"got {len(w)} weights for {n} adapters; give one weight per adapter")
    if not all(torch.isfinite(torch.tensor(w)).tolist()):
        raise UsageError(f"weights must be finite numbers, got {w}")
    return w


def _norm_base(b: str | None) -> str | None:
    return None if not b else b.rstrip("/")


def check_compatible(adapters: Sequence[Adapter], names: Sequence[str], allow_different_base: bool) -> None:
    """Refuse DoRA, different bases, and modules whose shapes or layouts disagree."""
    for a, n in zip(adapters, names, strict=True):
        if a.uses_dora:
            raise IncompatibleAdapters(
                f"{n} is a DoRA adapter: its magnitude vector renormalises each row of W + delta, so DoRA updates "
                "do not add linearly; merge it into the base on its own (adaptermerge merge) or combine plain LoRA adapters"
            )
    bases = {_norm_base(a.base_model) for a in adapters} - {None}
    if len(bases) > 1 and not allow_different_base:
        raise IncompatibleAdapters(
            f"adapters were trained on different bases ({', '.join(sorted(bases))}); pass --allow-different-base if they share weights"
        )
    roots = [{_module_root(m) for m in a.modules} for a in adapters]
    for i in range(1, len(adapters)):
        if not roots[i] & roots[0]:
            raise IncompatibleAdapters(
                f"{names[0]} and {names[i]} share no module paths ({', '.join(sorted(roots[0]))} vs {', '.join(sorted(roots[i]))}): "
                "they were made on different model architectures"
            )
    seen: dict[str, tuple[str, tuple[int, int], str]] = {}
    for a, n in zip(adapters, names, strict=True):
        for mod, m in a.modules.items():
            key = (m.layout, m.shape)
            if mod in seen and seen[mod][:2] != (m.layout, m.shape):
                lay0, shp0, n0 = seen[mod]
                raise IncompatibleAdapters(
                    f"module {mod}: {n0} has a {lay0} delta of shape {shp0} but {n} has a {m.layout} delta of shape {m.shape}; "
                    "the adapters were made on different base models"
                )
            seen.setdefault(mod, (*key, n))


def _module_root(name: str) -> str:
    """The first component of a module path: ``model.layers.3.mlp.up_proj`` -> ``model``."""
    return name.split(".", 1)[0]


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _combine_extras(
    adapters: Sequence[Adapter], names: Sequence[str], weights: list[float]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``modules_to_save`` tensors: the weight-normalised average where every adapter has them."""
    keys = [set(a.extra_tensors) for a in adapters]
    union = set().union(*keys)
    if not union:
        return {}, []
    # copies of base weights that PEFT saves beside embedding adapters (save_embedding_layers): keep one
    base_copies = {k for k in union if k.endswith(".base_layer.weight")}
    out: dict[str, torch.Tensor] = {}
    for k in sorted(base_copies):
        out[k] = next(a.extra_tensors[k] for a in adapters if k in a.extra_tensors).clone()
    union -= base_copies
    if not union:
        return out, []
    missing = [(k, n) for k in sorted(union) for a, n in zip(adapters, names, strict=True) if k not in a.extra_tensors]
    if missing:
        k, n = missing[0]
        raise IncompatibleAdapters(
            f"tensor {k} (modules_to_save) is in some adapters but not in {n}; full-weight modules can only be "
            "averaged when every adapter carries them"
        )
    total = sum(weights)
    if abs(total) < 1e-12:
        raise IncompatibleAdapters("weights sum to zero, so the modules_to_save tensors cannot be averaged")
    for k in sorted(union):
        ts = [a.extra_tensors[k] for a in adapters]
        if not all(t.shape == ts[0].shape for t in ts):
            raise IncompatibleAdapters(f"tensor {k} has different shapes across adapters")
        if not ts[0].is_floating_point() or all(torch.equal(t, ts[0]) for t in ts):
            out[k] = ts[0].clone()
            continue
        acc = sum(w * t.double() for w, t in zip(weights, ts, strict=True)) / total
        out[k] = acc.to(ts[0].dtype)
    note = f"modules_to_save tensors ({len(out)}) were averaged with the normalised weights"
    return out, [note]


def combine(
    adapters: Sequence[Adapter | str | os.PathLike],
    weights: Sequence[float] | None = None,
    method: str = "linear",
    rank: int | None = None,
    energy: float | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    compute_dtype: str | torch.dtype = torch.float32,
    allow_different_base: bool = False,
    progress: bool = False,
    base: str | os.PathLike | Checkpoint | None = None,
) -> Adapter:
    """Combine adapters into one new adapter.

    Args:
        adapters: loaded :class:`Adapter` objects or adapter folders.
        weights: one weight per adapter (default: equal, summing to 1).
        method: ``linear`` (exact weighted sum), ``cat``, ``svd``, ``factor-linear`` (PEFT's linear).
        rank: output rank for ``svd`` (default: largest input rank), optional truncation for ``linear``.
        energy: keep the smallest rank per module holding this fraction of ``||delta||_F^2``
            (``svd``/``linear``), capped by ``rank`` when both are given.
        device: where the algebra runs (``cpu`` or ``cuda``).
        dtype: storage dtype of the output factors (default: the inputs' dtype when they agree, else fp32).
        compute_dtype: ``float32`` (default) or ``float64``.
        allow_different_base: accept adapters whose ``base_model_name_or_path`` differ.
        progress: show a progress bar.
        base: the base checkpoint folder (or an open :class:`~adaptermerge.io.checkpoint.Checkpoint`) the adapters
            were trained on. Needed only (1) for adapters whose ``init_lora_weights`` changed the base (PiSSA, OLoRA):
            they are converted to plain LoRA against it first (:func:`adaptermerge.convert_to_plain_lora`), and
            (2) for trained token rows (PEFT ``trainable_token_indices``) whose weights do not sum to 1: their
            combined row ``base + sum_i w_i (row_i - base)`` contains the base row. Without it such inputs are refused.

    Returns:
        The combined :class:`Adapter`; ``adapter.provenance["modules"]`` holds a per-module report
        (ranks, kept energy, and for ``factor-linear`` the relative error against the exact sum).

    Example:
        >>> import torch, adaptermerge
        >>> from adaptermerge import Adapter, LowRank
        >>> a = Adapter({"q": LowRank(torch.randn(2, 8), torch.randn(6, 2))})
        >>> b = Adapter({"q": LowRank(torch.randn(3, 8), torch.randn(6, 3))})
        >>> m = adaptermerge.combine([a, b], [0.7, 0.3], method="linear")
        >>> exact = 0.7 * a.modules["q"].delta() + 0.3 * b.modules["q"].delta()
        >>> bool(torch.allclose(m.modules["q"].delta(), exact, atol=1e-5))
        True
    """
    if not adapters:
        raise UsageError("give at least one adapter to combine")
    spec = get_method(method)
    from adaptermerge.surgery.init_conversion import plain_adapters

    loaded = plain_adapters(adapters, base=base, device=device)
    names = [str(a.source) if a.source is not None else f"adapter #{i + 1}" for i, a in enumerate(loaded)]
    w = normalize_weights(weights, len(loaded))
    if rank is not None and (int(rank) != rank or rank < 1):
        raise UsageError(f"--rank must be a positive integer, got {rank}")
    if energy is not None and not (0.0 < energy <= 1.0):
        raise UsageError(f"--energy must be in (0, 1], got {energy}")
    if spec.refactor == "none" and (rank is not None or energy is not None):
        raise UsageError(f"method {spec.name} keeps the stacked factors; --rank/--energy apply to linear and svd")
    dev = resolve_device(device)
    cdtype = resolve_dtype(compute_dtype) or torch.float32
    check_compatible(loaded, names, allow_different_base)
    out_dtype = resolve_dtype(dtype)
    if out_dtype is None:
        dts = {a.dtype for a in loaded}
        out_dtype = dts.pop() if len(dts) == 1 else torch.float32
    token_rows = _combine_tokens(loaded, w, base, out_dtype)  # cheap, and refusals come before the algebra

    module_names = sorted({m for a in loaded for m in a.modules}, key=_natural_key)
    params = {"device": dev, "compute_dtype": cdtype}
    biases: dict[str, torch.Tensor | None] = {}
    layouts: dict[str, str] = {}
    input_ranks: dict[str, list[int]] = {}
    terms_by_module: dict[str, list[tuple[float, LowRank]]] = {}
    for mod in module_names:
        terms = [(wi, a.modules[mod]) for wi, a in zip(w, loaded, strict=True) if mod in a.modules]
        terms_by_module[mod] = terms
        layouts[mod] = terms[0][1].layout
        input_ranks[mod] = [m.rank for _, m in terms]
        bs = [(wi, m.bias) for wi, m in terms if m.bias is not None]
        biases[mod] = sum(wi * b.to(dev, cdtype) for wi, b in bs) if bs else None

    results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    reports: dict[str, ModuleReport] = {}
    if spec.refactor == "none":
        for mod in module_names:
            b, a = spec.fn(terms_by_module[mod], params)
            results[mod] = (b, a)
            reports[mod] = ModuleReport(mod, input_ranks[mod], int(a.shape[0]), 1.0)
    else:
        # Batch modules whose stacked factors have equal shapes; build each chunk's stack just before
        # its QR so that memory holds the inputs, the outputs and one chunk, not a second copy of all.
        groups: dict[tuple, list[str]] = defaultdict(list)
        for mod in module_names:
            m0 = terms_by_module[mod][0][1]
            groups[(m0.B.shape[0], m0.A.shape[1], sum(input_ranks[mod]))].append(mod)
        bar = _progress(len(module_names), progress, "re-ranking modules")
        for mods in groups.values():
            for c in range(0, len(mods), BATCH):
                chunk = mods[c : c + BATCH]
                stacks = [spec.fn(terms_by_module[m], params) for m in chunk]
                fs = factored_svd(torch.stack([b for b, _ in stacks]), torch.stack([a for _, a in stacks]))
                del stacks
                for i, mod in enumerate(chunk):
                    s = fs.S[i]
                    big_r = sum(input_ranks[mod])
                    if spec.refactor == "lossless" and rank is None and energy is None:
                        scale = sum(abs(wi) * m.frobenius_norm() for wi, m in terms_by_module[mod])
                        k = numerical_rank(s, big_r, scale)
                    else:
                        k = rank if rank is not None else (max(input_ranks[mod]) if energy is None else big_r)
                        if energy is not None:
                            k = min(k, energy_rank(s, energy))
                        k = min(k, s.numel())
                    b, a = fs.factors(k, i)
                    results[mod] = (b, a)
                    reports[mod] = ModuleReport(mod, input_ranks[mod], k, kept_energy(s, k))
                    bar.update(1)
                del fs
        bar.close()

    if spec.name == "factor-linear":
        for mod, (b, a) in results.items():
            eb, ea = spec_exact_stack(terms_by_module[mod], dev, cdtype)
            exact = LowRank(A=ea, B=eb)
            diff = LowRank(A=torch.cat([a, exact.A]), B=torch.cat([b, -exact.B], dim=1))
            denom = exact.frobenius_norm()
            reports[mod].rel_error_vs_exact = diff.frobenius_norm() / denom if denom > 0 else 0.0

    modules: dict[str, LowRank] = {}
    warnings: list[str] = []
    for mod in module_names:
        b, a = results[mod]
        if a.shape[0] == 0:
            warnings.append(f"module {mod}: the combined delta is zero and was dropped")
            continue
        bias = biases[mod]
        modules[mod] = LowRank(
            A=a.to("cpu").contiguous(),
            B=b.to("cpu").contiguous(),
            layout=layouts[mod],
            bias=None if bias is None else bias.to("cpu"),
        )
    extras, notes = _combine_extras(loaded, names, w)
    warnings += notes
    if spec.name == "factor-linear":
        errs = [r.rel_error_vs_exact for r in reports.values() if r.rel_error_vs_exact is not None]
        if errs and max(errs) > 1e-3:
            warnings.append(
                f"factor-linear (PEFT's 'linear') is not the weighted sum of the deltas: relative error against the exact sum "
                f"is {sum(errs) / len(errs):.3f} on average, {max(errs):.3f} at worst; use --method linear for the exact sum"
            )
    warnings += _bias_notes(modules, module_names)
    task_types = {a.task_type for a in loaded} - {None}
    if len(task_types) > 1:
        warnings.append(f"adapters have different task types {sorted(task_types)}; the first is kept")
    mts = [m for a in loaded for m in (a.modules_to_save or [])]
    return Adapter(
        modules=modules,
        base_model=next((a.base_model for a in loaded if a.base_model), None),
        task_type=loaded[0].task_type,
        extra_tensors=extras,
        modules_to_save=sorted(set(mts)) if mts else None,
        token_rows=token_rows,
        dtype=out_dtype,
        warnings=warnings,
        provenance={
            "method": spec.name,
            "weights": w,
            "rank": rank,
            "energy": energy,
            "allow_different_base": allow_different_base,
            **({"base": _base_path(base)} if base is not None and (token_rows or _converted(loaded)) else {}),
            "inputs": [str(a.source) if a.source else None for a in loaded],
            "compute_dtype": str(cdtype).replace("torch.", ""),
            "dtype": str(out_dtype).replace("torch.", ""),
            "modules": [asdict(r) for r in (reports[m] for m in module_names)],
        },
    )


def _base_path(base: str | os.PathLike | Checkpoint) -> str:
    return str(Path(base.path if isinstance(base, Checkpoint) else base).resolve())


def _converted(loaded: Sequence[Adapter]) -> bool:
    return any("converted" in a.provenance for a in loaded)


def _bias_notes(modules: dict[str, LowRank], module_names: list[str]) -> list[str]:
    """Say what PEFT does with ``lora_bias`` when only some modules carry a bias."""
    with_bias = [m for m in module_names if m in modules and modules[m].bias is not None]
    if not with_bias or len(with_bias) == len(modules):
        return []
    return [
        f"lora_bias: {len(with_bias)} of {len(modules)} modules carry a lora_B bias (from the inputs that trained one); "
        "the config says lora_bias: true, so PEFT gives the other modules a zero bias when loading (it reports them "
        "as missing keys). PEFT's merge_and_unload, and adaptermerge merge, need a base layer with a bias for every "
        "module that carries one"
    ]


def _combine_tokens(
    loaded: Sequence[Adapter], w: list[float], base: str | os.PathLike | Checkpoint | None, dtype: torch.dtype
) -> dict:
    """The weighted sum of the inputs' trained token rows (exact for every method; see :mod:`adaptermerge.tokens`)."""
    if not any(a.token_rows for a in loaded):
        return {}
    from adaptermerge.io.tokens import check_token_modules

    every = {n: tr for a in loaded for n, tr in a.token_rows.items()}
    mts = [m for a in loaded for m in (a.modules_to_save or [])]
    check_token_modules(every, [m for a in loaded for m in a.modules], mts, "the combined adapter")
    base_rows = None
    if base is not None:
        from adaptermerge.surgery.tokens import checkpoint_rows  # maps names as merges do (surgery imports us)

        base_rows = checkpoint_rows(base if isinstance(base, Checkpoint) else open_checkpoint(base))
    return combine_token_rows([a.token_rows for a in loaded], w, base_rows, dtype)


def save_combined(result: Adapter, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a combined adapter with its model card (README.md) and replayable recipe."""
    from adaptermerge.card import combine_card
    from adaptermerge.io.adapter import save_adapter
    from adaptermerge.recipe import RECIPE_NAME, combine_recipe, dump_recipe

    inputs = [p for p in result.provenance.get("inputs", []) if p]
    check_output_path(out, inputs, overwrite=overwrite)
    recipe = combine_recipe(result)
    files = {"README.md": combine_card(result, recipe), RECIPE_NAME: dump_recipe(recipe)}
    return save_adapter(result, out, overwrite=overwrite, extra_files=files)


def spec_exact_stack(
    terms: list[tuple[float, LowRank]], dev: torch.device, cdtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B_cat, A_cat)`` of the exact weighted sum, the reference the factor-wise methods are measured against."""
    from adaptermerge.methods.basic import weighted_stack

    return weighted_stack(terms, {"device": dev, "compute_dtype": cdtype})


def _progress(total: int, enabled: bool, desc: str) -> Any:
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="module", disable=not (enabled and sys.stderr.isatty()), leave=False)
