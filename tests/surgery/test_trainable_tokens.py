"""TrainableTokens (LoRA's trainable_token_indices): read, write, merge and combine, against PEFT's own outputs."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaModel

import adaptermerge
from adaptermerge.errors import IncompatibleAdapters, InvalidAdapter, UnsupportedAdapter, UsageError
from adaptermerge.surgery.merge import merge_into_base
from tests.helpers import input_ids, peft_deltas, rel_err, tiny_gpt2, tiny_llama

KEY = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
IDS = [5, 7, 9]


def tied_llama(seed: int = 0, dtype: torch.dtype = torch.float32):
    return tiny_llama(seed, tie=True, dtype=dtype)


def bf16_tied_llama(seed: int = 0):
    return tiny_llama(seed, tie=True, dtype=torch.bfloat16)


def token_adapter(out: Path, model_fn: Callable, seed: int = 1, **lora) -> Path:
    """A PEFT adapter whose LoRA factors and token rows are both non-zero changes (rows perturbed after init)."""
    lora.setdefault("r", 4)
    lora.setdefault("lora_alpha", 8)
    lora.setdefault("target_modules", ["q_proj", "v_proj"])
    lora.setdefault("init_lora_weights", False)
    base = model_fn(0)
    torch.manual_seed(seed)
    pm = get_peft_model(base, LoraConfig(**lora))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))
    pm.save_pretrained(str(out))
    return out


def ids_with_tokens() -> torch.Tensor:
    """Inputs that use the trained tokens (the rows only matter where they are read)."""
    ids = input_ids()
    ids[0, :5] = torch.tensor([5, 7, 9, 11, 3])
    return ids


def logits(model, ids=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids_with_tokens() if ids is None else ids).logits.float()


def peft_logits(model_fn: Callable, adapter: Path) -> torch.Tensor:
    return logits(PeftModel.from_pretrained(model_fn(0), str(adapter)).eval())


def save_base(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder, max_shard_size="60KB")
    return folder


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """The CLI in this process (as ``adaptermerge ARGS``): exit code and stderr."""
    from adaptermerge_cli.main import cli

    capsys.readouterr()  # drop what the test printed before
    with pytest.raises(SystemExit) as e:
        cli.main(list(args))
    return int(e.value.code), capsys.readouterr().err


def edit(folder: Path, dst: Path, config: Callable | None = None, weights: Callable | None = None) -> Path:
    """A copy of an adapter folder with its config and/or tensors changed by hand."""
    shutil.copytree(folder, dst)
    if config is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        config(cfg)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if weights is not None:
        sd = load_file(str(dst / "adapter_model.safetensors"))
        weights(sd)
        save_file(sd, str(dst / "adapter_model.safetensors"))
    return dst


# ------------------------------------------------------------------------------------------ reading and writing


def test_rows_are_read_as_saved(tmp_path: Path) -> None:
    a = token_adapter(tmp_path / "a", tiny_llama, trainable_token_indices=IDS)
    ad = adaptermerge.load_adapter(a)
    tr = ad.token_rows["model.embed_tokens"]
    assert tr.indices == tuple(IDS) and tr.input_embedding
    assert torch.equal(tr.rows, load_file(str(a / "adapter_model.safetensors"))[KEY])
    # PEFT stores the trained rows themselves (not a difference): its unmerged embedding reads exactly them
    pm = PeftModel.from_pretrained(tiny_llama(0), str(a))
    assert torch.equal(pm.get_input_embeddings().weight[IDS], tr.rows)
    assert ad.num_parameters() == sum(t.numel() for t in load_file(str(a / "adapter_model.safetensors")).values())


@pytest.mark.parametrize(
    "model_fn,tti",
    [(tiny_llama, IDS), (tied_llama, IDS), (tiny_llama, {"embed_tokens": [5, 7], "lm_head": [3, 9, 11]})],
    ids=["list", "list-tied", "dict-embedding-and-head"],
)
def test_save_round_trip_gives_peft_the_same_outputs(tmp_path: Path, model_fn: Callable, tti) -> None:
    a = token_adapter(tmp_path / "a", model_fn, trainable_token_indices=tti)
    out = adaptermerge.save_adapter(adaptermerge.load_adapter(a), tmp_path / "out")
    src, dst = load_file(str(a / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    for k in (k for k in src if "token_adapter" in k):
        assert torch.equal(dst[k], src[k]) and dst[k].dtype == src[k].dtype, k
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["trainable_token_indices"] == (
        tti if isinstance(tti, list) else {"model.embed_tokens": tti["embed_tokens"], "lm_head": tti["lm_head"]}
    )
    assert torch.allclose(peft_logits(model_fn, out), peft_logits(model_fn, a), atol=1e-5)
    again = adaptermerge.load_adapter(out)
    assert {n: t.indices for n, t in again.token_rows.items()} == {
        n: t.indices for n, t in adaptermerge.load_adapter(a).token_rows.items()
    }


def test_tied_head_entry_without_rows_is_the_embedding_entry(tmp_path: Path) -> None:
    """PEFT skips a dict entry for the tied head when its ids equal the embedding's: it saves no rows for it."""
    tti = {"embed_tokens": [5, 7], "lm_head": [5, 7]}
    a = token_adapter(tmp_path / "a", tied_llama, trainable_token_indices=tti)
    assert [k for k in load_file(str(a / "adapter_model.safetensors")) if "token_adapter" in k] == [KEY]
    out = adaptermerge.save_adapter(adaptermerge.load_adapter(a), tmp_path / "out")
    assert json.loads((out / "adapter_config.json").read_text())["trainable_token_indices"] == {
        "model.embed_tokens": [5, 7]
    }
    assert torch.allclose(peft_logits(tied_llama, out), peft_logits(tied_llama, a), atol=1e-5)


