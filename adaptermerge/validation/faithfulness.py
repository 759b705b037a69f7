"""Faithfulness of a merged checkpoint: the merged model against base + adapters run unmerged by PEFT.

Both models see the same probe inputs (``--probe`` prompts, or deterministic random token ids) and their
logits are compared position by position:

* ``max_rel_logit_error``: the largest ``||z_merged - z_ref||_2 / ||z_ref||_2`` over positions;
* ``kl_mean`` / ``kl_max``: ``KL(softmax(z_ref) || softmax(z_merged))`` in nats;
* ``top1_agreement``: the fraction of positions whose most likely token is the same.

Both models run in ``compute_dtype`` (float32 by default): a bf16 checkpoint is upcast, so what is measured is
the merge (W + delta rounded once to the stored dtype), not the rounding noise of bf16 matmuls, and the
verdict does not depend on the machine's kernels. The models are built one after the other (the reference's
logits are kept, the model freed), so peak memory is one model.

4-bit (bitsandbytes) checkpoints are compared as dequantized dense models: every ``Linear4bit`` that
transformers loads is replaced by an ``nn.Linear`` holding ``dequant(W4)`` computed from the format's
definition (:func:`adaptermerge.io.bnb4.dequantize`). bitsandbytes' CPU kernels are not used: on CPUs with
AVX512-BF16, bitsandbytes 0.50 repacks ``Linear4bit`` into a kernel that multiplies in bf16 (and fails when
``in_features`` is not a multiple of 64), so a comparison through it would measure the kernel. The reference for
a 4-bit merge is the QLoRA model: dequantized 4-bit base + adapters unmerged; its drift is measured against
how far the adapters move the logits.

Logits cannot tell a small change of one weight from bf16 rounding, and see only what the probes exercise. For
exact merges (dense, linear/cat), every tensor is therefore also compared with PEFT's ``merge_and_unload`` of
the same reference model, rounded to the dtype the checkpoint stores it in (``faithfulness.weights``).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adaptermerge.dtypes import ST_TO_TORCH, dtype_name
from adaptermerge.errors import UsageError
from adaptermerge.validation.base_checks import Base
from adaptermerge.validation.report import Check

# Defaults for --tolerance on max_rel_logit_error, by how the merged weights are stored (see docs/validate.md
# for the measurements behind them). An exact merge stays far below; a grossly changed weight goes far above
# (faithfulness.weights finds any change beyond rounding).
TOLERANCE = {"float32": 1e-4, "float64": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}
# faithfulness.weights: |merged - exact merge| per tensor, in units of eps(stored dtype) * max|tensor|, may reach
# ROUNDING_UNITS (two roundings to the stored dtype) plus COMPUTE_UNITS units of the compute dtype's eps (the
# order of fp32 operations differs between two correct merges: measured 2.02 units of fp32 eps for a two-adapter
# fp32 merge). A changed weight is millions of units away in fp32 and tens or more in 16 bits.
ROUNDING_UNITS = 2.0
COMPUTE_UNITS = 256.0
DRIFT_WARN_4BIT = 0.5  # warn when re-quantization moves the logits by half of what the adapters move them
PROBES, PROBE_LENGTH, PROBE_SEED = 4, 32, 0
MAX_PROBE_TOKENS = 256


@dataclass
class Probes:
    """Token id sequences both models run on, and where they came from."""

    ids: list[torch.Tensor]
    source: str


def load_probes(probe: Path | None, folders: Sequence[Path], vocab_size: int) -> Probes:
    """``--probe FILE.jsonl`` rows (``{"text"}``, ``{"prompt"}`` or ``{"input_ids"}``), or random token ids.

    Text rows are tokenized with the tokenizer found in the first of ``folders`` that has one (local files
    only). Random probes: ``PROBES`` sequences of ``PROBE_LENGTH`` ids drawn with a fixed seed.
    """
    if probe is None:
        g = torch.Generator().manual_seed(PROBE_SEED)
        lo = min(3, vocab_size - 1)  # skip the usual pad/bos/eos ids of small vocabularies
        ids = [torch.randint(lo, vocab_size, (PROBE_LENGTH,), generator=g) for _ in range(PROBES)]
        return Probes(ids, f"{PROBES} random sequences of {PROBE_LENGTH} token ids (seed {PROBE_SEED})")
    rows = _probe_rows(probe)
    tok = None
    ids = []
    for line, row in rows:
        if "input_ids" in row:
            seq = row["input_ids"]
            if not (isinstance(seq, list) and seq and all(isinstance(i, int) and 0 <= i < vocab_size for i in seq)):
                raise UsageError(f"{probe}:{line}: input_ids must be a non-empty list of ids below {vocab_size}")
            ids.append(torch.tensor(seq[:MAX_PROBE_TOKENS]))
            continue
        tok = tok or _tokenizer(folders, probe)
        enc = tok(row.get("text", row.get("prompt")), return_tensors="pt")["input_ids"][0][:MAX_PROBE_TOKENS]
        if enc.numel() == 0:
            raise UsageError(f"{probe}:{line}: the text tokenizes to nothing")
        ids.append(enc)
    return Probes(ids, f"{len(ids)} prompts from {probe}")


def _probe_rows(probe: Path) -> list[tuple[int, dict]]:
    try:
        lines = probe.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read `probe` {probe}: {e}") from None
    rows = []
    for i, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{probe}:{i}: not a JSON line ({e.msg})") from None
        ok = isinstance(row, dict) and (
            "input_ids" in row or isinstance(row.get("text"), str) or isinstance(row.get("prompt"), str)
        )
        if not ok:
            raise UsageError(
                f'{probe}:{i}: each line must be {{"text": ...}}, {{"prompt": ...}} or {{"input_ids": [...]}}'
            )
        rows.append((i, row))
    if not rows:
        raise UsageError(f"`probe` {probe} holds no prompts")
    return rows


def _tokenizer(folders: Sequence[Path], probe: Path) -> Any:
    from transformers import AutoTokenizer

    for f in folders:
        try:
            return AutoTokenizer.from_pretrained(str(f), local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError):
            continue
    raise UsageError(
        f"{probe} holds text but neither {' nor '.join(str(f) for f in folders)} has a tokenizer; "
        'add one or give token ids ({"input_ids": [...]})'
    )


def model_class(config: dict[str, Any]) -> Any:
    """The transformers class named by ``architectures`` (a causal LM when it names none or an unknown one)."""
    import transformers

    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    return cls or transformers.AutoModelForCausalLM


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No "Loading weights" bars from transformers: validate reports what it loaded in its own checks."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_model(ck: Base, dtype: torch.dtype, cls: Any = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A checkpoint as a dense model in ``dtype`` (4-bit weights dequantized), with transformers' loading info."""
    with quiet_loading():
        return _load_model(ck, dtype, cls or model_class(ck.ckpt.config))


