"""Extract a LoRA adapter that approximates a fully fine-tuned checkpoint: ``tuned - base ≈ B A`` per layer.

Both checkpoints are streamed tensor by tensor. Each changed 2-D layer weight is truncated by SVD: exact
for small modules, randomized (Halko-Martinsson-Tropp range finder with power iterations) for large ones,
with an a-posteriori estimate of how far the randomized truncation is from the exact one. Changed tensors
that are not layer weights (norms, biases) go to ``modules_to_save`` or are skipped.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from adaptermerge.adapter import Adapter
from adaptermerge.cpu import single_threaded
from adaptermerge.dtypes import FLOAT_DTYPES, dtype_name, resolve_device
from adaptermerge.errors import IncompatibleAdapters, UsageError
from adaptermerge.io.adapter import PEFT_PREFIX
from adaptermerge.io.checkpoint import Checkpoint, open_checkpoint
from adaptermerge.io.files import SourceFiles
from adaptermerge.io.stream import read_tensor
from adaptermerge.lowrank import LowRank, energy_rank
from adaptermerge.surgery.arch import weight_layouts

RANDOMIZED_MIN_DIM = 1024  # use the randomized SVD when min(out, in) is at least this
OVERSAMPLE = 10
POWER_ITERS = 4


@dataclass
class ExtractedModule:
    name: str
    rank: int
    kept_energy: float
    rel_residual: float  # ||D - BA||_F / ||D||_F
    svd: str  # "exact" or "randomized"
    energy_gap_estimate: float | None = None  # kept energy of a refined randomized pass minus ours


@dataclass
class ExtractReport:
    modules: list[ExtractedModule] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    unchanged: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _randomized_range(d: torch.Tensor, q: int, niter: int, gen: torch.Generator) -> torch.Tensor:
    """Orthonormal basis (m x q) of an approximate dominant range of ``d`` (power iterations, re-orthonormalised)."""
    omega = torch.randn(d.shape[1], q, generator=gen, dtype=d.dtype).to(d.device)
    y, _ = torch.linalg.qr(d @ omega)
    for _ in range(niter):
        z, _ = torch.linalg.qr(d.T @ y)
        y, _ = torch.linalg.qr(d @ z)
    return y


def truncated_svd(
    d: torch.Tensor, rank: int | None, energy: float | None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str, float | None]:
    """``(U_k, S_k, Vh_k, kind, gap)`` for the truncation of ``d`` by rank and/or energy.

    Randomized for large matrices: sketch ``q = k + oversample`` columns (grown until the energy target
    is met), ``POWER_ITERS`` power iterations; ``gap`` estimates the kept-energy shortfall against the
    exact truncation by a refined pass (two more power iterations, twice the oversampling).
    """
    m, n = d.shape
    full = min(m, n)
    total = float((d.double() ** 2).sum())
    gen = torch.Generator().manual_seed(seed)
    k_cap = min(rank or full, full)
    if full < RANDOMIZED_MIN_DIM or k_cap + OVERSAMPLE > full // 4:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        k = k_cap if energy is None else min(k_cap, energy_rank(s, energy))
        return u[:, :k], s[:k], vh[:k], "exact", None

    def sketch(q: int, niter: int):
        basis = _randomized_range(d, q, niter, gen)
        ub, s, vh = torch.linalg.svd(basis.T @ d, full_matrices=False)
        return basis @ ub, s, vh

    q = (rank if rank is not None else 32) + OVERSAMPLE
    while True:
        u, s, vh = sketch(min(q, full), POWER_ITERS)
        if energy is None:
            k = k_cap
            break
        cum = torch.cumsum(s.double() ** 2, 0) / max(total, 1e-300)
        hit = int((cum >= energy - 1e-12).nonzero()[0]) + 1 if bool((cum >= energy - 1e-12).any()) else None
        if hit is not None or q >= full // 4:
            k = min(k_cap, hit if hit is not None else len(s))
            break
        q *= 2
    if q >= full // 4 and energy is not None and float(torch.sum(s[:k].double() ** 2)) < energy * total - 1e-9 * total:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        k = min(k_cap, energy_rank(s, energy))
        return u[:, :k], s[:k], vh[:k], "exact", None
    _, s2, _ = sketch(min(2 * k + 2 * OVERSAMPLE, full), POWER_ITERS + 2)
    e1 = float(torch.sum(s[:k].double() ** 2)) / total if total else 1.0
    e2 = float(torch.sum(s2[:k].double() ** 2)) / total if total else 1.0
    return u[:, :k], s[:k], vh[:k], "randomized", max(0.0, e2 - e1)


@dataclass
class _Extraction:
    """What extraction collects while it walks the two checkpoints."""

    modules: dict[str, LowRank] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    to_save: set[str] = field(default_factory=set)
    dtypes: set[torch.dtype] = field(default_factory=set)
    biases: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> tuned bias (decided after the walk)
    report: ExtractReport = field(default_factory=ExtractReport)


def extract_lora(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    rank: int | None = None,
    energy: float | None = None,
    skip_undecomposable: bool = False,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> tuple[Adapter, ExtractReport]:
    """An adapter whose deltas approximate ``tuned - base``, and a per-module report.

    Args:
        base, tuned: checkpoint folders with the same tensor names and shapes.
        rank: rank per module (cap when ``energy`` is given too).
        energy: smallest rank per module keeping this fraction of ``||tuned - base||_F^2``.
        skip_undecomposable: skip changed tensors that are not 2-D layer weights (norms, biases) instead
            of putting their modules in ``modules_to_save``.
        device: where the SVDs run.
        dtype: storage dtype of the adapter (default: the checkpoint's dtype).
        progress: show a progress bar.

    Raises:
        IncompatibleAdapters: the checkpoints do not have the same tensors and shapes.
        UnsupportedArchitecture: transformers cannot build the model class ``config.json`` names, so the
            layer kinds (Linear, Conv1D, Embedding) are unknown.
    """
    if rank is None and energy is None:
        raise UsageError("give `rank` K or `energy` F (or both)")
    if rank is not None and rank < 1:
        raise UsageError("`rank` must be a positive integer")
    dev = resolve_device(device)
    cb, ct = _open_pair(base, tuned)
    layers = weight_layouts(cb)
    layers.require_known("extract")  # a Conv1D weight's delta is transposed: never guessed from names
    ex = _Extraction()
    _decompose(cb, ct, layers.kinds, ex, rank, energy, skip_undecomposable, dev, progress)
    _carry_biases(ex, skip_undecomposable)
    _tie_head(cb, layers.head_key, ex)
    _copy_saved_modules(ct, layers.kinds, ex)
    if ex.report.skipped:
        ex.report.warnings.append(
            f"skipped {len(ex.report.skipped)} changed tensors that are not layer weights (e.g. {ex.report.skipped[0]})"
        )
    if not ex.modules and not ex.extra:
        raise IncompatibleAdapters("the checkpoints are identical: there is nothing to extract")
    return _adapter(cb, base, tuned, ex, rank, energy, skip_undecomposable, dtype), ex.report


def _open_pair(base: str | os.PathLike, tuned: str | os.PathLike) -> tuple[Checkpoint, Checkpoint]:
    cb, ct = open_checkpoint(base), open_checkpoint(tuned)
    diff = sorted(set(cb.weight_map) ^ set(ct.weight_map))
    if diff:
        raise IncompatibleAdapters(
            f"the checkpoints hold different tensors (e.g. {diff[0]}); extract needs the same architecture"
        )
    return cb, ct


def _decompose(
    cb: Checkpoint,
    ct: Checkpoint,
    layouts: dict[str, str],
    ex: _Extraction,
    rank: int | None,
    energy: float | None,
    skip: bool,
    dev: torch.device,
    progress: bool,
) -> None:
    """Walk both checkpoints tensor by tensor: a changed layer weight becomes a truncated SVD, a changed layer
    bias is kept for :func:`_carry_biases`, any other changed tensor marks its module for modules_to_save."""
    from adaptermerge.progress import bar as progress_bar

    names = list(cb.weight_map)
    bar = progress_bar(len(names), "extracting", "tensor", progress)
    with SourceFiles(cb.path) as fb, SourceFiles(ct.path) as ft:
        for name in names:
            bar.update(1)
            ib, it = cb.info(name), ct.info(name)
            if ib.shape != it.shape or ib.dtype != it.dtype:
                raise IncompatibleAdapters(
                    f"tensor {name}: {ib.dtype}{list(ib.shape)} in base but {it.dtype}{list(it.shape)} in tuned"
                )
            wb, wt = read_tensor(fb.get(cb.weight_map[name]), ib), read_tensor(ft.get(ct.weight_map[name]), it)
            if torch.equal(wb, wt):
                ex.report.unchanged += 1
                continue
            if ib.dtype not in FLOAT_DTYPES:
                raise IncompatibleAdapters(
                    f"tensor {name} ({ib.dtype}) differs between the checkpoints; only floating weights can be extracted"
                )
            ex.dtypes.add(wb.dtype)
            if name in layouts:
                _decompose_layer(name, layouts[name], wb, wt, ex, rank, energy, dev)
            elif name.endswith(".bias") and name[: -len(".bias")] + ".weight" in layouts and len(ib.shape) == 1:
                ex.biases[name[: -len(".bias")]] = wt.clone()
            elif skip:
                ex.report.skipped.append(name)
            else:
                ex.to_save.add(name.rsplit(".", 1)[0])
                ex.report.modules_to_save.append(name)
    bar.close()


def _decompose_layer(
    name: str,
    layout: str,
    wb: torch.Tensor,
    wt: torch.Tensor,
    ex: _Extraction,
    rank: int | None,
    energy: float | None,
    dev: torch.device,
) -> None:
    """One changed layer weight as LoRA factors: the truncated SVD of ``tuned - base`` (in the Linear layout)."""
    d = wt.to(dev, torch.float32) - wb.to(dev, torch.float32)
    dc = d.T if layout == "conv1d" else d
    small = min(dc.shape) < RANDOMIZED_MIN_DIM
    with single_threaded() if small else contextlib.nullcontext():  # small LAPACK calls: threads only wait
        u, s, vh, kind, gap = truncated_svd(dc, rank, energy)
    root = torch.sqrt(s)
    module = name[: -len(".weight")]
    ex.modules[module] = LowRank(A=(root.unsqueeze(1) * vh).cpu(), B=(u * root).cpu(), layout=layout)
    resid = float((dc - u @ torch.diag(s) @ vh).norm() / max(float(dc.norm()), 1e-30))
    spec_full = float((dc.double() ** 2).sum())
    ke = float((s.double() ** 2).sum()) / spec_full if spec_full else 1.0
    ex.report.modules.append(ExtractedModule(module, int(s.numel()), min(ke, 1.0), resid, kind, gap))


def _carry_biases(ex: _Extraction, skip: bool) -> None:
    """A changed bias of a decomposed layer travels as PEFT's bias="lora_only" does: the tuned bias saved as
    <module>.base_layer.bias (works beside embedding LoRA, unlike lora_bias, which PEFT refuses there)."""
    for module, tuned_bias in ex.biases.items():
        lr = ex.modules.get(module)
        if lr is not None and lr.layout in ("linear", "conv1d"):
            ex.extra[PEFT_PREFIX + module + ".base_layer.bias"] = tuned_bias
        elif skip:
            ex.report.skipped.append(module + ".bias")
        else:  # the weight did not change: keep the whole module
            ex.to_save.add(module)
            ex.report.modules_to_save.append(module + ".bias")
    if any(k.endswith(".base_layer.bias") for k in ex.extra):
        ex.report.warnings.append(
            "changed layer biases are saved as PEFT bias='lora_only' tensors (vLLM refuses bias != 'none')"
        )


def _tie_head(cb: Checkpoint, head: str | None, ex: _Extraction) -> None:
    """A head that transformers ties to the input embedding (the same tie groups the merge uses) changed with
    it; PEFT does not propagate a LoRA on the embedding to the head, so the head gets the same delta as a Linear
    LoRA module of its own (a merge applies the pair once, through the shared tensor)."""
    from adaptermerge.surgery.arch import tie_groups

    if head is None or head in cb.weight_map:
        return
    group = next((g for g in tie_groups(cb) if head in g), None)
    emb = [k[: -len(".weight")] for k in (group or []) if k != head and k[: -len(".weight")] in ex.modules]
    if not emb or ex.modules[emb[0]].layout != "embedding":
        return
    src = ex.modules[emb[0]]
    ex.modules[head[: -len(".weight")]] = LowRank(A=src.A.clone(), B=src.B.clone(), layout="linear")
    ex.report.warnings.append(
        f"the output head is tied to {emb[0]}: its delta is also applied to {head[: -len('.weight')]}"
    )


def _copy_saved_modules(ct: Checkpoint, layouts: dict[str, str], ex: _Extraction) -> None:
    """modules_to_save copy whole modules: every parameter of those modules comes from the tuned checkpoint."""
    with SourceFiles(ct.path) as ft:
        for module in sorted(ex.to_save):
            for name in ct.weight_map:
                if name.rsplit(".", 1)[0] == module:
                    ex.extra[PEFT_PREFIX + name] = read_tensor(ft.get(ct.weight_map[name]), ct.info(name))
                    if module + ".weight" in layouts:
                        ex.modules.pop(module, None)  # the full copy supersedes the low-rank part


def _adapter(
    cb: Checkpoint,
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    ex: _Extraction,
    rank: int | None,
    energy: float | None,
    skip: bool,
    dtype: torch.dtype | None,
) -> Adapter:
    arch = (cb.config.get("architectures") or [""])[0]
    dts = set(ex.dtypes)
    out_dtype = dtype or (dts.pop() if len(dts) == 1 else torch.float32)
    return Adapter(
        modules=ex.modules,
        base_model=cb.config.get("_name_or_path") or str(Path(base).resolve()),
        task_type="CAUSAL_LM" if arch.endswith("ForCausalLM") else None,
        extra_tensors=ex.extra,
        modules_to_save=sorted(ex.to_save) or None,
        dtype=out_dtype,
        warnings=ex.report.warnings,
        provenance={
            "method": "extract",
            "base": str(Path(base).resolve()),
            "tuned": str(Path(tuned).resolve()),
            "rank": rank,
            "energy": energy,
            "skip_undecomposable": skip,
            "dtype": None if dtype is None else dtype_name(dtype),
            "modules": [asdict(m) for m in ex.report.modules],
        },
    )


def save_extracted(adapter: Adapter, report: ExtractReport, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write an extracted adapter with a model card and a recipe (``operation: extract``) that
    ``adaptermerge extract --recipe`` replays."""
    from adaptermerge import __version__
    from adaptermerge.io.adapter import save_adapter
    from adaptermerge.io.atomic import check_output_path
    from adaptermerge.outputs import base_model_text, card_metadata, front_matter
    from adaptermerge.recipe import RECIPE_NAME, dump_recipe, extract_recipe

    prov = adapter.provenance
    check_output_path(out, [prov["base"], prov["tuned"]], overwrite=overwrite)
    recipe = extract_recipe(prov)
    ranks = sorted({m.rank for m in report.modules})
    worst = min((m.kept_energy for m in report.modules), default=1.0)
    meta = card_metadata("peft", ["lora", "extract", "extracted"], adapter.base_model)
    card = "\n".join(
        [
            front_matter(meta),
            "# LoRA adapter extracted from a fine-tuned checkpoint",
            "",
            f"Made with adaptermerge {__version__}: truncated SVD of `tuned - base` per layer.",
            "",
            f"- Base: `{prov['base']}` ({base_model_text(adapter.base_model)})",
            f"- Fine-tuned: `{prov['tuned']}`",
            f"- Ranks: {ranks}; lowest kept energy {worst:.4f}",
            f"- modules_to_save: {adapter.modules_to_save or 'none'}",
            "",
            f"Reproduce: `adaptermerge extract --recipe {RECIPE_NAME} -o OUT`",
            "",
        ]
    )
    files = {"README.md": card, RECIPE_NAME: dump_recipe(recipe)}
    return save_adapter(adapter, out, overwrite=overwrite, extra_files=files)