# ------------------------------------------------------------------------------------------ merge vs PEFT


MERGE_CASES = {
    "llama-untied": (tiny_llama, dict(trainable_token_indices=IDS)),
    "llama-tied": (tied_llama, dict(trainable_token_indices=IDS)),
    "llama-tied-ensure": (tied_llama, dict(trainable_token_indices=IDS, ensure_weight_tying=True)),
    "gpt2-tied-wte": (tiny_gpt2, dict(trainable_token_indices=IDS, target_modules=["c_attn"], fan_in_fan_out=True)),
    "llama-dict-head": (tiny_llama, dict(trainable_token_indices={"embed_tokens": [5, 7], "lm_head": [3, 9]})),
    "llama-tied-dict-same-ids": (tied_llama, dict(trainable_token_indices={"embed_tokens": IDS, "lm_head": IDS})),
    "llama-lora-on-embedding-too": (
        tiny_llama,
        dict(trainable_token_indices={"lm_head": IDS}, target_modules=["q_proj", "embed_tokens", "down_proj"]),
    ),
    "llama-bf16-tied": (bf16_tied_llama, dict(trainable_token_indices=IDS)),
    "llama-modules-to-save-head": (tiny_llama, dict(trainable_token_indices=IDS, modules_to_save=["lm_head"])),
}


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_merge_equals_peft_merge_and_unload(tmp_path: Path, case: str) -> None:
    model_fn, lora = MERGE_CASES[case]
    base = save_base(model_fn(0), tmp_path / "base")
    a = token_adapter(tmp_path / "a", model_fn, **lora)
    report = merge_into_base(base, a, tmp_path / "out")
    assert any(r.module.endswith(("embed_tokens", "wte", "lm_head")) for r in report.modules)
    merged, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True, dtype="auto")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # PEFT on the same checkpoint as transformers loads it (a model cast with .to(bf16) has bf16 rotary buffers)
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype="auto"), str(a)).eval()
    unmerged = logits(pm)
    ref = pm.merge_and_unload()
    ours = merged.state_dict()
    for k, v in ref.state_dict().items():
        if any(n in k for n in ("embed_tokens", "wte", "lm_head")) and not (case.endswith("too") and "embed" in k):
            assert torch.equal(ours[k], v), k  # replaced rows are copied (rounded once to the dtype), never computed
        else:  # W + delta: fp32 rounding, or one bf16 ulp (PEFT rounds the delta to bf16 before adding it)
            assert torch.allclose(
                ours[k].float(), v.float(), atol=2e-6, rtol=2**-7 if v.dtype != torch.float32 else 0
            ), k
    if merged.config.tie_word_embeddings:
        assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    assert rel_err(logits(merged), logits(ref)) < (1e-2 if merged.dtype != torch.float32 else 1e-6)
    if merged.dtype == torch.float32:  # bf16: PEFT's unmerged LoRA path rounds differently from any merged weight
        assert torch.allclose(logits(merged), unmerged, atol=2e-5)
    else:
        assert rel_err(logits(merged), unmerged) < 2e-2
    base_logits = logits(AutoModelForCausalLM.from_pretrained(base, dtype="auto"))
    assert not torch.allclose(logits(merged), base_logits, atol=1e-2)  # the rows changed the outputs


