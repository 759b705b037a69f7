"""combine against PEFT's add_weighted_adapter and against dense references, on PEFT-made adapters."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import adaptermerge
from adaptermerge.errors import IncompatibleAdapters, UsageError
from tests.helpers import input_ids, make_adapter, peft_deltas, peft_model, rel_err, tiny_gpt2, tiny_llama

W = [0.7, 0.3]


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    a = make_adapter(tmp_path / "a", tiny_llama, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=1)
    b = make_adapter(tmp_path / "b", tiny_llama, r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], seed=2)
    return a, b


def exact_deltas(model_fn, paths, weights) -> dict[str, torch.Tensor]:
    """sum_i w_i * PEFT get_delta_weight_i, per module (stored layout)."""
    pm = peft_model(model_fn, *paths)
    out: dict[str, torch.Tensor] = {}
    for i, w in enumerate(weights):
        for name, d in peft_deltas(pm, f"a{i}").items():
            out[name] = out.get(name, 0) + w * d.double()
    return out


def our_deltas(adapter) -> dict[str, torch.Tensor]:
    return {n: m.weight_delta(torch.float64) for n, m in adapter.modules.items()}


@pytest.mark.parametrize(
    "ctype,ours,kw", [("cat", "cat", {}), ("svd", "svd", {"rank": 4}), ("linear", "factor-linear", {})]
)
def test_against_peft_add_weighted_adapter(pair, ctype, ours, kw) -> None:
    pm = peft_model(tiny_llama, *pair)
    extra = {"svd_rank": kw["rank"]} if "rank" in kw else {}
    pm.add_weighted_adapter(["a0", "a1"], W, "m", combination_type=ctype, **extra)
    ref = peft_deltas(pm, "m")
    got = our_deltas(adaptermerge.combine(list(pair), W, method=ours, **kw))
    assert set(ref) == set(got)
    for name in ref:
        assert rel_err(got[name], ref[name]) < (1e-4 if ctype == "svd" else 1e-5), name


def test_factor_linear_warns_with_measured_error(pair) -> None:
    out = adaptermerge.combine(list(pair), W, method="factor-linear")
    exact = exact_deltas(tiny_llama, pair, W)
    errs = [r["rel_error_vs_exact"] for r in out.provenance["modules"]]
    for rep in out.provenance["modules"]:
        measured = rel_err(out.modules[rep["name"]].weight_delta(torch.float64), exact[rep["name"]])
        assert abs(measured - rep["rel_error_vs_exact"]) < 1e-4
    assert min(errs) > 0.1  # independent adapters: large cross-term error
    assert any("not the weighted sum" in w for w in out.warnings)
    lin = adaptermerge.combine(list(pair), W, method="linear")
    for name, d in our_deltas(lin).items():
        assert rel_err(d, exact[name]) < 1e-6


HETERO = [
    (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "down_proj"])),
    (tiny_llama, dict(r=2, lora_alpha=2, target_modules=["q_proj"], layers_to_transform=[0]), dict(r=6, lora_alpha=12, target_modules=["q_proj", "k_proj"], rank_pattern={"k_proj": 3}, alpha_pattern={"layers.1.self_attn.q_proj": 1})),
    (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True), dict(r=2, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]), dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "v_proj"])),
]  # fmt: skip


@pytest.mark.parametrize("case", range(len(HETERO)))
@pytest.mark.parametrize("method", ["linear", "cat", "svd"])
def test_heterogeneous_inputs_give_exact_sum_and_load_in_peft(tmp_path: Path, case: int, method: str) -> None:
    model_fn, ca, cb = HETERO[case]
    a = make_adapter(tmp_path / "a", model_fn, seed=5, **ca)
    b = make_adapter(tmp_path / "b", model_fn, seed=6, **cb)
    w = [0.6, -0.9]
    kw = {"rank": 10_000} if method == "svd" else {}
    merged = adaptermerge.combine([a, b], w, method=method, **kw)
    exact = exact_deltas(model_fn, [a, b], w)
    got = our_deltas(merged)
    assert set(got) == set(exact)
    for name in exact:
        assert rel_err(got[name], exact[name]) < 1e-5, name
    out = adaptermerge.save_combined(merged, tmp_path / "out")
    # PEFT loads our folder and reproduces base + sum_i w_i delta_i in its outputs
    pm = peft_model(model_fn, out)
    for name, d in peft_deltas(pm, "a0").items():
        assert rel_err(d, exact[name]) < 1e-5, name
    base = model_fn(0)
    with torch.no_grad():
        mods = dict(base.named_modules())
        for name, d in exact.items():
            mods[name].weight += d.float()
        ids = input_ids()
        assert torch.allclose(pm(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_rslora_cat_is_not_overscaled(tmp_path: Path) -> None:
    a = make_adapter(
        tmp_path / "a", tiny_llama, r=16, lora_alpha=16, use_rslora=True, target_modules=["q_proj"], seed=1
    )
    b = make_adapter(
        tmp_path / "b", tiny_llama, r=16, lora_alpha=16, use_rslora=True, target_modules=["q_proj"], seed=2
    )
    exact = exact_deltas(tiny_llama, [a, b], W)
    out = adaptermerge.save_combined(adaptermerge.combine([a, b], W, method="cat"), tmp_path / "o")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False and cfg["r"] == cfg["lora_alpha"] == 32
    for name, d in peft_deltas(peft_model(tiny_llama, out), "a0").items():
        assert rel_err(d, exact[name]) < 1e-5
    # PEFT itself inherits use_rslora and over-scales by sqrt(32): documented, measured here
    pm = peft_model(tiny_llama, a, b)
    pm.add_weighted_adapter(["a0", "a1"], W, "m", combination_type="cat")
    name = next(iter(exact))
    ratio = float(peft_deltas(pm, "m")[name].norm() / exact[name].norm())
    assert abs(ratio - 32**0.5) < 1e-3


@pytest.mark.parametrize("energy,rank", [(0.9, 3), (0.6, None), (0.999, 5)])
def test_svd_energy_and_rank_cap(pair, energy: float, rank: int | None) -> None:
    """Per module, the stored rank is the smallest k whose top-k singular values of the exact weighted sum (PEFT's
    deltas, dense SVD here) keep ``energy`` of its squared norm, capped by ``rank``; the stored delta keeps exactly
    that energy (Eckart-Young), and the report says what was stored."""
    out = adaptermerge.combine(list(pair), W, method="svd", energy=energy, rank=rank)
    exact = exact_deltas(tiny_llama, pair, W)
    reports = {r["name"]: r for r in out.provenance["modules"]}
    assert set(reports) == set(out.modules) == set(exact)
    ranks = set()
    for name, dense in exact.items():
        s2 = torch.linalg.svdvals(dense).pow(2)
        share = torch.cumsum(s2, 0) / s2.sum()
        k = int((share < energy - 1e-12).sum()) + 1
        k = min(k, rank) if rank is not None else k
        got = out.modules[name].weight_delta(torch.float64)
        assert out.modules[name].rank == k == reports[name]["rank"], name
        kept = 1 - float((dense - got).pow(2).sum() / s2.sum())  # energy the stored delta really keeps
        assert abs(kept - float(share[k - 1])) < 1e-5 and abs(reports[name]["kept_energy"] - kept) < 1e-5, name
        ranks.add(k)
    assert len(ranks) > 1 or rank is not None  # the energy rule, not a constant, chose the ranks


def test_svd_default_rank_is_the_largest_input_rank_like_peft(tmp_path: Path) -> None:
    """Without --rank, svd keeps the largest input rank per module, as PEFT's add_weighted_adapter(svd) does; the
    written adapter has PEFT's rank and PEFT's product."""
    a = make_adapter(tmp_path / "a", tiny_llama, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], seed=1)
    b = make_adapter(tmp_path / "b", tiny_llama, r=6, lora_alpha=6, target_modules=["q_proj", "v_proj"], seed=2)
    pm = peft_model(tiny_llama, a, b)
    pm.add_weighted_adapter(["a0", "a1"], [0.8, -0.5], "m", combination_type="svd")
    ref = peft_deltas(pm, "m")
    peft_rank = {
        n: int(m.lora_A["m"].weight.shape[0])
        for n, m in pm.base_model.model.named_modules()
        if hasattr(m, "lora_A") and "m" in m.lora_A
    }
    out = adaptermerge.save_combined(adaptermerge.combine([a, b], [0.8, -0.5], method="svd"), tmp_path / "out")
    from safetensors.torch import load_file

    sd = load_file(str(out / "adapter_model.safetensors"))
    assert set(peft_rank.values()) == {6}
    for name, r in peft_rank.items():
        assert sd[f"base_model.model.{name}.lora_A.weight"].shape[0] == r, name
    got = peft_deltas(peft_model(tiny_llama, out), "a0")
    assert set(got) == set(ref) and all(rel_err(got[n], ref[n]) < 1e-4 for n in ref)


def test_refusals(tmp_path: Path, pair) -> None:
    a, b = pair
    with pytest.raises(UsageError, match="2 adapters"):
        adaptermerge.combine([a, b], [1.0])
    g = make_adapter(tmp_path / "g", tiny_gpt2, r=4, target_modules=["c_attn"], fan_in_fan_out=True)
    with pytest.raises(IncompatibleAdapters, match="different model architectures"):
        adaptermerge.combine([a, g])
    d = make_adapter(tmp_path / "d", tiny_llama, r=4, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(IncompatibleAdapters, match="DoRA"):
        adaptermerge.combine([a, d])
    for p, base in ((a, "org/llama-a"), (b, "org/llama-b")):
        cfg = json.loads((p / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = base
        (p / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(IncompatibleAdapters, match="different bases"):
        adaptermerge.combine([a, b])
    allowed = our_deltas(adaptermerge.combine([a, b], allow_different_base=True))
    exact = exact_deltas(tiny_llama, [a, b], [0.5, 0.5])
    assert set(allowed) == set(exact) and all(rel_err(allowed[n], exact[n]) < 1e-6 for n in exact)
    with pytest.raises(UsageError):
        adaptermerge.combine([a, b], method="cat", rank=2)
    with pytest.raises(UsageError, match="unknown method"):
        adaptermerge.combine([a, b], method="nope")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "adaptermerge_cli", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_combine_recipe_replay_and_card(tmp_path: Path, pair) -> None:
    a, b = pair
    out1, out2 = tmp_path / "o1", tmp_path / "o2"
    p = cli(
        "combine",
        str(a),
        str(b),
        "--weights",
        "0.7",
        "0.3",
        "--method",
        "svd",
        "--rank",
        "3",
        "-o",
        str(out1),
        "--json",
    )
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["method"] == "svd" and all(m["rank"] == 3 for m in rep["modules"])
    card = (out1 / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "peft" and "adaptermerge" in meta["tags"] and "svd" in meta["tags"]
    assert "0.7" in card and "Eckart" in card
    recipe = yaml.safe_load((out1 / "adaptermerge_recipe.yaml").read_text())
    assert recipe["merge_method"] == "svd" and recipe["models"][0]["parameters"]["weight"] == 0.7
    for entry, folder in zip(recipe["models"], (a, b), strict=True):  # the inputs' hashes, computed here
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            assert entry["sha256"][f] == hashlib.sha256((folder / f).read_bytes()).hexdigest()
    p = cli("combine", "--recipe", str(out1 / "adaptermerge_recipe.yaml"), "-o", str(out2))
    assert p.returncode == 0, p.stderr
    assert (out1 / "adapter_model.safetensors").read_bytes() == (out2 / "adapter_model.safetensors").read_bytes()
    # comma form gives the same result
    p = cli(
        "combine", str(a), str(b), "--weights", "0.7,0.3", "--method", "svd", "--rank", "3", "-o", str(tmp_path / "o3")
    )
    assert (tmp_path / "o3" / "adapter_model.safetensors").read_bytes() == (
        out1 / "adapter_model.safetensors"
    ).read_bytes()
    # a changed input makes the recipe refuse to replay
    shutil.copy(b / "adapter_model.safetensors", a / "adapter_model.safetensors")
    p = cli("combine", "--recipe", str(out1 / "adaptermerge_recipe.yaml"), "-o", str(tmp_path / "o4"))
    assert p.returncode == 1 and "changed since the recipe" in p.stderr and not (tmp_path / "o4").exists()


@pytest.mark.parametrize(
    "extra,code,needle",
    [
        (["--weights", "0.5"], 2, "got 1 weight for 2 adapters"),
        (["--weights", "a,b"], 2, "expected numbers"),
        (["--method", "bogus"], 2, "Invalid value for '--method'"),
        (["--method", "cat", "--rank", "2"], 2, "--rank/--energy"),
        (["--energy", "1.5"], 2, "energy"),
    ],
)
def test_cli_usage_errors_write_nothing(tmp_path: Path, pair, extra, code, needle) -> None:
    a, b = pair
    before = {p: p.read_bytes() for d in pair for p in d.iterdir()}
    p = cli("combine", str(a), str(b), *extra, "-o", str(tmp_path / "out"))
    assert p.returncode == code and needle in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    assert {p: p.read_bytes() for d in pair for p in d.iterdir()} == before
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".out")]


def test_cli_refuses_output_inside_input(pair) -> None:
    a, b = pair
    p = cli("combine", str(a), str(b), "-o", str(a / "sub"))
    assert p.returncode == 2 and "overlaps the input" in p.stderr
    p = cli("combine", str(a), str(b), "-o", str(a))
    assert p.returncode == 2


def test_cli_dora_refused_one_line(tmp_path: Path, pair) -> None:
    d = make_adapter(tmp_path / "d", tiny_llama, r=4, target_modules=["q_proj"], use_dora=True)
    p = cli("combine", str(pair[0]), str(d), "-o", str(tmp_path / "out"))
    assert p.returncode == 1 and "DoRA" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_embedding_adapter_with_plain_adapter(tmp_path: Path) -> None:
    """PEFT saves a base-weight copy beside embedding adapters; it must not block combining with others."""
    e = make_adapter(tmp_path / "e", tiny_llama, r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], seed=1)
    p = make_adapter(tmp_path / "p", tiny_llama, r=4, lora_alpha=8, target_modules=["q_proj"], seed=2)
    out = adaptermerge.combine([e, p], W)
    assert "model.embed_tokens" in out.modules
    # the base-layer copy PEFT saved beside the embedding adapter is carried unchanged: it is the base's embedding
    copies = {k: t for k, t in out.extra_tensors.items() if k.endswith("base_layer.weight")}
    assert list(copies) == ["base_model.model.model.embed_tokens.base_layer.weight"]
    assert torch.equal(
        copies["base_model.model.model.embed_tokens.base_layer.weight"], tiny_llama(0).model.embed_tokens.weight
    )
    saved = adaptermerge.save_combined(out, tmp_path / "o")
    exact = exact_deltas(tiny_llama, [e, p], W)
    for name, d in peft_deltas(peft_model(tiny_llama, saved), "a0").items():
        assert rel_err(d, exact[name]) < 1e-5


def test_cancelling_sum_is_zero_and_not_written(tmp_path: Path, pair) -> None:
    a, _ = pair
    out = adaptermerge.combine([a, a], [1.0, -1.0])
    assert not out.modules and all("zero" in w for w in out.warnings)
    with pytest.raises(adaptermerge.InvalidAdapter, match="nothing was written"):
        adaptermerge.save_adapter(out, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_weights_with_equals_sign(tmp_path: Path, pair) -> None:
    """``--weights=0.7 0.3`` gives the first weight to the first adapter: the written adapter, loaded in PEFT, holds
    0.7 delta_a + 0.3 delta_b (PEFT's deltas), not the reverse."""
    a, b = pair
    p = cli("combine", str(a), str(b), "--weights=0.7", "0.3", "-o", str(tmp_path / "o"), "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["weights"] == [0.7, 0.3]
    exact = exact_deltas(tiny_llama, [a, b], [0.7, 0.3])
    got = peft_deltas(peft_model(tiny_llama, tmp_path / "o"), "a0")
    assert set(got) == set(exact) and all(rel_err(got[n], exact[n]) < 1e-5 for n in exact)


def tiny_llama_bias(seed: int = 0):
    """A tiny Llama whose attention projections have biases (as Qwen2's do), so lora_bias can be merged."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.helpers import LLAMA_CFG

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**LLAMA_CFG, attention_bias=True)).eval()


@pytest.mark.parametrize("weights", [(0.7, 0.3), (0.6, -0.4)])
def test_lora_bias_combined_with_plain_adapter(tmp_path: Path, weights: tuple[float, float]) -> None:
    """Biases are weighted like the deltas and written only where an input trained one; PEFT loads the result
    (zero bias elsewhere) and it merges into a base with biases."""
    from tests.helpers import input_ids, peft_deltas, peft_model, rel_err

    a = make_adapter(tmp_path / "a", tiny_llama_bias, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=1)
    b = make_adapter(
        tmp_path / "b", tiny_llama_bias, r=2, lora_alpha=8, target_modules=["q_proj", "o_proj"], lora_bias=True, seed=2
    )
    pa, pb = peft_model(tiny_llama_bias, a), peft_model(tiny_llama_bias, b)
    with torch.no_grad():  # PEFT's non-zero lora_B biases, as a trained adapter has them
        for mod in pb.modules():
            if hasattr(mod, "lora_B") and "a0" in mod.lora_B:
                mod.lora_B["a0"].bias.normal_()
    pb.save_pretrained(tmp_path / "b2")
    b = tmp_path / "b2" / "a0"  # PEFT saves a non-default adapter name in a subfolder
    pb = peft_model(tiny_llama_bias, b)
    m = adaptermerge.combine([a, b], list(weights))
    want_bias = {}
    for name, mod in pb.base_model.model.named_modules():
        if hasattr(mod, "lora_B") and "a0" in mod.lora_B:
            want_bias[name] = weights[1] * mod.scaling["a0"] * mod.lora_B["a0"].bias.detach()
    assert {n for n, lr in m.modules.items() if lr.bias is not None} == set(want_bias)
    for n, bias in want_bias.items():
        assert torch.allclose(m.modules[n].bias, bias, atol=1e-6), n
    assert any("lora_bias" in w for w in m.warnings)
    out = adaptermerge.save_combined(m, tmp_path / "out")

    expected = tiny_llama_bias(0)
    mods = dict(expected.named_modules())
    with torch.no_grad():
        for pm, w in ((pa, weights[0]), (pb, weights[1])):
            for name, d in peft_deltas(pm, "a0").items():
                mods[name].weight += w * d
        for name, bias in want_bias.items():
            mods[name].bias += bias
        want = expected(input_ids=input_ids()).logits
        got = peft_model(tiny_llama_bias, out)(input_ids=input_ids()).logits
    assert rel_err(got, want) < 1e-5
    base = tmp_path / "base"
    tiny_llama_bias(0).save_pretrained(base)
    adaptermerge.merge_into_base(base, out, tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(input_ids=input_ids()).logits
    assert rel_err(merged, want) < 1e-5


def _adapter_with_trained_head(out: Path, seed: int, **lora) -> Path:
    """A PEFT adapter on a tiny Llama classifier whose ``score`` head (modules_to_save) differs from the base's."""
    from peft import LoraConfig, get_peft_model

    from tests.helpers import tiny_llama_cls

    base = tiny_llama_cls(0)
    torch.manual_seed(seed)
    pm = get_peft_model(base, LoraConfig(init_lora_weights=False, task_type="SEQ_CLS", **lora))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.1 * torch.randn_like(p))
    pm.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("weights", [(0.7, -0.3), (0.6, 0.9), (1.0, 0.0)])
def test_modules_to_save_are_the_normalised_weighted_average(tmp_path: Path, weights: tuple[float, float]) -> None:
    """Each adapter's trained head, read back from PEFT, enters the combined head as ``sum_i w_i h_i / sum_i w_i``;
    PEFT loads the combined folder with that head and the weighted sum of the LoRA deltas."""
    from tests.helpers import tiny_llama_cls

    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["score"])
    a = _adapter_with_trained_head(tmp_path / "a", 1, **lora)
    b = _adapter_with_trained_head(tmp_path / "b", 2, **lora)
    pm = peft_model(tiny_llama_cls, a, b)
    heads = [pm.base_model.model.score.modules_to_save[n].weight.detach().double() for n in ("a0", "a1")]
    assert not torch.equal(heads[0], heads[1])
    want = (weights[0] * heads[0] + weights[1] * heads[1]) / sum(weights)
    out = adaptermerge.save_combined(adaptermerge.combine([a, b], list(weights)), tmp_path / "out")
    loaded = peft_model(tiny_llama_cls, out)
    got = loaded.base_model.model.score.modules_to_save["a0"].weight.detach().double()
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)
    exact = exact_deltas(tiny_llama_cls, [a, b], list(weights))
    deltas = peft_deltas(loaded, "a0")
    assert set(deltas) == {n for n, d in exact.items() if float(d.norm()) > 0}
    assert all(rel_err(deltas[n], exact[n]) < 1e-5 for n in deltas)


