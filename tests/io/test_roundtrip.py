"""Hypothesis: random canonical adapters round-trip exactly through save/load."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import adaptermerge
from adaptermerge import Adapter, LowRank


@st.composite
def adapters(draw) -> Adapter:
    n_mod = draw(st.integers(1, 5))
    layout = draw(st.sampled_from(["linear", "conv1d"]))
    with_bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for i in range(n_mod):
        r = draw(st.integers(1, 6))
        out, inn = draw(st.integers(1, 12)), draw(st.integers(1, 12))
        kind = "embedding" if (i == 0 and draw(st.booleans())) else layout
        modules[f"model.layers.{i}.proj"] = LowRank(
            A=torch.randn(r, inn, generator=g) * draw(st.floats(0.01, 100)),
            B=torch.randn(out, r, generator=g),
            layout=kind,
            bias=torch.randn(out, generator=g) if with_bias and kind != "embedding" else None,
        )
    return Adapter(modules=modules, base_model=draw(st.sampled_from([None, "org/base"])), task_type="CAUSAL_LM")


@settings(max_examples=40, deadline=None)
@given(adapters())
def test_save_load_is_exact(adapter: Adapter) -> None:
    with tempfile.TemporaryDirectory() as d:
        out = adaptermerge.save_adapter(adapter, Path(d) / "a")
        back = adaptermerge.load_adapter(out)
    assert list(back.modules) == list(adapter.modules)
    assert back.base_model == adapter.base_model
    for name, m in adapter.modules.items():
        b = back.modules[name]
        assert b.layout == m.layout
        assert torch.equal(b.A, m.A) and torch.equal(b.B, m.B)
        if m.bias is not None:
            assert torch.equal(b.bias, m.bias)


@st.composite
def peft_folders(draw):
    """A PEFT-format folder written directly: random r, alpha, rsLoRA, rank/alpha patterns, tensors."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    r = draw(st.integers(1, 8))
    names = [f"model.layers.{i}.self_attn.{p}" for i in range(draw(st.integers(1, 3))) for p in ("q_proj", "v_proj")]
    rank_pattern = {"v_proj": draw(st.integers(1, 8))} if draw(st.booleans()) else {}
    alpha_pattern = {"layers.0.self_attn.q_proj": draw(st.floats(0.5, 64))} if draw(st.booleans()) else {}
    config = {
        "peft_type": "LORA", "r": r, "lora_alpha": draw(st.floats(0.5, 128)), "use_rslora": draw(st.booleans()),
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "target_modules": ["q_proj", "v_proj"],
        "fan_in_fan_out": draw(st.booleans()), "task_type": "CAUSAL_LM",
    }  # fmt: skip
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    sd = {}
    for n in names:
        rr = rank_pattern.get("v_proj", r) if n.endswith("v_proj") else r
        sd[f"base_model.model.{n}.lora_A.weight"] = torch.randn(rr, 16, generator=g).to(dtype)
        sd[f"base_model.model.{n}.lora_B.weight"] = torch.randn(12, rr, generator=g).to(dtype)
    return config, sd


@settings(max_examples=40, deadline=None)
@given(peft_folders())
def test_random_configs_round_trip_exactly(data) -> None:
    import json

    from peft.utils.other import get_pattern_key as peft_key
    from safetensors.torch import save_file

    config, sd = data
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "src"
        src.mkdir()
        (src / "adapter_config.json").write_text(json.dumps(config))
        save_file(sd, str(src / "adapter_model.safetensors"))
        first = adaptermerge.load_adapter(src)
        second = adaptermerge.load_adapter(adaptermerge.save_adapter(first, Path(d) / "out", dtype=torch.float32))
    for name, m in first.modules.items():
        b = second.modules[name]
        assert torch.equal(b.A, m.A) and torch.equal(b.B, m.B) and b.layout == m.layout
        # the folded scaling is PEFT's: alpha / r or alpha / sqrt(r), per module through PEFT's own pattern matching
        rp, ap = config["rank_pattern"], config["alpha_pattern"]
        r = rp.get(peft_key(list(rp), name), config["r"])
        alpha = ap.get(peft_key(list(ap), name), config["lora_alpha"])
        expect = alpha / (r**0.5 if config["use_rslora"] else r)
        raw_a = sd[f"base_model.model.{name}.lora_A.weight"].float()
        assert abs(m.scale - expect) <= 1e-12 * expect
        assert torch.allclose(m.A, raw_a * expect, rtol=1e-6, atol=0)
