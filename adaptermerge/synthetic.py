"""Tiny models, a character tokenizer and synthetic tasks, all made on this machine (nothing downloaded).

The demo and the tests need a base model whose tokenizer loads with ``AutoTokenizer.from_pretrained(BASE)``
and tasks whose answers can be checked by hand. A character-level tokenizer makes both easy: every string
of printable ASCII round-trips exactly, so exact-match and per-character accuracy mean what they say.

Example:
    >>> from adaptermerge.synthetic import char_tokenizer, make_examples
    >>> tok = char_tokenizer()
    >>> tok.decode(tok("abc")["input_ids"], skip_special_tokens=True)
    'abc'
    >>> make_examples("reverse", 1, seed=0)[0]["completion"] == make_examples("reverse", 1, seed=0)[0]["prompt"][8:-1][::-1]
    True
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
CHARS = "".join(chr(c) for c in range(32, 127)) + "\n"  # printable ASCII and the newline the chat template uses
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def char_tokenizer() -> Any:
    """A character-level ``PreTrainedTokenizerFast``: one id per printable ASCII character, BOS added.

    Ids 0-3 are ``<pad>``, ``<s>``, ``</s>``, ``<unk>``; a chat template (``role: content`` lines, EOS after
    each assistant turn) is set so that chat rows can be rendered. ``save_pretrained`` writes it beside a
    model so that ``AutoTokenizer.from_pretrained`` loads it offline.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in CHARS:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama_config(
    hidden: int = 64, layers: int = 2, vocab_size: int = 128, max_positions: int = 64, init_range: float = 0.02
) -> Any:
    """A small ``LlamaConfig`` sized for the character tokenizer.

    Widths are multiples of 64 so that bitsandbytes' 4-bit CPU kernels (block size 64) accept every layer.
    ``init_range`` is the weights' initial standard deviation: with the usual 0.02 an untrained model's logits
    are almost uniform and no LoRA layer can move them far (the output head is random and tiny); 0.2 makes an
    untrained base that LoRA adapts within a few dozen steps, which is what the tests need.
    """
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=max_positions, initializer_range=init_range,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip


def save_tiny_base(out: str | os.PathLike, seed: int = 0, **config: Any) -> Path:
    """Save a randomly initialised tiny Llama and the character tokenizer in ``out`` (a plain folder)."""
    import torch
    from transformers import LlamaForCausalLM

    out_p = Path(out)
    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_llama_config(**config)).save_pretrained(out_p)
    char_tokenizer().save_pretrained(out_p)
    return out_p


# --- synthetic tasks: each maps a random word to a prompt and its one correct completion --------------------


def _word(rng: random.Random, lo: int = 3, hi: int = 7) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def _shift(word: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in word)


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"add {a}+{b}=", str(a + b)


def _unary(name: str, fn: Callable[[str], str]) -> Callable[[random.Random], tuple[str, str]]:
    def make(rng: random.Random) -> tuple[str, str]:
        w = _word(rng)
        return f"{name} {w}=", fn(w)

    return make


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "copy": _unary("copy", lambda w: w),
    "reverse": _unary("reverse", lambda w: w[::-1]),
    "upper": _unary("upper", str.upper),
    "shift": _unary("shift", _shift),
    "sort": _unary("sort", lambda w: "".join(sorted(w))),
    "add": _add,
}


def make_examples(task: str, n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` rows ``{"prompt", "completion"}`` of a synthetic task (see :data:`TASKS`), reproducible by seed."""
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose one of {', '.join(TASKS)}")
    rng = random.Random(f"{task}-{seed}")
    rows = []
    for _ in range(n):
        prompt, completion = TASKS[task](rng)
        rows.append({"prompt": prompt, "completion": completion})
    return rows


def write_jsonl(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> Path:
    """Write rows as JSON Lines (one object per line)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return p
