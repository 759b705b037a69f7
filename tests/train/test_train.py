"""train: LoRA and QLoRA lower the completion loss, outputs load in PEFT, resume, replay, DDP, refusals."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from adaptermerge.errors import AdapterMergeError, InvalidCheckpoint, OutputExistsError, UsageError
from adaptermerge.evaluation import completion_loss
from adaptermerge.models import load_causal_lm, load_tokenizer
from adaptermerge.synthetic import make_examples, save_tiny_base, write_jsonl
from adaptermerge.train import TrainConfig, train_adapter
from adaptermerge_cli.main import cli
from tests.conftest import PACKED_4BIT_KERNEL

FAST = dict(rank=8, alpha=16, batch_size=16, grad_accum=1, lr=1e-2, max_length=32)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained base with large initial weights (see ``tiny_llama_config``), which LoRA adapts quickly."""
    w = tmp_path_factory.mktemp("train")
    save_tiny_base(w / "base", init_range=0.2)
    write_jsonl(w / "upper.jsonl", make_examples("upper", 256, seed=1))
    write_jsonl(w / "upper-eval.jsonl", make_examples("upper", 32, seed=2))
    return w


def _loss(model: torch.nn.Module, work: Path) -> float:
    from adaptermerge.data import read_task_file

    return completion_loss(model, load_tokenizer(work / "base"), read_task_file(work / "upper-eval.jsonl").rows, 32, 32)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_lora_lowers_completion_loss_and_loads_in_peft(work: Path, tmp_path: Path) -> None:
    out = tmp_path / "upper"
    res = train_adapter(work / "base", work / "upper.jsonl", out, eval_data=work / "upper-eval.jsonl", steps=30, **FAST)
    base = AutoModelForCausalLM.from_pretrained(work / "base").eval()
    before = _loss(base, work)
    after = _loss(PeftModel.from_pretrained(base, str(out)).eval(), work)
    assert after < before - 0.5, (before, after)
    assert res.steps == 30 and res.eval_loss is not None and res.tokens > 0 and res.world_size == 1
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16
    # PEFT saves 'all-linear' resolved to module names: every linear layer but the head
    names = {t.rsplit(".", 1)[-1] for t in cfg["target_modules"]}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    card = (out / "README.md").read_text()
    assert "base_model:" in card and "final eval loss" in card and "| rank | 8 |" in card and "256 |" in card
    recipe = (out / "adaptermerge_recipe.yaml").read_text()
    assert "operation: train" in recipe and "sha256" in recipe
    summary = json.loads((out / "training_summary.json").read_text())
    losses = [h["loss"] for h in summary["log_history"] if "loss" in h]
    assert losses[-1] < losses[0]
    assert not (tmp_path / "upper.checkpoints").exists()  # removed after a successful run
    assert not any(p.suffix in (".bin", ".pt", ".pth") for p in out.iterdir())  # no pickles in the output


def test_qlora_nf4_lowers_completion_loss_on_the_4bit_base(work: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    res = train_adapter(work / "base", work / "upper.jsonl", out, eval_data=work / "upper-eval.jsonl", steps=30,
                        quantize="nf4", save_steps=10, **FAST)  # fmt: skip
    base4 = load_causal_lm(work / "base", quantize="nf4").eval()
    before = _loss(base4, work)
    after = _loss(PeftModel.from_pretrained(base4, str(out)).eval(), work)
    assert after < before - 0.5, (before, after)
    # evaluations ran between training steps (every 10): the 4-bit layers stayed on the reference kernel
    from bitsandbytes.nn import Linear4bit

    assert all(not m.support_avx512bf16_for_cpu for m in base4.modules() if isinstance(m, Linear4bit))
    assert "quantize: nf4" in (out / "adaptermerge_recipe.yaml").read_text()
    assert res.eval_loss is not None and "QLoRA" in (out / "README.md").read_text()


def test_qlora_gradients_survive_an_evaluation(work: Path) -> None:
    """On AVX512-BF16 CPUs bitsandbytes 0.50 repacks a 4-bit weight at its first no-grad eval call, and the
    repacked kernel has no autograd formula: training after an evaluation silently loses the gradient through
    the base layers. ``use_reference_4bit_kernel`` (applied by train and evaluate) keeps them exact."""
    from bitsandbytes.nn import Linear4bit

    from adaptermerge.models import use_reference_4bit_kernel
    from adaptermerge.train.run import _peft_model

    cfg = TrainConfig(rank=4, alpha=8, dropout=0.0, quantize="nf4")
    cfg.check()
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))

    def grads_before_and_after_eval(pm: torch.nn.Module) -> tuple[dict, dict]:
        out = []
        for _ in range(2):
            pm.train()
            pm.zero_grad()
            pm(input_ids=ids, labels=ids).loss.backward()
            out.append({n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad})
            pm.eval()
            with torch.no_grad():
                pm(input_ids=ids)
        return out[0], out[1]

    def model(packed: bool) -> torch.nn.Module:
        pm = _peft_model(work / "base", cfg)
        with torch.no_grad():  # non-zero B so that gradients flow into A and through the base layers
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        for m in pm.modules():  # as bitsandbytes sets it on an AVX512-BF16 CPU (the test session patches it off)
            if isinstance(m, Linear4bit):
                m.support_avx512bf16_for_cpu = packed
        return pm

    pm = model(packed=True)
    assert use_reference_4bit_kernel(pm) == 14  # 2 layers x 7 linear modules
    g0, g1 = grads_before_and_after_eval(pm)
    assert all(torch.equal(g0[n], g1[n]) for n in g0)
    if not PACKED_4BIT_KERNEL:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    g0, g1 = grads_before_and_after_eval(model(packed=True))
    worst = max(float((g0[n] - g1[n]).norm() / g0[n].norm()) for n in g0 if "layers.0." in n)
    assert worst > 0.05  # the hazard is real: first-layer LoRA gradients change after one evaluation


