"""validate: good adapters and faithful merges pass; broken, wrong-base, tampered and incomplete ones fail with the
right check named. Figures are compared with independent computations (PEFT's deltas, dense SVDs, transformers)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

import adaptermerge
from adaptermerge.errors import UsageError
from adaptermerge.validation.interference import sign_conflicts
from adaptermerge_cli.main import cli
from tests.helpers import make_adapter, peft_deltas, peft_model, tiny_gpt2, tiny_llama

QVO = ["q_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama base (fp32 and bf16), two adapters on it, and merges of them."""
    d = tmp_path_factory.mktemp("validate")
    tiny_llama().save_pretrained(d / "base")
    tiny_llama(dtype=torch.bfloat16).save_pretrained(d / "base16")
    make_adapter(d / "a", tiny_llama, r=4, lora_alpha=8, target_modules=QVO, seed=1)
    make_adapter(d / "b", tiny_llama, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=2)
    adaptermerge.merge_into_base(d / "base", d / "a", d / "merged")
    adaptermerge.merge_into_base(d / "base16", d / "a", d / "merged16")
    return d


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_tensors(folder: Path, fn, name: str = "adapter_model.safetensors") -> None:
    sd = load_file(str(folder / name))
    fn(sd)
    save_file(sd, str(folder / name), metadata={"format": "pt"})


def edit_config(folder: Path, name: str = "adapter_config.json", **changes) -> None:
    cfg = json.loads((folder / name).read_text())
    cfg.update(changes)
    (folder / name).write_text(json.dumps(cfg))


def status(report, name: str, subject: str | None = None) -> str:
    c = report.check(name, subject)
    assert c is not None, (name, [x.name for x in report.checks])
    return c.status


# ------------------------------------------------------------------------------------------ one adapter


def test_good_adapter_passes_with_base_and_vllm(work: Path) -> None:
    r = adaptermerge.validate(work / "a", base=work / "base", target="vllm")
    assert r.ok and r.kind == "adapter"
    for name in ("adapter.files", "adapter.finite", "adapter.structure", "adapter.config", "adapter.norms",
                 "adapter.effective_rank", "adapter.anti_patterns", "base.modules", "base.targets", "base.vocab",
                 "serving.vllm"):  # fmt: skip
        assert status(r, name) == "pass", (name, r.check(name).message)
    assert status(r, "base.identity") == "warn"  # PEFT recorded no base name for a model built from a config
    assert "default max_lora_rank (16) covers it" in r.check("serving.vllm").figures["findings"][0]["message"]
    # per-module delta norms are PEFT's own ||get_delta_weight||
    theirs = peft_deltas(peft_model(tiny_llama, work / "a"), "a0")
    ours = r.check("adapter.norms").figures["modules"]
    assert set(ours) == set(theirs)
    assert all(math.isclose(ours[n], float(d.norm()), rel_tol=1e-4) for n, d in theirs.items())


def test_report_json_is_stable_and_documented_shape(work: Path) -> None:
    one = adaptermerge.validate(work / "a", base=work / "base").to_json()
    two = adaptermerge.validate(work / "a", base=work / "base").to_json()
    assert one == two
    d = json.loads(one)
    assert list(d) == ["schema", "ok", "path", "kind", "inputs", "summary", "checks"]
    assert d["schema"] == "adaptermerge.validate/1" and d["ok"] is True
    assert all(list(c) == ["name", "status", "subject", "message", "hint", "figures"] for c in d["checks"])
    assert d["summary"]["pass"] + d["summary"]["warn"] + d["summary"]["fail"] == len(d["checks"])


