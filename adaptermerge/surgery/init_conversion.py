"""PiSSA, OLoRA and the other base-changing initialisations, turned into plain LoRA adapters.

PEFT's ``init_lora_weights`` = ``pissa``, ``pissa_niter_K``, ``olora``, ``corda`` and ``lora_ga`` subtract an
initial product from each targeted base weight before training (``peft/tuners/lora/layer.py``: ``pissa_init``,
``olora_init``, ``corda_init``, ``lora_ga_init``), so the trained model is ``(W0 - s0*B0@A0) + s*B@A``, not
``W0 + s*B@A``. The plain LoRA adapter with the same function on the unchanged base has, per module,

    delta = s*B@A - s0*B0@A0        (rank 2r: A' = [s*A; s0*A0], B' = [B, -B0])

which is what PEFT's ``save_pretrained(..., path_initial_model_for_weight_conversion=INITIAL)`` writes
(``peft/tuners/lora/model.py`` ``subtract_mutated_init``: ``lora_A`` and ``lora_B`` concatenated, ``r`` and
``lora_alpha`` doubled). The init term is known exactly in one of two ways:

* recomputed from the base, where PEFT's init is a deterministic function of W0: ``pissa`` (exact SVD) and
  ``olora`` (QR), in fp32 on the Linear-layout weight, the way ``pissa_init`` / ``olora_init`` compute it;
* from the initial adapter, the folder saved right after ``get_peft_model`` and before training, which holds
  B0 and A0: for all five (``pissa_niter_K`` is a randomized SVD and CorDA/LoRA-GA are built from data, so only
  this works for them).

LoftQ replaces W0 by a dequantized quantization (not ``W0 - s*B0@A0``) and is refused. So are 4-bit bases with a
recomputed init (PEFT's ``pissa_init`` refuses quantized weights; ``olora_init`` re-quantizes the residual) and
OLoRA on GPT-2 ``Conv1D`` layers (``olora_init`` decomposes the stored ``in x out`` weight without the
``fan_in_fan_out`` transpose, which PEFT's own conversion does not undo).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from adaptermerge.adapter import Adapter
from adaptermerge.dtypes import dtype_name
from adaptermerge.errors import (
    IncompatibleAdapters,
    InvalidAdapter,
    InvalidCheckpoint,
    UnsupportedAdapter,
    UsageError,
)
from adaptermerge.io.adapter import CONFIG_NAME, load_adapter, save_adapter
from adaptermerge.io.checkpoint import Checkpoint, open_checkpoint
from adaptermerge.io.peft_config import (
    BASE_CHANGING_INITS,
    INITIAL_FACTOR_INITS,
    RECOMPUTABLE_INITS,
    changes_base,
    init_kind,
    init_refusal,
)
from adaptermerge.io.stream import read_tensor
from adaptermerge.lowrank import LowRank
from adaptermerge.outputs import adapter_usage, base_model_text, card_metadata, front_matter
from adaptermerge.recipe import RECIPE_NAME

# singular values r and r+1 closer than this (relative to the largest) make PiSSA's top-r subspace ill-defined
PISSA_GAP_WARNING = 1e-3


# ----------------------------------------------------------------------------------------------- the init terms


def pissa_term(w: torch.Tensor, r: int, s: float) -> tuple[LowRank, float]:
    """PiSSA's init term ``s*B0@A0`` of a Linear-layout weight, computed as PEFT's ``pissa_init`` does.

    fp32 ``torch.linalg.svd(full_matrices=False)``; ``B0 = V_r diag(sqrt(S_r/s))``, ``A0 = diag(sqrt(S_r/s)) Uh_r``.
    Returned in canonical form (scaling folded into A: ``B = B0``, ``A = s*A0``) with ``(S_r - S_{r+1}) / S_1``, how
    well the top-r singular subspace PiSSA takes is defined (near 0: it depends on rounding).
    """
    V, S, Uh = torch.linalg.svd(w.float(), full_matrices=False)
    root = torch.sqrt(S[:r] / s)
    gap = float((S[r - 1] - S[r]) / S[0]) if r < S.numel() and float(S[0]) > 0 else 1.0
    return LowRank(A=s * (root.unsqueeze(1) * Uh[:r]), B=V[:, :r] * root.unsqueeze(0)), gap


def olora_term(w: torch.Tensor, r: int, s: float) -> tuple[LowRank, float]:
    """OLoRA's init term ``s*Q_r@R_r`` of a Linear-layout weight, as PEFT's ``olora_init`` computes it (fp32 QR).

    A Householder QR has no ill-defined choice, so the second value (the conditioning, as for PiSSA) is 1.
    """
    Q, R = torch.linalg.qr(w.float())
    return LowRank(A=s * R[:r], B=Q[:, :r]), 1.0


TERMS = {"pissa": pissa_term, "olora": olora_term}


# ----------------------------------------------------------------------------------------------- the base


@dataclass
class _Base:
    """A base checkpoint opened once for every adapter converted against it."""

    ckpt: Checkpoint
    _layouts: dict[str, str] | None = field(default=None, repr=False)

    @property
    def layouts(self) -> dict[str, str]:
        """Weight key -> the layer type PEFT wraps (``linear``/``conv1d``/``embedding``), from the model class."""
        if self._layouts is None:
            from adaptermerge.surgery.arch import weight_layouts

            self._layouts = dict(weight_layouts(self.ckpt).kinds)
        return self._layouts

    def read(self, key: str) -> torch.Tensor:
        with open(self.ckpt.path / self.ckpt.weight_map[key], "rb") as fh:
            return read_tensor(fh, self.ckpt.info(key))


def _open_base(base: str | os.PathLike | Checkpoint | _Base) -> _Base:
    if isinstance(base, _Base):
        return base
    return _Base(base if isinstance(base, Checkpoint) else open_checkpoint(base))


def _recomputed_terms(raw: Adapter, kind: str, value: Any, base: _Base, device: torch.device) -> dict[str, LowRank]:
    """Each module's init term recomputed from the base weights, in the layout PEFT's layer sees."""
    from adaptermerge.io.checkpoint import choose_prefix_map

    ckpt = base.ckpt
    pm = choose_prefix_map(raw.modules, set(ckpt.weight_map))
    if pm is None:
        missing = next(n for n in raw.modules if f"{n}.weight" not in ckpt.weight_map)
        raise IncompatibleAdapters(
            f"adapter module {missing} has no weight in the base checkpoint {ckpt.path}; the init_lora_weights="
            f"{value!r} term can only be recomputed from the base the adapter was trained on"
        )
    strip, add = pm
    quantized = ckpt.bnb_4bit_modules()
    terms: dict[str, LowRank] = {}
    for name, lr in raw.modules.items():
        key = f"{add}{name[len(strip) :]}.weight"
        layout = _layer_layout(base.layouts.get(key), lr)
        _refuse_layer(name, kind, value, layout, key in quantized)
        info = ckpt.info(key)
        expect = replace(lr, layout=layout).weight_shape
        if tuple(info.shape) != tuple(expect):
            raise IncompatibleAdapters(
                f"module {name}: the adapter's delta has shape {list(expect)} ({layout}) but the checkpoint's {key} "
                f"has shape {list(info.shape)}; the adapter was made for a different base model"
            )
        w = base.read(key).to(device, torch.float32)
        w = w.T if layout == "conv1d" else w  # PEFT's transpose(weight, fan_in_fan_out)
        r = lr.rank
        if r > min(w.shape):
            raise InvalidAdapter(
                f"module {name}: rank {r} exceeds min{tuple(w.shape)}; PEFT cannot initialise {kind} at that rank"
            )
        if not bool(torch.isfinite(w).all()):
            raise InvalidCheckpoint(f"{ckpt.path}: {key} holds NaN or Inf; the {kind} init term cannot be computed")
        term, gap = TERMS[kind](w, r, lr.scale)
        terms[name] = replace(term.to(device="cpu"), layout=layout)
        if gap < PISSA_GAP_WARNING:
            raw.warnings.append(
                f"module {name}: singular values {r} and {r + 1} of the base weight nearly tie (gap {gap:.1e} of the "
                "largest), so PiSSA's top-r subspace, here and in PEFT's own reload, depends on rounding"
            )
    return terms


def _layer_layout(kind: str | None, lr: LowRank) -> str:
    """The layout PEFT applies: Conv1D layers are transposed whatever the config says (PEFT forces
    ``fan_in_fan_out``), Linear layers are not; unknown architectures keep the adapter's flag."""
    return kind if kind in ("linear", "conv1d", "embedding") else lr.layout