def test_rows_alone_change_the_logits_as_in_the_issue(tmp_path: Path) -> None:
    """Issue 8: the rows used to stay at base values. With them folded, outputs match PEFT; without, they do not."""
    base = save_base(tiny_llama(0), tmp_path / "base")
    a = token_adapter(tmp_path / "a", tiny_llama, trainable_token_indices=IDS)
    merge_into_base(base, a, tmp_path / "out")
    out = tensors(tmp_path / "out")
    assert not any("token_adapter" in k for k in out)
    rows = load_file(str(a / "adapter_model.safetensors"))[KEY]
    assert torch.equal(out["model.embed_tokens.weight"][IDS], rows)
    untouched = [i for i in range(128) if i not in IDS]
    assert torch.equal(
        out["model.embed_tokens.weight"][untouched], tensors(base)["model.embed_tokens.weight"][untouched]
    )


def test_task_adapter_on_bare_checkpoint(tmp_path: Path) -> None:
    """The planner's prefix mapping applies to token modules: model.embed_tokens -> embed_tokens.weight."""
    torch.manual_seed(0)
    bare = LlamaModel(tiny_llama(0).config)
    bare.load_state_dict(tiny_llama(0).model.state_dict())
    base = save_base(bare, tmp_path / "base")
    a = token_adapter(tmp_path / "a", tiny_llama, trainable_token_indices=IDS)
    merge_into_base(base, a, tmp_path / "out")
    ref = PeftModel.from_pretrained(tiny_llama(0), str(a)).merge_and_unload().model.state_dict()
    out = tensors(tmp_path / "out")
    assert set(out) == set(ref)
    for k, v in ref.items():
        assert torch.allclose(out[k], v, atol=2e-6), k


def test_tied_checkpoint_that_stores_the_head_keeps_both_equal(tmp_path: Path) -> None:
    base = save_base(tied_llama(0), tmp_path / "base")
    sd = tensors(base)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    for f in base.glob("*.safetensors*"):
        f.unlink()
    save_file(sd, str(base / "model.safetensors"), metadata={"format": "pt"})
    a = token_adapter(tmp_path / "a", tied_llama, trainable_token_indices=IDS)
    merge_into_base(base, a, tmp_path / "out")
    out = tensors(tmp_path / "out")
    assert torch.equal(out["lm_head.weight"], out["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"][IDS], load_file(str(a / "adapter_model.safetensors"))[KEY])