def test_nan_adapter_fails_finite_check_without_traceback(work: Path, tmp_path: Path) -> None:
    bad = copy(work / "a", tmp_path / "nan")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    edit_tensors(bad, lambda sd: sd[key].view(-1).__setitem__(3, float("nan")))
    r = adaptermerge.validate(bad)
    assert not r.ok and status(r, "adapter.finite") == "fail"
    assert r.check("adapter.finite").figures["nonfinite_tensors"] == [key]
    assert r.check("adapter.structure") is None  # not run on non-finite tensors, and the message says so
    res = CliRunner().invoke(cli, ["validate", str(bad), "--json"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    d = json.loads(res.stdout)
    assert d["ok"] is False and [c["name"] for c in d["checks"] if c["status"] == "fail"] == ["adapter.finite"]


def test_inf_in_modules_to_save_tensor_is_found(work: Path, tmp_path: Path) -> None:
    bad = copy(work / "a", tmp_path / "inf")
    edit_config(bad, modules_to_save=["lm_head"])
    edit_tensors(bad, lambda sd: sd.__setitem__("base_model.model.lm_head.weight", torch.full((128, 64), float("inf"))))
    r = adaptermerge.validate(bad)
    assert r.check("adapter.finite").figures["nonfinite_tensors"] == ["base_model.model.lm_head.weight"]


def test_broken_files_and_inconsistent_config_fail_named(work: Path, tmp_path: Path) -> None:
    trunc = copy(work / "a", tmp_path / "trunc")
    data = (trunc / "adapter_model.safetensors").read_bytes()
    (trunc / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    r = adaptermerge.validate(trunc)
    assert status(r, "adapter.files") == "fail" and "corrupt or truncated" in r.check("adapter.files").message

    pickle_only = copy(work / "a", tmp_path / "pickle")
    (pickle_only / "adapter_model.safetensors").rename(pickle_only / "adapter_model.bin")
    r = adaptermerge.validate(pickle_only)
    assert status(r, "adapter.files") == "fail" and "pickle" in r.check("adapter.files").message

    wrong_r = copy(work / "a", tmp_path / "rank")
    edit_config(wrong_r, r=8)
    r = adaptermerge.validate(wrong_r)
    assert status(r, "adapter.structure") == "fail" and "r=8" in r.check("adapter.structure").message

    r = adaptermerge.validate(tmp_path / "nowhere")
    assert r.kind == "unknown" and status(r, "path") == "fail"


def test_anti_patterns_are_warnings(tmp_path: Path) -> None:
    hot = make_adapter(tmp_path / "hot", tiny_llama, r=2, lora_alpha=128, target_modules=["q_proj"])
    r = adaptermerge.validate(hot)
    assert r.ok and status(r, "adapter.anti_patterns") == "warn"
    assert [f["code"] for f in r.check("adapter.anti_patterns").figures["findings"]] == ["alpha_ratio_high", "rank_low"]
    big = make_adapter(tmp_path / "big", tiny_llama, r=136, lora_alpha=136, target_modules=["v_proj"])
    r = adaptermerge.validate(big, target="vllm")
    assert "above 128" in r.check("adapter.anti_patterns").message
    assert "--max-lora-rank 256" in r.check("serving.vllm").message


def test_adapter_dtype_against_base_compute_dtype(work: Path) -> None:
    r = adaptermerge.validate(work / "a", base=work / "base16")
    found = r.check("adapter.anti_patterns").figures["findings"]
    assert [f["code"] for f in found] == ["dtype_mismatch"] and "bfloat16" in found[0]["message"]
    assert r.check("base.open").figures["compute_dtype"] == "bfloat16"


def test_norm_outlier_is_flagged(work: Path, tmp_path: Path) -> None:
    odd = copy(work / "a", tmp_path / "odd")
    key = "base_model.model.model.layers.2.self_attn.o_proj.lora_B.weight"
    edit_tensors(odd, lambda sd: sd[key].mul_(50.0))
    r = adaptermerge.validate(odd)
    c = r.check("adapter.norms")
    assert c.status == "warn" and list(c.figures["outliers"]) == ["model.layers.2.self_attn.o_proj"]


def test_effective_rank_matches_dense_svd(work: Path, tmp_path: Path) -> None:
    low = copy(work / "a", tmp_path / "low")

    def squash(sd):  # q_proj of layer 0: rank-1 content in rank-4 factors
        a = sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
        a.copy_(a[:1].repeat(4, 1) * torch.tensor([[1.0], [2.0], [3.0], [4.0]]))

    edit_tensors(low, squash)
    r = adaptermerge.validate(low)
    per = r.check("adapter.effective_rank").figures["modules"]
    for name, d in peft_deltas(peft_model(tiny_llama, low), "a0").items():
        s2 = torch.linalg.svdvals(d.double()) ** 2
        k = int(torch.searchsorted(torch.cumsum(s2, 0) / s2.sum(), torch.tensor(0.99 - 1e-12, dtype=s2.dtype))) + 1
        assert per[name] == [k, 4], name
    assert per["model.layers.0.self_attn.q_proj"][0] == 1


def test_unmodelled_config_fields_fail(work: Path, tmp_path: Path) -> None:
    pissa = copy(work / "a", tmp_path / "pissa")
    edit_config(pissa, init_lora_weights="pissa")
    r = adaptermerge.validate(pissa, target="vllm")
    assert status(r, "adapter.config") == "fail" and "init_lora_weights='pissa'" in r.check("adapter.config").message
    assert status(r, "serving.vllm") == "fail"


# ------------------------------------------------------------------------------------------ against a base


def test_wrong_base_adapter_fails_naming_first_module(work: Path, tmp_path: Path) -> None:
    g = make_adapter(tmp_path / "gpt2", tiny_gpt2, r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    r = adaptermerge.validate(g, base=work / "base")
    assert status(r, "base.modules") == "fail" and "transformer.h.0.attn.c_attn" in r.check("base.modules").message
    res = CliRunner().invoke(cli, ["validate", str(g), "--base", str(work / "base")])
    assert res.exit_code == 1 and "FAIL  base.modules" in res.stdout and "NOT safe to deploy" in res.stdout


def test_other_shapes_fail_with_the_module_and_shapes(work: Path, tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.helpers import LLAMA_CFG

    def wide(seed: int = 0) -> LlamaForCausalLM:
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(**{**LLAMA_CFG, "intermediate_size": 192})).eval()

    a = make_adapter(tmp_path / "wide", wide, r=4, lora_alpha=8, target_modules=["down_proj"])
    r = adaptermerge.validate(a, base=work / "base")
    msg = r.check("base.modules").message
    assert "model.layers.0.mlp.down_proj" in msg and "[64, 192]" in msg and "[64, 128]" in msg


def test_base_identity_and_vocabulary(work: Path, tmp_path: Path) -> None:
    named = copy(work / "a", tmp_path / "named")
    edit_config(named, base_model_name_or_path=str(work / "base"))
    assert status(adaptermerge.validate(named, base=work / "base"), "base.identity") == "pass"
    edit_config(named, base_model_name_or_path="meta-llama/Llama-3.1-8B")
    r = adaptermerge.validate(named, base=work / "base")
    assert status(r, "base.identity") == "warn" and "meta-llama/Llama-3.1-8B" in r.check("base.identity").message

    resized = copy(work / "a", tmp_path / "resized")
    edit_config(resized, modules_to_save=["embed_tokens"])
    edit_tensors(resized, lambda sd: sd.__setitem__("base_model.model.model.embed_tokens.weight", torch.zeros(130, 64)))
    r = adaptermerge.validate(resized, base=work / "base")
    assert (
        status(r, "base.vocab") == "fail"
        and "130" in r.check("base.vocab").message
        and "128" in r.check("base.vocab").message
    )


def test_missing_factors_for_targeted_layers_warn(work: Path, tmp_path: Path) -> None:
    part = copy(work / "a", tmp_path / "part")
    edit_tensors(part, lambda sd: [sd.pop(k) for k in list(sd) if "layers.2.self_attn.v_proj" in k])
    r = adaptermerge.validate(part, base=work / "base")
    assert status(r, "base.targets") == "warn"
    assert r.check("base.targets").figures["missing"] == ["model.layers.2.self_attn.v_proj"]


# ------------------------------------------------------------------------------------------ several adapters


def test_interference_figures_against_dense_deltas(work: Path) -> None:
    r = adaptermerge.validate(work / "a", adapters=[work / "b"], weights=[0.7, 0.3])
    assert r.ok and status(r, "combine.compatible") == "pass"
    c = r.check("combine.interference")
    pm = peft_model(tiny_llama, work / "a", work / "b")
    da, db = peft_deltas(pm, "a0"), peft_deltas(pm, "a1")
    for mod, fig in c.figures["modules"].items():
        x, y = da[mod].double().flatten(), db[mod].double().flatten()
        assert math.isclose(fig["cosine"]["0-1"], float(x @ y / (x.norm() * y.norm())), abs_tol=1e-6)
        # sign conflicts, computed directly on the weighted dense deltas
        wx, wy = 0.7 * x, 0.3 * y
        k = math.ceil(0.2 * x.numel())
        tx = wx.abs() >= wx.abs().topk(k).values.min()
        ty = wy.abs() >= wy.abs().topk(k).values.min()
        both = tx & ty
        expected = float(((wx > 0) != (wy > 0))[both].double().mean())
        assert math.isclose(fig["sign_conflict"], expected, abs_tol=1e-9), mod
    assert set(c.figures["modules"]) == set(db)  # the modules both adapters touch


def test_sampled_sign_conflicts_estimate_the_exact_rate(work: Path) -> None:
    a = adaptermerge.load_adapter(work / "a")
    b = adaptermerge.load_adapter(work / "b")
    m = "model.layers.0.self_attn.q_proj"
    terms = [(1.0, a.modules[m]), (1.0, b.modules[m])]
    exact, n_exact, sampled = sign_conflicts(terms)
    est, n_est, was_sampled = sign_conflicts(terms, max_entries=2048)
    assert not sampled and was_sampled and n_est < n_exact
    assert abs(est - exact) < 0.1


def test_opposed_adapters_warn(work: Path, tmp_path: Path) -> None:
    neg = copy(work / "a", tmp_path / "neg")
    edit_tensors(neg, lambda sd: [sd[k].neg_() for k in sd if "lora_B" in k])
    r = adaptermerge.validate(work / "a", adapters=[neg])
    c = r.check("combine.interference")
    assert c.status == "warn" and c.figures["mean_cosine"] == pytest.approx(-1.0, abs=1e-6)
    assert c.figures["sign_conflict_rate"] == pytest.approx(1.0)


def test_adapters_from_different_bases_are_not_combinable(work: Path, tmp_path: Path) -> None:
    other = copy(work / "b", tmp_path / "other")
    edit_config(other, base_model_name_or_path="org/another-model")
    first = copy(work / "a", tmp_path / "first")
    edit_config(first, base_model_name_or_path="org/a-model")
    r = adaptermerge.validate(first, adapters=[other])
    c = r.check("combine.compatible")
    assert c.status == "fail" and "--allow-different-base" in c.hint and r.check("combine.interference") is None


def test_weights_count_and_misplaced_options_are_usage_errors(work: Path) -> None:
    with pytest.raises(UsageError):
        adaptermerge.validate(work / "a", adapters=[work / "b"], weights=[1.0])
    with pytest.raises(UsageError, match="`tolerance`"):
        adaptermerge.validate(work / "a", tolerance=0.1)
    with pytest.raises(UsageError, match="`target`"):
        adaptermerge.validate(work / "a", target="tgi")
    res = CliRunner().invoke(cli, ["validate", str(work / "a"), "--adapter", str(work / "b"), "--weights", "1"])
    assert res.exit_code == 2 and res.stderr.startswith("error:")


# ------------------------------------------------------------------------------------------ serving targets


@pytest.mark.parametrize(
    "lora, code",
    [
        (dict(lora_bias=True), "vllm_bias"),
        (dict(modules_to_save=["lm_head"]), "vllm_modules_to_save"),
        (dict(use_dora=True), "vllm_dora"),
        (dict(r=4, lora_alpha=8, rank_pattern={"v_proj": 8}), "vllm_scaling"),
    ],
)
def test_vllm_refusals_have_fix_hints(tmp_path: Path, lora: dict, code: str) -> None:
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **lora}
    a = make_adapter(tmp_path / "a", tiny_llama, **lora)
    r = adaptermerge.validate(a, target="vllm")
    c = r.check("serving.vllm")
    assert c.status == "fail" and code in [f["code"] for f in c.figures["findings"] if f["level"] == "fail"]
    assert c.hint and ("adaptermerge merge" in c.hint or "adaptermerge combine" in c.hint)


def test_our_writer_folds_pattern_scaling_for_vllm(tmp_path: Path) -> None:
    a = make_adapter(tmp_path / "a", tiny_llama, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 8})  # fmt: skip
    out = adaptermerge.save_combined(adaptermerge.combine([a]), tmp_path / "folded")
    r = adaptermerge.validate(out, target="vllm")
    assert (
        status(r, "serving.vllm") == "pass" and "top-level scaling 1 on every module" in r.check("serving.vllm").message
    )


def test_peft_target_reports_unknown_fields(work: Path, tmp_path: Path) -> None:
    newer = copy(work / "a", tmp_path / "newer")
    edit_config(newer, some_future_option=True)  # a set field nobody knows: it may change what the adapter computes
    r = adaptermerge.validate(newer, target="peft")
    assert status(r, "adapter.config") == "fail" and "some_future_option" in r.check("adapter.config").message
    edit_config(newer, some_future_option=False)  # unset: accepted, and PEFT drops it with a warning
    r = adaptermerge.validate(newer, target="peft")
    c = r.check("serving.peft")
    assert c.status == "warn" and c.figures["unknown_fields"] == ["some_future_option"]
    assert status(adaptermerge.validate(work / "a", target="transformers"), "serving.transformers") == "pass"


# ------------------------------------------------------------------------------------------ merged checkpoints


@pytest.mark.parametrize("merged, base", [("merged", "base"), ("merged16", "base16")])
def test_faithful_merges_pass(work: Path, merged: str, base: str) -> None:
    r = adaptermerge.validate(work / merged, base=work / base, adapters=[work / "a"])
    assert r.ok, r.to_text()
    f = r.check("faithfulness.logits").figures
    assert f["top1_agreement"] >= 0.95 and f["kl_mean"] < 1e-5 and f["positions"] == 4 * 32
    assert f["max_rel_logit_error"] < f["tolerance"] == (1e-4 if base == "base" else 5e-2)
    w = r.check("faithfulness.weights").figures
    assert w["tensors"] == 30 and (w["worst"] is None or w["worst"]["error"] <= w["worst"]["allowed"])
    for name in ("checkpoint.tensors", "checkpoint.finite", "checkpoint.loads", "base.identity"):
        assert status(r, name) == "pass"
    other = adaptermerge.validate(work / merged, base=work / ("base16" if base == "base" else "base"))
    assert status(other, "base.identity") == "warn" and "config.json" in other.check("base.identity").message


def test_peft_merge_and_unload_checkpoint_passes(work: Path, tmp_path: Path) -> None:
    peft_model(tiny_llama, work / "a").merge_and_unload().save_pretrained(tmp_path / "peft")
    r = adaptermerge.validate(tmp_path / "peft", base=work / "base", adapters=[work / "a"])
    assert r.ok, r.to_text()


def test_recipe_supplies_base_and_adapters(work: Path) -> None:
    r = adaptermerge.validate(work / "merged")
    assert r.ok and status(r, "faithfulness.inputs") == "pass" and status(r, "faithfulness.weights") == "pass"
    assert r.inputs["from_recipe"] is True


def test_tampered_weight_fails(work: Path, tmp_path: Path) -> None:
    t = copy(work / "merged", tmp_path / "tampered")
    edit_tensors(t, lambda sd: sd["model.layers.1.mlp.down_proj.weight"].view(-1).__getitem__(7).add_(0.05), "model.safetensors")  # fmt: skip
    r = adaptermerge.validate(t, base=work / "base", adapters=[work / "a"])
    assert not r.ok and status(r, "faithfulness.weights") == "fail"
    worst = r.check("faithfulness.weights").figures["worst"]
    assert worst["tensor"] == "model.layers.1.mlp.down_proj.weight" and worst["index"] == [0, 7]
    assert status(r, "checkpoint.tensors") == "pass"  # every tensor is there: only the values betray it
    assert status(r, "faithfulness.logits") == "fail"  # 3.5e-4 relative logit error, above fp32's 1e-4
    res = CliRunner().invoke(cli, ["validate", str(t), "--base", str(work / "base"), "--adapter", str(work / "a"), "--json"])  # fmt: skip
    assert res.exit_code == 1 and json.loads(res.stdout)["ok"] is False


def test_tampered_bf16_weight_fails_exactness(work: Path, tmp_path: Path) -> None:
    t = copy(work / "merged16", tmp_path / "tampered16")
    edit_tensors(t, lambda sd: sd["model.layers.0.self_attn.q_proj.weight"][3, 5].add_(0.05), "model.safetensors")  # fmt: skip
    r = adaptermerge.validate(t, base=work / "base16", adapters=[work / "a"])
    assert status(r, "faithfulness.weights") == "fail"
    # in bf16 the logits cannot tell this from rounding (measured: 0.0164 clean, 0.0175 with +0.5 there)
    assert status(r, "faithfulness.logits") == "pass"
    assert r.check("faithfulness.weights").figures["worst"]["tensor"] == "model.layers.0.self_attn.q_proj.weight"


def test_missing_tensor_and_nan_fail(work: Path, tmp_path: Path) -> None:
    gone = copy(work / "merged", tmp_path / "gone")
    edit_tensors(gone, lambda sd: sd.pop("model.layers.2.post_attention_layernorm.weight"), "model.safetensors")
    r = adaptermerge.validate(gone, base=work / "base", adapters=[work / "a"])
    assert status(r, "checkpoint.tensors") == "fail"
    assert r.check("checkpoint.tensors").figures["missing"] == ["model.layers.2.post_attention_layernorm.weight"]
    assert status(r, "checkpoint.loads") == "fail"

    nan = copy(work / "merged", tmp_path / "nanckpt")
    edit_tensors(nan, lambda sd: sd["model.norm.weight"].__setitem__(0, float("nan")), "model.safetensors")
    r = adaptermerge.validate(nan)
    assert status(r, "checkpoint.finite") == "fail" and r.check("checkpoint.finite").figures["nonfinite_tensors"] == ["model.norm.weight"]  # fmt: skip


def test_weighted_merge_of_two_adapters(work: Path, tmp_path: Path) -> None:
    adaptermerge.merge_into_base(work / "base", [work / "a", work / "b"], tmp_path / "ab", weights=[0.7, 0.3])
    r = adaptermerge.validate(tmp_path / "ab")  # weights from the recipe
    assert r.ok and r.check("faithfulness.logits").figures["weights"] == [0.7, 0.3]
    r = adaptermerge.validate(
        tmp_path / "ab", base=work / "base", adapters=[work / "a", work / "b"], weights=[0.3, 0.7]
    )
    assert status(r, "faithfulness.weights") == "fail"


def test_merging_into_a_tied_embedding_is_faithful(tmp_path: Path) -> None:
    """The merge unties the head (the trained model's head reads the base embedding); validate's reference is the
    trained model too, not PEFT's merge_and_unload (which changes the tied head)."""

    def tied(seed: int = 0):
        return tiny_llama(seed, tie=True)

    tied().save_pretrained(tmp_path / "base")
    a = make_adapter(tmp_path / "a", tied, r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"])
    adaptermerge.merge_into_base(tmp_path / "base", a, tmp_path / "merged")
    r = adaptermerge.validate(tmp_path / "merged")
    assert status(r, "faithfulness.weights") == "pass" and status(r, "faithfulness.logits") == "pass"
    # PEFT's own merge_and_unload of the same adapter is not the trained model: validate says so
    from peft import PeftModel

    peft_merged = PeftModel.from_pretrained(tied(), str(a)).merge_and_unload()
    peft_merged.save_pretrained(tmp_path / "peft-merged")
    r = adaptermerge.validate(tmp_path / "peft-merged", base=tmp_path / "base", adapters=[a])
    assert status(r, "faithfulness.logits") == "fail" and status(r, "faithfulness.weights") == "fail"


def test_probe_file(work: Path, tmp_path: Path) -> None:
    probe = tmp_path / "probe.jsonl"
    probe.write_text('{"input_ids": [5, 6, 7, 8, 9]}\n\n{"input_ids": [10, 11, 12]}\n')
    r = adaptermerge.validate(work / "merged", base=work / "base", adapters=[work / "a"], probe=probe)
    assert r.ok and r.check("faithfulness.logits").figures["positions"] == 8
    probe.write_text('{"input_ids": [5, 6]}\n{"question": "no"}\n')
    res = CliRunner().invoke(cli, ["validate", str(work / "merged"), "--base", str(work / "base"), "--adapter", str(work / "a"), "--probe", str(probe)])  # fmt: skip
    assert res.exit_code == 2 and "probe.jsonl:2" in res.stderr
    probe.write_text('{"text": "hello"}\n')
    with pytest.raises(UsageError, match="tokenizer"):
        adaptermerge.validate(work / "merged", base=work / "base", adapters=[work / "a"], probe=probe)


def test_checkpoint_target_loads_with_transformers(work: Path, tmp_path: Path) -> None:
    r = adaptermerge.validate(work / "base", target="transformers")
    assert status(r, "serving.transformers") == "pass"
    gone = copy(work / "base", tmp_path / "gone")
    edit_tensors(gone, lambda sd: sd.pop("model.norm.weight"), "model.safetensors")
    r = adaptermerge.validate(gone, target="vllm")
    assert status(r, "serving.vllm") == "fail" and "model.norm.weight" in r.check("serving.vllm").message


def test_adapters_for_a_checkpoint_need_a_base(work: Path) -> None:
    res = CliRunner().invoke(cli, ["validate", str(work / "base"), "--adapter", str(work / "a")])
    assert res.exit_code == 2 and "--base" in res.stderr


# ------------------------------------------------------------------------------------------ 4-bit


def test_4bit_merge_drift_against_qlora(work: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = tmp_path / "nf4"
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    AutoModelForCausalLM.from_pretrained(work / "base", quantization_config=cfg, device_map="cpu").save_pretrained(q)
    adaptermerge.merge_into_base(q, work / "a", tmp_path / "m4")
    r = adaptermerge.validate(tmp_path / "m4", base=q, adapters=[work / "a"])
    f = r.check("faithfulness.logits").figures
    assert r.ok and f["drift_vs_adapter_effect"] < 0.5 and f["adapter_effect"] > 0.1
    assert r.check("faithfulness.weights") is None  # re-quantization is not exact by design
    # an adapter too small to survive re-quantization: the drift is as large as its effect
    tiny = copy(work / "a", tmp_path / "tiny")
    edit_tensors(tiny, lambda sd: [sd[k].mul_(1e-3) for k in sd if "lora_B" in k])
    adaptermerge.merge_into_base(q, tiny, tmp_path / "m4tiny")
    r = adaptermerge.validate(tmp_path / "m4tiny", base=q, adapters=[tiny])
    assert status(r, "faithfulness.logits") == "warn" and r.check("faithfulness.logits").figures["drift_vs_adapter_effect"] > 0.5  # fmt: skip
    # --dequantize gives an exact 16-bit merge of dequant(W4) + delta
    adaptermerge.merge_into_base(q, work / "a", tmp_path / "m4deq", dequantize=True)
    r = adaptermerge.validate(tmp_path / "m4deq", base=q, adapters=[work / "a"])
    assert r.ok and status(r, "faithfulness.weights") == "pass"


# ------------------------------------------------------------------------------------------ the card


def test_write_card_adds_the_summary_once(work: Path, tmp_path: Path) -> None:
    out = adaptermerge.save_combined(adaptermerge.combine([work / "a", work / "b"]), tmp_path / "ab")
    before = ModelCard.load(out / "README.md").data.to_dict()
    adaptermerge.validate(out, base=work / "base", write_card=True)
    res = CliRunner().invoke(cli, ["validate", str(out), "--base", str(work / "base"), "--write-card"])
    assert res.exit_code == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.to_dict() == before
    assert card.text.count("## Validation") == 1 and "`base.modules` | pass" in card.text
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left

    bare = copy(work / "a", tmp_path / "bare")
    (bare / "README.md").unlink()
    adaptermerge.validate(bare, write_card=True)
    card = ModelCard.load(bare / "README.md")
    assert card.data.library_name == "peft" and "adaptermerge" in card.data.tags and "## Validation" in card.text