def _refuse_layer(name: str, kind: str, value: Any, layout: str, quantized: bool) -> None:
    """The cases where PEFT's init on this layer is not ``W0 - init`` with an init we compute."""
    if layout == "embedding":
        raise UnsupportedAdapter(
            f"module {name} is an embedding: PEFT has no {kind} init for embedding layers (its update_layer "
            f"raises on init_lora_weights={value!r}), so this adapter did not come from PEFT"
        )
    if quantized and kind == "pissa":
        raise UnsupportedAdapter(
            f"module {name}: the base weight is 4-bit (bitsandbytes) and PEFT's pissa_init refuses quantized weights, "
            "so the adapter was not trained on it (PiSSA's 4-bit workflow quantizes the residual model); give the "
            "16-bit base"
        )
    if quantized:
        raise UnsupportedAdapter(
            f"module {name}: the base weight is 4-bit (bitsandbytes); PEFT's olora_init re-quantizes "
            "dequant(W4) - init at load time, which adaptermerge does not reproduce bit for bit; give the 16-bit base "
            "or merge with PEFT"
        )
    if kind == "olora" and layout == "conv1d":
        raise UnsupportedAdapter(
            f"module {name} is a GPT-2 Conv1D layer: PEFT's olora_init decomposes the stored in x out weight without "
            "the fan_in_fan_out transpose (its init does not preserve the model, and PEFT's own conversion does not "
            "undo it), so the trained model has no exact plain-LoRA form; merge it with PEFT's merge_and_unload"
        )