@pytest.mark.parametrize("mode", ["4-bit-base", "quantize"])
def test_rows_stay_dense_and_exact_with_4bit(tmp_path: Path, mode: str) -> None:
    """bitsandbytes keeps embeddings in 16/32 bits: the rows land there exactly whether the base is 4-bit or the
    output is quantized; the tied head follows them."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    base = save_base(tied_llama(0), tmp_path / "fp32")
    if mode == "4-bit-base":
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        AutoModelForCausalLM.from_pretrained(base, quantization_config=q, device_map="cpu").save_pretrained(
            tmp_path / "nf4"
        )
        base = tmp_path / "nf4"
    a = token_adapter(tmp_path / "a", tied_llama, trainable_token_indices=IDS)
    merge_into_base(base, a, tmp_path / "out", quantize="nf4" if mode == "quantize" else None)
    out = tensors(tmp_path / "out")
    emb, src = out["model.embed_tokens.weight"], tensors(base)["model.embed_tokens.weight"]
    assert torch.equal(emb[IDS], load_file(str(a / "adapter_model.safetensors"))[KEY].to(emb.dtype))
    rest = [i for i in range(128) if i not in IDS]
    assert torch.equal(emb[rest], src[rest])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu")
    assert torch.equal(model.get_output_embeddings().weight[IDS].float(), emb[IDS].float())


# ------------------------------------------------------------------------------------------ combine


def expected_model(model_fn: Callable, adapters: list[Path], weights: list[float]) -> torch.nn.Module:
    """base + sum_i w_i delta_i by hand: PEFT's own LoRA deltas, and token rows base + sum_i w_i (row_i - base)."""
    pm = PeftModel.from_pretrained(model_fn(0), str(adapters[0]), adapter_name="a0")
    for i, a in enumerate(adapters[1:], start=1):
        pm.load_adapter(str(a), adapter_name=f"a{i}")
    model = model_fn(0)
    mods = dict(model.named_modules())
    emb = model.get_input_embeddings().weight
    base_emb = emb.detach().clone()
    with torch.no_grad():
        for i, (a, w) in enumerate(zip(adapters, weights, strict=True)):
            for name, d in peft_deltas(pm, f"a{i}").items():
                mods[name].weight += w * d
            rows = load_file(str(a / "adapter_model.safetensors"))[KEY]
            ids = json.loads((a / "adapter_config.json").read_text())["trainable_token_indices"]
            emb[ids] += w * (rows - base_emb[ids])
    return model.eval()


@pytest.mark.parametrize("method", ["linear", "cat", "svd", "factor-linear"])
def test_combine_is_the_weighted_sum_of_row_changes(tmp_path: Path, method: str) -> None:
    a = token_adapter(tmp_path / "a", tiny_llama, seed=1, trainable_token_indices=[5, 7, 9])
    b = token_adapter(tmp_path / "b", tiny_llama, seed=2, trainable_token_indices=[7, 11])
    base = save_base(tiny_llama(0), tmp_path / "base")
    w = [0.6, 0.3]  # token 7: both adapters (0.9); 5, 9: a only; 11: b only -> every row needs the base row
    with pytest.raises(UsageError, match="needs the base model.s own row.*`base`"):
        adaptermerge.combine([a, b], w, method=method)
    res = adaptermerge.combine([a, b], w, method=method, base=base)
    tr = res.token_rows["model.embed_tokens"]
    assert tr.indices == (5, 7, 9, 11)
    exp = expected_model(tiny_llama, [a, b], w)
    assert torch.allclose(tr.rows, exp.get_input_embeddings().weight[list(tr.indices)], atol=1e-6, rtol=0)
    out = adaptermerge.save_combined(res, tmp_path / "out")
    assert json.loads((out / "adapter_config.json").read_text())["trainable_token_indices"] == [5, 7, 9, 11]
    got = peft_logits(tiny_llama, out)
    if method in ("linear", "cat"):  # exact sums; svd truncates and factor-linear adds cross terms to the factors
        assert torch.allclose(got, logits(exp), atol=2e-5)
    # the token rows are exact for every method (no rank is involved): PEFT's embedding reads them unchanged
    loaded = PeftModel.from_pretrained(tiny_llama(0), str(out)).eval()
    assert torch.equal(loaded.get_input_embeddings().weight[[5, 7, 9, 11]], tr.rows)
    recipe = (out / "adaptermerge_recipe.yaml").read_text()
    assert str(base.resolve()) in recipe or str(base) in recipe


def test_combine_with_weights_summing_to_one_needs_no_base(tmp_path: Path) -> None:
    a = token_adapter(tmp_path / "a", tied_llama, seed=1, trainable_token_indices=[5, 7])
    b = token_adapter(tmp_path / "b", tied_llama, seed=2, trainable_token_indices=[5, 7])
    res = adaptermerge.combine([a, b], [0.25, 0.75])
    out = adaptermerge.save_combined(res, tmp_path / "out")
    exp = expected_model(tied_llama, [a, b], [0.25, 0.75])
    assert torch.allclose(peft_logits(tied_llama, out), logits(exp), atol=2e-5)


