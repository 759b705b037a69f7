"""The conformance matrix: architectures x operations x PEFT features, each against PEFT's own result.

Every architecture of ``tests/archs.py`` (Llama, Qwen2, Gemma 1/2/3, Mistral, Phi-3 fused layers, GPT-2 Conv1D,
GPT-NeoX, Falcon, OPT, BART, T5, BERT/RoBERTa classification with their heads in ``modules_to_save``, a Qwen2 MoE)
goes through:

* ``merge`` in fp32 of an adapter with rsLoRA and rank/alpha patterns: the merged model's outputs equal the
  unmerged PEFT model's (PEFT's forward is the reference, not its merge);
* ``merge`` in bf16: the tensors equal PEFT's ``merge_and_unload`` in bf16 (one rounding of W + delta);
* ``merge`` of a DoRA adapter: equal to the unmerged PEFT DoRA model;
* ``combine`` linear of two adapters with weights of both signs, loaded back in PEFT: its outputs equal the base
  plus the weighted sum of PEFT's own deltas;
* a 4-bit base made by transformers + bitsandbytes: our re-quantized merge is no further from
  ``dequant(W4) + delta`` than PEFT's 4-bit ``merge_and_unload``, module by module; ``--dequantize`` gives the
  unmerged QLoRA model's outputs;
* features we do not model are refused with one line and nothing written, whatever the architecture.

``merge --quantize`` is covered across the same architectures by ``tests/surgery/test_quantize_archs.py``; tied
embeddings, TrainableTokens and PiSSA/OLoRA by their own test files (they need particular models). Everything is
built once per architecture (module-scoped cache) and kept tiny, so the matrix runs in about a minute.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import adaptermerge
from adaptermerge.errors import UnsupportedAdapter
from tests.archs import ARCHS, forward_inputs
from tests.helpers import peft_deltas, rel_err

bnb = pytest.importorskip("bitsandbytes")

TASK = {"bert_cls": "SEQ_CLS", "roberta_cls": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM", "bart": "SEQ_2_SEQ_LM"}
FOUR_BIT = [n for n in ARCHS if n != "falcon"]  # transformers quantizes no layer of Falcon (FalconLinear)


@dataclass
class Case:
    """One architecture's base checkpoints and adapters, built once."""

    name: str
    root: Path
    cls: type
    targets: list[str]
    paths: dict[str, Path] = field(default_factory=dict)

    def model(self, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        m, _ = ARCHS[self.name](0)
        return m.to(dtype).eval()

    def adapter(self, key: str, seed: int, **lora) -> Path:
        if key not in self.paths:
            torch.manual_seed(seed)
            cfg = LoraConfig(
                target_modules=self.targets, init_lora_weights=False, task_type=TASK.get(self.name), **lora
            )
            pm = get_peft_model(self.model(), cfg)
            with torch.no_grad():  # a trained classification head differs from the base's
                for n, p in pm.named_parameters():
                    if "modules_to_save" in n:
                        p.add_(0.05 * torch.randn_like(p))
            pm.save_pretrained(self.root / key)
            self.paths[key] = self.root / key
        return self.paths[key]

    def base(self, dtype: torch.dtype = torch.float32) -> Path:
        key = f"base-{dtype}"
        if key not in self.paths:
            self.model(dtype).save_pretrained(self.root / key)
            self.paths[key] = self.root / key
        return self.paths[key]

    def outputs(self, model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(**forward_inputs(model)).logits.float()

    def load(self, folder: Path, **kw) -> torch.nn.Module:
        return self.cls.from_pretrained(folder, **kw).eval()

    def unmerged(self, adapter: Path, base: torch.nn.Module | None = None) -> PeftModel:
        return PeftModel.from_pretrained(base if base is not None else self.model(), str(adapter)).eval()


_CASES: dict[str, Case] = {}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("conformance")


def case(root: Path, name: str) -> Case:
    if name not in _CASES:
        model, targets = ARCHS[name](0)
        (root / name).mkdir()
        _CASES[name] = Case(name, root / name, type(model), targets)
    return _CASES[name]


def patterned(c: Case) -> Path:
    """rsLoRA, and rank/alpha patterns on one target (the feature set of the default adapter)."""
    t = c.targets[-1]
    return c.adapter("patterned", 1, r=4, lora_alpha=8, use_rslora=True, rank_pattern={t: 2}, alpha_pattern={t: 4})


def expected_sum(c: Case, adapters: list[Path], weights: list[float]) -> torch.nn.Module:
    """The base plus the weighted sum of PEFT's own deltas (``get_delta_weight``) and modules_to_save copies."""
    model = c.model()
    mods = dict(model.named_modules())
    with torch.no_grad():
        for path, w in zip(adapters, weights, strict=True):
            pm = c.unmerged(path)
            for name, d in peft_deltas(pm, "default").items():
                mods[name].weight += w * d
        total = sum(weights)
        for name, mod in c.unmerged(adapters[0]).base_model.model.named_modules():
            if hasattr(mod, "modules_to_save") and "default" in getattr(mod, "modules_to_save", {}):
                heads = [
                    dict(c.unmerged(p).base_model.model.named_modules())[name].modules_to_save["default"]
                    for p in adapters
                ]
                for pname, param in mods[name].named_parameters():
                    param.copy_(
                        sum(w * dict(h.named_parameters())[pname] for w, h in zip(weights, heads, strict=True)) / total
                    )
    return model


# ------------------------------------------------------------------------------------------------ 16-bit


@pytest.mark.parametrize("name", list(ARCHS))
def test_merge_fp32_equals_unmerged_peft(root: Path, name: str) -> None:
    c = case(root, name)
    a = patterned(c)
    adaptermerge.merge_into_base(c.base(), a, c.root / "merged-fp32")
    merged, info = c.cls.from_pretrained(c.root / "merged-fp32", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert rel_err(c.outputs(merged.eval()), c.outputs(c.unmerged(a))) < 1e-5


@pytest.mark.parametrize("name", list(ARCHS))
def test_merge_bf16_equals_peft_merge_and_unload(root: Path, name: str) -> None:
    c = case(root, name)
    a = c.adapter("plain", 2, r=4, lora_alpha=8)
    adaptermerge.merge_into_base(c.base(torch.bfloat16), a, c.root / "merged-bf16")
    ours = load_file(str(c.root / "merged-bf16" / "model.safetensors"))
    # saved by transformers, so its key names are the checkpoint's (transformers 5 renames some on save)
    c.unmerged(a, c.model(torch.bfloat16)).merge_and_unload().save_pretrained(c.root / "peft-bf16")
    peft = load_file(str(c.root / "peft-bf16" / "model.safetensors"))
    assert set(ours) == set(peft)
    assert all(t.dtype == torch.bfloat16 for t in ours.values() if t.is_floating_point())
    worst = 0.0
    for k, t in ours.items():
        ref = peft[k]
        ulp = torch.finfo(torch.bfloat16).eps * ref.float().abs().max()
        worst = max(worst, float((t.float() - ref.float()).abs().max() / max(float(ulp), 1e-30)))
    assert worst <= 1.0  # one rounding of W + delta; PEFT rounds once too (fp32 delta added in place)


@pytest.mark.parametrize("name", list(ARCHS))
def test_merge_dora_equals_unmerged_peft(root: Path, name: str) -> None:
    c = case(root, name)
    a = c.adapter("dora", 3, r=4, lora_alpha=8, use_dora=True)
    adaptermerge.merge_into_base(c.base(), a, c.root / "merged-dora")
    merged = c.load(c.root / "merged-dora")
    assert rel_err(c.outputs(merged), c.outputs(c.unmerged(a))) < 1e-5


@pytest.mark.parametrize("name", list(ARCHS))
def test_combine_linear_loads_in_peft_as_the_weighted_sum(root: Path, name: str) -> None:
    c = case(root, name)
    a, b = patterned(c), c.adapter("plain", 2, r=4, lora_alpha=8)
    weights = [0.7, -0.3]
    out = adaptermerge.save_combined(adaptermerge.combine([a, b], weights), c.root / "combined")
    got = c.outputs(c.unmerged(out))
    assert rel_err(got, c.outputs(expected_sum(c, [a, b], weights))) < 1e-5


# ------------------------------------------------------------------------------------------------ 4-bit


def four_bit(c: Case) -> Path:
    from transformers import BitsAndBytesConfig

    if "nf4" not in c.paths:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
        c.cls.from_pretrained(c.base(), quantization_config=q, device_map="cpu").save_pretrained(c.root / "nf4")
        c.paths["nf4"] = c.root / "nf4"
    return c.paths["nf4"]


def dequantized(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    import bitsandbytes.functional as bnbf

    return {
        n.removesuffix(".base_layer"): bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
        for n, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }


def qlora_reference(c: Case, base4: Path, adapter: Path) -> tuple[PeftModel, dict[str, torch.Tensor]]:
    """The QLoRA model in fp32, kernel-independent: the fp32 base with every 4-bit weight replaced by its
    dequantized value, and the adapter unmerged on it by PEFT. Also the dequantized 4-bit weights by module."""
    w4 = dequantized(c.load(base4, device_map="cpu"))
    model = c.model()
    mods = dict(model.named_modules())
    with torch.no_grad():
        for n, w in w4.items():
            mods[n].weight.copy_(w.T if type(mods[n]).__name__ == "Conv1D" else w)
    return c.unmerged(adapter, model), w4


@pytest.mark.parametrize("name", FOUR_BIT)
def test_qlora_merge_and_dequantize(root: Path, name: str) -> None:
    """4-bit base: ``--dequantize`` is the QLoRA model exactly; the re-quantized merge is no further from
    ``dequant(W4) + delta`` (a trained modules_to_save head: from that head) than bitsandbytes' own quantization of
    it, module by module, and than PEFT's 4-bit merge_and_unload where PEFT can load the adapter at all (it cannot
    wrap a 4-bit classification head in modules_to_save)."""
    import bitsandbytes.functional as bnbf

    c = case(root, name)
    base4, a = four_bit(c), c.adapter("plain", 2, r=4, lora_alpha=8)
    ref, w4 = qlora_reference(c, base4, a)
    ref_out = c.outputs(ref)
    targets = {n: w.clone() for n, w in w4.items()}
    for n, d in peft_deltas(ref, "default").items():
        if n in targets:
            targets[n] += d.T if type(dict(c.model().named_modules())[n]).__name__ == "Conv1D" else d
    for n, mod in ref.base_model.model.named_modules():
        if n in targets and "default" in getattr(mod, "modules_to_save", {}):
            targets[n] = mod.modules_to_save["default"].weight.detach().float().clone()

    adaptermerge.merge_into_base(base4, a, c.root / "merged-deq", dequantize=True)
    assert "quantization_config" not in json.loads((c.root / "merged-deq" / "config.json").read_text())
    assert rel_err(c.outputs(c.load(c.root / "merged-deq")), ref_out) < 1e-5

    adaptermerge.merge_into_base(base4, a, c.root / "merged-nf4")
    ours = dequantized(c.load(c.root / "merged-nf4", device_map="cpu"))
    changed = [n for n in targets if not torch.equal(targets[n], w4[n])]
    assert changed, "the adapter touches no 4-bit layer"
    for n in changed:
        q, st = bnbf.quantize_4bit(targets[n], blocksize=64, quant_type="nf4", compress_statistics=True)
        plain = bnbf.dequantize_4bit(q, st).float()
        assert rel_err(ours[n], targets[n]) <= rel_err(plain, targets[n]) + 1e-6, n
    try:
        peft_w = dequantized(c.unmerged(a, c.load(base4, device_map="cpu")).merge_and_unload())
    except RuntimeError as e:  # PEFT copies a 4-bit head for modules_to_save and fails (it requires grad)
        assert "require" in str(e) and name in ("bert_cls", "roberta_cls")
        return
    for n in changed:
        assert rel_err(ours[n], targets[n]) <= rel_err(peft_w[n], targets[n]) + 1e-6, n


# ------------------------------------------------------------------------------------------------ refusals


REFUSED = {
    "layer_replication": [[0, 1], [0, 2]],
    "alora_invocation_tokens": [5, 6],
    "kasa_config": {"enabled": True},
}


@pytest.mark.parametrize("name", list(ARCHS))
def test_unmodeled_features_refused_nothing_written(root: Path, name: str) -> None:
    c = case(root, name)
    src = c.adapter("plain", 2, r=4, lora_alpha=8)
    for fld, value in REFUSED.items():
        bad = c.root / f"bad-{fld}"
        if not bad.exists():
            shutil.copytree(src, bad)
            cfg = json.loads((bad / "adapter_config.json").read_text())
            cfg[fld] = value
            (bad / "adapter_config.json").write_text(json.dumps(cfg))
        out = c.root / f"out-{fld}"
        with pytest.raises(UnsupportedAdapter, match=fld):
            adaptermerge.merge_into_base(c.base(), bad, out)
        with pytest.raises(UnsupportedAdapter, match=fld):
            adaptermerge.combine([bad, src])
        assert not out.exists()