# ----------------------------------------------------------------------------------------------- the initial adapter


def _initial_terms(raw: Adapter, kind: str, initial: str | os.PathLike | Adapter) -> dict[str, LowRank]:
    """Each module's init term ``s0*B0@A0`` read from the adapter saved right after ``get_peft_model``."""
    init = initial if isinstance(initial, Adapter) else load_adapter(initial, raw_init=True)
    where = str(init.source) if init.source is not None else "the initial adapter"
    if init.source is not None and raw.source is not None and init.source == raw.source:
        raise UsageError("`initial_adapter` is the adapter itself; give the folder saved before training")
    ikind = init_kind(init.config.get("init_lora_weights", True))
    if ikind in BASE_CHANGING_INITS and ikind != kind:
        raise IncompatibleAdapters(
            f"{where} was initialised with {ikind}, the adapter with {kind}: it is not the adapter's initial state"
        )
    if set(init.modules) != set(raw.modules):
        odd = sorted(set(init.modules) ^ set(raw.modules))[0]
        raise IncompatibleAdapters(
            f"{where} and the adapter target different modules ({odd}): it is not the adapter's initial state"
        )
    terms: dict[str, LowRank] = {}
    for name, lr in raw.modules.items():
        t = init.modules[name]
        if (t.A.shape, t.B.shape, t.layout) != (lr.A.shape, lr.B.shape, lr.layout) or not math.isclose(
            t.scale, lr.scale, rel_tol=1e-6
        ):
            raise IncompatibleAdapters(
                f"module {name}: {where} has rank {t.rank}, scaling {t.scale:g} ({t.layout}) but the adapter has rank "
                f"{lr.rank}, scaling {lr.scale:g} ({lr.layout}): it is not the adapter's initial state"
            )
        terms[name] = LowRank(A=t.A, B=t.B, layout=lr.layout)
    return terms


# ----------------------------------------------------------------------------------------------- conversion