def _load_model(ck: Base, dtype: torch.dtype, cls: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    if not ck.groups:
        model, info = cls.from_pretrained(str(ck.path), dtype=dtype, output_loading_info=True)
        return model.eval(), info
    model, info = cls.from_pretrained(str(ck.path), device_map="cpu", output_loading_info=True)
    _dequantize_modules(model, ck)
    _forget_quantization(model)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.data = t.data.to(dtype)
    return model.eval(), info


def _dequantize_modules(model: torch.nn.Module, ck: Base) -> None:
    """Replace every bitsandbytes ``Linear4bit`` by an ``nn.Linear`` holding ``dequant(W4)`` from the file."""
    import bitsandbytes as bnb

    from adaptermerge.io import bnb4
    from adaptermerge.io.stream import read_tensor

    prefix = getattr(model, "base_model_prefix", "") + "."
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, bnb.nn.Linear4bit):
            continue
        key = next(k for k in (name + ".weight", name.removeprefix(prefix) + ".weight", prefix + name + ".weight")
                   if k in ck.groups)  # fmt: skip
        tensors = {}
        for m in ck.groups[key]:
            with open(ck.path / ck.ckpt.weight_map[m], "rb") as fh:
                tensors[m] = read_tensor(fh, ck.ckpt.info(m))
        dense = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
        dense.weight = torch.nn.Parameter(bnb4.dequantize(tensors, key).reshape(mod.out_features, mod.in_features))
        if mod.bias is not None:
            dense.bias = torch.nn.Parameter(mod.bias.detach().float())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, dense)


