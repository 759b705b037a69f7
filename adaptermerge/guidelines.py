"""The rules practitioners review adapters against, and the limits of the engines that serve them: one home.

Two sources of facts live here so that ``inspect`` and ``validate`` say the same thing:

* the anti-patterns of the LoRA guidelines our users follow (alpha far above 2r, ranks far above 64, an
  adapter dtype that does not match the base's compute dtype);
* what a serving target accepts. vLLM's rules are read from its ``vllm/lora/peft_helper.py``
  (``PEFTHelper._validate_features`` and ``validate_legal``): ``max_lora_rank`` is one of
  :data:`VLLM_RANKS` (default 16) and must cover the largest rank, ``rank_pattern`` included; no LoRA bias;
  ``modules_to_save`` only for classification heads; no DoRA; none of the PEFT features listed in
  :data:`VLLM_UNSUPPORTED_FIELDS`. Older vLLM releases compute ONE scaling from the top-level ``lora_alpha / r``
  and ignore ``rank_pattern``/``alpha_pattern``; newer ones apply the patterns. An adapter whose every
  module has the top-level scaling is served correctly by both, which is what adaptermerge writes.

Each rule yields a :class:`Finding` with a stable ``code``; callers decide how loud it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # this module is read by the CLI's --help: no torch at import time
    import torch

    from adaptermerge.adapter import Adapter

ALPHA_RATIO_HIGH = 4.0  # scaling alpha/r above twice the usual "alpha = 2r" (the guidelines' bad example is 16)
ALPHA_RATIO_LOW = 0.25  # updates this small usually mean a mis-set alpha
RANK_LOW = 4  # "rank too low: poor adaptation"
RANK_HIGH = 64  # "rarely need r > 64 even for complex tasks"
RANK_EXPERIMENTAL = 128  # "128+: experimental, diminishing returns"
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # max_lora_rank values vLLM accepts
VLLM_DEFAULT_MAX_LORA_RANK = 16
VLLM_MODULES_TO_SAVE_OK = ("classifier", "score")  # heads vLLM loads from modules_to_save
SERVING_TARGETS = ("vllm", "peft", "transformers")

# PEFT features vLLM cannot serve (its PEFTHelper refuses them, or it has no code for them), with the values that
# mean "off". What adaptermerge itself models is declared in adaptermerge/io/peft_config.py.
VLLM_UNSUPPORTED_FIELDS: dict[str, tuple[tuple[Any, ...], str]] = {
    "trainable_token_indices": ((None, [], {}), "trains selected embedding rows (a token_adapter delta)"),
    "alora_invocation_tokens": ((None, []), "Activated LoRA: the adapter only acts after the invocation tokens"),
    "layer_replication": ((None, []), "duplicates base layers before adapting them"),
    "target_parameters": ((None, []), "adapts raw parameters (e.g. fused MoE experts), not modules"),
    "use_qalora": ((False, None), "QA-LoRA pools the layer inputs group-wise"),
    "use_bdlora": ((None, False, {}), "block-diagonal LoRA"),
    "megatron_config": ((None, {}), "Megatron-parallel LoRA layers"),
    "arrow_config": ((None, {}), "Arrow routing between adapters"),
    "kasa_config": ((None, {}), "a LoRA variant with its own forward"),
    "velora_config": ((None, {}), "a LoRA variant with its own forward"),
    "monteclora_config": ((None, {}), "a LoRA variant with its own forward"),
    "ensure_weight_tying": ((False, None), "ties adapter weights across tied embeddings and head"),
}


@dataclass(frozen=True)
class Finding:
    """One rule that an adapter breaks or meets.

    Attributes:
        code: stable identifier (``alpha_ratio_high``, ``vllm_bias``...), for scripts and docs.
        level: ``fail`` (the target refuses it or would compute something else), ``warn`` (an anti-pattern
            or a risk), ``note`` (worth knowing, nothing to fix).
        message: one sentence for people.
        hint: what to do about it, when something can be done.
    """

    code: str
    level: str
    message: str
    hint: str | None = None


def scaling_ratio(config: dict[str, Any]) -> float | None:
    """The top-level scaling ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), or None when not readable."""
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, (int, float)) or not isinstance(alpha, (int, float)) or r <= 0:
        return None
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def anti_patterns(adapter: Adapter, compute_dtype: torch.dtype | None = None) -> list[Finding]:
    """The guidelines' anti-patterns this adapter shows; ``compute_dtype`` (the base's) enables the dtype rule."""
    cfg = adapter.config
    ratio = scaling_ratio(cfg) if cfg else None
    out = [] if ratio is None else scaling_findings(ratio, cfg.get("lora_alpha"), cfg.get("r"))
    out += rank_findings(max((m.rank for m in adapter.modules.values()), default=0))
    if compute_dtype is not None and adapter.dtype != compute_dtype:
        out.append(
            Finding(
                "dtype_mismatch",
                "warn",
                f"adapter stored in {_dt(adapter.dtype)} but the base computes in {_dt(compute_dtype)}; the guidelines "
                "match the adapter to the compute dtype (PEFT runs the LoRA branch in the adapter's dtype)",
                f"re-save it in {_dt(compute_dtype)}: adaptermerge combine ADAPTER --dtype {_dt(compute_dtype)} -o OUT",
            )
        )
    return out


def scaling_findings(ratio: float, alpha: Any = None, r: Any = None) -> list[Finding]:
    """The alpha/r anti-patterns for a scaling ``ratio`` (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA)."""
    if ratio > ALPHA_RATIO_HIGH:
        return [
            Finding(
                "alpha_ratio_high",
                "warn",
                f"lora_alpha/r scaling is {ratio:g} (alpha={alpha}, r={r}); alpha much larger than r makes training "
                "unstable (alpha = r or 2r is usual)",
            )
        ]
    if ratio < ALPHA_RATIO_LOW:
        return [
            Finding(
                "alpha_ratio_low",
                "warn",
                f"lora_alpha/r scaling is {ratio:g}; updates this small often mean a mis-set alpha",
            )
        ]
    return []


def rank_findings(top: int) -> list[Finding]:
    """The rank anti-patterns for the largest rank ``top``."""
    if top > RANK_EXPERIMENTAL:
        return [
            Finding(
                "rank_above_128",
                "warn",
                f"rank {top} is above {RANK_EXPERIMENTAL}: experimental territory with diminishing returns "
                f"(rarely needed above {RANK_HIGH}), and it slows serving",
                "check how much of it carries energy (validate's effective rank) and shrink it: adaptermerge resize --energy 0.99",
            )
        ]
    if top > RANK_HIGH:
        return [
            Finding(
                "rank_high",
                "note",
                f"rank {top} is high: rarely needed above {RANK_HIGH}, risks overfitting and slows serving",
            )
        ]
    if 0 < top < RANK_LOW:
        return [Finding("rank_low", "note", f"rank {top} is very low: the adapter may be too weak for its task")]
    return []


def _dt(dtype: torch.dtype) -> str:
    from adaptermerge.dtypes import dtype_name

    return dtype_name(dtype)


def vllm_unsupported_fields(config: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """``(field, value, what it does)`` for every set field that vLLM cannot serve."""
    from adaptermerge.io.peft_config import changes_base

    out = [
        (k, config[k], why) for k, (off, why) in VLLM_UNSUPPORTED_FIELDS.items() if k in config and config[k] not in off
    ]
    if changes_base(config):
        out.append(("init_lora_weights", config["init_lora_weights"], "PEFT modifies the base weights at load time"))
    return out


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest ``max_lora_rank`` vLLM accepts that covers ``rank``, or None above 512."""
    return next((v for v in VLLM_RANKS if v >= rank), None)


