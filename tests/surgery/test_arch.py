"""Layer kinds from the model class config.json names; what happens when transformers cannot build it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GPT2Config, GPT2LMHeadModel

from adaptermerge.errors import UnsupportedArchitecture, UsageError
from adaptermerge.io.checkpoint import open_checkpoint
from adaptermerge.surgery.arch import weight_layouts
from adaptermerge.surgery.extract import extract_lora
from adaptermerge.surgery.merge import merge_into_base
from adaptermerge_cli.main import cli
from tests.helpers import input_ids, make_adapter, peft_model, tiny_gpt2, tiny_llama, tiny_llama_cls


def renamed(src: Path, dst: Path, **changes) -> Path:
    """A copy of a checkpoint folder whose config.json is changed (``None`` removes a key)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_layouts_from_the_named_class(tmp_path: Path) -> None:
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    layers = weight_layouts(open_checkpoint(tmp_path / "gpt2"))
    assert layers.known and layers.source == "GPT2LMHeadModel" and layers.head_key == "lm_head.weight"
    assert layers.kind("transformer.h.0.attn.c_proj.weight") == "conv1d"
    assert layers.kind("transformer.wte.weight") == "embedding"
    tiny_llama_cls().model.save_pretrained(tmp_path / "bare")  # LlamaModel: no head
    layers = weight_layouts(open_checkpoint(tmp_path / "bare"))
    assert layers.source == "LlamaModel" and layers.head_key is None
    assert layers.kind("layers.0.self_attn.q_proj.weight") == "linear"
    # without "architectures": the default causal-LM class of model_type
    no_arch = renamed(tmp_path / "gpt2", tmp_path / "no_arch", architectures=None)
    assert weight_layouts(open_checkpoint(no_arch)).source == "GPT2LMHeadModel"


def test_unknown_architecture(tmp_path: Path) -> None:
    """A class transformers does not ship: extract (which must know Conv1D from Linear) refuses in one line and
    writes nothing; a merge whose layouts PEFT's record and the shapes settle still works."""
    tiny_gpt2().save_pretrained(tmp_path / "g")
    base = renamed(tmp_path / "g", tmp_path / "base", architectures=["MyGPTForCausalLM"])
    layers = weight_layouts(open_checkpoint(base))
    assert not layers.known and "MyGPTForCausalLM" in layers.source
    with pytest.raises(UnsupportedArchitecture, match="extract needs each weight.s layer type.*MyGPTForCausalLM"):
        extract_lora(base, base, rank=2)
    r = CliRunner().invoke(cli, ["extract", str(base), str(base), "--rank", "2", "-o", str(tmp_path / "x")])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    # non-square Conv1D layers: the stored shape says in x out
    a = make_adapter(tmp_path / "a", tiny_gpt2, r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    merge_into_base(base, a, tmp_path / "out")
    ref = peft_model(tiny_gpt2, a).merge_and_unload()
    with torch.no_grad():
        ours = GPT2LMHeadModel.from_pretrained(tmp_path / "out")(input_ids=input_ids()).logits
        assert torch.allclose(ours, ref(input_ids=input_ids()).logits, atol=1e-5)
    # a square Conv1D layer fits both layouts: refused, nothing written
    sq = make_adapter(tmp_path / "sq", tiny_gpt2, r=4, target_modules=["attn.c_proj"], fan_in_fan_out=True)
    with pytest.raises(
        UnsupportedArchitecture, match=r"transformer\.h\.0\.attn\.c_proj\.weight is a Conv1D or a Linear"
    ):
        merge_into_base(base, sq, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_gpt2_adapter_recorded_as_linear_merges_conv1d_layers(tmp_path: Path) -> None:
    """PEFT records fan_in_fan_out of the last layer it wrapped: with an untied Linear lm_head last, a GPT-2
    adapter says False though its c_proj layers are Conv1D (square in attention). Layouts come from the model."""

    def untied(seed: int = 0) -> GPT2LMHeadModel:
        torch.manual_seed(seed)
        cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, tie_word_embeddings=False)
        return GPT2LMHeadModel(cfg).eval()

    untied().save_pretrained(tmp_path / "base")
    a = make_adapter(
        tmp_path / "a", untied, r=4, lora_alpha=8, target_modules=["c_proj", "lm_head"], fan_in_fan_out=True
    )
    assert json.loads((a / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    merge_into_base(tmp_path / "base", a, tmp_path / "out")
    ref = peft_model(untied, a).merge_and_unload()
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(tmp_path / "out")(input_ids=input_ids()).logits
        assert torch.allclose(ours, ref(input_ids=input_ids()).logits, atol=1e-5)


def test_dequantize_needs_the_layer_kinds(tmp_path: Path) -> None:
    """A 4-bit base of an unknown class: merging into it works (4-bit weights are out x in whatever the layer),
    --dequantize cannot know which weights to write back as Conv1D and refuses."""
    tiny_gpt2().save_pretrained(tmp_path / "fp32")
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    GPT2LMHeadModel.from_pretrained(tmp_path / "fp32", quantization_config=cfg, device_map="cpu").save_pretrained(
        tmp_path / "q"
    )
    base = renamed(tmp_path / "q", tmp_path / "base", architectures=["MyGPTForCausalLM"])
    a = make_adapter(tmp_path / "a", tiny_gpt2, r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    merge_into_base(base, a, tmp_path / "merged")
    with pytest.raises(UnsupportedArchitecture, match="`dequantize` needs each weight.s layer type"):
        merge_into_base(base, a, tmp_path / "deq", dequantize=True)
    assert not (tmp_path / "deq").exists()


def test_quantize_refuses_an_added_head(tmp_path: Path) -> None:
    """A task adapter's head onto a bare checkpoint: config.json would not name the model the output holds."""
    tiny_llama_cls().model.save_pretrained(tmp_path / "base")
    a = make_adapter(
        tmp_path / "a", tiny_llama_cls, r=4, target_modules=["q_proj"], modules_to_save=["score"], task_type="SEQ_CLS"
    )
    with pytest.raises(UsageError, match="modules_to_save head"):
        merge_into_base(tmp_path / "base", a, tmp_path / "out", quantize="nf4")
    assert not (tmp_path / "out").exists()
    tiny_llama().save_pretrained(tmp_path / "llama")  # the layer choice is transformers' for the named class
    out = tmp_path / "q"
    merge_into_base(
        tmp_path / "llama",
        make_adapter(tmp_path / "b", tiny_llama, r=4, target_modules=["q_proj"]),
        out,
        quantize="nf4",
    )
    keys = set(open_checkpoint(out).weight_map)
    assert "model.layers.0.self_attn.q_proj.weight.absmax" in keys and "lm_head.weight.absmax" not in keys