def _forget_quantization(model: torch.nn.Module) -> None:
    """Once every ``Linear4bit`` is dense, the model is a plain one: transformers and PEFT must treat it so
    (transformers refuses ``.to(dtype)`` on a model it loaded quantized, PEFT dispatches on these flags)."""
    for attr in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if hasattr(model, attr):
            setattr(model, attr, False)
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def reference_model(
    base: Base, adapters: Sequence[Path], weights: Sequence[float], dtype: torch.dtype, cls: Any
) -> torch.nn.Module:
    """Base + adapters unmerged in PEFT: all adapters active at once, each one's scaling multiplied by its weight."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model, _ = load_model(base, dtype, cls)
    pm = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="a0")
    names = ["a0"]
    for i, a in enumerate(adapters[1:], start=1):
        pm.load_adapter(str(a), adapter_name=f"a{i}")
        names.append(f"a{i}")
    if len(names) > 1:
        pm.base_model.set_adapter(names)
    for mod in pm.modules():
        if isinstance(mod, LoraLayer):
            for n, w in zip(names, weights, strict=True):
                if n in mod.scaling:
                    mod.scaling[n] *= w
    return pm.to(dtype).eval()


@torch.no_grad()
def run(model: torch.nn.Module, probes: Probes) -> list[torch.Tensor]:
    """Logits (float64) of each probe sequence, run one sequence at a time (no padding to get wrong)."""
    return [model(input_ids=ids.unsqueeze(0)).logits[0].double() for ids in probes.ids]


def compare(ref: Sequence[torch.Tensor], got: Sequence[torch.Tensor]) -> dict[str, float]:
    """The faithfulness figures of ``got`` against ``ref`` (per position, over the last dimension)."""
    z_r = torch.cat([r.reshape(-1, r.shape[-1]) for r in ref])
    z_m = torch.cat([g.reshape(-1, g.shape[-1]) for g in got])
    rel = (z_m - z_r).norm(dim=-1) / z_r.norm(dim=-1).clamp_min(1e-30)
    lp_r, lp_m = torch.log_softmax(z_r, -1), torch.log_softmax(z_m, -1)
    kl = (lp_r.exp() * (lp_r - lp_m)).sum(-1).clamp_min(0.0)
    return {
        "positions": int(z_r.shape[0]),
        "max_rel_logit_error": float(rel.max()),
        "mean_rel_logit_error": float(rel.mean()),
        "max_abs_logit_error": float((z_m - z_r).abs().max()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1_agreement": float((z_r.argmax(-1) == z_m.argmax(-1)).double().mean()),
    }


def default_tolerance(merged: Base) -> float:
    """The default tolerance for a dense merged checkpoint: by the dtype most of its floating tensors use."""
    from adaptermerge.dtypes import dtype_name

    sizes: dict[str, int] = {}
    for k in merged.ckpt.weight_map:
        info = merged.ckpt.info(k)
        dt = dtype_name(ST_TO_TORCH[info.dtype])
        if dt in TOLERANCE:
            sizes[dt] = sizes.get(dt, 0) + info.numel
    return max(TOLERANCE[d] for d in sizes) if sizes else TOLERANCE["float32"]


def check_faithfulness(
    merged: Base,
    base: Base,
    adapters: Sequence[Path],
    weights: Sequence[float],
    probes: Probes,
    tolerance: float | None,
    compute_dtype: torch.dtype = torch.float32,
    method: str | None = None,
) -> list[Check]:
    """checkpoint.loads, faithfulness.logits (against the unmerged model) and, for exact dense merges,
    faithfulness.weights (every tensor against PEFT's merge of the same inputs, rounded to the stored dtypes)."""
    cls = model_class(merged.ckpt.config)
    exact = not merged.groups and method in (None, "linear", "cat")
    try:
        ref_logits, weight_figures, base_logits = _reference_logits(
            base, merged, adapters, weights, probes, compute_dtype, cls, exact
        )
    except Exception as e:  # noqa: BLE001 - PEFT/transformers refusals become a check, not a traceback
        return [
            Check(
                "faithfulness.logits", "fail",
                f"the unmerged reference (base + adapters in PEFT) could not be built: {' '.join(str(e).split())[:300]}",
                hint="check that the adapters load on this base with PEFT",
            )
        ]  # fmt: skip
    try:
        model, info = load_model(merged, compute_dtype, cls)
        got = run(model, probes)
    except Exception as e:  # noqa: BLE001 - an unloadable checkpoint is a failed check, not a traceback
        return [Check("checkpoint.loads", "fail", f"transformers cannot load or run it: {' '.join(str(e).split())[:300]}")]  # fmt: skip
    del model
    gc.collect()
    common = {
        "probes": probes.source,
        "compute_dtype": dtype_name(compute_dtype),
        "weights": list(weights),
    }
    figures = {**compare(ref_logits, got), **common}
    if base_logits is not None:
        figures.update(drift_figures(base_logits, ref_logits, got))
    logits = _verdict(figures, merged, tolerance, method)
    checks = [_loads_check(info), logits]
    if weight_figures is not None:
        weights_check = _weights_verdict(weight_figures)
        checks.append(weights_check)
        if logits.status == "fail" and weights_check.status == "pass":
            logits.hint = MERGE_CHANGES_MEANING
    return checks


MERGE_CHANGES_MEANING = (
    "the merged weights equal the reference merge of these inputs (each adapter wrapper folded into its own layer, "
    "as the unmerged model uses it), yet the outputs differ: the merged architecture computes something else than "
    "base + adapters (e.g. a config the merge cannot express); serve the adapters unmerged"
)


def _reference_logits(
    base: Base, merged: Base, adapters, weights, probes: Probes, dtype: torch.dtype, cls: Any, exact: bool
) -> tuple[list[torch.Tensor], dict[str, Any] | None, list[torch.Tensor] | None]:
    """Logits of base + adapters unmerged; when ``exact``, how far ``merged``'s tensors are from PEFT's own merge
    of them rounded like ``merged``; for a 4-bit ``merged``, the logits of the base alone (the adapters' effect
    sizes the drift)."""
    ref = reference_model(base, adapters, weights, dtype, cls)
    out = run(ref, probes)
    base_only = None
    if merged.groups:
        with ref.disable_adapter():
            base_only = run(ref, probes)
    ideal = None
    if exact:
        unshare_wrapped_weights(ref)
        model = ref.merge_and_unload()
        round_like(model, merged)
        ideal = compare_weights(model, merged, dtype)
        del model
    del ref
    gc.collect()
    return out, ideal, base_only


@torch.no_grad()
def unshare_wrapped_weights(model: torch.nn.Module) -> None:
    """Give every adapter wrapper its own copy of its base weight, so that ``merge_and_unload`` folds each wrapper's
    change into that layer alone, as the unmerged model uses it.

    In a tied model the input embedding and the output head read one tensor; a LoRA (or trained token rows) on the
    embedding changes only the embedding's use of it. PEFT's merge writes into the shared tensor, so the head
    changes too (twice over with ``ensure_weight_tying``); with the copies, the reference is the trained model.
    """
    for mod in model.modules():
        base = getattr(mod, "base_layer", None)
        w = getattr(base, "weight", None)
        if isinstance(w, torch.nn.Parameter) and w.device.type != "meta":
            base.weight = torch.nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)