def convert_to_plain_lora(
    adapter: str | os.PathLike | Adapter,
    base: str | os.PathLike | Checkpoint | None = None,
    initial_adapter: str | os.PathLike | Adapter | None = None,
    device: str | torch.device = "cpu",
) -> Adapter:
    """A PiSSA/OLoRA/CorDA/LoRA-GA adapter as the plain LoRA adapter with the same trained model.

    Per module ``delta = s*B@A - init`` (rank 2r), the adapter PEFT's ``save_pretrained(...,
    path_initial_model_for_weight_conversion=...)`` writes: it loads unchanged in PEFT (``init_lora_weights:
    true``), combines with other adapters and merges into the unchanged base.

    Args:
        adapter: the trained adapter folder, saved by PEFT's plain ``save_pretrained`` (unconverted).
        base: the base checkpoint folder it was trained on: the init term is recomputed from its weights exactly as
            PEFT recomputes it when it loads the adapter (``pissa``: fp32 SVD; ``olora``: fp32 QR).
        initial_adapter: instead of ``base``, the folder saved right after ``get_peft_model``, before training
            (B0, A0): the only exact source for ``pissa_niter_K``, ``corda`` and ``lora_ga``.
        device: where the SVD/QR runs.

    Raises:
        UsageError: neither or both of ``base`` and ``initial_adapter``, or an adapter that is already plain.
        UnsupportedAdapter: LoftQ; a randomised or data-dependent init without ``initial_adapter``; a 4-bit base;
            OLoRA on GPT-2 Conv1D layers.
        IncompatibleAdapters: a base or initial adapter that does not fit the adapter.

    Example:
        >>> import adaptermerge
        >>> plain = adaptermerge.convert_to_plain_lora("pissa-adapter", base="Llama-3-8B")  # doctest: +SKIP
        >>> adaptermerge.save_adapter(plain, "pissa-adapter-as-lora")  # doctest: +SKIP
    """
    if (base is None) == (initial_adapter is None):
        raise UsageError(
            "give either the base checkpoint (`base`) or the initial adapter saved before training "
            "(`initial_adapter`), exactly one"
        )
    raw = adapter if isinstance(adapter, Adapter) else load_adapter(adapter, raw_init=True)
    if changes_base(raw.config) is None:
        raise UsageError(
            f"{raw.source or 'the adapter'} is plain LoRA already (init_lora_weights="
            f"{raw.config.get('init_lora_weights', True)!r} leaves the base unchanged); nothing to convert"
        )
    return _convert(raw, base=None if base is None else _open_base(base), initial=initial_adapter, device=device)


def _convert(
    raw: Adapter, base: _Base | None, initial: str | os.PathLike | Adapter | None, device: str | torch.device
) -> Adapter:
    value = raw.config.get("init_lora_weights")
    kind = changes_base(raw.config)
    where = f"{raw.source / CONFIG_NAME}: " if raw.source is not None else ""
    if kind not in INITIAL_FACTOR_INITS or (initial is None and kind not in RECOMPUTABLE_INITS):
        raise UnsupportedAdapter(where + init_refusal(value))
    raw = replace(raw, warnings=list(raw.warnings))
    if initial is not None:
        terms = _initial_terms(raw, kind, initial)
        src: dict[str, Any] = {"initial_adapter": str(getattr(initial, "source", None) or initial)}
    else:
        from adaptermerge.dtypes import resolve_device

        terms = _recomputed_terms(raw, kind, value, base, resolve_device(device))
        src = {"base": str(base.ckpt.path)}
    modules = {
        n: replace(lr, A=torch.cat([lr.A, terms[n].A]), B=torch.cat([lr.B, -terms[n].B], dim=1), layout=terms[n].layout)
        for n, lr in raw.modules.items()
    }
    how = "recomputed from the base" if initial is None else "read from the initial adapter"
    note = f"init_lora_weights={value!r} converted to plain LoRA (init term {how}): rank r -> 2r per module"
    return replace(
        raw,
        modules=modules,
        config={**raw.config, "init_lora_weights": True},
        warnings=[*raw.warnings, note],
        provenance={
            **raw.provenance,
            "converted": {"init_lora_weights": value, **src, "trained_ranks": raw.ranks},
        },
    )


def plain_adapters(
    items: Sequence[Adapter | str | os.PathLike],
    base: str | os.PathLike | Checkpoint | None = None,
    device: str | torch.device = "cpu",
) -> list[Adapter]:
    """Adapters as plain LoRA, for combine and merge: folders are loaded, and those whose init changed the base are
    converted against ``base`` (refused without it); Adapter objects holding raw factors are refused."""
    opened: _Base | None = None
    out: list[Adapter] = []
    for item in items:
        a = item if isinstance(item, Adapter) else load_adapter(item, raw_init=True)
        kind = changes_base(a.config)
        if kind is None:
            out.append(a)
            continue
        if isinstance(item, Adapter):
            raise UnsupportedAdapter(
                f"{a.source or 'an Adapter object'} holds the raw factors of an init_lora_weights="
                f"{a.config['init_lora_weights']!r} adapter; convert it first (adaptermerge.convert_to_plain_lora)"
            )
        if base is None or kind not in RECOMPUTABLE_INITS:
            raise UnsupportedAdapter(f"{a.source / CONFIG_NAME}: {init_refusal(a.config['init_lora_weights'])}")
        opened = opened or _open_base(base)
        out.append(_convert(a, base=opened, initial=None, device=device))
    return out


