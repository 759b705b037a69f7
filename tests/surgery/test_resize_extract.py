"""resize (re-rank one adapter) and extract (LoRA from a fine-tuned checkpoint)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adaptermerge.errors import IncompatibleAdapters, UsageError
from adaptermerge.surgery.extract import extract_lora, save_extracted, truncated_svd
from adaptermerge.surgery.merge import merge_into_base
from adaptermerge.surgery.resize import resize_adapter
from tests.helpers import input_ids, make_adapter, peft_deltas, peft_model, rel_err, tiny_gpt2, tiny_llama


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "adaptermerge_cli", *args], capture_output=True, text=True, timeout=300
    )


def test_resize_matches_dense_truncation(tmp_path: Path) -> None:
    a = make_adapter(tmp_path / "a", tiny_llama, r=16, lora_alpha=16, target_modules=["q_proj", "down_proj"])
    src = peft_deltas(peft_model(tiny_llama, a), "a0")
    out = resize_adapter(a, rank=5)
    assert {rep["name"] for rep in out.provenance["modules"]} == set(src)
    for rep in out.provenance["modules"]:
        dense = src[rep["name"]].double()
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        best = (u[:, :5] * s[:5]) @ vh[:5]
        assert rep["rank"] == 5
        assert rel_err(out.modules[rep["name"]].delta(torch.float64), best) < 1e-5
        assert abs(rep["kept_energy"] - float((s[:5] ** 2).sum() / (s**2).sum())) < 1e-5


def test_resize_cli_energy_and_peft_load(tmp_path: Path) -> None:
    a = make_adapter(tmp_path / "a", tiny_llama, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    p = cli("resize", str(a), "--energy", "0.8", "-o", str(tmp_path / "r"), "--json")
    assert p.returncode == 0, p.stderr
    reports = {m["name"]: m for m in json.loads(p.stdout)["modules"]}
    # per module: PEFT's delta of the input, its smallest rank keeping 80% of the energy (dense SVD), and the
    # resized adapter as PEFT loads it: that rank, the truncated delta, the report saying so
    src = peft_deltas(peft_model(tiny_llama, a), "a0")
    pm = peft_model(tiny_llama, tmp_path / "r")
    got = peft_deltas(pm, "a0")
    layers = dict(pm.base_model.model.named_modules())
    assert set(got) == set(src) == set(reports)
    for name, d in src.items():
        u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
        share = torch.cumsum(s * s, 0) / (s * s).sum()
        k = int((share < 0.8 - 1e-12).sum()) + 1
        assert layers[name].lora_A["a0"].weight.shape[0] == k == reports[name]["rank"], name
        assert rel_err(got[name], (u[:, :k] * s[:k]) @ vh[:k]) < 1e-5, name
        assert abs(reports[name]["kept_energy"] - float(share[k - 1])) < 1e-5, name
    p = cli("resize", str(a), "-o", str(tmp_path / "r2"))
    assert p.returncode == 2 and "--rank" in p.stderr and not (tmp_path / "r2").exists()


def test_extract_recovers_known_low_rank_delta(tmp_path: Path) -> None:
    tiny_llama().save_pretrained(tmp_path / "base")
    a = make_adapter(tmp_path / "a", tiny_llama, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    merge_into_base(tmp_path / "base", a, tmp_path / "tuned")
    adapter, report = extract_lora(tmp_path / "base", tmp_path / "tuned", rank=4)
    src = peft_deltas(peft_model(tiny_llama, a), "a0")
    assert set(adapter.modules) == set(src) and report.unchanged > 0
    for name, d in src.items():
        assert rel_err(adapter.modules[name].delta(), d) < 1e-5
    out = save_extracted(adapter, report, tmp_path / "x")
    pm = peft_model(tiny_llama, out)
    from transformers import AutoModelForCausalLM

    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned")
    with torch.no_grad():
        assert torch.allclose(pm(input_ids=input_ids()).logits, tuned(input_ids=input_ids()).logits, atol=1e-4)


def test_extract_gpt2_conv1d_and_norms(tmp_path: Path) -> None:
    tiny_gpt2().save_pretrained(tmp_path / "base")
    a = make_adapter(
        tmp_path / "a", tiny_gpt2, r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True
    )
    merge_into_base(tmp_path / "base", a, tmp_path / "tuned")
    # also change a LayerNorm: not decomposable
    sd = load_file(str(tmp_path / "tuned" / "model.safetensors"))
    sd["transformer.ln_f.weight"] += 0.5
    save_file(sd, str(tmp_path / "tuned" / "model.safetensors"), metadata={"format": "pt"})
    adapter, report = extract_lora(tmp_path / "base", tmp_path / "tuned", rank=4)
    assert report.modules_to_save == ["transformer.ln_f.weight"] and adapter.modules_to_save == ["transformer.ln_f"]
    assert all(m.layout == "conv1d" for m in adapter.modules.values())
    out = save_extracted(adapter, report, tmp_path / "x")
    from transformers import AutoModelForCausalLM

    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned")
    pm = peft_model(tiny_gpt2, out)
    with torch.no_grad():
        assert torch.allclose(pm(input_ids=input_ids()).logits, tuned(input_ids=input_ids()).logits, atol=1e-4)
    skipped, rep2 = extract_lora(tmp_path / "base", tmp_path / "tuned", rank=4, skip_undecomposable=True)
    assert rep2.skipped == ["transformer.ln_f.weight"] and not skipped.modules_to_save


def test_randomized_svd_close_to_exact() -> None:
    g = torch.Generator().manual_seed(0)
    m, n, r = 1500, 1200, 12
    d = torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g) + 0.05 * torch.randn(m, n, generator=g)
    u, s, vh, kind, gap = truncated_svd(d, 12, None)
    assert kind == "randomized" and gap is not None and gap < 1e-4
    ue, se, vhe = torch.linalg.svd(d, full_matrices=False)
    best = float((d - (ue[:, :12] * se[:12]) @ vhe[:12]).norm())
    ours = float((d - (u * s) @ vh).norm())
    assert ours <= best * 1.001
    _, s2, _, kind2, _ = truncated_svd(d, None, 0.9)
    assert kind2 in ("randomized", "exact") and float((s2**2).sum() / (d**2).sum()) >= 0.9 - 1e-6


def test_extract_refusals(tmp_path: Path) -> None:
    tiny_llama().save_pretrained(tmp_path / "base")
    tiny_gpt2().save_pretrained(tmp_path / "other")
    with pytest.raises(IncompatibleAdapters):
        extract_lora(tmp_path / "base", tmp_path / "other", rank=4)
    with pytest.raises(IncompatibleAdapters, match="identical"):
        extract_lora(tmp_path / "base", tmp_path / "base", rank=4)
    with pytest.raises(UsageError):
        extract_lora(tmp_path / "base", tmp_path / "base")
    p = cli("extract", str(tmp_path / "base"), str(tmp_path / "other"), "--rank", "4", "-o", str(tmp_path / "x"))
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_extract_full_finetune_gpt2_biases_and_tied_head(tmp_path: Path) -> None:
    """A 'full fine-tune' that changes weights, biases and the tied input embedding: the adapter carries the
    biases as PEFT's bias='lora_only' tensors and the embedding delta on the tied head too, so PEFT reproduces
    the model."""
    tiny_gpt2().save_pretrained(tmp_path / "base")
    sd = load_file(str(tmp_path / "base" / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    for k in list(sd):
        if k.endswith(("c_attn.weight", "c_fc.weight", "wte.weight")):
            sd[k] = sd[k] + 0.05 * torch.randn(sd[k].shape[0], 3, generator=g) @ torch.randn(
                3, sd[k].shape[1], generator=g
            )
        if k.endswith(("c_attn.bias", "c_fc.bias")):
            sd[k] = sd[k] + 0.1 * torch.randn(sd[k].shape, generator=g)
    (tmp_path / "tuned").mkdir()
    save_file(sd, str(tmp_path / "tuned" / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(tmp_path / "base" / "config.json", tmp_path / "tuned" / "config.json")
    adapter, report = extract_lora(tmp_path / "base", tmp_path / "tuned", rank=3)
    assert not report.modules_to_save and "lm_head" in adapter.modules
    assert sum(k.endswith(".base_layer.bias") for k in adapter.extra_tensors) == 4
    out = save_extracted(adapter, report, tmp_path / "x")
    assert json.loads((out / "adapter_config.json").read_text())["bias"] == "lora_only"
    from transformers import AutoModelForCausalLM

    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned")
    pm = peft_model(tiny_gpt2, out)
    with torch.no_grad():
        assert torch.allclose(pm(input_ids=input_ids()).logits, tuned(input_ids=input_ids()).logits, atol=1e-4)
    # and merging the extracted adapter back gives the tuned weights
    merge_into_base(tmp_path / "base", out, tmp_path / "merged")
    back = load_file(str(tmp_path / "merged" / "model.safetensors"))
    for k, t in sd.items():
        assert torch.allclose(back[k], t, atol=1e-5), k