def drift_figures(
    base: Sequence[torch.Tensor], ref: Sequence[torch.Tensor], got: Sequence[torch.Tensor]
) -> dict[str, float]:
    """How far a 4-bit merge moved the logits, measured against how far the adapters move them.

    ``adapter_effect``: ``||Z_ref - Z_base||_F / ||Z_ref||_F``; ``drift_vs_adapter_effect``:
    ``||Z_merged - Z_ref||_F / ||Z_ref - Z_base||_F`` (over every probe position). At 1 the re-quantization
    error is as large as everything the adapters do.
    """
    zb, zr, zm = (torch.cat([t.reshape(-1, t.shape[-1]) for t in ts]) for ts in (base, ref, got))
    effect = float((zr - zb).norm())
    return {
        "adapter_effect": effect / max(float(zr.norm()), 1e-30),
        "drift_vs_adapter_effect": float((zm - zr).norm()) / effect if effect > 0 else float("inf"),
    }


@torch.no_grad()
def round_like(model: torch.nn.Module, ck: Base) -> None:
    """Round every parameter to the dtype its tensor has in ``ck`` (what a merge writing that checkpoint does)."""

    prefix = getattr(model, "base_model_prefix", "") + "."
    keys = set(ck.ckpt.weight_map)
    for name, param in model.named_parameters():
        key = next((k for k in (name, name.removeprefix(prefix), prefix + name) if k in keys), None)
        if key is None or not param.is_floating_point():
            continue
        stored = ST_TO_TORCH[ck.ckpt.info(key).dtype]
        if stored.is_floating_point and stored != param.dtype:
            param.copy_(param.to(stored).to(param.dtype))


