"""Every ``LoraConfig`` field, classified: what we model exactly, what only shaped training, what we refuse.

A merge tool that reads ``adapter_config.json`` loosely is silently wrong the day a field changes what the saved
tensors mean (PiSSA re-initialises the base at load time, aLoRA activates only after invocation tokens,
``layer_replication`` duplicates layers, KaSA inserts a diagonal between the factors). So every field is declared
here, once, with its kind:

* ``modeled``: read and honoured exactly (scaling, patterns, layouts, DoRA, biases, ...);
* ``metadata``: provenance or PEFT bookkeeping that does not change what the tensors compute;
* ``training``: shaped how the adapter was trained (dropout, an initialiser's settings) but not the trained
  function once saved;
* ``refused``: changes what the adapter computes in a way we do not model. A non-default value is refused with
  one line that names the field and says what to do; the default value is accepted.

``tests/io/test_peft_config.py`` walks the installed PEFT's ``LoraConfig`` fields and fails on any field missing
here, so a new PEFT release cannot add a silent error. A key in a config file that no rule knows (a newer PEFT,
a typo) is accepted only when its value is empty (``None``, ``False``, ``0``, ``""``, ``[]``, ``{}``).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from adaptermerge.errors import InvalidAdapter, UnsupportedAdapter
from adaptermerge.io.tokens import check_token_config

CONFIG_NAME = "adapter_config.json"


class Kind(enum.Enum):
    MODELED = "modeled"
    METADATA = "metadata"
    TRAINING = "training"
    REFUSED = "refused"


Check = Callable[[Any, dict[str, Any]], "str | None"]


def _never(value: Any, config: dict[str, Any]) -> str | None:
    return None


def _empty(value: Any) -> bool:
    return value is None or value is False or value == 0 or value in ("", [], {}, ())


@dataclass(frozen=True)
class Rule:
    """How one ``LoraConfig`` field is treated.

    Attributes:
        kind: see the module docstring.
        meaning: one line for people (docs/formats.md is generated from it).
        refuse: for ``modeled`` fields, returns why a particular value is not modeled (or None). ``refused``
            fields are refused whenever their value is not empty, with ``meaning`` as the reason.
    """

    kind: Kind
    meaning: str
    refuse: Check = _never


# ----------------------------------------------------------------------------------------------- value checks

# init_lora_weights, as PEFT 0.21.2 dispatches it (peft/tuners/lora/layer.py, LoraLayer.update_layer, in this order:
# startswith "pissa", startswith "corda", lower() == "olora", lower() == "mica", == "loftq", == "eva",
# == "orthogonal", == "lora_ga", any other true value -> reset_lora_parameters (True or lower() == "gaussian",
# anything else raises), a false value -> no initialisation). Embedding and Conv layers know only mica, loftq,
# lora_ga, True and gaussian: PEFT raises for pissa/olora/corda/eva/orthogonal there.
#
# Inits that leave the base untouched give a plain LoRA once trained: the trained model is W0 + s*B@A, and PEFT's
# reload re-runs the init only to have its result overwritten by the saved factors.
BASE_PRESERVING_INITS: dict[str, str] = {
    "true": "reset_lora_parameters: A Kaiming-uniform, B = 0",
    "false": "no initialisation (nn.Linear's random A and B); PEFT's debugging setting",
    "gaussian": "reset_lora_parameters: A ~ N(0, 1/r), B = 0",
    "eva": "update_layer sets B = 0; A comes later from an SVD of input activations (peft/tuners/lora/eva.py)",
    "orthogonal": "orthogonal_init: random orthogonal A and B (B@A != 0 at init), base untouched",
    "mica": "mica_init: B from W0's smallest singular vectors, A = 0; MiCALinearVariant freezes B and its forward "
    "and merge are plain LoRA",
}
# Inits that subtract an initial product from the base: the trained model is (W0 - init) + s*B@A.
BASE_CHANGING_INITS: dict[str, str] = {
    "pissa": "PEFT's pissa_init subtracts s*B0@A0, the top-r exact SVD of W0 (fp32), from W0, and redoes it "
    "whenever PEFT loads the adapter",
    "pissa_niter": "PEFT's pissa_init subtracts a randomized SVD (svd_lowrank) of W0 from W0, and redoes it at load "
    "time with whatever random state the loading process has, so the term cannot be recomputed",
    "olora": "PEFT's olora_init subtracts s*Q_r@R_r, from a QR decomposition of W0 (fp32), from W0, and redoes it "
    "whenever PEFT loads the adapter",
    "corda": "PEFT's corda_init subtracts a product built from activation covariances (preprocess_corda); PEFT "
    "cannot reload the adapter unconverted",
    "lora_ga": "PEFT's lora_ga_init subtracts a product built from gradients (preprocess_loraga); PEFT's reload "
    "skips it (falls back to the default init), so only the converted adapter is the trained model",
    "loftq": "PEFT's loftq_init replaces W0 by a dequantized NF4/int8 quantization of a residual "
    "(peft/utils/loftq_utils.py), which is not W0 - s*B0@A0",
}
# How the init term is known exactly: recomputed from the base (deterministic inits), or from the initial factors
# B0, A0 of the adapter saved right after get_peft_model (init = s*B0@A0 for all five; LoftQ is neither).
RECOMPUTABLE_INITS: frozenset[str] = frozenset({"pissa", "olora"})
INITIAL_FACTOR_INITS: frozenset[str] = frozenset({"pissa", "pissa_niter", "olora", "corda", "lora_ga"})


def init_kind(value: Any) -> str | None:
    """``init_lora_weights`` as PEFT dispatches it: a key of :data:`BASE_PRESERVING_INITS` or
    :data:`BASE_CHANGING_INITS`, or None for a value PEFT raises on (``"PISSA"``, ``"pissa_niter_x"``, ``"true"``).
    """
    if value is True:
        return "true"
    if not value:  # None, False, "" (and 0): update_layer initialises nothing
        return "false"
    if not isinstance(value, str):
        return None
    if value.startswith("pissa"):
        if value == "pissa":
            return "pissa"
        parts = value.split("_niter_")
        return "pissa_niter" if len(parts) == 2 and _is_int(parts[1]) else None
    if value.startswith("corda"):
        return "corda"
    if value.lower() in ("olora", "mica", "gaussian"):
        return value.lower()
    return value if value in ("loftq", "eva", "orthogonal", "lora_ga") else None


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def changes_base(config: dict[str, Any]) -> str | None:
    """The base-changing init kind of an adapter config (``pissa``, ``olora``, ...), or None for plain LoRA."""
    kind = init_kind(config.get("init_lora_weights", True))
    return kind if kind in BASE_CHANGING_INITS else None


def init_refusal(value: Any) -> str:
    """Why an adapter with this ``init_lora_weights`` is not W0 + s*B@A, and what to do (one line)."""
    kind = init_kind(value)
    if kind is None:
        return (
            f"init_lora_weights={value!r} is not a value PEFT accepts (its update_layer raises on it); "
            "nothing can be assumed about the adapter"
        )
    head = f"init_lora_weights={value!r}: {BASE_CHANGING_INITS[kind]}, so the trained model is (W0 - init) + s*B@A"
    if kind in RECOMPUTABLE_INITS:
        return (
            f"{head}; give the base it was trained on (adaptermerge merge BASE ADAPTER, combine --base BASE) or "
            "convert it to plain LoRA: adaptermerge convert ADAPTER --base BASE -o OUT"
        )
    if kind in INITIAL_FACTOR_INITS:
        return (
            f"{head}; convert it with the adapter saved right after get_peft_model, before training: "
            "adaptermerge convert ADAPTER --initial-adapter INITIAL -o OUT"
        )
    return f"{head}; adaptermerge cannot reproduce that: merge it with PEFT's merge_and_unload on the LoftQ base"


def _check_init(value: Any, config: dict[str, Any]) -> str | None:
    return None if init_kind(value) in BASE_PRESERVING_INITS else init_refusal(value)


# Saved tensors that only served training (VeLoRA's activation projection, used by its backward pass alone):
# recognised by key suffix and dropped on read when the config field that makes PEFT save them is set.
TRAINING_ONLY_TENSORS: dict[str, str] = {".lora_velora_embed": "velora_config"}


def training_only_tensor(config: dict[str, Any], name: str) -> bool:
    """Whether tensor ``name`` is one PEFT saves for training only under ``config`` (and is ignored)."""
    return any(name.endswith(suf) and not _empty(config.get(field)) for suf, field in TRAINING_ONLY_TENSORS.items())


def _check_bias(value: Any, config: dict[str, Any]) -> str | None:
    if value in ("none", "all", "lora_only", None):
        return None
    return f"bias={value!r} is not one of PEFT's 'none', 'all', 'lora_only'"


def _check_peft_type(value: Any, config: dict[str, Any]) -> str | None:
    if value is None or str(value).upper() == "LORA":
        return None
    return f"peft_type={value!r}: adaptermerge handles LoRA adapters only"


# ----------------------------------------------------------------------------------------------- the table

RULES: dict[str, Rule] = {
    # what the tensors are and how they scale
    "peft_type": Rule(Kind.MODELED, "must be LORA", _check_peft_type),
    "r": Rule(Kind.MODELED, "rank; the scaling is lora_alpha / r (or / sqrt(r) with use_rslora), folded on read"),
    "lora_alpha": Rule(Kind.MODELED, "scaling numerator, folded into the factors on read"),
    "use_rslora": Rule(Kind.MODELED, "scaling lora_alpha / sqrt(r), folded on read"),
    "rank_pattern": Rule(Kind.MODELED, "per-module r, matched as PEFT's get_pattern_key matches it"),
    "alpha_pattern": Rule(Kind.MODELED, "per-module lora_alpha, matched as PEFT's get_pattern_key matches it"),
    "fan_in_fan_out": Rule(Kind.MODELED, "GPT-2 Conv1D layout (the weight is stored in x out)"),
    "use_dora": Rule(Kind.MODELED, "DoRA magnitude vectors: merged per output row as PEFT merges them"),
    "lora_bias": Rule(Kind.MODELED, "lora_B carries a bias, added to the base layer's bias"),
    "bias": Rule(Kind.MODELED, "trained base biases saved beside the factors, replacing the base's", _check_bias),
    "modules_to_save": Rule(Kind.MODELED, "full copies of modules (heads) saved beside the factors"),
    "trainable_token_indices": Rule(
        Kind.MODELED,
        "TrainableTokens: trained rows of the embedding (and of a tied head) that replace the base rows",
        check_token_config,
    ),
    "init_lora_weights": Rule(
        Kind.MODELED,
        "plain LoRA once trained, except inits that change the base (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ), which are "
        "converted with the base or the initial adapter (adaptermerge convert) or refused",
        _check_init,
    ),
    # which modules carry factors (the saved tensors are checked against them)
    "target_modules": Rule(Kind.MODELED, "modules that carry factors; tensors of other modules are refused"),
    "exclude_modules": Rule(Kind.MODELED, "modules excluded from target_modules"),
    "layers_to_transform": Rule(Kind.MODELED, "layer indices that carry factors"),
    "layers_pattern": Rule(Kind.MODELED, "name of the layer list for layers_to_transform"),
    # provenance and PEFT bookkeeping
    "task_type": Rule(Kind.METADATA, "the PEFT task (CAUSAL_LM, SEQ_CLS, ...); kept"),
    "base_model_name_or_path": Rule(Kind.METADATA, "the base the adapter was trained on; checked against bases"),
    "revision": Rule(Kind.METADATA, "the base's revision; kept"),
    "inference_mode": Rule(Kind.METADATA, "whether PEFT loads it frozen"),
    "auto_mapping": Rule(Kind.METADATA, "PEFT's class lookup helper"),
    "peft_version": Rule(Kind.METADATA, "the PEFT version that wrote the file"),
    # training only: the saved factors already hold what training made of them
    "lora_dropout": Rule(Kind.TRAINING, "dropout on the LoRA input during training; none at inference"),
    "runtime_config": Rule(Kind.TRAINING, "runtime options (GPU offload); not saved meaning"),
    "eva_config": Rule(Kind.TRAINING, "EVA's data-driven initialisation of A (the base is untouched)"),
    "loftq_config": Rule(Kind.TRAINING, "LoftQ settings; init_lora_weights='loftq' itself is refused"),
    "corda_config": Rule(Kind.TRAINING, "CorDA settings; init_lora_weights='corda' itself is refused"),
    "lora_ga_config": Rule(Kind.TRAINING, "LoRA-GA settings; init_lora_weights='lora_ga' itself is refused"),
    "megatron_core": Rule(Kind.TRAINING, "the Megatron module path, used only with megatron_config"),
    "qalora_group_size": Rule(Kind.TRAINING, "QALoRA pooling size, used only with use_qalora"),
    # changes what the adapter computes in ways we do not model
    "alora_invocation_tokens": Rule(
        Kind.REFUSED,
        "activated LoRA applies the update only after its invocation tokens, so it has no merged equivalent "
        "(PEFT refuses to merge it too); serve it as an adapter",
    ),
    "layer_replication": Rule(
        Kind.REFUSED,
        "layer_replication builds extra layers from copies of the base's; merge it with PEFT's merge_and_unload",
    ),
    "target_parameters": Rule(
        Kind.REFUSED,
        "LoRA on nn.Parameter tensors (fused MoE experts) is not modeled; merge it with PEFT's merge_and_unload",
    ),
    "megatron_config": Rule(Kind.REFUSED, "Megatron parallel layers are not modeled; merge inside Megatron"),
    "use_qalora": Rule(Kind.REFUSED, "QALoRA pools the input before lora_A, so the delta is not B @ A"),
    "velora_config": Rule(
        Kind.MODELED,
        "VeLoRA compresses the LoRA input for the backward pass only (VeloraFunction's forward is F.linear); its "
        "forward and merge are plain LoRA, and its saved lora_velora_embed buffers are training-only and dropped",
    ),
    "monteclora_config": Rule(Kind.REFUSED, "MonteCLoRA samples its update; it has no single merged delta"),
    "use_bdlora": Rule(Kind.REFUSED, "BD-LoRA stores block-diagonal factors that are not plain B @ A"),
    "arrow_config": Rule(Kind.REFUSED, "Arrow routes between adapters per token; it has no single merged delta"),
    "kasa_config": Rule(
        Kind.REFUSED,
        "KaSA inserts a trained diagonal (lora_diag) between the factors and truncates the base's smallest singular "
        "components; merge it with PEFT's merge_and_unload",
    ),
    "ensure_weight_tying": Rule(
        Kind.MODELED, "adapters on tied embedding/head layers are tied too; merges follow the tied weights"
    ),
}


def check_config(config: dict[str, Any], where: str = CONFIG_NAME, raw_init: bool = False) -> list[str]:
    """Refuse every field value we do not model exactly; return notes for people.

    ``raw_init`` lets a base-changing ``init_lora_weights`` (PiSSA, OLoRA, ...) through, for the one caller that
    folds the init term in afterwards (:mod:`adaptermerge.surgery.init_conversion`).

    Raises:
        UnsupportedAdapter: a ``refused`` field with a non-empty value, a ``modeled`` field with a value we do not
            model, or an unknown field with a non-empty value. The message names the field and what to do.
        InvalidAdapter: a field of the wrong form.
    """
    for key, value in config.items():
        rule = RULES.get(key)
        if rule is None:
            if _empty(value):
                continue
            raise UnsupportedAdapter(
                f"{where}: field {key!r} = {_short(value)} is unknown to adaptermerge (a newer PEFT feature?); "
                "it may change what the adapter computes, so the adapter is refused"
            )
        if rule.kind is Kind.REFUSED and not _empty(value):
            raise UnsupportedAdapter(f"{where}: {key} = {_short(value)} is not supported: {rule.meaning}")
        if rule.kind is Kind.MODELED:
            if raw_init and key == "init_lora_weights" and init_kind(value) in BASE_CHANGING_INITS:
                continue
            why = rule.refuse(value, config)
            if why:
                raise UnsupportedAdapter(f"{where}: {why}")
    _check_forms(config, where)
    return []


def _check_forms(config: dict[str, Any], where: str) -> None:
    for key in ("rank_pattern", "alpha_pattern"):
        v = config.get(key)
        if v is not None and not isinstance(v, dict):
            raise InvalidAdapter(f"{where}: {key} must map module regexes to numbers, got {_short(v)}")
    mts = config.get("modules_to_save")
    if mts is not None and not (isinstance(mts, list) and all(isinstance(m, str) for m in mts)):
        raise InvalidAdapter(f"{where}: modules_to_save must be a list of module names, got {_short(mts)}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def targets_module(config: dict[str, Any], module_name: str) -> bool:
    """Whether PEFT would put LoRA factors on ``module_name`` under ``config`` (PEFT's own matcher).

    Uses ``peft.tuners.tuners_utils.check_target_module_exists`` so the answer is PEFT's: suffix or regex
    ``target_modules``, ``exclude_modules``, ``layers_to_transform`` with ``layers_pattern``, and modules that
    ``modules_to_save`` wraps. ``target_modules="all-linear"`` (PEFT expands it to names before saving, so only a
    hand-written config holds it) and ``None`` accept every module.
    """
    tm = config.get("target_modules")
    if tm is None or tm == "all-linear":
        return True
    if isinstance(tm, str):
        try:
            re.compile(tm)
        except re.error as e:
            raise InvalidAdapter(f"{CONFIG_NAME}: target_modules {tm!r} is not a valid regex ({e})") from None
    elif not (isinstance(tm, (list, tuple)) and all(isinstance(t, str) for t in tm)):
        raise InvalidAdapter(f"{CONFIG_NAME}: target_modules must be a list of names or a regex string, got {tm!r}")
    if _plain_names(config):
        return any(module_name == t or module_name.endswith("." + t) for t in tm)
    return _peft_matcher(config, module_name)


def _plain_names(config: dict[str, Any]) -> bool:
    """Whether ``config`` targets a list of names with nothing that narrows it (the common case).

    PEFT's rule for such a config is a suffix match; answering it here saves importing PEFT (about 3 s, most of
    a small merge). ``tests/io/test_peft_config.py`` checks the two answers agree on generated configs and names.
    """
    layers = config.get("layers_to_transform")
    return (
        not isinstance(config.get("target_modules"), str)
        and not config.get("exclude_modules")
        and not config.get("modules_to_save")
        and (layers is None or layers == [])
    )


def _peft_matcher(config: dict[str, Any], module_name: str) -> bool:
    from types import SimpleNamespace

    from peft.tuners.tuners_utils import check_target_module_exists

    tm = config.get("target_modules")
    ns = SimpleNamespace(
        target_modules=tm if isinstance(tm, str) else set(tm),
        exclude_modules=config.get("exclude_modules"),
        modules_to_save=config.get("modules_to_save"),
        target_parameters=config.get("target_parameters"),
        layers_to_transform=config.get("layers_to_transform"),
        layers_pattern=config.get("layers_pattern"),
    )
    return bool(check_target_module_exists(ns, module_name))  # an excluded module's marker is falsy


def fields_table() -> str:
    """The markdown table of every field and its treatment (docs/formats.md holds it; a test keeps it current)."""
    rows = ["| field | treatment | meaning |", "|---|---|---|"]
    for name, rule in sorted(RULES.items(), key=lambda kv: (list(Kind).index(kv[1].kind), kv[0])):
        rows.append(f"| `{name}` | {rule.kind.value} | {rule.meaning} |")
    return "\n".join(rows)
