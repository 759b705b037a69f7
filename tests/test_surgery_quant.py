"""merge on bitsandbytes 4-bit bases (NF4/FP4, double quantization on/off), --dequantize and --quantize."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbf  # noqa: E402
from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

import adaptermerge  # noqa: E402
from adaptermerge.surgery.merge import merge_into_base  # noqa: E402
from tests.helpers import input_ids, make_adapter, peft_deltas, tiny_llama  # noqa: E402

CONFIGS = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]
TARGETS = ["q_proj", "v_proj", "down_proj"]


def bnb_config(qt: str, dq: bool) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=qt, bnb_4bit_use_double_quant=dq, bnb_4bit_compute_dtype=torch.float32
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("q")
    tiny_llama().save_pretrained(d / "fp32")
    make_adapter(d / "adapter", tiny_llama, r=8, lora_alpha=16, target_modules=TARGETS, seed=3)
    return d


def quantized(work: Path, qt: str, dq: bool) -> Path:
    folder = work / f"{qt}-{int(dq)}"
    if not folder.exists():
        AutoModelForCausalLM.from_pretrained(
            work / "fp32", quantization_config=bnb_config(qt, dq), device_map="cpu"
        ).save_pretrained(folder)
    return folder


def dequant_weights(model) -> dict[str, torch.Tensor]:
    return {
        n: bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state).float().clone()
        for n, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }


@pytest.mark.parametrize("qt,dq", CONFIGS)
def test_requantized_merge_no_worse_than_peft(work: Path, qt: str, dq: bool) -> None:
    base = quantized(work, qt, dq)
    adapter = work / "adapter"
    q = AutoModelForCausalLM.from_pretrained(base, device_map="cpu")
    w4 = dequant_weights(q)
    pm = PeftModel.from_pretrained(q, str(adapter))
    deltas = peft_deltas(pm, "default")
    peft_w = dequant_weights(pm.merge_and_unload())
    for opt in (False, True):
        out = work / f"out-{qt}-{dq}-{opt}"
        rep = merge_into_base(base, adapter, out, optimize_scales=opt)
        model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
        assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
        ours = dequant_weights(model)
        tot_ours = tot_peft = 0.0
        for name, d in deltas.items():
            target = w4[name] + d
            e_ours = float((ours[name] - target).norm() / target.norm())
            e_peft = float((peft_w[name] - target).norm() / target.norm())
            assert e_ours <= e_peft + 1e-6, name
            tot_ours, tot_peft = tot_ours + e_ours, tot_peft + e_peft
            r = next(m for m in rep.modules if m.module == name)
            assert abs(r.requant_rel_error - e_ours) < 1e-4 and r.quant_type == qt
            assert 0.5 < r.delta_survival < 1.5
        if opt:
            assert tot_ours < 0.97 * tot_peft  # error-minimising scales gain measurably
        # untouched 4-bit groups are copied byte for byte
        src, dst = load_file(str(base / "model.safetensors")), load_file(str(out / "model.safetensors"))
        assert src.keys() == dst.keys()
        for k in src:
            if "k_proj" in k or "gate_proj" in k:
                assert torch.equal(src[k], dst[k]), k
        ids = input_ids()
        with torch.no_grad():
            lo = model(input_ids=ids).logits
        assert torch.isfinite(lo).all()


def test_tiny_delta_lost_in_quantization_is_reported(work: Path, tmp_path: Path) -> None:
    base = quantized(work, "nf4", True)
    small = tmp_path / "small"
    import shutil

    shutil.copytree(work / "adapter", small)
    sd = load_file(str(small / "adapter_model.safetensors"))
    save_file({k: (v * 1e-3 if "lora_B" in k else v) for k, v in sd.items()}, str(small / "adapter_model.safetensors"))
    rep = merge_into_base(base, small, tmp_path / "out")
    assert any("quantization noise" in w for w in rep.warnings)
    assert max(m.delta_survival for m in rep.modules) < 0.5


@pytest.mark.parametrize("qt,dq", [("nf4", True), ("fp4", False)])
def test_dequantize_gives_dense_w4_plus_delta(work: Path, qt: str, dq: bool) -> None:
    base = quantized(work, qt, dq)
    out = work / f"deq-{qt}-{dq}"
    merge_into_base(base, work / "adapter", out, dequantize=True)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    q = AutoModelForCausalLM.from_pretrained(base, device_map="cpu")
    w4 = dequant_weights(q)
    ad = adaptermerge.load_adapter(work / "adapter")
    mods = dict(model.named_modules())
    for name, w in w4.items():
        expect = w + (ad.modules[name].delta() if name in ad.modules else 0)
        assert torch.allclose(mods[name].weight, expect, atol=1e-6), name


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_quantize_16bit_merge_equals_transformers_quantization(work: Path, tmp_path: Path, qt: str) -> None:
    """--quantize writes exactly what transformers + bitsandbytes write for the merged dense model."""
    out = tmp_path / "q"
    merge_into_base(work / "fp32", work / "adapter", out, quantize=qt)
    dense = tmp_path / "dense"
    merge_into_base(work / "fp32", work / "adapter", dense)
    cfg = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=qt, bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32
    )
    AutoModelForCausalLM.from_pretrained(dense, quantization_config=cfg, device_map="cpu").save_pretrained(
        tmp_path / "ref"
    )
    ours, ref = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "ref" / "model.safetensors"))
    assert ours.keys() == ref.keys()
    for k in ref:
        if ".quant_state." in k:
            a = json.loads(bytes(ours[k].tolist()).decode())
            b = json.loads(bytes(ref[k].tolist()).decode())
            assert a == b, k
        else:
            assert torch.equal(ours[k], ref[k]), k
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert isinstance(model.model.layers[1].mlp.down_proj, bnb.nn.Linear4bit)
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, bnb.nn.Linear4bit)