def test_merge_of_several_adapters_reads_the_base_rows(tmp_path: Path) -> None:
    a = token_adapter(tmp_path / "a", tied_llama, seed=1, trainable_token_indices=[5, 7, 9])
    b = token_adapter(tmp_path / "b", tied_llama, seed=2, trainable_token_indices=[9, 11])
    base = save_base(tied_llama(0), tmp_path / "base")
    merge_into_base(base, [a, b], tmp_path / "out", weights=[0.5, 0.5])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    exp = expected_model(tied_llama, [a, b], [0.5, 0.5])
    assert torch.allclose(merged.get_input_embeddings().weight, exp.get_input_embeddings().weight, atol=1e-6)
    assert torch.allclose(logits(merged), logits(exp), atol=2e-5)


def test_resize_keeps_rows_exact(tmp_path: Path) -> None:
    a = token_adapter(tmp_path / "a", tiny_llama, trainable_token_indices=IDS)
    res = adaptermerge.resize_adapter(a, rank=2)
    assert torch.equal(
        res.token_rows["model.embed_tokens"].rows, adaptermerge.load_adapter(a).token_rows["model.embed_tokens"].rows
    )


def test_combine_refuses_lora_and_rows_on_one_module(tmp_path: Path) -> None:
    a = token_adapter(tmp_path / "a", tiny_llama, seed=1, target_modules=["q_proj", "embed_tokens"])
    b = token_adapter(tmp_path / "b", tiny_llama, seed=2, trainable_token_indices=IDS)
    with pytest.raises(UnsupportedAdapter, match="both LoRA factors and trainable token rows"):
        adaptermerge.combine([a, b], [0.5, 0.5])


# ------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    "tti", [{"embed_tokens": [5, 7], "lm_head": [3, 9]}, {"lm_head": [3, 9]}], ids=["different-ids", "head-only"]
)
def test_tied_head_rows_that_need_untying_are_refused(tmp_path: Path, tti) -> None:
    """PEFT's merge_and_unload writes both row sets into the shared matrix, which differs from its own outputs."""
    a = token_adapter(tmp_path / "a", tied_llama, trainable_token_indices=tti)
    pm = PeftModel.from_pretrained(tied_llama(0), str(a)).eval()
    unmerged = logits(pm)
    assert not torch.allclose(logits(pm.merge_and_unload()), unmerged, atol=1e-2)  # PEFT's own inconsistency
    base = save_base(tied_llama(0), tmp_path / "base")
    with pytest.raises(IncompatibleAdapters, match="untying"):
        merge_into_base(base, a, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["5", [5, "7"], [True], {"embed_tokens": 5}, {"": [5]}, 7])
def test_malformed_config_values_are_refused(value) -> None:
    from adaptermerge.io.peft_config import check_config

    with pytest.raises(UnsupportedAdapter, match="trainable_token_indices"):
        check_config({"r": 4, "target_modules": ["q_proj"], "trainable_token_indices": value})


def test_modules_to_save_head_on_a_tied_model_is_refused(tmp_path: Path) -> None:
    """PEFT wraps the saved head copy in the tied token wrapper and then cannot run the model at all."""
    a = token_adapter(tmp_path / "a", tied_llama, trainable_token_indices=IDS, modules_to_save=["lm_head"])
    with pytest.raises(ValueError, match="unknown layer type"):
        logits(PeftModel.from_pretrained(tied_llama(0), str(a)).eval())
    with pytest.raises(UnsupportedAdapter, match="full copy of a layer that carries trainable tokens"):
        adaptermerge.load_adapter(a)


def _drop_key(sd: dict) -> None:
    del sd[KEY]


def _nan_rows(sd: dict) -> None:
    sd[KEY] = sd[KEY].clone()
    sd[KEY][0, 0] = float("nan")


def _repeat_id(cfg: dict) -> None:
    cfg["trainable_token_indices"] = [5, 5, 9]


