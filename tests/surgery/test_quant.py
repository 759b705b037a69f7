"""merge on bitsandbytes 4-bit bases (NF4/FP4, double quantization on/off), --dequantize and --quantize."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adaptermerge.dtypes import dtype_name

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbf  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GPT2LMHeadModel  # noqa: E402

from adaptermerge.io import bnb4  # noqa: E402
from adaptermerge.surgery.merge import merge_into_base  # noqa: E402
from tests.helpers import input_ids, make_adapter, peft_deltas, rel_err, tiny_llama  # noqa: E402

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
            # the share of PEFT's delta the stored weights carry (bitsandbytes' dequantization, projected on delta)
            carried = float(((ours[name] - w4[name]).double() * d.double()).sum() / d.double().pow(2).sum())
            assert abs(r.delta_survival - carried) < 1e-4, name
        if opt:
            assert tot_ours < 0.97 * tot_peft  # error-minimising scales gain measurably
        # untouched 4-bit groups are copied byte for byte
        src, dst = load_file(str(base / "model.safetensors")), load_file(str(out / "model.safetensors"))
        assert src.keys() == dst.keys()
        for k in src:
            if "k_proj" in k or "gate_proj" in k:
                assert torch.equal(src[k], dst[k]), k
        # transformers runs the checkpoint as the weights bitsandbytes dequantizes from it: the fp32 model holding
        # those weights gives the same logits
        dense = tiny_llama()
        mods = dict(dense.named_modules())
        with torch.no_grad():
            for name, w in ours.items():
                mods[name].weight.copy_(w)
            ids = input_ids()
            assert rel_err(model(input_ids=ids).logits, dense(input_ids=ids).logits) < 1e-5


def test_tiny_delta_lost_in_quantization_is_reported(work: Path, tmp_path: Path) -> None:
    base = quantized(work, "nf4", True)
    small = tmp_path / "small"
    import shutil

    shutil.copytree(work / "adapter", small)
    sd = load_file(str(small / "adapter_model.safetensors"))
    save_file({k: (v * 1e-3 if "lora_B" in k else v) for k, v in sd.items()}, str(small / "adapter_model.safetensors"))
    rep = merge_into_base(base, small, tmp_path / "out")
    assert any("quantization noise" in w for w in rep.warnings)
    q = AutoModelForCausalLM.from_pretrained(base, device_map="cpu")
    w4 = dequant_weights(q)
    deltas = peft_deltas(PeftModel.from_pretrained(q, str(small)), "default")
    ours = dequant_weights(AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu"))
    for m in rep.modules:
        d = deltas[m.module].double()
        carried = float(((ours[m.module] - w4[m.module]).double() * d).sum() / d.pow(2).sum())
        assert abs(m.delta_survival - carried) < 1e-3 and carried < 0.5, m.module


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
    deltas = peft_deltas(PeftModel.from_pretrained(tiny_llama(), str(work / "adapter")), "default")
    assert len(deltas) == 3 * len(TARGETS) and set(deltas) < set(w4)
    mods = dict(model.named_modules())
    for name, w in w4.items():
        expect = w + deltas[name] if name in deltas else w
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


# --------------------------------------------------------------------------------------------- GPT-2 Conv1D in 4-bit


@pytest.fixture(scope="module")
def gpt2_work(tmp_path_factory) -> Path:
    """A tiny GPT-2, an adapter on all its Conv1D layers (square attn.c_proj, non-square c_attn/c_fc/mlp.c_proj)
    and the NF4 checkpoint transformers writes: its quant states hold the Conv1D weights transposed (out x in)."""
    from tests.archs import ARCHS

    d = tmp_path_factory.mktemp("gpt2q")
    model, targets = ARCHS["gpt2"](0)
    model.save_pretrained(d / "fp32")
    torch.manual_seed(1)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=targets, fan_in_fan_out=True, init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(d / "adapter")
    GPT2LMHeadModel.from_pretrained(
        d / "fp32", quantization_config=bnb_config("nf4", True), device_map="cpu"
    ).save_pretrained(d / "nf4")
    return d


def test_gpt2_4bit_merge_equals_peft_qlora_merge(gpt2_work: Path) -> None:
    """The delta goes into the 4-bit weight in the Linear layout, as PEFT's bnb Linear4bit merges it."""
    from tests.archs import forward_inputs

    d = gpt2_work
    q = GPT2LMHeadModel.from_pretrained(d / "nf4", device_map="cpu")
    assert tuple(q.transformer.h[0].attn.c_attn.weight.quant_state.shape) == (192, 64)  # out x in
    w4 = dequant_weights(q)
    pm = PeftModel.from_pretrained(q, str(d / "adapter"))
    deltas = peft_deltas(pm, "default")
    x = forward_inputs(q)
    peft_merged = pm.merge_and_unload()
    peft_w = dequant_weights(peft_merged)
    rep = merge_into_base(d / "nf4", d / "adapter", d / "merged")
    ours_model = GPT2LMHeadModel.from_pretrained(d / "merged", device_map="cpu")
    ours = dequant_weights(ours_model)
    assert len(deltas) == 8 and any(w.shape[0] == w.shape[1] for w in w4.values())
    for name, delta in deltas.items():
        target = w4[name] + delta
        e_ours = float((ours[name] - target).norm() / target.norm())
        e_peft = float((peft_w[name] - target).norm() / target.norm())
        assert e_ours <= e_peft + 1e-6, name
        r = next(m for m in rep.modules if m.module == name)
        assert 0.9 < r.delta_survival < 1.1 and r.requant_rel_error < 0.12, name  # delta^T would leave ~0
        carried = float(((ours[name] - w4[name]).double() * delta.double()).sum() / delta.double().pow(2).sum())
        assert abs(r.delta_survival - carried) < 1e-4 and abs(r.requant_rel_error - e_ours) < 1e-4, name
    with torch.no_grad():
        assert torch.allclose(ours_model(**x).logits, peft_merged(**x).logits, atol=1e-5)


