"""Tiny models of many architectures, built from configs (nothing is downloaded), and the LoRA targets of each.

``ARCHS[name](seed)`` returns ``(model, targets)``: a float32 model in eval mode (hidden size 64, 2 layers,
vocabulary 128, feed-forward sizes multiples of 64, so that bitsandbytes' 4-bit kernels run on every CPU) and
the module names a LoRA adapter on its linear layers targets. ``forward_inputs(model)`` gives inputs that
every model here accepts. The conformance tests build each architecture once per module and reuse it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as tf

VOCAB = 128
HIDDEN = 64
FFN = 128
LAYERS = 2
HEADS = 4

Builder = Callable[[int], tuple[torch.nn.Module, list[str]]]

_DECODER = dict(
    hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
    num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
    eos_token_id=2,
)  # fmt: skip
_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
_MLP = ["gate_proj", "up_proj", "down_proj"]


def _make(model_cls: type, config: tf.PretrainedConfig, targets: list[str]) -> Builder:
    def build(seed: int = 0) -> tuple[torch.nn.Module, list[str]]:
        torch.manual_seed(seed)
        return model_cls(config).float().eval(), list(targets)

    return build


_SMALL = dict(num_hidden_layers=LAYERS, num_attention_heads=HEADS, vocab_size=VOCAB, max_position_embeddings=64)
_ENCODER = dict(hidden_size=HIDDEN, intermediate_size=FFN, num_labels=3, **_SMALL)
_NEOX = dict(hidden_size=HIDDEN, intermediate_size=FFN, **_SMALL)
_OPT = dict(hidden_size=HIDDEN, ffn_dim=FFN, word_embed_proj_dim=HIDDEN, **_SMALL)
_BART = dict(
    d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=HEADS,
    decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, vocab_size=VOCAB,
    max_position_embeddings=64,
)  # fmt: skip
_T5 = dict(
    d_model=HIDDEN, d_kv=16, d_ff=FFN, num_layers=LAYERS, num_heads=HEADS, vocab_size=VOCAB, decoder_start_token_id=0
)  # fmt: skip
_GPT2 = dict(
    n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN, vocab_size=VOCAB, n_positions=64, bos_token_id=1,
    eos_token_id=2,
)  # fmt: skip
_MOE = dict(
    moe_intermediate_size=64, shared_expert_intermediate_size=FFN, num_experts=4, num_experts_per_tok=2,
    tie_word_embeddings=False,
)  # fmt: skip
_FUSED = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
_NEOX_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
_BART_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
_BERT_TARGETS = ["query", "key", "value", "dense"]

ARCHS: dict[str, Builder] = {
    "llama": _make(tf.LlamaForCausalLM, tf.LlamaConfig(**_DECODER), _ATTN + _MLP),
    "qwen2": _make(tf.Qwen2ForCausalLM, tf.Qwen2Config(**_DECODER, tie_word_embeddings=False), _ATTN + _MLP),
    "gemma": _make(tf.GemmaForCausalLM, tf.GemmaConfig(**_DECODER, head_dim=16), _ATTN + _MLP),
    "gemma2": _make(tf.Gemma2ForCausalLM, tf.Gemma2Config(**_DECODER, head_dim=16, sliding_window=16), _ATTN + _MLP),
    "gemma3": _make(
        tf.Gemma3ForCausalLM, tf.Gemma3TextConfig(**_DECODER, head_dim=16, sliding_window=16), _ATTN + _MLP
    ),
    "mistral": _make(tf.MistralForCausalLM, tf.MistralConfig(**_DECODER), _ATTN + _MLP),
    "phi3": _make(tf.Phi3ForCausalLM, tf.Phi3Config(**_DECODER), _FUSED),
    "gpt2": _make(tf.GPT2LMHeadModel, tf.GPT2Config(**_GPT2), ["c_attn", "c_proj", "c_fc"]),
    "gpt_neox": _make(tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig(**_NEOX), _NEOX_TARGETS),
    "falcon": _make(tf.FalconForCausalLM, tf.FalconConfig(hidden_size=HIDDEN, **_SMALL), _NEOX_TARGETS),
    "opt": _make(tf.OPTForCausalLM, tf.OPTConfig(**_OPT), _BART_TARGETS),
    "bart": _make(tf.BartForConditionalGeneration, tf.BartConfig(**_BART), _BART_TARGETS),
    "t5": _make(tf.T5ForConditionalGeneration, tf.T5Config(**_T5), ["q", "k", "v", "o", "wi", "wo"]),
    "bert_cls": _make(tf.BertForSequenceClassification, tf.BertConfig(**_ENCODER), _BERT_TARGETS),
    "roberta_cls": _make(tf.RobertaForSequenceClassification, tf.RobertaConfig(**_ENCODER), _BERT_TARGETS),
    "qwen2_moe": _make(
        tf.Qwen2MoeForCausalLM, tf.Qwen2MoeConfig(**_DECODER, **_MOE), _ATTN + _MLP + ["shared_expert_gate"]
    ),
}


def forward_inputs(model: torch.nn.Module, batch: int = 2, length: int = 12, seed: int = 123) -> dict:
    """Token ids (and decoder ids for encoder-decoder models) that avoid the special tokens 0-2."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    out = {"input_ids": ids}
    if getattr(model.config, "is_encoder_decoder", False):
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, length // 2), generator=g)
    return out
