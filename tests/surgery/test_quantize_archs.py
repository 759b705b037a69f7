"""merge --quantize across architectures, against transformers + bitsandbytes quantizing the merged model.

For every architecture of ``tests/archs.py``: a tiny model saved in float32 or bfloat16, a PEFT LoRA adapter on
its linear layers (task models keep their head as PEFT's ``modules_to_save``), then

* ours: ``merge_into_base(base, adapter, out, quantize="nf4")``;
* transformers' path: PEFT ``merge_and_unload`` -> ``save_pretrained`` -> ``from_pretrained`` with
  ``BitsAndBytesConfig(nf4, double quantization)`` -> ``save_pretrained``;
* transformers quantizing the dense checkpoint our plain merge writes (the exact contract of ``--quantize``).

Measured (transformers 5.24, PEFT 0.21.2, bitsandbytes 0.50.2): ours equals both references bit for bit on
every architecture, float32 and bfloat16. PEFT's merge is one rounding of ``W + delta`` too (its fp32 LoRA
factors are added in place to the bf16 weight, computed in fp32), and the scaling here (2) is exact in floating
point, so not even a 4-bit code differs; the comparison with PEFT's path still allows codes one step apart.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
from click.testing import CliRunner  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import BitsAndBytesConfig  # noqa: E402

from adaptermerge.errors import UnsupportedArchitecture  # noqa: E402
from adaptermerge.io import bnb4  # noqa: E402
from adaptermerge.surgery.merge import merge_into_base  # noqa: E402
from adaptermerge_cli.main import cli  # noqa: E402
from tests.archs import ARCHS, forward_inputs  # noqa: E402

BF16 = {"llama", "qwen2", "gemma", "gemma2", "gemma3", "mistral", "phi3", "gpt_neox", "qwen2_moe", "t5"}
TASK = {"bert_cls": "SEQ_CLS", "roberta_cls": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM", "bart": "SEQ_2_SEQ_LM"}
QUANTIZABLE = [n for n in ARCHS if n != "falcon"]


def bnb_config(dtype: torch.dtype) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("archs")


def base_and_adapter(root: Path, name: str):
    """Save the tiny model and a PEFT adapter on it; returns (folder, model class, dtype, PEFT model)."""
    dtype = torch.bfloat16 if name in BF16 else torch.float32
    model, targets = ARCHS[name](0)
    model = model.to(dtype)
    d = root / name
    model.save_pretrained(d / "base")
    torch.manual_seed(1)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, task_type=TASK.get(name, "CAUSAL_LM")
    )
    pm = get_peft_model(model, lora)
    pm.save_pretrained(d / "adapter")
    return d, type(model), dtype, pm


def quantize_with_transformers(cls: type, dense: Path, out: Path, dtype: torch.dtype) -> None:
    cls.from_pretrained(dense, quantization_config=bnb_config(dtype), device_map="cpu").save_pretrained(out)


def code_steps(ours: torch.Tensor, ref: torch.Tensor) -> tuple[int, int]:
    """(number of 4-bit codes that differ, largest distance in the sorted NF4 code book) of two packed weights."""

    def codes(t: torch.Tensor) -> torch.Tensor:
        b = t.reshape(-1).view(torch.uint8)
        return torch.stack([b >> 4, b & 15], dim=1).reshape(-1).long()

    a, b = codes(ours), codes(ref)
    return int((a != b).sum()), int((a - b).abs().max())


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_quantize_equals_transformers(root: Path, name: str) -> None:
    d, cls, dtype, pm = base_and_adapter(root, name)
    rep = merge_into_base(d / "base", d / "adapter", d / "ours", quantize="nf4")
    assert any(m.quant_type == "nf4" for m in rep.modules)  # the adapter touches layers that end up 4-bit
    merge_into_base(d / "base", d / "adapter", d / "dense")
    quantize_with_transformers(cls, d / "dense", d / "ref_dense", dtype)
    pm.merge_and_unload().save_pretrained(d / "peft_dense")
    quantize_with_transformers(cls, d / "peft_dense", d / "ref_peft", dtype)
    ours, ref_dense, ref_peft = (load_file(str(d / f / "model.safetensors")) for f in ("ours", "ref_dense", "ref_peft"))

    # the same tensors (so the same layers 4-bit), dtypes and shapes as transformers writes
    assert {k: (v.dtype, v.shape) for k, v in ours.items()} == {k: (v.dtype, v.shape) for k, v in ref_peft.items()}
    # bit for bit what transformers writes for the dense checkpoint a plain merge writes
    for k, v in ref_dense.items():
        assert torch.equal(ours[k], v), k
    # against PEFT's merge: codes at most one step apart, dense tensors equal (measured: everything identical)
    groups = bnb4.group_quantized(list(ref_peft))
    differ, total = 0, 0
    for w in groups:
        n, step = code_steps(ours[w], ref_peft[w])
        assert step <= 1, w
        differ, total = differ + n, total + 2 * ours[w].numel() * ours[w].element_size()
    assert differ <= total // 1000
    members = {m for ms in groups.values() for m in ms}
    for k, v in ref_peft.items():
        if k not in members:
            assert torch.equal(ours[k], v), k
    qc = [json.loads((d / f / "config.json").read_text())["quantization_config"] for f in ("ours", "ref_peft")]
    assert qc[0] == qc[1]
    if name == "t5":  # wo (_keep_in_fp32_modules) stays dense in transformers' 4-bit T5, with its LoRA merged
        base = load_file(str(d / "base" / "model.safetensors"))
        wo = [k for k in ours if k.endswith(".wo.weight")]
        assert wo and all(k not in groups and not torch.equal(ours[k], base[k]) for k in wo)

    model, info = cls.from_pretrained(d / "ours", device_map="cpu", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    ref = cls.from_pretrained(d / "ref_peft", device_map="cpu")
    x = forward_inputs(model)
    with torch.no_grad():
        lo, lr = model(**x).logits.float(), ref(**x).logits.float()
    if differ == 0:
        assert torch.equal(lo, lr)
    else:
        assert torch.allclose(lo, lr, atol=0.05 * float(lr.abs().max()))


def test_falcon_refused_transformers_quantizes_nothing(root: Path, tmp_path: Path) -> None:
    """FalconLinear subclasses nn.Linear, and transformers converts only exact nn.Linear/Conv1D types: its
    4-bit "model" has no 4-bit layer at all. --quantize says so in one line and writes nothing."""
    d, cls, dtype, _ = base_and_adapter(root, "falcon")
    quantize_with_transformers(cls, d / "base", tmp_path / "ref", dtype)
    assert not any(".quant_state." in k for k in load_file(str(tmp_path / "ref" / "model.safetensors")))
    with pytest.raises(UnsupportedArchitecture, match="no layer of FalconForCausalLM"):
        merge_into_base(d / "base", d / "adapter", tmp_path / "out", quantize="nf4")
    r = CliRunner().invoke(
        cli, ["merge", str(d / "base"), str(d / "adapter"), "-o", str(tmp_path / "out"), "--quantize", "nf4"]
    )
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and "FalconForCausalLM" in r.output
    assert not (tmp_path / "out").exists()
    merge_into_base(d / "base", d / "adapter", tmp_path / "dense")  # a plain merge works


def test_float16_upcast_refused_then_bfloat16_works(root: Path, tmp_path: Path) -> None:
    """From a float16 checkpoint transformers loads T5's ``wo`` in float32 (``_keep_in_fp32_modules``);
    --quantize does not mirror that dtype change and refuses, naming --dtype."""
    model, targets = ARCHS["t5"](0)
    model.half().save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q", "v"], init_lora_weights=False)).save_pretrained(
        tmp_path / "a"
    )
    with pytest.raises(UnsupportedArchitecture, match=r"wo\.weight in float32.*`dtype`"):
        merge_into_base(tmp_path / "base", tmp_path / "a", tmp_path / "out", quantize="nf4")
    assert not (tmp_path / "out").exists()
    merge_into_base(tmp_path / "base", tmp_path / "a", tmp_path / "out", quantize="nf4", dtype="bfloat16")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert out["encoder.block.0.layer.1.DenseReluDense.wo.weight"].dtype == torch.bfloat16
