"""Loading base models, tokenizers and 4-bit bases for training and evaluation, offline.

A base is a local checkpoint folder with its tokenizer files, or a Hub id that is already in the local
Hugging Face cache: nothing is downloaded here, and a missing model says how to get it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from adaptermerge.errors import InvalidCheckpoint, UsageError

QUANT_TYPES = ("nf4", "fp4")


def resolve_base(base: str | os.PathLike) -> Path:
    """A local folder for ``base``: the folder itself, or the cached snapshot of a Hub id (never downloaded)."""
    p = Path(base)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise InvalidCheckpoint(f"{p} has no config.json; pass a Hugging Face model folder")
        return p
    if p.exists():
        raise InvalidCheckpoint(f"{p} is a file; pass a Hugging Face model folder")
    name = str(base)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise InvalidCheckpoint(f"{name} is not a folder (and not a Hub id of the form owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure here means "not in the cache"
        raise InvalidCheckpoint(
            f"{name} is not a local folder and not in the local Hugging Face cache, and nothing is downloaded at "
            f"run time; download it first (hf download {name}) or pass a model folder"
        ) from None


def load_tokenizer(base: Path) -> Any:
    """The base's tokenizer, with a padding token (EOS when the tokenizer has none), right padding."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError, TypeError) as e:
        raise InvalidCheckpoint(
            f"cannot load a tokenizer from {base} ({' '.join(str(e).split())[:200]}); save the tokenizer beside "
            "the model (tokenizer.save_pretrained(BASE))"
        ) from None
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise InvalidCheckpoint(f"the tokenizer in {base} has neither a pad nor an EOS token; set pad_token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def bnb_config(quantize: str, compute_dtype: Any) -> Any:
    """QLoRA's 4-bit loading recipe: NF4 (or FP4) with double quantization, computing in ``compute_dtype``."""
    from transformers import BitsAndBytesConfig

    if quantize not in QUANT_TYPES:
        raise UsageError(f"`quantize` must be one of {', '.join(QUANT_TYPES)}, got {quantize!r}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UsageError("`quantize` needs bitsandbytes: pip install 'adaptermerge[quant]'") from None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantize,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_causal_lm(
    path: Path, quantize: str | None = None, dtype: Any = None, device: str = "cpu", device_map: Any = None
) -> Any:
    """``AutoModelForCausalLM`` from a folder, optionally quantized to 4 bits while loading.

    A folder saved in 4 bits (its config has ``quantization_config``) loads as 4-bit by itself. 4-bit
    layers get bitsandbytes' reference CPU kernel (see :func:`use_reference_4bit_kernel`).
    """
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype or torch.float32}
    if quantize:
        kwargs["quantization_config"] = bnb_config(quantize, kwargs["dtype"])
    if quantize or _is_quantized(path):
        kwargs["device_map"] = device_map or {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise InvalidCheckpoint(f"cannot load {path} as a causal LM: {' '.join(str(e).split())[:300]}") from None
    use_reference_4bit_kernel(model)
    if "device_map" not in kwargs:
        model.to(device)
    return model


def _is_quantized(path: Path) -> bool:
    import json

    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(cfg.get("quantization_config"))


def use_reference_4bit_kernel(model: Any) -> int:
    """Keep bitsandbytes' 4-bit layers of ``model`` on the reference kernel; returns how many were switched.

    On CPUs with AVX512-BF16, bitsandbytes 0.50's ``Linear4bit.forward`` repacks its weight in place the
    first time it runs in eval mode without gradients (an evaluation, a ``generate``) for a kernel that
    computes in bf16 whatever the compute dtype, fails when ``in_features`` is not a multiple of 64, and has
    no autograd formula: training after an evaluation then drops the gradient through every 4-bit layer
    (measured: 30-50% error in the LoRA gradients of all but the last layer, with only a PyTorch warning).
    The switch is the layer's own ``support_avx512bf16_for_cpu`` flag, so it affects this model only.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    n = 0
    for mod in model.modules():
        if isinstance(mod, Linear4bit) and getattr(mod, "support_avx512bf16_for_cpu", False):
            mod.support_avx512bf16_for_cpu = False
            n += 1
    return n


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """A PEFT adapter folder (``adapter_config.json``), as opposed to a full model checkpoint."""
    return (Path(path) / "adapter_config.json").is_file()
