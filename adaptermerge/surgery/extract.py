"""Extract a LoRA adapter that approximates a fully fine-tuned checkpoint: ``tuned - base ≈ B A`` per layer.

Both checkpoints are streamed tensor by tensor. Each changed 2-D layer weight is truncated by SVD: exact
for small modules, randomized (Halko-Martinsson-Tropp range finder with power iterations) for large ones,
with an a-posteriori estimate of how far the randomized truncation is from the exact one. Changed tensors
that are not layer weights (norms, biases) go to ``modules_to_save`` or are skipped.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from adaptermerge.adapter import Adapter
from adaptermerge.dtypes import FLOAT_DTYPES, dtype_name, resolve_device
from adaptermerge.errors import IncompatibleAdapters, UsageError
from adaptermerge.io.adapter import PEFT_PREFIX
from adaptermerge.io.checkpoint import open_checkpoint
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
    cb, ct = open_checkpoint(base), open_checkpoint(tuned)
    kb, kt = set(cb.weight_map), set(ct.weight_map)
    if kb != kt:
        diff = sorted(kb ^ kt)
        raise IncompatibleAdapters(
            f"the checkpoints hold different tensors (e.g. {diff[0]}); extract needs the same architecture"
        )
    layers = weight_layouts(cb)
    layers.require_known("extract")  # a Conv1D weight's delta is transposed: never guessed from names
    layouts, head = layers.kinds, layers.head_key
    report = ExtractReport()
    modules: dict[str, LowRank] = {}
    extra: dict[str, torch.Tensor] = {}
    to_save: set[str] = set()
    dtypes = set()
    from tqdm.auto import tqdm

    handles: dict[tuple[str, str], Any] = {}

    def fh(ckpt, f):
        key = (str(ckpt.path), f)
        if key not in handles:
            handles[key] = open(ckpt.path / f, "rb")  # noqa: SIM115
        return handles[key]

    names = list(cb.weight_map)
    bias_deltas: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(names), unit="tensor", desc="extracting", disable=not (progress and sys.stderr.isatty()))
    try:
        for name in names:
            bar.update(1)
            ib, it = cb.info(name), ct.info(name)
            if ib.shape != it.shape or ib.dtype != it.dtype:
                raise IncompatibleAdapters(
                    f"tensor {name}: {ib.dtype}{list(ib.shape)} in base but {it.dtype}{list(it.shape)} in tuned"
                )
            wb = read_tensor(fh(cb, cb.weight_map[name]), ib)
            wt = read_tensor(fh(ct, ct.weight_map[name]), it)
            if torch.equal(wb, wt):
                report.unchanged += 1
                continue
            if ib.dtype not in FLOAT_DTYPES:
                raise IncompatibleAdapters(
                    f"tensor {name} ({ib.dtype}) differs between the checkpoints; only floating weights can be extracted"
                )
            dtypes.add(wb.dtype)
            if name in layouts:
                layout = layouts[name]
                d = wt.to(dev, torch.float32) - wb.to(dev, torch.float32)
                dc = d.T if layout == "conv1d" else d
                u, s, vh, kind, gap = truncated_svd(dc, rank, energy)
                root = torch.sqrt(s)
                lr = LowRank(A=(root.unsqueeze(1) * vh).cpu(), B=(u * root).cpu(), layout=layout)
                module = name[: -len(".weight")]
                modules[module] = lr
                resid = float((dc - u @ torch.diag(s) @ vh).norm() / max(float(dc.norm()), 1e-30))
                spec_full = float((dc.double() ** 2).sum())
                ke = float((s.double() ** 2).sum()) / spec_full if spec_full else 1.0
                report.modules.append(ExtractedModule(module, int(s.numel()), min(ke, 1.0), resid, kind, gap))
            elif name.endswith(".bias") and name[: -len(".bias")] + ".weight" in layouts and len(ib.shape) == 1:
                # a layer's bias: carried the way PEFT's bias="lora_only" saves it (decided after the loop)
                bias_deltas[name[: -len(".bias")]] = wt.clone()
            else:
                module = name.rsplit(".", 1)[0]
                if skip_undecomposable:
                    report.skipped.append(name)
                    continue
                to_save.add(module)
                report.modules_to_save.append(name)
    finally:
        bar.close()
        for h in handles.values():
            h.close()
    # A changed bias of a decomposed layer travels as PEFT's bias="lora_only" does: the tuned bias saved as
    # <module>.base_layer.bias (works beside embedding LoRA, unlike lora_bias, which PEFT refuses there).
    for module, tuned_bias in bias_deltas.items():
        lr = modules.get(module)
        if lr is not None and lr.layout in ("linear", "conv1d"):
            extra[PEFT_PREFIX + module + ".base_layer.bias"] = tuned_bias
        elif skip_undecomposable:
            report.skipped.append(module + ".bias")
        else:  # the weight did not change: keep the whole module
            to_save.add(module)
            report.modules_to_save.append(module + ".bias")
    if any(k.endswith(".base_layer.bias") for k in extra):
        report.warnings.append(
            "changed layer biases are saved as PEFT bias='lora_only' tensors (vLLM refuses bias != 'none')"
        )
    # tied output head: PEFT does not propagate a LoRA on the input embedding to the head, so the head gets
    # the same delta as a Linear LoRA module of its own
    tied = bool(cb.config.get("tie_word_embeddings", True))
    if tied and head is not None and head not in cb.weight_map:
        vocab = cb.config.get("vocab_size")
        emb = [m for m, lr in modules.items() if lr.layout == "embedding" and lr.shape[0] == vocab]
        if emb:
            src = modules[emb[0]]
            modules[head[: -len(".weight")]] = LowRank(A=src.A.clone(), B=src.B.clone(), layout="linear")
            report.warnings.append(
                f"the output head is tied to {emb[0]}: its delta is also applied to {head[: -len('.weight')]}"
            )
    # modules_to_save copy whole modules: every parameter of those modules comes from the tuned checkpoint
    for module in sorted(to_save):
        for name in names:
            if name.rsplit(".", 1)[0] == module:
                with open(ct.path / ct.weight_map[name], "rb") as f:
                    extra[PEFT_PREFIX + name] = read_tensor(f, ct.info(name))
                if module + ".weight" in layouts:
                    modules.pop(module, None)  # the full copy supersedes the low-rank part
    if report.skipped:
        report.warnings.append(
            f"skipped {len(report.skipped)} changed tensors that are not layer weights (e.g. {report.skipped[0]})"
        )
    if not modules and not extra:
        raise IncompatibleAdapters("the checkpoints are identical: there is nothing to extract")
    if (
        head is not None
        and head[: -len(".weight")] in modules
        and "tie_word_embeddings" in cb.config
        and cb.config["tie_word_embeddings"]
    ):
        report.warnings.append("the output head is tied to the embeddings; its delta was extracted separately")
    arch = (cb.config.get("architectures") or [""])[0]
    out_dtype = dtype or (dtypes.pop() if len(dtypes) == 1 else torch.float32)
    adapter = Adapter(
        modules=modules,
        base_model=cb.config.get("_name_or_path") or str(Path(base).resolve()),
        task_type="CAUSAL_LM" if arch.endswith("ForCausalLM") else None,
        extra_tensors=extra,
        modules_to_save=sorted(to_save) or None,
        dtype=out_dtype,
        warnings=report.warnings,
        provenance={
            "method": "extract",
            "base": str(Path(base).resolve()),
            "tuned": str(Path(tuned).resolve()),
            "rank": rank,
            "energy": energy,
            "skip_undecomposable": skip_undecomposable,
            "dtype": None if dtype is None else dtype_name(dtype),
            "modules": [asdict(m) for m in report.modules],
        },
    )
    return adapter, report


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
