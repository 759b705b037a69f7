"""init_lora_weights that change the base (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ) and the plain ones, against PEFT.

Adapters are made the way PEFT documents it: ``get_peft_model`` with the init, the initial adapter saved right away
(its config set to ``init_lora_weights=True``, as PEFT's examples do), "training" (noise added to A and B), then
the trained adapter saved unconverted and PEFT's own conversion (``path_initial_model_for_weight_conversion``)
written beside it. The trained model is the PeftModel in memory at the end of training; its logits are the
reference, together with what PEFT computes when it reloads the folders.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import adaptermerge
from adaptermerge.errors import IncompatibleAdapters, UnsupportedAdapter, UsageError
from adaptermerge.io.peft_config import check_config
from adaptermerge.surgery.init_conversion import load_convert_recipe
from adaptermerge_cli.main import cli
from tests.helpers import input_ids, make_adapter, peft_deltas, tiny_gpt2, tiny_llama

LLAMA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
PATTERNS = dict(rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 4})  # per-module r and scaling
GPT2 = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)


@dataclass
class Made:
    trained: Path
    initial: Path
    peft_converted: Path | None
    logits: torch.Tensor  # the trained model's (the PeftModel in memory after training)
    model_fn: Callable[..., torch.nn.Module]


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids()).logits


def initialised(
    folder: Path, model_fn: Callable, init: str, prepare: Callable | None = None, convert: bool = True, **lora
) -> Made:
    """An adapter made with PEFT's base-changing ``init``, trained (noise), saved the documented ways."""
    base = model_fn(0)
    cfg = LoraConfig(init_lora_weights=init, **lora)
    if prepare is not None:
        prepare(base, cfg)
    pm = get_peft_model(base, cfg)
    pm.peft_config["default"].init_lora_weights = True
    pm.save_pretrained(str(folder / "initial"))
    pm.peft_config["default"].init_lora_weights = init
    torch.manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn_like(p))
    ref = logits(pm)
    pm.save_pretrained(str(folder / "trained"))
    if convert:
        pm.save_pretrained(str(folder / "peft"), path_initial_model_for_weight_conversion=str(folder / "initial"))
    return Made(folder / "trained", folder / "initial", folder / "peft" if convert else None, ref, model_fn)


def save_base(model_fn: Callable, folder: Path, dtype: torch.dtype | None = None) -> Path:
    m = model_fn(0) if dtype is None else model_fn(0).to(dtype)
    m.save_pretrained(str(folder), max_shard_size="60KB")
    return folder


def peft_reload(made: Made, folder: Path | None = None, base: torch.nn.Module | None = None) -> PeftModel:
    return PeftModel.from_pretrained(base or made.model_fn(0), str(folder or made.trained)).eval()