class _Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN003
        if state.global_step == 3:
            raise KeyboardInterrupt


def test_resume_continues_from_the_checkpoint(work: Path, tmp_path: Path) -> None:
    kw = dict(steps=6, save_steps=2, dropout=0.0, **FAST)
    full = train_adapter(work / "base", work / "upper.jsonl", tmp_path / "full", progress=False, **kw)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train_adapter(work / "base", work / "upper.jsonl", out, progress=False, callbacks=[_Crash()], **kw)
    ckpt = tmp_path / "resumed.checkpoints"
    assert not out.exists() and (ckpt / "checkpoint-2").is_dir()
    with pytest.raises(UsageError, match="pass `resume`"):
        train_adapter(work / "base", work / "upper.jsonl", out, progress=False, **kw)
    with pytest.raises(UsageError, match="different lr"):
        train_adapter(work / "base", work / "upper.jsonl", out, resume=True, **{**kw, "lr": 1e-3})
    res = train_adapter(work / "base", work / "upper.jsonl", out, resume=True, progress=False, **kw)
    assert res.steps == 6 and not ckpt.exists()
    a, b = _tensors(full.output), _tensors(out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(UsageError, match="no checkpoint"):
        train_adapter(work / "base", work / "upper.jsonl", tmp_path / "x", resume=True, **kw)


def test_seeded_runs_are_identical_and_the_recipe_replays(work: Path, tmp_path: Path) -> None:
    kw = dict(steps=5, seed=3, **FAST)
    train_adapter(work / "base", work / "upper.jsonl", tmp_path / "a", progress=False, **kw)
    res = CliRunner().invoke(
        cli,
        ["train", "--recipe", str(tmp_path / "a" / "adaptermerge_recipe.yaml"), "-o", str(tmp_path / "b"), "--quiet"],
    )
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and "tokens/s" in res.output
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "adapter_config.json").read_bytes() == (
        tmp_path / "b" / "adapter_config.json"
    ).read_bytes()
    other = train_adapter(work / "base", work / "upper.jsonl", tmp_path / "c", progress=False, **{**kw, "seed": 4})
    assert not all(torch.equal(a[k], _tensors(other.output)[k]) for k in a)


def test_chat_and_text_rows_train(work: Path, tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in make_examples("upper", 24, seed=5)] + [{"text": "hello world"}] * 8  # fmt: skip
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    res = train_adapter(work / "base", data, tmp_path / "chat", steps=2, progress=False, **{**FAST, "max_length": 48})
    assert res.steps == 2 and (tmp_path / "chat" / "adapter_model.safetensors").is_file()
    assert "'chat': 24" in (tmp_path / "chat" / "README.md").read_text()