@pytest.fixture(scope="module")
def embedding_pair(tmp_path_factory) -> tuple[list, object]:
    """Two equal-rank adapters on an embedding and a projection (different alphas), loaded by us and by PEFT."""
    d = tmp_path_factory.mktemp("emb_pair")
    targets = ["embed_tokens", "q_proj", "down_proj"]
    a = make_adapter(d / "a", tiny_llama, r=4, lora_alpha=8, target_modules=targets, seed=11)
    b = make_adapter(d / "b", tiny_llama, r=4, lora_alpha=16, target_modules=targets, seed=12)
    return [adaptermerge.load_adapter(a), adaptermerge.load_adapter(b)], peft_model(tiny_llama, a, b)


_PEFT_CALLS = iter(range(10**9))


@settings(max_examples=12, deadline=None)
@given(st.lists(st.floats(-2, 2).filter(lambda x: abs(x) > 0.05), min_size=2, max_size=2))
def test_factor_linear_is_peft_linear_for_weights_of_both_signs(embedding_pair, weights: list[float]) -> None:
    """factor-linear reproduces PEFT's add_weighted_adapter(combination_type='linear') whatever the signs of the
    weights, on Linear and embedding layers (whose factors PEFT stores the other way round)."""
    adapters, pm = embedding_pair
    name = f"m{next(_PEFT_CALLS)}"
    pm.add_weighted_adapter(["a0", "a1"], weights, name, combination_type="linear")
    try:
        ref = peft_deltas(pm, name)
    finally:
        pm.delete_adapter(name)
    got = our_deltas(adaptermerge.combine(adapters, weights, method="factor-linear"))
    assert set(got) == set(ref) and "model.embed_tokens" in got
    for n in ref:
        assert rel_err(got[n], ref[n]) < 1e-5, (n, weights)


