"""The on-disk JSON cache, and the model-class facts a merge reads from it instead of importing the class."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adaptermerge.io import cache
from adaptermerge.io.checkpoint import open_checkpoint
from adaptermerge.surgery import arch
from tests.helpers import tiny_gpt2, tiny_llama


def _counting():
    calls = []

    def compute() -> dict:
        calls.append(1)
        return {"answer": len(calls)}

    return calls, compute


def _ident(x):
    return x


def _dicts_only(x):
    return x if isinstance(x, dict) and "answer" in x else None


def test_off_computes_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERMERGE_CACHE", "off")
    calls, compute = _counting()
    for _ in range(2):
        cache.cached_json("t", "k", compute, _ident, _dicts_only)
    assert len(calls) == 2 and cache.cache_dir() is None


def test_second_call_reads_the_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERMERGE_CACHE", str(tmp_path))
    calls, compute = _counting()
    first = cache.cached_json("t", ["k", 1], compute, _ident, _dicts_only)
    second = cache.cached_json("t", ["k", 1], compute, _ident, _dicts_only)
    other = cache.cached_json("t", ["k", 2], compute, _ident, _dicts_only)
    assert first == second == {"answer": 1} and other == {"answer": 2} and len(calls) == 2
    assert not [p for p in (tmp_path / "t").iterdir() if p.name.startswith(".tmp")]


def test_a_malformed_entry_is_computed_again_and_rewritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERMERGE_CACHE", str(tmp_path))
    calls, compute = _counting()
    cache.cached_json("t", "k", compute, _ident, _dicts_only)
    (entry,) = (tmp_path / "t").iterdir()
    for bad in ("{not json", json.dumps(["a list"])):
        entry.write_text(bad)
        assert cache.cached_json("t", "k", compute, _ident, _dicts_only)["answer"] == len(calls)
        assert json.loads(entry.read_text()) == {"answer": len(calls)}
    assert len(calls) == 3


def test_an_unwritable_cache_is_not_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("ADAPTERMERGE_CACHE", str(blocker))
    calls, compute = _counting()
    assert cache.cached_json("t", "k", compute, _ident, _dicts_only) == {"answer": 1}


def test_default_location_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ADAPTERMERGE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.cache_dir() == tmp_path / "adaptermerge"


@pytest.mark.parametrize("model_fn,tie", [(tiny_llama, True), (tiny_llama, False), (tiny_gpt2, None)])
def test_cached_facts_equal_the_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_fn, tie) -> None:
    model = model_fn() if tie is None else model_fn(tie=tie)
    model.save_pretrained(tmp_path / "base")
    ckpt = open_checkpoint(tmp_path / "base")
    arch._facts.cache_clear()
    fresh = (arch.weight_layouts(ckpt), arch.tie_groups(ckpt))
    monkeypatch.setenv("ADAPTERMERGE_CACHE", str(tmp_path / "cache"))
    for _ in range(2):  # the first call writes the entry, the second reads it
        arch._facts.cache_clear()
        assert (arch.weight_layouts(ckpt), arch.tie_groups(ckpt)) == fresh
    assert len(list((tmp_path / "cache" / "model-facts").iterdir())) == 1
    if tie:
        assert fresh[1] and fresh[0].head_key in fresh[1][0]


def test_a_cached_base_is_merged_without_importing_the_class(tmp_path: Path, llama_adapter: Path) -> None:
    tiny_llama().save_pretrained(tmp_path / "base")
    env = {**os.environ, "ADAPTERMERGE_CACHE": str(tmp_path / "cache")}
    code = (
        "import sys; from adaptermerge.surgery.merge import merge_into_base; "
        f"merge_into_base({str(tmp_path / 'base')!r}, [{str(llama_adapter)!r}], sys.argv[1]); "
        "print('transformers.modeling_utils' in sys.modules, 'peft' in sys.modules)"
    )
    runs = [
        subprocess.run([sys.executable, "-c", code, str(tmp_path / f"out{i}")], env=env, capture_output=True, text=True)
        for i in range(2)
    ]
    assert [r.stdout.split()[-2:] for r in runs] == [["True", "False"], ["False", "False"]], runs[1].stderr


def _class_kinds(model, stored: set[str]) -> dict[str, str]:
    """The reference: each stored weight's layer type, read off the model's own modules."""
    import torch

    kinds = {}
    for name, mod in model.named_modules():
        kind = (
            "linear"
            if isinstance(mod, torch.nn.Linear)
            else "embedding"
            if isinstance(mod, torch.nn.Embedding)
            else None
        )
        if kind and name + ".weight" in stored:
            kinds[name + ".weight"] = kind
    return kinds


def test_cache_key_includes_the_stored_weight_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two checkpoints with one config.json but different stored weights get their own entries (each checkpoint's
    facts name only the weights it stores), in either order."""
    from safetensors.torch import load_file, save_file

    model = tiny_llama()
    model.save_pretrained(tmp_path / "full", safe_serialization=True)
    sd = {}
    for f in (tmp_path / "full").glob("*.safetensors"):
        sd.update(load_file(f))
    dropped = {"lm_head.weight", "model.layers.0.mlp.down_proj.weight"}
    assert dropped <= set(sd)
    (tmp_path / "part").mkdir()
    (tmp_path / "part" / "config.json").write_text((tmp_path / "full" / "config.json").read_text())
    save_file({k: v for k, v in sd.items() if k not in dropped}, str(tmp_path / "part" / "model.safetensors"),
              metadata={"format": "pt"})  # fmt: skip
    ckpts = [open_checkpoint(tmp_path / "full"), open_checkpoint(tmp_path / "part")]
    want = [_class_kinds(model, set(c.weight_map)) for c in ckpts]
    assert want[0] != want[1] and set(want[0]) - set(want[1]) == dropped
    for order, folder in (((0, 1), "c1"), ((1, 0), "c2")):
        monkeypatch.setenv("ADAPTERMERGE_CACHE", str(tmp_path / folder))
        for _ in range(2):  # the first pass writes the entries, the second reads them
            for i in order:
                arch._facts.cache_clear()
                assert arch.weight_layouts(ckpts[i]).kinds == want[i], (order, i)
        assert len(list((tmp_path / folder / "model-facts").iterdir())) == 2


def test_cache_key_includes_the_transformers_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry written under another transformers version is not read: here that version's (tampered) answer
    says every weight is an embedding, and the facts still come from this version's class."""
    import importlib.metadata

    model = tiny_llama()
    model.save_pretrained(tmp_path / "base")
    ckpt = open_checkpoint(tmp_path / "base")
    want = _class_kinds(model, set(ckpt.weight_map))
    monkeypatch.setenv("ADAPTERMERGE_CACHE", str(tmp_path / "cache"))
    real = importlib.metadata.version
    with monkeypatch.context() as m:
        m.setattr(importlib.metadata, "version", lambda d: "0.0.1-other" if d == "transformers" else real(d))
        arch._facts.cache_clear()
        assert arch.weight_layouts(ckpt).kinds == want
    (entry,) = (tmp_path / "cache" / "model-facts").iterdir()
    data = json.loads(entry.read_text())
    data["kinds"] = {k: "embedding" for k in data["kinds"]}
    entry.write_text(json.dumps(data))
    arch._facts.cache_clear()
    assert arch.weight_layouts(ckpt).kinds == want
    assert len(list((tmp_path / "cache" / "model-facts").iterdir())) == 2
    arch._facts.cache_clear()