def test_anti_pattern_warnings() -> None:
    assert any("alpha much larger than r" in w for w in TrainConfig(rank=8, alpha=128).check())
    assert any("rarely needed above 64" in w for w in TrainConfig(rank=128, alpha=256).check())
    assert TrainConfig().check() == []
    assert TrainConfig(targets="q_proj, v_proj").targets == "q_proj, v_proj"
    cfg = TrainConfig(targets="q_proj, v_proj")
    cfg.check()
    assert cfg.targets == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"rank": 0}, "`rank` must be a positive integer"),
        ({"lr": -1.0}, "must be positive"),
        ({"quantize": "int8"}, "`quantize` must be one of"),
        ({"targets": "nothing_like_this"}, "`targets`"),
        ({"bogus": 1}, "unknown training parameters"),
    ],
)
def test_bad_settings_are_usage_errors(work: Path, tmp_path: Path, settings: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        train_adapter(work / "base", work / "upper.jsonl", tmp_path / "o", steps=1, progress=False, **settings)
    assert not (tmp_path / "o").exists()


def test_refusals_before_training(work: Path, tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(OutputExistsError):
        train_adapter(work / "base", work / "upper.jsonl", tmp_path / "full", steps=1)
    with pytest.raises(UsageError, match="overlaps the input"):
        train_adapter(work / "base", work / "upper.jsonl", work / "base" / "inside", steps=1)
    with pytest.raises(InvalidCheckpoint, match="not in the local Hugging Face cache"):
        train_adapter("nobody-xyz/not-a-model", work / "upper.jsonl", tmp_path / "o", steps=1)
    res = CliRunner().invoke(cli, ["train", "--data", str(work / "upper.jsonl"), "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "give --base" in res.output
    assert issubclass(InvalidCheckpoint, AdapterMergeError)


def test_ddp_two_processes_match_the_single_process_format(work: Path, tmp_path: Path) -> None:
    """torchrun --nproc_per_node 2 on CPU (gloo): the adapter has the single-process keys, shapes and config."""
    pytest.importorskip("torch.distributed.run")
    args = ["--base", str(work / "base"), "--data", str(work / "upper.jsonl"), "--steps", "4", "--rank", "8",
            "--alpha", "16", "--batch-size", "8", "--grad-accum", "1", "--max-length", "32", "--quiet"]  # fmt: skip
    single = tmp_path / "single"
    train_adapter(work / "base", work / "upper.jsonl", single, steps=4, batch_size=8, grad_accum=1, rank=8, alpha=16,
                  max_length=32, progress=False)  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "adaptermerge_cli", "train", *args, "-o", str(tmp_path / "ddp")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote") == 1  # only rank 0 reports and writes
    a, b = _tensors(single), _tensors(tmp_path / "ddp")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert {k: v.dtype for k, v in a.items()} == {k: v.dtype for k, v in b.items()}
    ca = json.loads((single / "adapter_config.json").read_text())
    cb = json.loads((tmp_path / "ddp" / "adapter_config.json").read_text())
    assert ca == cb
    summary = json.loads((tmp_path / "ddp" / "training_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert not (tmp_path / "ddp.checkpoints").exists()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "base"), str(tmp_path / "ddp"))


def test_hub_id_resolves_from_the_local_cache_only(work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import huggingface_hub.constants as hc

    from adaptermerge.models import resolve_base

    snap = tmp_path / "models--someone--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(work / "base", snap)
    (tmp_path / "models--someone--tiny" / "refs").mkdir()
    (tmp_path / "models--someone--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    assert resolve_base("someone/tiny") == snap
    with pytest.raises(InvalidCheckpoint, match="hf download someone/other"):
        resolve_base("someone/other")


@pytest.mark.parametrize(
    ("flags", "config_fields"),
    [
        ({"dora": True}, {"use_dora": True}),
        ({"rslora": True}, {"use_rslora": True}),
        ({"gradient_checkpointing": True}, {}),
        ({"bf16": True}, {}),
        ({"quantize": "fp4", "gradient_checkpointing": True}, {}),
        ({"targets": "q_proj,v_proj"}, {"target_modules": ["q_proj", "v_proj"]}),
    ],
)
def test_switches_train_and_load(work: Path, tmp_path: Path, flags: dict, config_fields: dict) -> None:
    out = tmp_path / "o"
    res = train_adapter(work / "base", work / "upper.jsonl", out, steps=3, progress=False, **{**FAST, **flags})
    assert res.steps == 3 and res.train_loss is not None and math.isfinite(res.train_loss)
    cfg = json.loads((out / "adapter_config.json").read_text())
    for k, v in config_fields.items():
        assert cfg[k] == v, k
    tensors = _tensors(out)
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert any("lora_B" in k and t.abs().sum() > 0 for k, t in tensors.items())  # the adapter moved from B = 0
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "base"), str(out))
