"""The allow-list of LoraConfig fields against the installed PEFT, and refusals of real PEFT adapters."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig

import adaptermerge
from adaptermerge.errors import UnsupportedAdapter
from adaptermerge.io.peft_config import RULES, Kind, _peft_matcher, _plain_names, check_config, targets_module
from tests.helpers import make_adapter, tiny_llama


def test_every_loraconfig_field_is_classified() -> None:
    """A new PEFT release that adds a field fails here until the field is classified."""
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    missing = sorted(fields - set(RULES))
    assert not missing, f"LoraConfig fields without a rule in adaptermerge/io/peft_config.py: {missing}"


def test_every_lora_variant_field_is_refused_or_modeled() -> None:
    """PEFT tags the fields that select a LoRA variant (a different forward/merge); each must be declared."""
    for f in dataclasses.fields(LoraConfig):
        if f.metadata.get("is_lora_variant"):
            assert RULES[f.name].kind in (Kind.REFUSED, Kind.MODELED), f.name


def test_saved_default_config_passes() -> None:
    cfg = LoraConfig(r=4, target_modules=["q_proj"]).to_dict()
    cfg = json.loads(json.dumps(cfg, default=str))
    assert check_config(cfg) == []


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("alora_invocation_tokens", [5, 6], "activated LoRA"),
        ("layer_replication", [[0, 2], [1, 3]], "layer_replication"),
        ("kasa_config", {"x": 1}, "KaSA"),
        ("use_qalora", True, "QALoRA"),
        ("init_lora_weights", "pissa", "pissa_init.*--base BASE"),
        ("init_lora_weights", "pissa_niter_4", "randomized SVD.*--initial-adapter"),
        ("init_lora_weights", "olora", "olora_init.*--base BASE"),
        ("init_lora_weights", "OLoRA", "olora_init"),
        ("init_lora_weights", "loftq", "loftq_init.*cannot reproduce"),
        ("init_lora_weights", "corda", "corda_init.*--initial-adapter"),
        ("init_lora_weights", "lora_ga", "lora_ga_init.*--initial-adapter"),
        ("init_lora_weights", "something_new", "not a value PEFT accepts"),
        ("init_lora_weights", "PISSA", "not a value PEFT accepts"),
        ("init_lora_weights", "pissa_niter_x", "not a value PEFT accepts"),
        ("init_lora_weights", "true", "not a value PEFT accepts"),
        ("brand_new_field", {"on": True}, "unknown to adaptermerge"),
        ("bias", "weird", "bias='weird'"),
    ],
)
def test_refused_values_name_the_field(field: str, value: object, needle: str) -> None:
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], field: value}
    with pytest.raises(UnsupportedAdapter, match=needle):
        check_config(cfg)


@pytest.mark.parametrize("value", [None, False, [], {}, ""])
def test_unknown_empty_fields_are_accepted(value: object) -> None:
    assert check_config({"r": 4, "some_future_flag": value}) == []


@pytest.mark.parametrize("init", [True, False, None, "", "gaussian", "Gaussian", "eva", "orthogonal", "mica", "MiCA"])
def test_base_preserving_inits_are_accepted(init: object) -> None:
    assert check_config({"r": 4, "init_lora_weights": init}) == []


def test_target_matching_is_peft_own() -> None:
    cfg = {"target_modules": ["q_proj"], "layers_to_transform": [1], "exclude_modules": None}
    assert targets_module(cfg, "model.layers.1.self_attn.q_proj")
    assert not targets_module(cfg, "model.layers.0.self_attn.q_proj")
    assert not targets_module({"target_modules": ["q_proj"], "exclude_modules": ["q_proj"]}, "a.q_proj")
    assert targets_module({"target_modules": r".*\.layers\.\d+\.mlp\.up_proj"}, "model.layers.3.mlp.up_proj")
    assert not targets_module({"target_modules": r".*up_proj", "modules_to_save": ["up_proj"]}, "m.up_proj")


_SEGMENTS = st.sampled_from(["model", "layers", "0", "1", "12", "q_proj", "proj", "self_attn", "mlp", "up_proj", "j"])


@settings(max_examples=300, deadline=None)
@given(
    targets=st.lists(_SEGMENTS | st.sampled_from(["self_attn.q_proj", "layers.1.mlp", "_proj"]), max_size=4),
    name=st.lists(_SEGMENTS, min_size=1, max_size=6).map(".".join),
    layers=st.sampled_from([None, []]),
)
def test_the_plain_names_shortcut_agrees_with_peft(targets: list[str], name: str, layers: list | None) -> None:
    """The suffix rule answered without importing PEFT is PEFT's answer for a plain list of names."""
    cfg = {"target_modules": targets, "layers_to_transform": layers, "exclude_modules": [], "modules_to_save": None}
    assert _plain_names(cfg)
    assert targets_module(cfg, name) == _peft_matcher(cfg, name)


def test_factors_of_an_untargeted_module_are_refused(tmp_path: Path, llama_adapter: Path) -> None:
    """PEFT ignores tensors of modules its config does not target; merging them would not be what PEFT runs."""
    folder = tmp_path / "x"
    shutil.copytree(llama_adapter, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "v_proj"]  # the file also holds o_proj factors
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(adaptermerge.InvalidAdapter, match="o_proj.*does not target it"):
        adaptermerge.load_adapter(folder)


@pytest.mark.parametrize(
    "lora",
    [
        dict(alora_invocation_tokens=[5, 6]),
        dict(layer_replication=[[0, 2], [1, 3]]),
    ],
    ids=["alora", "layer_replication"],
)
def test_real_peft_adapters_with_unmodeled_fields_are_refused(tmp_path: Path, lora: dict) -> None:
    folder = make_adapter(tmp_path / "a", tiny_llama, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **lora)
    with pytest.raises(UnsupportedAdapter, match=next(iter(lora))):
        adaptermerge.load_adapter(folder)


def test_docs_list_every_field() -> None:
    from adaptermerge.io.peft_config import fields_table

    text = (Path(__file__).resolve().parents[2] / "docs" / "formats.md").read_text()
    start, end = text.index("<!-- fields-table:start -->\n"), text.index("\n<!-- fields-table:end -->")
    assert text[start + len("<!-- fields-table:start -->\n") : end] == fields_table()
