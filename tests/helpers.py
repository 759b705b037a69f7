"""Builders shared by the tests and the benchmarks: tiny models from configs and PEFT adapters on them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

LLAMA_CFG = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=128, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip


def tiny_llama(seed: int = 0, tie: bool = False, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    m = LlamaForCausalLM(LlamaConfig(**LLAMA_CFG, tie_word_embeddings=tie))
    return m.to(dtype).eval()


def tiny_llama_cls(seed: int = 0) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(LlamaConfig(**LLAMA_CFG, num_labels=3)).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


def make_adapter(
    out: Path, model_fn: Callable[..., torch.nn.Module], seed: int = 1, base_seed: int = 0, **lora: Any
) -> Path:
    """Make a PEFT adapter with random (non-zero) factors on ``model_fn(base_seed)`` and save it."""
    base = model_fn(base_seed)
    lora.setdefault("init_lora_weights", False)
    torch.manual_seed(seed)
    pm = get_peft_model(base, LoraConfig(**lora))
    pm.save_pretrained(str(out))
    return out


def adapter_on_folder(
    base: Path, out: Path, seed: int, targets: list[str], alpha: float = 8, b_scale: float = 1.0
) -> Path:
    """A rank-4 PEFT adapter with random factors on the model saved in ``base`` (a folder), saved to ``out``.

    ``b_scale`` multiplies every ``lora_B``: random factors give deltas too small to change a tiny model's greedy
    answers, and tests of task scores need deltas that do.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=alpha, target_modules=targets, init_lora_weights=False))
    if b_scale != 1.0:
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.mul_(b_scale)
    pm.save_pretrained(out)
    return out


def load_benchmark(name: str) -> Any:
    """The script ``benchmarks/NAME.py`` as a module (benchmarks are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def peft_model(model_fn: Callable[..., torch.nn.Module], *adapters: Path, base_seed: int = 0) -> PeftModel:
    """Load one or more adapter folders onto a fresh base with PEFT, named a0, a1, ..."""
    base = model_fn(base_seed)
    pm = PeftModel.from_pretrained(base, str(adapters[0]), adapter_name="a0")
    for i, a in enumerate(adapters[1:], start=1):
        pm.load_adapter(str(a), adapter_name=f"a{i}")
    return pm.eval()


def peft_deltas(pm: PeftModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """PEFT's ``get_delta_weight`` per LoRA module, in the base weight's stored layout, keyed by module path."""
    out = {}
    for name, mod in pm.base_model.model.named_modules():
        if hasattr(mod, "get_delta_weight") and adapter_name in getattr(mod, "scaling", {}):
            out[name] = mod.get_delta_weight(adapter_name).detach().float()
    return out


def input_ids(vocab: int = 128, batch: int = 2, length: int = 12, seed: int = 123) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / max(float(b.double().norm()), 1e-30))


def use_reference_4bit_kernels() -> bool:
    """Make bitsandbytes run 4-bit layers on CPU with its reference kernel (dequantize, then fp32 matmul).

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks each ``Linear4bit`` at its first inference call for a
    kernel that multiplies in bf16 and that fails when ``in_features`` is not a multiple of the block size
    (``shape '[64, 1]' is invalid``). Tests that compare 4-bit logits with fp32 references at fp32 tolerances
    need the reference kernel on every machine; ``tests/io/test_bnb4.py`` runs the packed kernel separately.
    Returns whether the packed kernel would otherwise have been used.
    """
    import bitsandbytes.nn.modules as bnb_modules

    had = bool(bnb_modules.has_avx512bf16())
    bnb_modules.has_avx512bf16 = lambda: False
    return had