def serving_findings(adapter: Adapter, target: str) -> list[Finding]:
    """What ``target`` (``vllm``, ``peft``, ``transformers``) makes of this adapter's features (config-level)."""
    if target not in SERVING_TARGETS:
        raise ValueError(f"unknown serving target {target!r}; choose one of {', '.join(SERVING_TARGETS)}")
    if target != "vllm":
        return []  # PEFT and transformers' PEFT integration run every LoRA feature; see validation.serving
    return [*_vllm_rank(adapter), *_vllm_features(adapter), *_vllm_scaling(adapter)]


def _vllm_rank(adapter: Adapter) -> list[Finding]:
    top = max((m.rank for m in adapter.modules.values()), default=0)
    best = vllm_max_lora_rank(top)
    if best is None:
        return [
            Finding(
                "vllm_rank",
                "fail",
                f"rank {top} exceeds vLLM's largest max_lora_rank ({VLLM_RANKS[-1]})",
                f"shrink it: adaptermerge resize ADAPTER --rank {VLLM_RANKS[-1]} -o OUT, or merge it into the base "
                "(adaptermerge merge) and serve the merged checkpoint",
            )
        ]
    if top <= VLLM_DEFAULT_MAX_LORA_RANK:
        msg = f"largest rank {top}: vLLM's default max_lora_rank ({VLLM_DEFAULT_MAX_LORA_RANK}) covers it"
    else:
        msg = f"largest rank {top}: start vLLM with --max-lora-rank {best}"
    return [Finding("vllm_rank", "note", msg)]


def _vllm_features(adapter: Adapter) -> list[Finding]:
    cfg = adapter.config
    out: list[Finding] = []
    merge_hint = "merge it into the base (adaptermerge merge) and serve the merged checkpoint"
    if adapter.uses_bias or cfg.get("bias", "none") not in (None, "none") or cfg.get("lora_bias"):
        out.append(
            Finding(
                "vllm_bias",
                "fail",
                "the adapter trains biases (bias != 'none' or lora_bias); vLLM refuses them",
                merge_hint,
            )
        )
    bad = [m for m in adapter.modules_to_save or [] if m not in VLLM_MODULES_TO_SAVE_OK]
    if bad:
        out.append(
            Finding(
                "vllm_modules_to_save",
                "fail",
                f"modules_to_save {bad}: vLLM loads only classifier/score heads this way",
                merge_hint,
            )
        )
    if adapter.uses_dora or cfg.get("use_dora"):
        out.append(Finding("vllm_dora", "fail", "DoRA adapter: vLLM does not support DoRA", merge_hint))
    for name, value, why in vllm_unsupported_fields(cfg):
        out.append(Finding("vllm_unsupported", "fail", f"{name}={value!r} ({why}): vLLM refuses it", merge_hint))
    return out


def _vllm_scaling(adapter: Adapter) -> list[Finding]:
    cfg = adapter.config
    top = scaling_ratio(cfg)
    if top is None or not (cfg.get("rank_pattern") or cfg.get("alpha_pattern")):
        return []
    from adaptermerge.io.adapter import module_scaling

    differ = [n for n in adapter.modules if not math.isclose(module_scaling(cfg, n)[2], top, rel_tol=1e-6)]
    if not differ:
        return [
            Finding("vllm_scaling", "note", f"rank/alpha patterns keep the top-level scaling {top:g} on every module")
        ]
    return [
        Finding(
            "vllm_scaling",
            "fail",
            f"{len(differ)} modules (e.g. {differ[0]}) get a scaling other than the top-level lora_alpha/r = {top:g} "
            "from rank_pattern/alpha_pattern; vLLM releases that ignore the patterns would serve them wrong",
            "re-save it with the scaling folded into the factors: adaptermerge combine ADAPTER -o OUT",
        )
    ]