# ----------------------------------------------------------------------------------------------- output


def convert_recipe(result: Adapter, dtype: torch.dtype | None) -> dict[str, Any]:
    """The recipe that replays a conversion (``adaptermerge convert --recipe FILE -o OUT``)."""
    from adaptermerge import __version__
    from adaptermerge.recipe import adapter_hashes, checkpoint_hashes

    conv = result.provenance["converted"]
    recipe: dict[str, Any] = {
        "adaptermerge_version": __version__,
        "operation": "convert",
        "init_lora_weights": conv["init_lora_weights"],
        "base_model": result.base_model,
        "dtype": None if dtype is None else dtype_name(dtype),
        "model": {"model": str(result.source), "sha256": adapter_hashes(result.source)},
    }
    if "base" in conv:
        base = Path(conv["base"])
        recipe["base"] = str(base.resolve())
        recipe["base_sha256"] = checkpoint_hashes(base)
    else:
        recipe["initial_adapter"] = {
            "model": conv["initial_adapter"],
            "sha256": adapter_hashes(conv["initial_adapter"]),
        }
    return recipe


def load_convert_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Keyword arguments for :func:`convert_to_plain_lora` (plus ``dtype``) from a convert recipe, inputs checked."""
    p = Path(path)
    try:
        r = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"cannot read recipe {p}: {' '.join(str(e).split())}") from None
    if not isinstance(r, dict) or r.get("operation") != "convert" or not isinstance(r.get("model"), dict):
        raise UsageError(f"{p} is not an adaptermerge convert recipe (operation: convert, model)")
    from adaptermerge.recipe import check_unchanged

    for entry in (r["model"], r.get("initial_adapter")):
        if entry:
            check_unchanged(entry["model"], entry.get("sha256") or {"adapter_config.json": ""})
    base = r.get("base")
    if base:
        check_unchanged(base, r.get("base_sha256"))
    return {
        "adapter": r["model"]["model"],
        "base": base,
        "initial_adapter": (r.get("initial_adapter") or {}).get("model"),
        "dtype": r.get("dtype"),
    }


def convert_card(result: Adapter, recipe: dict[str, Any]) -> str:
    """README.md for a converted adapter: Hub metadata, what was converted and how, how to replay and use it."""
    from adaptermerge import __version__

    meta = card_metadata("peft", ["lora", "converted"], result.base_model)
    source = recipe.get("base") or recipe["initial_adapter"]["model"]
    how = "recomputed from the base" if "base" in recipe else "read from the initial adapter"
    lines = [
        front_matter(meta),
        f"# Plain LoRA adapter converted from init_lora_weights={recipe['init_lora_weights']!r}",
        "",
        f"Made with adaptermerge {__version__} from `{recipe['model']['model']}`.",
        "",
        "- Per module: `delta = s*B@A - s0*B0@A0` (rank 2r), the adapter PEFT's "
        "`save_pretrained(path_initial_model_for_weight_conversion=...)` writes.",
        f"- Init term {how}: `{source}`.",
        f"- Base model: {base_model_text(result.base_model)}; it loads on the unchanged base.",
        "",
        *adapter_usage("convert"),
    ]
    return "\n".join(lines)


def save_converted(
    result: Adapter, out: str | os.PathLike, dtype: torch.dtype | None = None, overwrite: bool = False
) -> Path:
    """Write a converted adapter with its model card and replayable recipe (atomically)."""
    from adaptermerge.recipe import dump_recipe

    recipe = convert_recipe(result, dtype)
    files = {"README.md": convert_card(result, recipe), RECIPE_NAME: dump_recipe(recipe, "convert")}
    return save_adapter(result, out, overwrite=overwrite, dtype=dtype, extra_files=files)


__all__ = ["convert_to_plain_lora", "load_convert_recipe", "plain_adapters", "save_converted"]