@settings(max_examples=15, deadline=None)
@given(
    st.lists(st.sampled_from(["float32", "bfloat16", "float16"]), min_size=1, max_size=3),
    st.sampled_from([None, "float32", "bfloat16", "float16"]),
    st.sampled_from(["linear", "cat", "svd"]),
)
def test_output_dtype_rules(tmp_path_factory, in_dtypes: list[str], dtype: str | None, method: str) -> None:
    """The written factors are stored in ``dtype`` when given, else in the inputs' dtype when they all agree, else in
    float32 (read from the safetensors file); they hold the float32 result rounded once, whose product is the exact
    weighted sum (dense, here)."""
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(len(in_dtypes) * 7 + len(method))
    adapters = [
        adaptermerge.Adapter(
            {
                "model.layers.0.q": adaptermerge.LowRank(
                    A=torch.randn(2 + i, 12, generator=g), B=torch.randn(8, 2 + i, generator=g)
                )
            },
            dtype=getattr(torch, dt),
        )
        for i, dt in enumerate(in_dtypes)
    ]
    weights = [0.5 - 0.3 * i for i in range(len(adapters))]
    kw = {"rank": 100} if method == "svd" else {}
    res = adaptermerge.combine(adapters, weights, method=method, dtype=dtype, **kw)
    want = (
        getattr(torch, dtype)
        if dtype
        else (getattr(torch, in_dtypes[0]) if len(set(in_dtypes)) == 1 else torch.float32)
    )
    out = adaptermerge.save_adapter(res, tmp_path_factory.mktemp("dt") / "o")
    sd = load_file(str(out / "adapter_model.safetensors"))
    A, B = sd["base_model.model.model.layers.0.q.lora_A.weight"], sd["base_model.model.model.layers.0.q.lora_B.weight"]
    assert A.dtype == B.dtype == want
    m = res.modules["model.layers.0.q"]
    assert torch.equal(A, m.A.to(want)) and torch.equal(B, m.B.to(want))
    dense = sum(w * a.modules["model.layers.0.q"].delta(torch.float64) for w, a in zip(weights, adapters))
    assert rel_err(m.delta(torch.float64), dense) < 1e-5
    tol = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 5e-3}[want]
    assert rel_err(B.double() @ A.double(), dense) < tol


