"""distill: the refined merge is closer (in PEFT's own outputs) to every task's adapter on that task's rows, also on
rows it never saw; the loss is a KL (zero when the merge is the teachers); reproducible per seed; the base is never
changed; the recipe replays both stages bitwise; bad inputs are refused before a model is loaded; tune refines its
winner and shows it before and after."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from adaptermerge.combination import combine
from adaptermerge.data import read_task_file, tokenize_row
from adaptermerge.distillation import DistillSettings, _Sampler, distill, distill_recipe, refine, save_distilled
from adaptermerge.errors import InvalidData, NumericalError, UsageError
from adaptermerge.evaluation import pad_batch
from adaptermerge.io.adapter import load_adapter
from adaptermerge.models import load_tokenizer
from adaptermerge.synthetic import make_examples, save_tiny_base, write_jsonl
from adaptermerge.tuning import tune, tune_summary
from adaptermerge_cli.main import cli
from tests.helpers import adapter_on_folder

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
FAST = DistillSettings(steps=30, lr=3e-3, batch_size=8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two adapters on the same modules (so that they conflict), a task file for each and unseen rows of each."""
    w = tmp_path_factory.mktemp("distill")
    save_tiny_base(w / "base", init_range=0.2)
    adapter_on_folder(w / "base", w / "a", 1, TARGETS, alpha=4, b_scale=6.0)
    adapter_on_folder(w / "base", w / "b", 2, TARGETS, alpha=4, b_scale=6.0)
    for task in ("reverse", "upper"):
        write_jsonl(w / f"{task}.jsonl", make_examples(task, 16, seed=3))
        write_jsonl(w / f"{task}-unseen.jsonl", make_examples(task, 16, seed=4))
    return w


def _tasks(w: Path, suffix: str = "") -> dict[str, Path]:
    return {"reverse": w / f"reverse{suffix}.jsonl", "upper": w / f"upper{suffix}.jsonl"}