def test_gpt2_4bit_dequantize_writes_conv1d_layout(gpt2_work: Path) -> None:
    """--dequantize writes dequant(W4)^T + delta^T (Conv1D's in x out), which GPT-2 loads; its logits equal the
    unmerged QLoRA model's."""
    from tests.archs import forward_inputs

    d = gpt2_work
    merge_into_base(d / "nf4", d / "adapter", d / "deq", dequantize=True)
    model, info = GPT2LMHeadModel.from_pretrained(d / "deq", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    q = GPT2LMHeadModel.from_pretrained(d / "nf4", device_map="cpu")
    w4 = dequant_weights(q)
    from tests.archs import ARCHS

    deltas = peft_deltas(PeftModel.from_pretrained(ARCHS["gpt2"](0)[0], str(d / "adapter")), "default")  # in x out
    assert set(deltas) == set(w4)
    mods = dict(model.named_modules())
    for name, w in w4.items():
        assert mods[name].weight.shape == w.T.shape == deltas[name].shape
        assert torch.allclose(mods[name].weight, w.T + deltas[name], atol=1e-6), name
    qlora = PeftModel.from_pretrained(q, str(d / "adapter"))
    x = forward_inputs(model)
    with torch.no_grad():
        assert torch.allclose(model(**x).logits, qlora(**x).logits, atol=1e-5)


# --------------------------------------------------------------------------------------------- float quant storage


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
def test_float_quant_storage_merges_like_uint8(work: Path, storage: torch.dtype) -> None:
    """With bnb_4bit_quant_storage bfloat16/float32 the packed codes are a float tensor of bit patterns (some read
    as NaN): the merge treats them as bytes. The output holds the same bytes as the uint8-storage merge, keeps the
    storage dtype, loads back in transformers with it, and --dequantize gives the same dense weights."""
    cfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=storage,
    )
    base = work / f"storage-{storage}"
    AutoModelForCausalLM.from_pretrained(work / "fp32", quantization_config=cfg, device_map="cpu").save_pretrained(base)
    src = load_file(str(base / "model.safetensors"))
    packed = [src[w] for w in bnb4.group_quantized(list(src))]
    assert all(p.dtype == storage for p in packed) and any(bool(torch.isnan(p).any()) for p in packed)  # bit patterns
    out = work / f"storage-out-{storage}"
    merge_into_base(base, work / "adapter", out)
    ref_out = work / "storage-ref-uint8"
    if not ref_out.exists():
        merge_into_base(quantized(work, "nf4", True), work / "adapter", ref_out)
    ours, ref = load_file(str(out / "model.safetensors")), load_file(str(ref_out / "model.safetensors"))
    assert ours.keys() == ref.keys()
    for k, v in ours.items():
        assert v.dtype == src[k].dtype and v.shape == src[k].shape, k
        assert torch.equal(v.reshape(-1).view(torch.uint8), ref[k].reshape(-1).view(torch.uint8)), k
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert model.model.layers[0].mlp.down_proj.weight.dtype == storage
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_storage"] == dtype_name(
        storage
    )
    with torch.no_grad():  # the same codes as the uint8-storage merge: the same model
        ref_model = AutoModelForCausalLM.from_pretrained(ref_out, device_map="cpu")
        assert torch.equal(model(input_ids=input_ids()).logits, ref_model(input_ids=input_ids()).logits)
    merge_into_base(base, work / "adapter", work / f"storage-deq-{storage}", dequantize=True)
    deq_ref = work / "storage-deq-uint8"
    if not deq_ref.exists():
        merge_into_base(quantized(work, "nf4", True), work / "adapter", deq_ref, dequantize=True)
    a, b = (
        load_file(str(work / f"storage-deq-{storage}" / "model.safetensors")),
        load_file(str(deq_ref / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _offsets(path: Path) -> list[str]:
    """Tensor names in the order of their bytes in a safetensors file."""
    n = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + n])
    header.pop("__metadata__", None)
    return sorted(header, key=lambda k: header[k]["data_offsets"][0])


def test_group_members_written_together(work: Path) -> None:
    """safetensors stores a transformers NF4 checkpoint's float32 statistics first and the uint8 codes later; the
    merge writes each re-quantized group's members next to each other (so it holds at most one group in memory)
    and the result still loads in transformers with every tensor present."""
    base = quantized(work, "nf4", True)
    out = work / "out-order"
    merge_into_base(base, work / "adapter", out)

    def runs(order: list[str]) -> int:  # how many separate runs the members of the merged groups form
        groups = [next((g for g in merged if k.startswith(g + ".") or k == g), None) for k in order]
        return sum(1 for i, g in enumerate(groups) if g is not None and (i == 0 or groups[i - 1] != g))

    kinds = {"q_proj": "self_attn", "v_proj": "self_attn", "down_proj": "mlp"}
    merged = [f"model.layers.{i}.{kinds[m]}.{m}.weight" for i in range(3) for m in TARGETS]
    before, after = _offsets(base / "model.safetensors"), _offsets(out / "model.safetensors")
    assert runs(before) > len(merged)  # the base interleaves the groups' members
    assert runs(after) == len(merged) and sorted(before) == sorted(after)
    assert load_file(str(out / "model.safetensors")).keys() == load_file(str(base / "model.safetensors")).keys()
    AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