def as_plain(folder: Path, out: Path) -> Path:
    """The adapter read the old, wrong way: its factors as if init_lora_weights were true (W0 + s*B@A)."""
    shutil.copytree(folder, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": True}))
    return out


def state(folder: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("init")
    save_base(tiny_llama, d / "llama")
    save_base(tiny_gpt2, d / "gpt2")
    return d


CASES = {
    "pissa-llama": ("llama", tiny_llama, "pissa", {**LLAMA, **PATTERNS}),
    "olora-llama": ("llama", tiny_llama, "olora", {**LLAMA, **PATTERNS}),
    "pissa-gpt2-conv1d": ("gpt2", tiny_gpt2, "pissa", GPT2),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, work: Path) -> tuple[Path, Made]:
    base, fn, init, lora = CASES[request.param]
    return work / base, initialised(work / request.param, fn, init, **lora)


# ----------------------------------------------------------------------------------------------- pissa / olora


def test_merge_is_w0_minus_init_plus_delta_as_peft_reloads_it(case, tmp_path: Path) -> None:
    """merge recomputes the init from the base: PEFT's reload + merge_and_unload, and the trained model."""
    base, made = case
    rep = adaptermerge.merge_into_base(base, made.trained, tmp_path / "out")
    ours = state(tmp_path / "out")
    peft = peft_reload(made).merge_and_unload().state_dict()
    assert max(float((ours[k] - peft[k]).abs().max()) for k in peft) < 1e-6  # measured: <= 3e-8
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.allclose(logits(model), made.logits, atol=1e-5)
    assert any("converted to plain LoRA" in w for w in rep.warnings)
    # reading the factors as plain LoRA (what adaptermerge did before) is far off: the test can fail
    adaptermerge.merge_into_base(base, as_plain(made.trained, tmp_path / "naive"), tmp_path / "naive-out")
    naive = AutoModelForCausalLM.from_pretrained(tmp_path / "naive-out")
    assert float((logits(naive) - made.logits).abs().max()) > 0.05


def test_conversion_is_peft_conversion(case, tmp_path: Path) -> None:
    """The plain adapter from the base and from the initial adapter has PEFT's converted deltas, loads in PEFT as
    plain LoRA (init_lora_weights: true) on the unchanged base, and gives the trained model."""
    base, made = case
    peft = peft_deltas(peft_reload(made, made.peft_converted), "default")
    for i, kw in enumerate([dict(base=base), dict(initial_adapter=made.initial)]):
        ours = adaptermerge.convert_to_plain_lora(made.trained, **kw)
        assert set(ours.modules) == set(peft)
        for name, d in peft.items():
            assert torch.allclose(ours.modules[name].weight_delta(), d, atol=1e-6), name  # measured: 0.0
        out = adaptermerge.save_adapter(ours, tmp_path / f"ours{i}")
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["init_lora_weights"] is True
        assert ours.ranks == adaptermerge.load_adapter(made.peft_converted).ranks  # 2r, as PEFT writes
        assert torch.allclose(logits(peft_reload(made, out)), made.logits, atol=1e-5)


def test_combine_needs_the_base_and_writes_plain_lora(work: Path, tmp_path: Path) -> None:
    made = initialised(tmp_path / "p", tiny_llama, "pissa", **LLAMA)
    plain = make_adapter(tmp_path / "plain", tiny_llama, r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"])
    with pytest.raises(UnsupportedAdapter, match=r"pissa_init.*combine --base BASE.*adaptermerge convert"):
        adaptermerge.combine([made.trained, plain], [0.7, 0.3])
    result = adaptermerge.combine([made.trained, plain], [0.7, 0.3], base=work / "llama")
    out = adaptermerge.save_combined(result, tmp_path / "combined")
    assert json.loads((out / "adapter_config.json").read_text())["init_lora_weights"] is True
    # expected: W0 + 0.7 (s*B@A - init) + 0.3 delta_plain, from PEFT's own deltas of PEFT's conversion
    expected = tiny_llama(0)
    mods = dict(expected.named_modules())
    with torch.no_grad():
        for w, folder in ((0.7, made.peft_converted), (0.3, plain)):
            for name, d in peft_deltas(peft_reload(made, folder), "default").items():
                mods[name].weight += w * d
    assert torch.allclose(logits(peft_reload(made, out)), logits(expected), atol=1e-5)
    # the recipe records the base and replays the conversion
    from adaptermerge.recipe import load_recipe, recipe_arguments

    again = adaptermerge.combine(**recipe_arguments(load_recipe(out / "adaptermerge_recipe.yaml")))
    for name, m in result.modules.items():
        assert torch.equal(again.modules[name].delta(), m.delta())


def test_bf16_base_is_the_trained_model_rounded_once(tmp_path: Path) -> None:
    """PEFT computes the init in fp32 from the bf16 weight and holds W0 - init in bf16 (at training and at reload);
    merge rounds W0 - init to bf16 the same way, then adds s*B@A and rounds once, as PEFT's merge_and_unload does.
    Measured: bit-identical to PEFT on every element; allowed: one bf16 ulp in at most 0.1% of the elements."""
    base = save_base(tiny_llama, tmp_path / "base", torch.bfloat16)
    made = initialised(
        tmp_path / "a", lambda seed=0: tiny_llama(seed, dtype=torch.bfloat16), "pissa", convert=False, **LLAMA
    )
    adaptermerge.merge_into_base(base, made.trained, tmp_path / "out")
    ours = {k: v for f in sorted((tmp_path / "out").glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    peft = peft_reload(made).merge_and_unload().state_dict()
    differing = 0
    for k, p in peft.items():
        assert ours[k].dtype == torch.bfloat16
        top = torch.maximum(ours[k].float().abs(), p.float().abs()).clamp_min(2**-126)
        ulp = 2.0 ** (torch.floor(torch.log2(top)) - 7)
        diff = (ours[k].float() - p.float()).abs()
        assert bool((diff <= ulp).all()), k
        differing += int((diff > 0).sum())
    assert differing <= 1e-3 * sum(p.numel() for p in peft.values())
    # rounding W0 + (s*B@A - init) once instead (the converted adapter's view) differs in about a quarter of them
    plain = adaptermerge.save_adapter(adaptermerge.convert_to_plain_lora(made.trained, base=base), tmp_path / "plain")
    adaptermerge.merge_into_base(base, plain, tmp_path / "once")
    once = {k: v for f in sorted((tmp_path / "once").glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert sum(int((once[k] != p).sum()) for k, p in peft.items()) > 0.05 * sum(p.numel() for p in peft.values())


def test_dora_pissa_keeps_the_magnitude(work: Path, tmp_path: Path) -> None:
    """DoRA on a PiSSA adapter: W' = m (W0 - init + s*B@A) / ||.||; the conversion keeps the magnitude vector,
    which PEFT's own conversion drops (its converted folder has no lora_magnitude_vector)."""
    made = initialised(tmp_path / "a", tiny_llama, "pissa", use_dora=True, **LLAMA)
    adaptermerge.merge_into_base(work / "llama", made.trained, tmp_path / "out")
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out")), made.logits, atol=1e-5)
    out = adaptermerge.save_adapter(
        adaptermerge.convert_to_plain_lora(made.trained, base=work / "llama"), tmp_path / "ours"
    )
    assert torch.allclose(logits(peft_reload(made, out)), made.logits, atol=1e-5)
    assert not any("magnitude" in k for k in load_file(str(made.peft_converted / "adapter_model.safetensors")))
    assert float((logits(peft_reload(made, made.peft_converted)) - made.logits).abs().max()) > 1e-2


def _orthogonal_q(seed: int = 0) -> torch.nn.Module:
    """tiny_llama whose first q_proj is 0.1 * an orthogonal matrix: all its singular values tie."""
    m = tiny_llama(seed)
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(5)))
    with torch.no_grad():
        m.model.layers[0].self_attn.q_proj.weight.copy_(0.1 * q)
    return m


def test_pissa_on_tied_singular_values_warns(tmp_path: Path) -> None:
    base = save_base(_orthogonal_q, tmp_path / "base")
    made = initialised(
        tmp_path / "a", _orthogonal_q, "pissa", convert=False, r=4, lora_alpha=8, target_modules=["q_proj"]
    )
    rep = adaptermerge.merge_into_base(base, made.trained, tmp_path / "out")
    tied = [w for w in rep.warnings if "nearly tie" in w]
    assert len(tied) == 1 and "layers.0.self_attn.q_proj" in tied[0]


# ----------------------------------------------------------------------------------------------- refusals


def test_pissa_niter_needs_the_initial_adapter(work: Path, tmp_path: Path) -> None:
    made = initialised(tmp_path / "a", tiny_llama, "pissa_niter_2", **LLAMA)
    with pytest.raises(UnsupportedAdapter, match=r"randomized SVD.*--initial-adapter"):
        adaptermerge.merge_into_base(work / "llama", made.trained, tmp_path / "out")
    with pytest.raises(UnsupportedAdapter, match=r"randomized SVD.*--initial-adapter"):
        adaptermerge.convert_to_plain_lora(made.trained, base=work / "llama")
    assert not (tmp_path / "out").exists()
    ours = adaptermerge.save_adapter(
        adaptermerge.convert_to_plain_lora(made.trained, initial_adapter=made.initial), tmp_path / "ours"
    )
    assert torch.allclose(logits(peft_reload(made, ours)), made.logits, atol=1e-5)
    # why: PEFT's own reload redoes the randomized SVD with the loading process's random state
    reloads = []
    for seed in (1, 2):
        b = tiny_llama(0)
        torch.manual_seed(seed)
        reloads.append(logits(peft_reload(made, base=b)))
    assert float((reloads[0] - reloads[1]).abs().max()) > 1e-3


def _corda(base: torch.nn.Module, cfg: LoraConfig) -> None:
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    cfg.corda_config = CordaConfig(corda_method="ipm")
    preprocess_corda(
        base, cfg, run_model=lambda: [base(input_ids=input_ids(batch=1, length=60, seed=k)) for k in range(4)]
    )


def _lora_ga(base: torch.nn.Module, cfg: LoraConfig) -> None:
    from peft.tuners.lora.config import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    cfg.lora_ga_config = LoraGAConfig()
    ids = input_ids()
    preprocess_loraga(base, cfg, train_step=lambda: base(input_ids=ids, labels=ids).loss.backward())


@pytest.mark.parametrize("init,prepare", [("corda", _corda), ("lora_ga", _lora_ga)])
def test_data_dependent_inits_convert_only_with_the_initial_adapter(
    init: str, prepare: Callable, work: Path, tmp_path: Path
) -> None:
    """CorDA and LoRA-GA subtract s*B0@A0 built from data: exact from the initial adapter, refused otherwise."""
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    made = initialised(tmp_path / "a", tiny_llama, init, prepare=prepare, convert=False, **lora)
    for call in (
        lambda: adaptermerge.load_adapter(made.trained),
        lambda: adaptermerge.merge_into_base(work / "llama", made.trained, tmp_path / "out"),
        lambda: adaptermerge.convert_to_plain_lora(made.trained, base=work / "llama"),
    ):
        with pytest.raises(UnsupportedAdapter, match=rf"{init}_init.*--initial-adapter"):
            call()
    ours = adaptermerge.save_adapter(
        adaptermerge.convert_to_plain_lora(made.trained, initial_adapter=made.initial), tmp_path / "ours"
    )
    assert torch.allclose(logits(peft_reload(made, ours)), made.logits, atol=1e-5)  # measured: 2e-7
    if init == "lora_ga":  # PEFT's reload of the unconverted adapter silently drops the init term
        assert float((logits(peft_reload(made)) - made.logits).abs().max()) > 1e-2


def _with_init(src: Path, out: Path, value: object, **extra) -> Path:
    shutil.copytree(src, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": value, **extra}))
    return out


def test_loftq_is_refused_even_with_the_initial_adapter(work: Path, tmp_path: Path) -> None:
    made = initialised(tmp_path / "a", tiny_llama, "pissa", convert=False, **LLAMA)
    loftq = _with_init(made.trained, tmp_path / "loftq", "loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    for call in (
        lambda: adaptermerge.load_adapter(loftq),
        lambda: adaptermerge.merge_into_base(work / "llama", loftq, tmp_path / "out"),
        lambda: adaptermerge.convert_to_plain_lora(loftq, initial_adapter=made.initial),
    ):
        with pytest.raises(UnsupportedAdapter, match="loftq_init.*cannot reproduce"):
            call()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_4bit_base_is_refused(init: str, work: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    AutoModelForCausalLM.from_pretrained(work / "llama", quantization_config=q, device_map="cpu").save_pretrained(
        tmp_path / "nf4"
    )
    made = initialised(tmp_path / "a", tiny_llama, init, convert=False, **LLAMA)
    needle = "pissa_init refuses quantized weights" if init == "pissa" else "olora_init re-quantizes"
    with pytest.raises(UnsupportedAdapter, match=needle):
        adaptermerge.merge_into_base(tmp_path / "nf4", made.trained, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_olora_on_conv1d_is_refused(work: Path, tmp_path: Path) -> None:
    """PEFT's olora_init ignores fan_in_fan_out: on GPT-2's square attn.c_proj it decomposes the stored in x out
    weight, and PEFT's own conversion then gives another model (checked here); non-square layers fail in PEFT."""
    made = initialised(tmp_path / "a", tiny_gpt2, "olora", r=4, lora_alpha=8, target_modules=["attn.c_proj"])
    assert float((logits(peft_reload(made, made.peft_converted)) - made.logits).abs().max()) > 1e-2
    for call in (
        lambda: adaptermerge.merge_into_base(work / "gpt2", made.trained, tmp_path / "out"),
        lambda: adaptermerge.convert_to_plain_lora(made.trained, base=work / "gpt2"),
    ):
        with pytest.raises(UnsupportedAdapter, match="Conv1D.*olora_init"):
            call()


def test_raw_factors_never_leave_as_plain_lora(work: Path, tmp_path: Path) -> None:
    made = initialised(tmp_path / "a", tiny_llama, "pissa", convert=False, **LLAMA)
    raw = adaptermerge.load_adapter(made.trained, raw_init=True)
    with pytest.raises(UnsupportedAdapter, match="raw factors"):
        adaptermerge.save_adapter(raw, tmp_path / "raw")
    with pytest.raises(UnsupportedAdapter, match="raw factors"):
        adaptermerge.combine([raw], base=work / "llama")
    with pytest.raises(UnsupportedAdapter, match="raw factors"):
        adaptermerge.merge_into_base(work / "llama", raw, tmp_path / "out")
    assert not (tmp_path / "raw").exists() and not (tmp_path / "out").exists()
    # the raw object converts like the folder
    a = adaptermerge.convert_to_plain_lora(raw, base=work / "llama")
    b = adaptermerge.convert_to_plain_lora(made.trained, base=work / "llama")
    assert all(torch.equal(a.modules[n].delta(), b.modules[n].delta()) for n in a.modules)


def test_wrong_sources_are_refused(work: Path, tmp_path: Path) -> None:
    made = initialised(tmp_path / "a", tiny_llama, "pissa", convert=False, **LLAMA)
    other = initialised(
        tmp_path / "b", tiny_llama, "pissa", convert=False, r=2, lora_alpha=8, target_modules=["q_proj"]
    )
    with pytest.raises(UsageError, match="exactly one"):
        adaptermerge.convert_to_plain_lora(made.trained)
    with pytest.raises(UsageError, match="exactly one"):
        adaptermerge.convert_to_plain_lora(made.trained, base=work / "llama", initial_adapter=made.initial)
    with pytest.raises(IncompatibleAdapters, match="not the adapter's initial state"):
        adaptermerge.convert_to_plain_lora(made.trained, initial_adapter=other.initial)
    with pytest.raises(UsageError, match="is the adapter itself"):
        adaptermerge.convert_to_plain_lora(made.trained, initial_adapter=made.trained)
    with pytest.raises(IncompatibleAdapters, match="no weight in the base checkpoint"):
        adaptermerge.convert_to_plain_lora(made.trained, base=work / "gpt2")
    plain = make_adapter(tmp_path / "plain", tiny_llama, r=4, target_modules=["q_proj"])
    with pytest.raises(UsageError, match="plain LoRA already"):
        adaptermerge.convert_to_plain_lora(plain, base=work / "llama")


# ----------------------------------------------------------------------------------------------- plain inits


def _trained(folder: Path, model_fn: Callable, **lora) -> tuple[Path, torch.Tensor]:
    pm = get_peft_model(model_fn(0), LoraConfig(**lora))
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))
    pm.save_pretrained(str(folder))
    return folder, logits(pm.eval())


@pytest.mark.parametrize(
    "lora",
    [dict(init_lora_weights="mica"), dict(velora_config={"num_groups": 4}), dict(init_lora_weights="orthogonal")],
    ids=["mica", "velora", "orthogonal"],
)
def test_base_preserving_variants_merge_like_peft(lora: dict, work: Path, tmp_path: Path) -> None:
    """MiCA (B frozen at W0's smallest singular vectors), VeLoRA (a training-only backward) and orthogonal init
    leave the base alone: merge equals PEFT's merge_and_unload, and a re-saved adapter loads with the same logits."""
    folder, ref = _trained(tmp_path / "a", tiny_llama, **LLAMA, **lora)
    made = Made(folder, folder, None, ref, tiny_llama)
    saved = load_file(str(folder / "adapter_model.safetensors"))
    assert any("lora_velora_embed" in k for k in saved) == ("velora_config" in lora)
    adaptermerge.merge_into_base(work / "llama", folder, tmp_path / "out")
    peft = peft_reload(made).merge_and_unload()
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out")), logits(peft), atol=1e-5)
    assert torch.allclose(logits(peft), ref, atol=1e-5)
    ad = adaptermerge.load_adapter(folder)
    assert not ad.extra_tensors
    resaved = adaptermerge.save_adapter(ad, tmp_path / "resaved")
    assert torch.allclose(logits(peft_reload(made, resaved)), ref, atol=1e-5)


def test_velora_tensors_are_dropped_only_with_velora_config(tmp_path: Path) -> None:
    folder, _ = _trained(tmp_path / "a", tiny_llama, velora_config={"num_groups": 4}, **LLAMA)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "velora_config": None}))
    with pytest.raises(UnsupportedAdapter, match="lora_velora_embed"):
        adaptermerge.load_adapter(folder)


def test_every_peft_init_value_is_classified() -> None:
    """Every value in LoraConfig's init_lora_weights Literal (and PEFT's prefix/case variants) has a verdict."""
    import typing

    from peft.tuners.lora.config import LoraConfig as LC

    hint = typing.get_type_hints(LC)["init_lora_weights"]
    literals = [a for arg in typing.get_args(hint) for a in (typing.get_args(arg) or [arg]) if isinstance(a, str)]
    literals = [v.replace("[number of iters]", "16") for v in literals] + ["lora_ga", "OLoRA", "MICA", True, False]
    accepted = {v for v in literals if _accepted(v)}
    assert accepted == {True, False, "gaussian", "eva", "orthogonal", "mica", "MICA"}


def _accepted(value: object) -> bool:
    try:
        check_config({"r": 4, "init_lora_weights": value})
    except UnsupportedAdapter:
        return False
    return True


# ----------------------------------------------------------------------------------------------- CLI


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_convert_combine_merge(work: Path, tmp_path: Path) -> None:
    made = initialised(tmp_path / "a", tiny_llama, "pissa", convert=False, **LLAMA)
    niter = initialised(tmp_path / "n", tiny_llama, "pissa_niter_2", convert=False, **LLAMA)
    before = {p: p.read_bytes() for p in made.trained.iterdir()}
    r = invoke("convert", made.trained, "-o", tmp_path / "x")
    assert r.exit_code == 2 and "exactly one" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = invoke("convert", niter.trained, "--base", work / "llama", "-o", tmp_path / "x")
    assert r.exit_code == 1 and "--initial-adapter" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = invoke("merge", work / "llama", niter.trained, "-o", tmp_path / "x")
    assert r.exit_code == 1 and "randomized SVD" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = invoke("combine", made.trained, "-o", tmp_path / "x")
    assert r.exit_code == 1 and "--base" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists() and before == {p: p.read_bytes() for p in made.trained.iterdir()}
    r = invoke("convert", made.trained, "--base", work / "llama", "-o", tmp_path / "conv", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["init_lora_weights"] == "pissa"
    assert torch.allclose(logits(peft_reload(made, tmp_path / "conv")), made.logits, atol=1e-5)
    r = invoke("convert", "--recipe", tmp_path / "conv" / "adaptermerge_recipe.yaml", "-o", tmp_path / "again")
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "again" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "conv" / "adapter_model.safetensors"
    ).read_bytes()
    assert load_convert_recipe(tmp_path / "conv" / "adaptermerge_recipe.yaml")["base"] == str(
        (work / "llama").resolve()
    )
    r = invoke("convert", niter.trained, "--initial-adapter", niter.initial, "-o", tmp_path / "niter")
    assert r.exit_code == 0, r.stderr
    r = invoke("combine", made.trained, tmp_path / "niter", "--base", work / "llama", "-o", tmp_path / "comb")
    assert r.exit_code == 0, r.stderr
    assert json.loads((tmp_path / "comb" / "adapter_config.json").read_text())["init_lora_weights"] is True


def test_cli_refusal_is_one_line_from_the_entry_point(work: Path, tmp_path: Path) -> None:
    made = initialised(tmp_path / "a", tiny_llama, "olora", convert=False, **LLAMA)
    p = subprocess.run(
        [sys.executable, "-m", "adaptermerge_cli", "combine", str(made.trained), "-o", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "olora_init" in p.stderr and "--base BASE" in p.stderr and not (tmp_path / "x").exists()
