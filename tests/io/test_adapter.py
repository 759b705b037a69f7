"""Reading and writing PEFT adapter folders: round trips against PEFT, and every bad input."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import adaptermerge
from adaptermerge.errors import InvalidAdapter, OutputExistsError, UnsafeFormat, UnsupportedAdapter, UsageError
from adaptermerge.io.adapter import get_pattern_key
from tests.helpers import (
    input_ids,
    make_adapter,
    peft_deltas,
    peft_model,
    rel_err,
    tiny_gpt2,
    tiny_llama,
    tiny_llama_cls,
)

VARIANTS = {
    "plain": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "rslora": (tiny_llama, dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "down_proj"])),
    "patterns": (
        tiny_llama,
        dict(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj"],
            rank_pattern={"v_proj": 2, "layers.1.mlp.up_proj": 6}, alpha_pattern={"layers.2.self_attn.q_proj": 32, "gate_proj": 3},
        ),
    ),
    # several keys match one module: PEFT takes the first in dict order (and saves the config with sorted keys, so
    # the keys are given here in sorted order: otherwise PEFT cannot load the adapter it made)
    "overlapping-patterns": (
        tiny_llama,
        dict(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
            rank_pattern={"layers.1.self_attn.v_proj": 6, "v_proj": 2}, alpha_pattern={"layers.0.self_attn.q_proj": 32, "q_proj": 3},
        ),
    ),
    "layers": (tiny_llama, dict(r=4, lora_alpha=4, target_modules=["q_proj", "o_proj"], layers_to_transform=[0, 2])),
    "regex": (tiny_llama, dict(r=2, lora_alpha=5, target_modules=r".*\.(q_proj|down_proj)")),
    "embedding": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "bias": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_bias=True)),
    "dora": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)),
    "gpt2": (tiny_gpt2, dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "seqcls": (tiny_llama_cls, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["score"], task_type="SEQ_CLS")),
}  # fmt: skip


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_round_trip_matches_peft(tmp_path: Path, variant: str) -> None:
    model_fn, lora = VARIANTS[variant]
    src = make_adapter(tmp_path / "src", model_fn, seed=3, **lora)
    adapter = adaptermerge.load_adapter(src)
    out = adaptermerge.save_adapter(adapter, tmp_path / "out")
    ref = peft_model(model_fn, src)
    new = peft_model(model_fn, out)
    d_ref, d_new = peft_deltas(ref, "a0"), peft_deltas(new, "a0")
    assert set(d_ref) == set(d_new) and d_ref
    for name in d_ref:
        assert rel_err(d_new[name], d_ref[name]) < 1e-6, name
        # our canonical delta equals PEFT's, in the stored layout
        assert rel_err(adapter.modules[name].weight_delta(), d_ref[name]) < 1e-6, name
    ids = input_ids()
    with torch.no_grad():
        lo_ref = ref(input_ids=ids).logits
        lo_new = new(input_ids=ids).logits
    assert torch.allclose(lo_ref, lo_new, atol=1e-5, rtol=1e-5)
    # loading what we wrote reproduces the canonical tensors exactly
    again = adaptermerge.load_adapter(out)
    for name, m in adapter.modules.items():
        assert torch.equal(again.modules[name].A, m.A) and torch.equal(again.modules[name].B, m.B)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False
    assert all(v == cfg["alpha_pattern"][k] for k, v in cfg["rank_pattern"].items())


def test_pattern_matching_like_peft() -> None:
    from peft.utils.other import get_pattern_key as peft_key

    keys = ["v_proj", "layers.1.mlp.up_proj", r"layers\.[02]\..*q_proj", "proj", "q_proj", "self_attn.q_proj"]
    names = [
        "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.up_proj", "model.layers.11.mlp.up_proj",
        "model.layers.2.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "lm_head", "model.layers.1.self_attn.q_proj",
    ]  # fmt: skip
    matched = []
    for n in names:
        ours = get_pattern_key(keys, n)
        assert (ours if ours is not None else n) == peft_key(keys, n)
        matched.append(sum(bool(re.match(rf"(.*\.)?({k})$", n)) for k in keys))
    assert max(matched) == 3  # some names match several keys, so the order is tested


def test_scaling_folded(tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a", tiny_llama, r=4, lora_alpha=12, target_modules=["q_proj"])
    raw = load_file(str(src / "adapter_model.safetensors"))
    a = adaptermerge.load_adapter(src)
    name = "model.layers.0.self_attn.q_proj"
    expect = raw[f"base_model.model.{name}.lora_B.weight"] @ raw[f"base_model.model.{name}.lora_A.weight"] * 3.0
    assert torch.allclose(a.modules[name].delta(), expect, rtol=1e-6, atol=1e-7)


def _break(folder: Path, how: str) -> None:
    st = folder / "adapter_model.safetensors"
    cfg = folder / "adapter_config.json"
    if how == "no-config":
        cfg.unlink()
    elif how == "bad-json":
        cfg.write_text("{not json")
    elif how == "truncated":
        data = st.read_bytes()
        st.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        st.write_bytes(b"\x00" * 7)
    elif how in ("r0", "alpha-neg"):
        c = json.loads(cfg.read_text())
        c.update({"r": 0} if how == "r0" else {"lora_alpha": -4})
        cfg.write_text(json.dumps(c))
    elif how in ("nan", "shape", "rank-config", "missing-b"):
        sd = load_file(str(st))
        k = next(k for k in sd if k.endswith("lora_A.weight"))
        if how == "nan":
            sd[k][0, 0] = float("nan")
        elif how == "shape":
            sd[k] = torch.randn(sd[k].shape[0] + 1, sd[k].shape[1])
        elif how == "missing-b":
            del sd[k.replace("lora_A", "lora_B")]
        else:
            kb = k.replace("lora_A", "lora_B")
            sd[k] = torch.randn(2, sd[k].shape[1])
            sd[kb] = torch.randn(sd[kb].shape[0], 2)
        save_file(sd, str(st))
    elif how == "bin-only":
        st.unlink()
        (folder / "adapter_model.bin").write_bytes(b"pickle would be here")
    elif how == "not-lora":
        c = json.loads(cfg.read_text())
        c["peft_type"] = "IA3"
        cfg.write_text(json.dumps(c))


BAD = {
    "no-config": InvalidAdapter, "bad-json": InvalidAdapter, "truncated": InvalidAdapter, "garbage": InvalidAdapter,
    "r0": InvalidAdapter, "alpha-neg": InvalidAdapter, "nan": InvalidAdapter, "shape": InvalidAdapter,
    "rank-config": InvalidAdapter, "missing-b": InvalidAdapter, "bin-only": UnsafeFormat, "not-lora": UnsupportedAdapter,
}  # fmt: skip


@pytest.mark.parametrize("how", sorted(BAD))
def test_bad_inputs_raise_typed_errors(tmp_path: Path, llama_adapter: Path, how: str) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(llama_adapter, bad)
    _break(bad, how)
    before = {p.name: p.read_bytes() for p in bad.iterdir()}
    with pytest.raises(BAD[how]) as ei:
        adaptermerge.load_adapter(bad)
    assert "\n" not in str(ei.value)
    assert {p.name: p.read_bytes() for p in bad.iterdir()} == before


def test_error_names_module(tmp_path: Path, llama_adapter: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(llama_adapter, bad)
    _break(bad, "shape")
    with pytest.raises(InvalidAdapter, match=r"model\.layers\.\d\.self_attn"):
        adaptermerge.load_adapter(bad)


def test_bin_is_never_unpickled(tmp_path: Path, llama_adapter: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(llama_adapter, bad)
    _break(bad, "bin-only")
    with pytest.raises(UnsafeFormat, match="pickle"):
        adaptermerge.load_adapter(bad)
    # even when allowed, only weights_only loading is used: arbitrary bytes are rejected, not executed
    with pytest.raises(InvalidAdapter, match="weights_only"):
        adaptermerge.load_adapter(bad, allow_pickle=True)


def test_save_refuses_existing_and_input(tmp_path: Path, llama_adapter: Path) -> None:
    a = adaptermerge.load_adapter(llama_adapter)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError):
        adaptermerge.save_adapter(a, out)
    assert (out / "keep.txt").read_text() == "x"
    adaptermerge.save_adapter(a, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").exists()
    with pytest.raises(UsageError):
        adaptermerge.save_adapter(a, llama_adapter, overwrite=True)
    with pytest.raises(UsageError):
        adaptermerge.save_adapter(a, llama_adapter / "inner")


def test_unknown_tensors_are_refused(tmp_path: Path, llama_adapter: Path) -> None:
    folder = tmp_path / "x"
    shutil.copytree(llama_adapter, folder)
    sd = load_file(str(folder / "adapter_model.safetensors"))
    sd["base_model.model.something.odd"] = torch.ones(3)
    save_file(sd, str(folder / "adapter_model.safetensors"))
    with pytest.raises(UnsupportedAdapter, match="something.odd"):
        adaptermerge.load_adapter(folder)


@pytest.mark.parametrize("how", sorted(BAD))
def test_bad_inputs_cli_one_line_nothing_written(tmp_path: Path, llama_adapter: Path, how: str) -> None:
    from click.testing import CliRunner

    from adaptermerge_cli.main import cli

    bad = tmp_path / "bad"
    shutil.copytree(llama_adapter, bad)
    _break(bad, how)
    before = {p.name: p.read_bytes() for p in bad.iterdir()}
    for args in (["inspect", str(bad)], ["combine", str(llama_adapter), str(bad), "-o", str(tmp_path / "out")]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 1, (args, r.output)
        assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
        assert "Traceback" not in r.output
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert {p.name: p.read_bytes() for p in bad.iterdir()} == before


@pytest.mark.parametrize(
    "patch,needle",
    [
        ({"rank_pattern": {"q_proj": "x"}}, "rank_pattern"),
        ({"target_modules": "(q_proj"}, "regex"),
        ({"target_modules": 5}, "target_modules"),
    ],
)
def test_bad_config_values_are_invalid_adapter(tmp_path: Path, llama_adapter: Path, patch: dict, needle: str) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(llama_adapter, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg.update(patch)
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidAdapter, match=needle):
        adaptermerge.load_adapter(bad)


def test_dora_on_embeddings_refused(tmp_path: Path) -> None:
    a = make_adapter(tmp_path / "a", tiny_llama, r=4, target_modules=["embed_tokens"], use_dora=True)
    with pytest.raises(UnsupportedAdapter, match="DoRA on an embedding"):
        adaptermerge.load_adapter(a)


def test_output_permissions_follow_umask(tmp_path: Path, llama_adapter: Path) -> None:
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = adaptermerge.save_adapter(adaptermerge.load_adapter(llama_adapter), tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