def _loads_check(info: dict[str, Any]) -> Check:
    missing, unexpected = sorted(info.get("missing_keys", [])), sorted(info.get("unexpected_keys", []))
    figures = {"missing_keys": missing, "unexpected_keys": unexpected}
    if missing:
        return Check("checkpoint.loads", "fail", f"transformers finds no weight for {len(missing)} parameters (first: {missing[0]})", figures)  # fmt: skip
    if unexpected:
        return Check("checkpoint.loads", "warn", f"transformers ignores {len(unexpected)} tensors (first: {unexpected[0]})", figures)  # fmt: skip
    return Check("checkpoint.loads", "pass", "transformers loads it with no missing or unexpected weights", figures)


def _verdict(figures: dict[str, Any], merged: Base, tolerance: float | None, method: str | None) -> Check:
    err = figures["max_rel_logit_error"]
    summary = (
        f"max relative logit error {err:.3g}, KL {figures['kl_mean']:.3g} nats (max {figures['kl_max']:.3g}), "
        f"top-1 agreement {figures['top1_agreement']:.1%} over {figures['positions']} positions"
    )
    lossy = f" (method {method} approximates the exact sum)" if method not in (None, "linear", "cat") else ""
    if merged.groups and tolerance is None:  # 4-bit: drift against the QLoRA model, a warning, never a failure
        figures["drift_warn"] = DRIFT_WARN_4BIT
        ratio = figures["drift_vs_adapter_effect"]
        msg = (
            f"4-bit merge vs the unmerged QLoRA model (dequantized, kernel-independent): {summary}; "
            f"the drift is {ratio:.2f}x the adapters' own effect on the logits"
        )
        if not ratio <= DRIFT_WARN_4BIT:
            return Check("faithfulness.logits", "warn", msg + "; re-quantization moved the model by a large part of what the adapters do", figures,
                         hint="merge with --dequantize for an exact 16-bit model, or --optimize-scales to reduce the drift")  # fmt: skip
        return Check("faithfulness.logits", "pass", msg, figures)
    tol = tolerance if tolerance is not None else default_tolerance(merged)
    figures["tolerance"] = tol
    if not math.isfinite(err) or err > tol:
        return Check("faithfulness.logits", "fail", f"{summary}: beyond the tolerance {tol:g}{lossy}", figures,
                     hint="the merged weights are not base + adapters: re-run the merge from the same inputs, or validate with the adapters and weights it was made from")  # fmt: skip
    return Check("faithfulness.logits", "pass", f"{summary}: within {tol:g}", figures)