BAD_FILES = {
    "rows-without-config": (lambda c: c.pop("trainable_token_indices"), None, InvalidAdapter, "has no trainable"),
    "config-without-rows": (None, _drop_key, InvalidAdapter, "holds no .*trainable_tokens_delta"),
    "count-mismatch": (lambda c: c.update(trainable_token_indices=[5, 7]), None, InvalidAdapter, "3 rows but"),
    "repeated-id": (_repeat_id, None, InvalidAdapter, "repeats token 5"),
    "nan-rows": (None, _nan_rows, InvalidAdapter, "NaN or Inf"),
    "negative-id": (lambda c: c.update(trainable_token_indices=[5, -7, 9]), None, UnsupportedAdapter, "non-negative"),
    "dict-no-match": (
        lambda c: c.update(trainable_token_indices={"wte": IDS}),
        None,
        InvalidAdapter,
        "matches none of its entries",
    ),
    "full-embedding-copy": (
        None,
        lambda sd: sd.update({KEY.replace("trainable_tokens_delta", "base_layer.weight"): torch.zeros(128, 64)}),
        UnsupportedAdapter,
        "full copy of a layer that carries trainable tokens",
    ),
    "lora-and-rows-on-one-module": (
        lambda c: c.update(target_modules=["q_proj", "v_proj", "embed_tokens"]),
        lambda sd: sd.update(
            {
                "base_model.model.model.embed_tokens.lora_embedding_A": torch.ones(4, 128),
                "base_model.model.model.embed_tokens.lora_embedding_B": torch.ones(64, 4),
            }
        ),
        UnsupportedAdapter,
        "PEFT refuses this combination",
    ),
    "modules-to-save-too": (
        lambda c: c.update(modules_to_save=["embed_tokens"]),
        None,
        UnsupportedAdapter,
        "both in modules_to_save",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_are_refused_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    config, weights, error, needle = BAD_FILES[case]
    good = token_adapter(tmp_path / "a", tiny_llama, trainable_token_indices=IDS)
    bad = edit(good, tmp_path / "bad", config, weights)
    before = {p.name: p.read_bytes() for p in bad.iterdir()}
    with pytest.raises(error, match=needle):
        adaptermerge.load_adapter(bad)
    base = save_base(tiny_llama(0), tmp_path / "base")
    code, err = run_cli(capsys, "merge", str(base), str(bad), "-o", str(tmp_path / "out"))
    assert code == 1 and err.startswith("error: ") and "internal error" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    assert {p.name: p.read_bytes() for p in bad.iterdir()} == before


def test_ids_beyond_the_vocabulary_are_refused(tmp_path: Path) -> None:
    good = token_adapter(tmp_path / "a", tiny_llama, trainable_token_indices=IDS)
    bad = edit(good, tmp_path / "bad", lambda c: c.update(trainable_token_indices=[5, 7, 500]))
    base = save_base(tiny_llama(0), tmp_path / "base")
    with pytest.raises(IncompatibleAdapters, match="id 500 is beyond the 128 rows"):
        merge_into_base(base, bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_list_form_rows_saved_for_another_module_are_refused(tmp_path: Path) -> None:
    """The list form means the input embedding; PEFT would ignore rows saved under another module's name."""
    good = token_adapter(tmp_path / "a", tiny_llama, trainable_token_indices=IDS)
    head_key = "base_model.model.lm_head.token_adapter.trainable_tokens_delta"
    bad = edit(good, tmp_path / "bad", weights=lambda sd: sd.update({head_key: sd.pop(KEY)}))
    base = save_base(tiny_llama(0), tmp_path / "base")
    with pytest.raises(IncompatibleAdapters, match="list form means the input embedding"):
        merge_into_base(base, bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_combine_base_option(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = token_adapter(tmp_path / "a", tiny_llama, seed=1, trainable_token_indices=[5, 7])
    b = token_adapter(tmp_path / "b", tiny_llama, seed=2, trainable_token_indices=[7, 11])
    base = save_base(tiny_llama(0), tmp_path / "base")
    code, err = run_cli(capsys, "combine", str(a), str(b), "-o", str(tmp_path / "x"))
    assert code == 2 and "--base" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()
    code, err = run_cli(capsys, "combine", str(a), str(b), "--base", str(base), "-o", str(tmp_path / "y"), "--quiet")
    assert code == 0, err
    recipe = str(tmp_path / "y" / "adaptermerge_recipe.yaml")
    code, err = run_cli(capsys, "combine", "--recipe", recipe, "-o", str(tmp_path / "z"), "--quiet")
    assert code == 0, err
    y, z = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("y", "z"))
    assert y.keys() == z.keys() and all(torch.equal(y[k], z[k]) for k in y)
    exp = expected_model(tiny_llama, [a, b], [0.5, 0.5])
    assert torch.allclose(peft_logits(tiny_llama, tmp_path / "z"), logits(exp), atol=2e-5)