def _peft_logprobs(base: Path, adapter: Path, task_file: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token log-probabilities of PEFT's model (base + adapter, loaded from the folders) on a task file's rows,
    and the mask of real tokens: the reference the distillation objective is checked against."""
    tok = load_tokenizer(base)
    rows = [t for t in (tokenize_row(r, tok, 48) for r in read_task_file(task_file).rows) if t is not None]
    ids, _, mask = pad_batch(rows, tok.pad_token_id)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1), mask.bool()


def _kl(base: Path, teacher: Path, student: Path, task_file: Path) -> float:
    t, mask = _peft_logprobs(base, teacher, task_file)
    s, _ = _peft_logprobs(base, student, task_file)
    return float((t.exp() * (t - s)).sum(-1)[mask].mean())


@pytest.fixture(scope="module")
def distilled(work: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The linear merge and its distillation, saved."""
    out = tmp_path_factory.mktemp("out")
    start = combine([work / "a", work / "b"], method="linear")
    from adaptermerge.combination import save_combined

    merged = distill(work / "base", [work / "a", work / "b"], _tasks(work), init=start, settings=FAST)
    return save_combined(start, out / "linear"), save_distilled(merged, out / "distilled")


def test_the_distilled_merge_is_closer_to_every_teacher_in_peft_also_on_unseen_rows(
    work: Path, distilled: tuple[Path, Path]
) -> None:
    start, refined = distilled
    for suffix in ("", "-unseen"):
        for teacher, task_file in zip((work / "a", work / "b"), _tasks(work, suffix).values(), strict=True):
            before = _kl(work / "base", teacher, start, task_file)
            after = _kl(work / "base", teacher, refined, task_file)
            assert after < 0.7 * before, (suffix, task_file.name, before, after)


def test_the_recorded_loss_is_the_kl_that_peft_measures(work: Path, distilled: tuple[Path, Path]) -> None:
    """The first step's loss is the init's mean KL over the first batches; with batches as large as the files it is
    the per-task mean KL PEFT gives, averaged over the tasks."""
    start = combine([work / "a", work / "b"], method="linear")
    one = DistillSettings(steps=1, lr=1e-9, batch_size=64)
    merged = distill(work / "base", [work / "a", work / "b"], _tasks(work), init=start, settings=one)
    lin = distilled[0]
    want = (_kl(work / "base", work / "a", lin, _tasks(work)["reverse"]) + _kl(work / "base", work / "b", lin, _tasks(work)["upper"])) / 2  # fmt: skip
    assert merged.provenance["distill"]["loss_first"] == pytest.approx(want, rel=1e-4)


def test_the_loss_is_zero_when_the_merge_is_the_teachers(work: Path) -> None:
    """Two copies of one adapter merged linearly are that adapter: nothing to distil."""
    merged = distill(work / "base", [work / "a", work / "a"], _tasks(work), init="linear", settings=DistillSettings(steps=1))  # fmt: skip
    assert merged.provenance["distill"]["loss_first"] < 1e-8


def test_reproducible_per_seed_and_the_base_is_unchanged(work: Path) -> None:
    before = load_file(work / "base" / "model.safetensors")
    ads = [work / "a", work / "b"]
    settings = DistillSettings(steps=5, batch_size=4, seed=1)
    first = distill(work / "base", ads, _tasks(work), init="ties", settings=settings)
    again = distill(work / "base", ads, _tasks(work), init="ties", settings=settings)
    other = distill(work / "base", ads, _tasks(work), init="ties", settings=DistillSettings(steps=5, batch_size=4, seed=2))  # fmt: skip
    for name, lr in first.modules.items():
        assert torch.equal(lr.A, again.modules[name].A) and torch.equal(lr.B, again.modules[name].B)
    assert any(not torch.equal(lr.A, other.modules[n].A) for n, lr in first.modules.items())
    start = combine(ads, method="ties")
    assert first.ranks == start.ranks  # the merge keeps the init's ranks
    after = load_file(work / "base" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_regmean_init_and_the_recipe_replays_both_stages_bitwise(work: Path, tmp_path: Path) -> None:
    args = ["distill", str(work / "a"), str(work / "b"), "--base", str(work / "base"), "--task",
            f"reverse={work / 'reverse.jsonl'}", "--task", f"upper={work / 'upper.jsonl'}", "--steps", "6",
            "--batch-size", "4", "--quiet"]  # fmt: skip
    r = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "d"), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["method"] == "regmean" and d["distill"]["steps"] == 6 and d["distill"]["rows"] == {"reverse": 16, "upper": 16}  # fmt: skip
    recipe = (tmp_path / "d" / "adaptermerge_recipe.yaml").read_text()
    assert "operation: distill" in recipe and "merge_method: regmean" in recipe and "steps: 6" in recipe
    card = (tmp_path / "d" / "README.md").read_text()
    assert "## Distillation" in card and "16 rows of reverse.jsonl" in card
    r = CliRunner().invoke(cli, ["distill", "--recipe", str(tmp_path / "d" / "adaptermerge_recipe.yaml"), "-o", str(tmp_path / "again"), "--quiet"])  # fmt: skip
    assert r.exit_code == 0, r.output
    first, again = (load_file(tmp_path / p / "adapter_model.safetensors") for p in ("d", "again"))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    # a combine replay is not a distill replay: refused, not silently made without the second stage
    r = CliRunner().invoke(cli, ["combine", "--recipe", str(tmp_path / "d" / "adaptermerge_recipe.yaml"), "-o", str(tmp_path / "c")])  # fmt: skip
    assert r.exit_code == 2 and "not an adaptermerge combine recipe" in r.output
    # options beside a recipe are refused, and a changed task file stops the replay
    r = CliRunner().invoke(cli, ["distill", "--recipe", str(tmp_path / "d" / "adaptermerge_recipe.yaml"), "--steps", "9", "-o", str(tmp_path / "x")])  # fmt: skip
    assert r.exit_code == 2 and "replays everything it records" in r.output
    copy = tmp_path / "copy"
    copy.mkdir()
    recipe = recipe.replace(str(work / "upper.jsonl"), str(copy / "upper.jsonl"))
    write_jsonl(copy / "upper.jsonl", make_examples("upper", 16, seed=9))
    (copy / "r.yaml").write_text(recipe)
    r = CliRunner().invoke(cli, ["distill", "--recipe", str(copy / "r.yaml"), "-o", str(tmp_path / "y")])
    assert r.exit_code == 1 and "changed since the recipe was written" in r.output and not (tmp_path / "y").exists()


@pytest.mark.usefixtures("no_model_load")
def test_bad_inputs_are_refused_before_any_model_is_loaded(work: Path, tmp_path: Path) -> None:
    ads = [work / "a", work / "b"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 1}\n')
    with pytest.raises(InvalidData, match="line 2"):
        distill(work / "base", ads, {"reverse": work / "reverse.jsonl", "upper": bad})
    with pytest.raises(UsageError, match="one task per adapter"):
        distill(work / "base", ads, {"reverse": work / "reverse.jsonl"})
    with pytest.raises(UsageError, match="unknown method"):
        distill(work / "base", ads, _tasks(work), init="nope")
    with pytest.raises(UsageError, match="other adapters"):
        distill(work / "base", ads, _tasks(work), init=combine([work / "b", work / "a"], method="linear"))
    with pytest.raises(UsageError, match="weights"):
        distill(work / "base", ads, _tasks(work), init=combine(ads, method="linear"), weights=[1.0, 1.0])
    with pytest.raises(UsageError, match="`lr`"):
        DistillSettings(lr=0.0)
    with pytest.raises(UsageError, match="`steps`"):
        DistillSettings(steps=0)
    with pytest.raises(UsageError, match="no setting 'temperature'"):
        DistillSettings.from_dict({"steps": 3, "temperature": 2.0}, "r.yaml")

    def run(*args: str) -> tuple[int, str]:
        r = CliRunner().invoke(cli, ["distill", *map(str, ads), "--base", str(work / "base"), *args, "-o", str(tmp_path / "o")])  # fmt: skip
        return r.exit_code, r.output.strip()

    code, out = run("--task", f"reverse={work / 'reverse.jsonl'}", "--task", f"upper={bad}")
    assert code == 1 and "line 2" in out and len(out.splitlines()) == 1
    code, out = run("--task", f"reverse={work / 'reverse.jsonl'}")
    assert code == 2 and "one task per adapter" in out
    code, out = run(*[x for t, p in _tasks(work).items() for x in ("--task", f"{t}={p}")], "--lr", "-1")
    assert code == 2
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep").write_text("x")
    code, out = run(*[x for t, p in _tasks(work).items() for x in ("--task", f"{t}={p}")])
    assert code == 2 and "not empty" in out and (tmp_path / "o" / "keep").read_text() == "x"


def test_the_init_must_have_read_the_same_task_rows(work: Path) -> None:
    other = combine([work / "a", work / "b"], method="regmean", base=work / "base", tasks=_tasks(work, "-unseen"))
    with pytest.raises(UsageError, match="other task rows"):
        distill(work / "base", [work / "a", work / "b"], _tasks(work), init=other, settings=FAST)


def test_distill_recipe_needs_a_distilled_adapter(work: Path) -> None:
    with pytest.raises(UsageError, match="not made by distillation"):
        distill_recipe(combine([work / "a", work / "b"], method="linear"))


def test_tune_refines_its_winner_and_the_recipe_replays_it(work: Path, tmp_path: Path) -> None:
    out = tmp_path / "t"
    res = tune(work / "base", [work / "a", work / "b"], _tasks(work), methods=["regmean"], budget=4, seed=1,
               out=out, distill=DistillSettings(steps=8, batch_size=4))  # fmt: skip
    rows = res.report.models
    assert "tuned (regmean)" in rows and "tuned (regmean) + distill" in rows and res.tuned_name == "tuned (regmean) + distill"  # fmt: skip
    record = res.adapter.provenance["distill"]
    assert record["loss_last"] < record["loss_first"] and record["rows"] == {"reverse": 11, "upper": 11}
    assert any(not torch.equal(lr.A, res.searched.modules[n].A) for n, lr in res.adapter.modules.items())
    assert res.searched is not None and "distill" not in res.searched.provenance and res.adapter.ranks == res.searched.ranks  # fmt: skip
    assert res.settings["distill"]["steps"] == 8 and "Then distilled" in tune_summary(res)
    recipe = (out / "adapter" / "adaptermerge_recipe.yaml").read_text()
    assert (
        "operation: distill" in recipe and "merge_method: regmean" in recipe and "lines:" in recipe
    )  # tuning rows only
    card = (out / "adapter" / "README.md").read_text()
    assert "## Tuning" in card and "## Distillation" in card and "(11 rows)" in card  # 16 rows, 5 held out
    r = CliRunner().invoke(cli, ["distill", "--recipe", str(out / "adapter" / "adaptermerge_recipe.yaml"), "-o", str(tmp_path / "again"), "--quiet"])  # fmt: skip
    assert r.exit_code == 0, r.output
    first, again = (load_file(p / "adapter_model.safetensors") for p in (out / "adapter", tmp_path / "again"))
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_the_public_function_is_not_shadowed_by_its_module() -> None:
    """``adaptermerge.distill`` stays the function after the module that defines it (and tune's) is imported."""
    import adaptermerge
    import adaptermerge.distillation
    import adaptermerge.tuning  # noqa: F401

    assert adaptermerge.distill is adaptermerge.distillation.distill and callable(adaptermerge.tune)


def test_the_init_may_name_the_adapters_by_other_paths(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same adapters named by a relative path in the init and an absolute one here are the same adapters."""
    monkeypatch.chdir(work)
    init = combine([Path("a"), Path("b")], method="linear")
    merged = distill(work / "base", [work / "a", work / "b"], _tasks(work), init=init, settings=DistillSettings(steps=1))  # fmt: skip
    assert merged.provenance["distill"]["steps"] == 1


def test_on_a_4bit_base_the_qlora_case(work: Path, tmp_path: Path) -> None:
    """QLoRA adapters are distilled on the 4-bit base they were trained on: bitsandbytes' layers pass gradients to
    the merge's factors (the loss falls) and the quantized checkpoint is not changed."""
    import shutil

    from transformers import BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    q = tmp_path / "nf4"
    AutoModelForCausalLM.from_pretrained(work / "base", quantization_config=cfg, device_map="cpu").save_pretrained(q)
    for f in (work / "base").iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            shutil.copy(f, q / f.name)
    before = load_file(q / "model.safetensors")
    merged = distill(q, [work / "a", work / "b"], _tasks(work), init="linear", settings=DistillSettings(steps=10, lr=3e-3, batch_size=4))  # fmt: skip
    record = merged.provenance["distill"]
    assert record["loss_last"] < 0.9 * record["loss_first"]
    after = load_file(q / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_relative_base_replays_from_another_folder(work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The recipe records the base resolved: written from the adapters' folder with ``--base ./base``, it replays
    from anywhere, and the card's Reproduce line names the command that replays it."""
    monkeypatch.chdir(work)
    args = ["distill", "a", "b", "--base", "./base", "--task", "reverse=reverse.jsonl", "--task", "upper=upper.jsonl",
            "--init", "linear", "--steps", "3", "--batch-size", "4", "--quiet", "-o", str(tmp_path / "d")]  # fmt: skip
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert f"base: {(work / 'base').resolve()}" in (tmp_path / "d" / "adaptermerge_recipe.yaml").read_text()
    assert "adaptermerge distill --recipe adaptermerge_recipe.yaml" in (tmp_path / "d" / "README.md").read_text()
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["distill", "--recipe", "d/adaptermerge_recipe.yaml", "-o", "again", "--quiet"])
    assert r.exit_code == 0, r.output
    first, again = (load_file(tmp_path / p / "adapter_model.safetensors") for p in ("d", "again"))
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_inits_whose_recipe_would_not_replay_are_refused(work: Path, tmp_path: Path) -> None:
    from adaptermerge.statistics import task_statistics

    ads = [work / "a", work / "b"]
    loaded = [load_adapter(a) for a in ads]
    stats = task_statistics(work / "base", loaded, [(t, read_task_file(p).rows) for t, p in _tasks(work).items()],
                            sorted({m for a in loaded for m in a.modules}))  # fmt: skip
    with pytest.raises(UsageError, match="statistics given in place of task rows"):
        distill(work / "base", ads, _tasks(work), init=combine(ads, method="regmean", statistics=stats))
    other_base = tmp_path / "base-copy"
    shutil.copytree(work / "base", other_base)
    with pytest.raises(UsageError, match="on the base"):
        distill(other_base, ads, _tasks(work), init=combine(ads, method="regmean", base=work / "base", tasks=_tasks(work)))  # fmt: skip
    once = distill(work / "base", ads, _tasks(work), init="linear", settings=DistillSettings(steps=1))
    with pytest.raises(UsageError, match="not distilled"):
        distill(work / "base", ads, _tasks(work), init=once)
    with pytest.raises(UsageError, match="dense modules"):
        distill(work / "base", ads, _tasks(work), init=combine(ads, method="ties", dense=True))


def test_refine_leaves_nothing_changed_also_when_it_fails(work: Path) -> None:
    """The base's weights and requires_grad, the init and the teachers are unchanged, and no adapter stays active on
    the live model, after a run and after a run that diverges."""
    from adaptermerge.live import LiveModel

    ads = [load_adapter(work / "a"), load_adapter(work / "b")]
    init = combine(ads, method="linear")
    tasks = [(t, read_task_file(p)) for t, p in _tasks(work).items()]
    snapshot = [t.clone() for a in [*ads, init] for lr in a.modules.values() for t in (lr.A, lr.B)]
    with LiveModel(work / "base", sorted(init.modules)) as live:
        weights = {k: v.clone() for k, v in live.model.state_dict().items()}
        refine(live, ads, init, tasks, DistillSettings(steps=3, batch_size=4))
        assert live._active == {}
        broken = replace(init, modules={n: replace(lr, A=lr.A * float("inf")) for n, lr in init.modules.items()})
        with pytest.raises(NumericalError, match="diverged at step 1"):
            refine(live, ads, broken, tasks, DistillSettings(steps=3, batch_size=4))
        assert live._active == {} and all(p.requires_grad for p in live.model.parameters())
        assert all(torch.equal(v, live.model.state_dict()[k]) for k, v in weights.items())
    after = [t for a in [*ads, init] for lr in a.modules.values() for t in (lr.A, lr.B)]
    assert all(torch.equal(x, y) for x, y in zip(snapshot, after, strict=True))


@given(n=st.integers(1, 12), size=st.integers(1, 16), batches=st.integers(1, 30), seed=st.integers(0, 9))
def test_sampler_batches_hold_distinct_rows_and_passes_cover_every_row(n: int, size: int, batches: int, seed: int) -> None:  # fmt: skip
    sampler = _Sampler(n, size, torch.Generator().manual_seed(seed))
    drawn = [sampler.next() for _ in range(batches)]
    assert all(len(b) == min(size, n) and len(set(b)) == len(b) for b in drawn)
    counts = [sum(b.count(i) for b in drawn) for i in range(n)]
    assert max(counts) - min(counts) <= 1 + (n % min(size, n) != 0)  # each pass takes every row once


@pytest.mark.usefixtures("no_model_load")
def test_chat_rows_without_a_chat_template_are_refused_before_the_model_loads(work: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(work / "base", base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n")  # fmt: skip
    with pytest.raises(InvalidData, match="no chat_template"):
        distill(base, [work / "a", work / "b"], {"reverse": work / "reverse.jsonl", "chat": chat}, init="linear")


def test_settings_from_a_recipe_need_every_setting_and_tune_options_need_steps(work: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="lack 'seed'"):
        DistillSettings.from_dict({"steps": 3, "lr": 0.001, "batch_size": 4, "max_length": 64}, "r.yaml")
    with pytest.raises(UsageError, match=r"`lr` must be in \(0, 1\]"):
        DistillSettings(lr=2.0)
    args = ["tune", str(work / "a"), str(work / "b"), "--base", str(work / "base"), "--task", f"reverse={work / 'reverse.jsonl'}",
            "--task", f"upper={work / 'upper.jsonl'}", "--distill-lr", "0.01", "-o", str(tmp_path / "t")]  # fmt: skip
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2 and "--distill-lr takes effect with --distill-steps N only" in r.output
    assert not (tmp_path / "t").exists()


def test_embedding_modules_are_trained_and_load_in_peft(work: Path, tmp_path: Path) -> None:
    """Adapters on the token embeddings too: their merged rows train like the linear factors, and PEFT loads the
    result with the deltas it was given."""
    from peft import LoraConfig, get_peft_model

    ads = []
    for name, seed in (("ea", 3), ("eb", 4)):
        torch.manual_seed(seed)
        cfg = LoraConfig(
            r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj", "v_proj"], init_lora_weights=False
        )
        pm = get_peft_model(AutoModelForCausalLM.from_pretrained(work / "base"), cfg)
        pm.save_pretrained(tmp_path / name, save_embedding_layers=False)  # the LoRA factors only, no full table
        ads.append(tmp_path / name)
    merged = distill(work / "base", ads, _tasks(work), init="linear", settings=DistillSettings(steps=10, lr=3e-3, batch_size=4))  # fmt: skip
    start = combine(ads, method="linear")
    emb = next(n for n in merged.modules if "embed_tokens" in n)
    assert merged.modules[emb].layout == "embedding" and not torch.equal(merged.modules[emb].B, start.modules[emb].B)
    assert merged.provenance["distill"]["loss_last"] < merged.provenance["distill"]["loss_first"]
    out = save_distilled(merged, tmp_path / "d")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "base"), out)
    layer = model.base_model.model.model.embed_tokens
    got = (layer.lora_embedding_B["default"] @ layer.lora_embedding_A["default"]).T * layer.scaling["default"]
    assert torch.allclose(got, merged.modules[emb].delta(), atol=1e-6)