def _weights_verdict(figures: dict[str, Any]) -> Check:
    worst = figures["worst"]
    what = f"{figures['tensors']} tensors against PEFT's merge of the same inputs rounded to the stored dtypes"
    if figures["shape_mismatch"]:
        return Check("faithfulness.weights", "fail", f"{figures['shape_mismatch'][0]} has another shape than PEFT's merge", figures)  # fmt: skip
    if worst is not None and not worst["error"] <= worst["allowed"]:
        return Check(
            "faithfulness.weights", "fail",
            f"{worst['tensor']}{worst['index']} is {worst['merged']:.6g} where the merge gives {worst['expected']:.6g} "
            f"({worst['error']:.3g} x eps * max|W|, rounding explains up to {worst['allowed']:.3g}; "
            f"{figures['differing']} tensors differ)",
            figures, hint="a weight was changed after the merge, or it was merged from other adapters or weights: re-run the merge",
        )  # fmt: skip
    err = "no difference" if worst is None else f"largest difference {worst['error']:.3g} x eps * max|W|"
    return Check("faithfulness.weights", "pass", f"{what}: {err} (rounding only)", figures)


@torch.no_grad()
def compare_weights(model: torch.nn.Module, ck: Base, compute_dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Every floating tensor of ``ck`` against ``model``'s parameter of the same name, read one at a time.

    A tensor's error is ``max|merged - expected| / (eps(stored) * max|expected|)``; it may reach
    ``ROUNDING_UNITS + COMPUTE_UNITS * eps(compute) / eps(stored)``. The scale is the tensor's largest value, not
    each element's own, so a sum that cancels to nearly zero is not held to a relative precision that no
    computation has; an element changed by more than rounding still stands out by orders of magnitude.
    """
    from adaptermerge.io.stream import read_tensor
    from adaptermerge.surgery.arch import tie_groups

    prefix = getattr(model, "base_model_prefix", "") + "."
    keys = set(ck.ckpt.weight_map)
    # a member of a tied group that the checkpoint does not store is loaded as the stored member
    alias = {
        k: next(m for m in g if m in keys) for g in tie_groups(ck.ckpt) if set(g) & keys for k in g if k not in keys
    }
    worst: dict[str, Any] | None = None
    shape_mismatch, differing, compared = [], 0, 0
    for name, t in model.state_dict().items():
        key = next((k for k in (name, name.removeprefix(prefix), prefix + name) if k in keys or k in alias), None)
        if key is None or not t.is_floating_point():
            continue
        key = alias.get(key, key)
        info = ck.ckpt.info(key)
        with open(ck.path / ck.ckpt.weight_map[key], "rb") as fh:
            got = read_tensor(fh, info).double()
        if tuple(got.shape) != tuple(t.shape):
            shape_mismatch.append(key)
            continue
        want = t.double()
        diff = (got - want).abs()
        compared += 1
        top = float(diff.max()) if diff.numel() else 0.0
        if top == 0.0:
            continue
        differing += 1
        eps = torch.finfo(ST_TO_TORCH[info.dtype]).eps
        allowed = ROUNDING_UNITS + COMPUTE_UNITS * torch.finfo(compute_dtype).eps / eps
        err = top / (eps * max(float(want.abs().max()), torch.finfo(torch.float32).tiny))
        if worst is None or not err / allowed <= worst["error"] / worst["allowed"]:
            i = int(diff.reshape(-1).argmax())
            idx = [int(x) for x in torch.unravel_index(torch.tensor(i), diff.shape)] if diff.ndim else []
            worst = {"tensor": key, "index": idx, "merged": float(got.reshape(-1)[i]),
                     "expected": float(want.reshape(-1)[i]), "error": err, "allowed": allowed}  # fmt: skip
    return {"tensors": compared, "differing": differing, "worst": worst, "shape_mismatch": shape_mismatch}
