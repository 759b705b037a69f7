"""The CLI frame and ``inspect``: output, JSON, one-line errors and exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from transformers import LlamaForCausalLM

from adaptermerge_cli.main import cli, normalize_multi_values
from tests.helpers import tiny_llama


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "adaptermerge_cli", *args], capture_output=True, text=True, timeout=300
    )


def test_inspect_adapter_text_and_json(llama_adapter: Path) -> None:
    r = CliRunner().invoke(cli, ["inspect", str(llama_adapter)])
    assert r.exit_code == 0, r.output
    assert "model.layers.0.self_attn.q_proj" in r.output and "r=4" in r.output
    r = CliRunner().invoke(cli, ["inspect", str(llama_adapter), "--json"])
    d = json.loads(r.stdout)
    assert d["kind"] == "adapter" and d["num_modules"] == 9 and d["ranks"] == {"4": 9}
    assert all(m["scaling"] == 2.0 for m in d["modules"])


def test_inspect_figures_are_peft_s(tmp_path: Path) -> None:
    """Per module, ``inspect --json`` gives PEFT's rank, alpha and scaling (rsLoRA, rank/alpha patterns), the base
    weight's shape, and ``||delta||_F`` of PEFT's ``get_delta_weight``; GPT-2 Conv1D shapes are ``in x out``."""
    from tests.helpers import make_adapter, peft_deltas, peft_model, tiny_gpt2

    cases = [
        (tiny_llama, dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "embed_tokens"],
                          rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 3})),
        (tiny_gpt2, dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    ]  # fmt: skip
    for i, (model_fn, lora) in enumerate(cases):
        a = make_adapter(tmp_path / f"a{i}", model_fn, seed=3, **lora)
        r = CliRunner().invoke(cli, ["inspect", str(a), "--json"])
        assert r.exit_code == 0, r.output
        got = {m["name"]: m for m in json.loads(r.stdout)["modules"]}
        pm = peft_model(model_fn, a)
        deltas = peft_deltas(pm, "a0")
        assert set(got) == set(deltas)
        layers = dict(pm.base_model.model.named_modules())
        for name, d in deltas.items():
            layer, m = layers[name], got[name]
            factor = layer.lora_A["a0"].weight if "a0" in layer.lora_A else layer.lora_embedding_A["a0"]
            assert m["rank"] == factor.shape[0] and m["alpha"] == layer.lora_alpha["a0"], name
            assert abs(m["scaling"] - layer.scaling["a0"]) < 1e-12, name
            assert m["shape"] == list(layer.base_layer.weight.shape) == list(d.shape), name
            assert abs(m["delta_norm"] - float(d.double().norm())) <= 1e-5 * float(d.norm()), name
        assert len({m["scaling"] for m in got.values()}) == (3 if i == 0 else 1)


def test_inspect_checkpoint(tmp_path: Path) -> None:
    m: LlamaForCausalLM = tiny_llama()
    m.save_pretrained(tmp_path / "base", max_shard_size="100KB")
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "base"), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["kind"] == "checkpoint" and d["num_shards"] > 1
    index = json.loads((tmp_path / "base" / "model.safetensors.index.json").read_text())
    assert d["num_tensors"] == len(index["weight_map"]) and d["elements_by_dtype"]["F32"] == d["num_elements"]


def test_warnings_for_anti_patterns(tmp_path: Path) -> None:
    from tests.helpers import make_adapter

    a = make_adapter(tmp_path / "a", tiny_llama, r=2, lora_alpha=128, target_modules=["q_proj"])
    r = CliRunner().invoke(cli, ["inspect", str(a)])
    assert "alpha much larger than r" in r.output and "very low" in r.output


@pytest.mark.parametrize(
    "args,code,needle",
    [
        (["inspect", "/nonexistent/path"], 2, "does not exist"),
        (["inspect"], 2, "Missing argument"),
        (["frobnicate"], 2, "No such command"),
    ],
)
def test_usage_errors_one_line(args: list[str], code: int, needle: str) -> None:
    p = run(args)
    assert p.returncode == code
    assert needle in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "Traceback" not in p.stderr


def test_bad_data_one_line_exit_1(tmp_path: Path, llama_adapter: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(llama_adapter, bad)
    (bad / "adapter_model.safetensors").write_bytes(b"\x01\x02")
    p = run(["inspect", str(bad)])
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and "corrupt" in p.stderr
    p = run(["--debug", "inspect", str(bad)])
    assert p.returncode == 1 and "Traceback" in p.stderr


def test_every_command_has_an_example() -> None:
    for name, _cmd in cli.commands.items():
        r = CliRunner().invoke(cli, [name, "--help"])
        assert r.exit_code == 0 and "adaptermerge " + name in r.output, name


def test_weights_normalization() -> None:
    assert normalize_multi_values(["combine", "a", "b", "--weights", "0.7", "0.3", "-o", "x"]) == [
        "combine", "a", "b", "--weights", "0.7,0.3", "-o", "x",
    ]  # fmt: skip
    assert normalize_multi_values(["--weights", "1", "-1", "a"]) == ["--weights", "1,-1", "a"]
    assert normalize_multi_values(["--weights", "0.7,0.3", "a"]) == ["--weights", "0.7,0.3", "a"]


def test_threads_option(llama_adapter: Path) -> None:
    r = CliRunner().invoke(cli, ["--threads", "1", "inspect", str(llama_adapter), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["kind"] == "adapter"


def test_global_options_after_the_subcommand() -> None:
    from adaptermerge_cli.main import hoist_global_options

    args = ["merge", "base", "a", "-o", "out", "--threads", "2", "--debug", "--weights", "1,2"]
    assert hoist_global_options(args) == [
        "--threads",
        "2",
        "--debug",
        "merge",
        "base",
        "a",
        "-o",
        "out",
        "--weights",
        "1,2",
    ]
    assert hoist_global_options(["inspect", "x", "--threads=3"]) == ["--threads=3", "inspect", "x"]
    p = run(["inspect", "/no/such/folder", "--threads", "1"])
    assert p.returncode == 2 and "does not exist" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_bare_command_prints_help() -> None:
    p = run([])
    assert p.returncode == 0 and "Usage: adaptermerge" in p.stdout and not p.stderr.startswith("error")


def test_help_and_version_do_not_import_torch() -> None:
    """--help, --version and the help of commands that do not merge answer without importing torch (which takes
    seconds); combine and merge read the method registry for their options, so they import it."""
    code = (
        "import sys\n"
        "from adaptermerge_cli.main import cli\n"
        "for args in (['--help'], ['--version'], ['inspect', '--help'], ['validate', '--help'], ['train', '--help']):\n"
        "    try:\n"
        "        cli.main(args, standalone_mode=False)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch' in sys.modules)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.stdout.strip().splitlines()[-1] == "False", p.stdout + p.stderr


def test_every_option_of_every_command_is_described() -> None:
    import click

    for name, cmd in cli.commands.items():
        ctx = click.Context(cmd)
        for p in cmd.get_params(ctx):
            if isinstance(p, click.Option) and "--help" not in p.opts:
                assert p.help, f"adaptermerge {name} {p.opts[0]} has no description"
        assert cmd.short_help and not cmd.short_help.endswith("..."), name