@pytest.mark.parametrize(
    "dtypes,option,want",
    [(("bfloat16", "bfloat16"), None, torch.bfloat16), (("bfloat16", "float32"), None, torch.float32),
     (("float16", "float16"), "float32", torch.float32), (("float32", "float32"), "bfloat16", torch.bfloat16)],
)  # fmt: skip
def test_output_dtype_of_peft_folders(tmp_path: Path, pair, dtypes, option, want) -> None:
    """Adapter folders stored in 16-bit (as PEFT saves them from a 16-bit model): the inputs' dtype is read from
    their files; PEFT loads the result as the weighted sum."""
    from safetensors.torch import load_file, save_file

    paths = []
    for src, dt in zip(pair, dtypes, strict=True):
        dst = tmp_path / f"{src.name}-{dt}"
        shutil.copytree(src, dst)
        sd = load_file(str(dst / "adapter_model.safetensors"))
        save_file({k: v.to(getattr(torch, dt)) for k, v in sd.items()}, str(dst / "adapter_model.safetensors"))
        paths.append(dst)
    out = adaptermerge.save_combined(adaptermerge.combine(paths, W, dtype=option), tmp_path / "out")
    sd = load_file(str(out / "adapter_model.safetensors"))
    assert {v.dtype for v in sd.values()} == {want}
    exact = exact_deltas(tiny_llama, paths, W)
    got = peft_deltas(peft_model(tiny_llama, out), "a0")
    tol = 1e-5 if want == torch.float32 and "float16" not in dtypes else 3e-2
    assert set(got) == set(exact) and all(rel_err(got[n], exact[n]) < tol for n in exact)
