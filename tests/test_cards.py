"""Model cards of every output kind round-trip through huggingface_hub.ModelCard: library_name, tags, base_model
only when it is a Hub id, inputs and weights in the text, and a recipe beside the card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

import adaptermerge
from adaptermerge.outputs import card_metadata, hub_model_id, render_card, with_validation, write_card
from tests.helpers import make_adapter, tiny_llama

HUB_BASE = "hf-internal-testing/tiny-random-LlamaForCausalLM"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cards")
    tiny_llama().save_pretrained(d / "base")
    tiny_llama(seed=5).save_pretrained(d / "tuned")
    for name, seed, base in (("hub_a", 1, HUB_BASE), ("hub_b", 2, HUB_BASE), ("local_a", 3, str(d / "base"))):
        make_adapter(d / name, tiny_llama, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=seed)
        cfg = json.loads((d / name / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = base
        (d / name / "adapter_config.json").write_text(json.dumps(cfg))
    return d


def card(folder: Path) -> ModelCard:
    return ModelCard.load(folder / "README.md")


def recipe(folder: Path) -> dict:
    return yaml.safe_load((folder / "adaptermerge_recipe.yaml").read_text())


def test_combine_card_with_hub_base(work: Path) -> None:
    out = adaptermerge.save_combined(
        adaptermerge.combine([work / "hub_a", work / "hub_b"], [0.7, 0.3], method="svd", rank=4), work / "comb"
    )
    c = card(out)
    assert c.data.library_name == "peft" and c.data.base_model == HUB_BASE
    assert c.data.tags[0] == "adaptermerge" and {"merge", "svd"} <= set(c.data.tags)
    assert f"| `{work / 'hub_a'}` | 0.7 |" in c.text and f"| `{work / 'hub_b'}` | 0.3 |" in c.text
    assert recipe(out)["operation"] == "combine" and recipe(out)["merge_method"] == "svd"


def test_local_base_stays_out_of_metadata(work: Path) -> None:
    out = adaptermerge.save_combined(adaptermerge.combine([work / "local_a"]), work / "local")
    c = card(out)
    assert c.data.base_model is None and "base_model" not in c.data.to_dict()
    assert f"`{work / 'base'}` (a local path)" in c.text


def test_resize_card(work: Path) -> None:
    out = adaptermerge.save_combined(adaptermerge.resize_adapter(work / "hub_a", rank=2), work / "resized")
    c = card(out)
    assert c.data.library_name == "peft" and {"adaptermerge", "resize", "svd"} <= set(c.data.tags)
    assert c.text.lstrip().startswith("# Resized LoRA adapter") and c.data.base_model == HUB_BASE
    assert f"| `{work / 'hub_a'}` | 1 |" in c.text and recipe(out)["operation"] == "combine"


def test_merge_card(work: Path) -> None:
    adaptermerge.merge_into_base(work / "base", [work / "hub_a", work / "hub_b"], work / "merged", weights=[0.5, 0.5])
    c = card(work / "merged")
    assert c.data.library_name == "transformers" and c.data.base_model == HUB_BASE
    assert {"adaptermerge", "merge", "linear"} <= set(c.data.tags)
    assert f"| `{work / 'hub_a'}` | 0.5 |" in c.text and recipe(work / "merged")["operation"] == "merge"


def test_extract_card(work: Path) -> None:
    adapter, report = adaptermerge.extract_lora(work / "base", work / "tuned", rank=4)
    out = adaptermerge.save_extracted(adapter, report, work / "extracted")
    c = card(out)
    assert c.data.library_name == "peft" and {"adaptermerge", "extract"} <= set(c.data.tags)
    assert c.data.base_model is None and str(work / "base") in c.text and str(work / "tuned") in c.text
    assert recipe(out)["operation"] == "extract"


def test_validated_card_still_parses(work: Path) -> None:
    merged = work / "merged_v"
    adaptermerge.merge_into_base(work / "base", work / "hub_a", merged)
    before = card(merged).data.to_dict()
    r = adaptermerge.validate(merged, write_card=True)
    c = card(merged)
    assert r.ok and c.data.to_dict() == before and "## Validation" in c.text and "**passed**" in c.text


@pytest.mark.parametrize(
    "name, hub",
    [
        ("meta-llama/Llama-3.1-8B", True),
        ("gpt2", True),
        ("/models/llama", False),
        ("./llama", False),
        ("~/llama", False),
        ("a/b/c", False),
        ("C:\\models\\llama", False),
        ("", False),
        (None, False),
    ],
)
def test_hub_model_id(name: str | None, hub: bool) -> None:
    assert hub_model_id(name) == (name if hub else None)


def test_render_card_for_new_outputs_round_trips(tmp_path: Path) -> None:
    text = render_card(
        library_name="peft",
        tags=["train", "lora", "adaptermerge"],
        title="Trained adapter",
        summary="LoRA r=16 on data.jsonl.",
        base_model="meta-llama/Llama-3.1-8B",
        inputs=[("data.jsonl", None), ("other.jsonl", 0.5)],
        sections=[("Training", "loss 1.23")],
    )
    write_card(tmp_path, text)
    c = ModelCard.load(tmp_path / "README.md")
    assert c.data.to_dict() == {
        "library_name": "peft",
        "tags": ["adaptermerge", "train", "lora"],
        "base_model": "meta-llama/Llama-3.1-8B",
    }
    assert "| `data.jsonl` | - |" in c.text and "| `other.jsonl` | 0.5 |" in c.text and "## Training" in c.text
    with pytest.raises(ValueError):
        card_metadata("timm", [])


def test_validation_section_is_replaced_not_repeated() -> None:
    base = "---\nlibrary_name: peft\n---\n# x\n"
    once = with_validation(base, "## Validation\n\nfirst\n")
    twice = with_validation(once, "## Validation\n\nsecond\n")
    assert twice.count("## Validation") == 1 and "second" in twice and "first" not in twice
    assert ModelCard(twice).data.library_name == "peft"


@pytest.mark.parametrize("base_name", ["local", HUB_BASE])
def test_convert_card_metadata(work: Path, base_name: str) -> None:
    from adaptermerge.surgery.init_conversion import convert_card

    adapter = adaptermerge.load_adapter(work / ("local_a" if base_name == "local" else "hub_a"))
    recipe = {"init_lora_weights": "pissa", "base": str(work / "base"), "model": {"model": str(work / "local_a")}}
    (work / "conv").mkdir(exist_ok=True)
    (work / "conv" / "README.md").write_text(convert_card(adapter, recipe))
    c = card(work / "conv")
    assert c.data.library_name == "peft" and {"adaptermerge", "lora", "converted"} <= set(c.data.tags)
    if base_name == "local":
        assert "base_model" not in c.data.to_dict() and f"`{work / 'base'}` (a local path)" in c.text
    else:
        assert c.data.base_model == HUB_BASE
    assert "adaptermerge convert --recipe adaptermerge_recipe.yaml -o OUT" in c.text
