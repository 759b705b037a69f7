"""tune: finds the one weight setting that restores two tasks, reproducibly per seed; scores candidates exactly as
PEFT scores the saved adapter; holds out rows and scores them; refuses bad inputs before loading a model; writes
a winner whose recipe replays without searching. Layer groups and weights per group."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from adaptermerge.combination import combine, save_combined
from adaptermerge.data import Row, parse_lines, read_task_file
from adaptermerge.errors import InvalidData, UsageError
from adaptermerge.evaluation import evaluate, greedy_outputs, report_from_scores
from adaptermerge.io.adapter import load_adapter
from adaptermerge.layers import check_weight, groups_used, layer_groups, layer_index, module_weight
from adaptermerge.live import LiveModel
from adaptermerge.synthetic import make_examples, save_tiny_base, write_jsonl
from adaptermerge.tuning import (
    Candidate,
    TuneResult,
    below_base,
    decode,
    kept_share,
    objective,
    score_candidate,
    search_space,
    tune,
    tune_summary,
)
from adaptermerge_cli.main import cli
from tests.helpers import adapter_on_folder

OPTIMUM = (1.25, 0.8)  # the weights of the model that wrote the tasks' answers
A_MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.up_proj"]
B_MODULES = ["model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two adapters on disjoint layers and two tasks whose answers are the greedy output (first four characters) of
    base + 1.25 * a + 0.8 * b: only those weights restore both tasks."""
    w = tmp_path_factory.mktemp("tune")
    save_tiny_base(w / "base", init_range=0.2)
    adapter_on_folder(w / "base", w / "a", 1, A_MODULES, alpha=4, b_scale=6.0)
    adapter_on_folder(w / "base", w / "b", 2, B_MODULES, alpha=4, b_scale=6.0)
    teacher = combine([w / "a", w / "b"], list(OPTIMUM), method="linear")
    save_combined(teacher, w / "teacher")
    with LiveModel(w / "base", A_MODULES + B_MODULES) as live:
        live.use(teacher)
        for task in ("reverse", "upper"):
            rows = [Row(i + 1, "completion", prompt=e["prompt"], completion="?") for i, e in enumerate(make_examples(task, 12, seed=4))]  # fmt: skip
            outs = greedy_outputs(live.model, live.tokenizer, rows, 16)
            write_jsonl(w / f"{task}.jsonl", [{"prompt": r.prompt, "completion": o[:4] or "?"} for r, (o, _) in zip(rows, outs, strict=True)])  # fmt: skip
    return w


def _tasks(w: Path) -> dict[str, Path]:
    return {"reverse": w / "reverse.jsonl", "upper": w / "upper.jsonl"}


def test_tune_finds_the_only_weights_that_restore_both_tasks(work: Path) -> None:
    res = tune(work / "base", [work / "a", work / "b"], _tasks(work), methods=["linear"], budget=150,
               metric="char", l1=0.0, holdout=0.0, seed=0)  # fmt: skip
    a, b = res.best.weights
    assert abs(a - OPTIMUM[0]) < 0.03 and abs(b - OPTIMUM[1]) < 0.03, res.best.weights
    teacher = evaluate(
        work / "base", [("teacher", work / "teacher")], _tasks(work), metrics=["char"], include_base=False
    )
    assert res.best.scores == pytest.approx(teacher.scores["char"]["teacher"])  # the best any weights can do
    defaults = res.candidates[0]  # the search starts from linear's defaults (1/2, 1/2)
    assert defaults.weights == [0.5, 0.5] and max(defaults.scores.values()) < 0.3
    for single in ("reverse", "upper"):  # neither adapter alone restores its task
        assert res.report.scores["char"][single][single] < 0.5 * res.best.scores[single]


def test_tune_is_reproducible_per_seed(work: Path) -> None:
    def run(seed: int) -> list[tuple]:
        r = tune(
            work / "base", [work / "a", work / "b"], _tasks(work), methods=["linear", "ties"], budget=16, seed=seed
        )
        return [(c.method, c.weights, c.params, c.objective) for c in r.candidates]

    first = run(3)
    assert run(3) == first and len(first) == 16
    assert run(4) != first
    assert [m for m, *_ in first] == ["linear"] * 8 + ["ties"] * 8  # the budget is split between the methods


def test_candidate_scores_equal_peft_scores_of_the_saved_adapter(work: Path, tmp_path: Path) -> None:
    merged = combine([work / "a", work / "b"], [0.7, 1.1], method="ties", density=0.5)
    path = save_combined(merged, tmp_path / "cand")
    rows = {t: read_task_file(p).rows for t, p in _tasks(work).items()}
    with LiveModel(work / "base", A_MODULES + B_MODULES) as live:
        loss = score_candidate(live, merged, rows, "loss", 5)
        char = score_candidate(live, load_adapter(path), rows, "char", 7)
        base_loss = score_candidate(live, None, rows, "loss", 5)
    ref = evaluate(work / "base", [("cand", path)], _tasks(work), metrics=["loss", "char"])
    assert loss == pytest.approx(ref.scores["loss"]["cand"], rel=1e-5)
    assert char == ref.scores["char"]["cand"]
    assert base_loss == pytest.approx(ref.scores["loss"]["base"], rel=1e-5)  # use(None) is the plain base


def test_held_out_rows_are_kept_from_the_search_and_scored(work: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = tune(work / "base", [work / "a", work / "b"], _tasks(work), methods=["linear", "regmean"], budget=10,
               holdout=0.3, out=out, seed=1)  # fmt: skip
    assert res.report_split == "held-out"
    for task, path in _tasks(work).items():
        s = res.split[task]
        tune_lines, held_lines = parse_lines(s["tune_lines"]), parse_lines(s["held_out_lines"])
        assert (s["tune"], s["held_out"]) == (8, 4) and not set(tune_lines) & set(held_lines)
        assert sorted(tune_lines + held_lines) == list(range(1, 13))
        assert res.report.examples[task] == 4
        # the table's winner row is an independent evaluation of the written adapter on the held-out rows
        rows = [json.loads(line) for i, line in enumerate(path.read_text().splitlines(), 1) if i in held_lines]
        write_jsonl(tmp_path / f"{task}-held.jsonl", rows)
    ref = evaluate(work / "base", [("w", out / "adapter")], {t: tmp_path / f"{t}-held.jsonl" for t in _tasks(work)})
    assert res.report.scores["loss"][res.tuned_name] == pytest.approx(ref.scores["loss"]["w"], rel=1e-5)
    assert set(res.report.models) == {"base", "reverse", "upper", "linear defaults", "regmean defaults", res.tuned_name}
    log = json.loads((out / "tune_log.json").read_text())
    assert len(log["candidates"]) == 10 and log["split"] == res.split
    assert {"adapter", "tune_log.json", "tune_report.json", "tune_report.png"} <= {p.name for p in out.iterdir()}
    card = (out / "adapter" / "README.md").read_text()
    assert "## Tuning" in card and "held-out" in card and "- tune" in card


def test_the_winner_replays_from_its_recipe_without_searching(work: Path, tmp_path: Path) -> None:
    out = tmp_path / "rm"
    res = tune(work / "base", [work / "a", work / "b"], _tasks(work), methods=["regmean"], budget=6, out=out,
               granularity="layer-group", seed=2)  # fmt: skip
    recipe = (out / "adapter" / "adaptermerge_recipe.yaml").read_text()
    assert "merge_method: regmean" in recipe and "lines:" in recipe and "layers 0-0" in recipe
    r = CliRunner().invoke(cli, ["combine", "--recipe", str(out / "adapter" / "adaptermerge_recipe.yaml"), "-o", str(tmp_path / "again"), "--quiet"])  # fmt: skip
    assert r.exit_code == 0, r.output
    first = load_file(out / "adapter" / "adapter_model.safetensors")
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert isinstance(res.best.weights[0], dict) and set(res.best.weights[0]) == {"layers 0-0", "layers 1-1"}


@pytest.mark.usefixtures("no_model_load")
def test_bad_inputs_are_refused_before_any_model_is_loaded(work: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "completion": 3}\n')
    ads = [work / "a", work / "b"]
    with pytest.raises(InvalidData, match="line 3"):
        tune(work / "base", ads, {"reverse": work / "reverse.jsonl", "upper": bad})
    with pytest.raises(UsageError, match="one `tasks` entry per adapter"):
        tune(work / "base", ads, {"reverse": work / "reverse.jsonl"})
    with pytest.raises(UsageError, match="at least one evaluation per method"):
        tune(work / "base", ads, _tasks(work), methods=["linear", "ties"], budget=1)

    def run(*args: str) -> tuple[int, str]:
        r = CliRunner().invoke(
            cli, ["tune", *map(str, ads), "--base", str(work / "base"), *args, "-o", str(tmp_path / "o")]
        )
        return r.exit_code, r.output.strip()

    task_args = ["--task", f"reverse={work / 'reverse.jsonl'}", "--task", f"upper={bad}"]
    code, out = run(*task_args)
    assert code == 1 and "line 3" in out and len(out.splitlines()) == 1
    code, out = run("--task", f"reverse={work / 'reverse.jsonl'}")
    assert code == 2 and "one --task entry per adapter" in out
    code, out = run(*task_args[:2], "--task", f"upper={work / 'upper.jsonl'}", "--methods", "linear,nope")
    assert code == 2 and "unknown method 'nope'" in out
    code, out = run(*task_args[:2], "--task", f"upper={work / 'upper.jsonl'}", "--holdout", "1")
    assert code == 2
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep").write_text("x")
    code, out = run(*task_args[:2], "--task", f"upper={work / 'upper.jsonl'}")
    assert code == 2 and "not empty" in out and (tmp_path / "o" / "keep").read_text() == "x"


def test_cli_tune_writes_the_outputs(work: Path, tmp_path: Path) -> None:
    args = ["tune", str(work / "a"), str(work / "b"), "--base", str(work / "base"), "--task",
            f"reverse={work / 'reverse.jsonl'}", "--task", f"upper={work / 'upper.jsonl'}", "--methods",
            "linear,ties", "--budget", "6", "--metric", "char", "-o", str(tmp_path / "t"), "--quiet", "--json"]  # fmt: skip
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert (
        d["evaluations"] == 6 and d["settings"]["metric"] == "char" and d["output"] == str((tmp_path / "t").resolve())
    )
    assert set(d["report"]["metrics"]) == {"char", "loss"}
    assert (tmp_path / "t" / "adapter" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------ layer groups


def test_layer_groups_and_weights_per_group() -> None:
    assert [(g.name, g.key) for g in layer_groups(2)] == [("embeddings", "embeddings"), ("early", "layers 0-0"), ("middle", "layers 1-1")]  # fmt: skip
    assert [g.key for g in layer_groups(7)] == ["embeddings", "layers 0-2", "layers 3-4", "layers 5-6"]
    assert layer_index("transformer.h.11.attn.c_attn") == 11 and layer_index("model.embed_tokens") is None
    used = groups_used(layer_groups(6), ["model.layers.0.mlp.up_proj", "model.layers.5.mlp.up_proj"])
    assert [g.name for g in used] == ["early", "late"]
    w = {"embeddings": 0.1, "layers 0-1": 0.2, "layers 2-5": 0.3}
    assert module_weight(w, "lm_head") == 0.1 and module_weight(w, "model.layers.3.x") == 0.3
    with pytest.raises(UsageError, match="covers module model.layers.9.x"):
        module_weight(w, "model.layers.9.x")
    for bad in ({"layers 3-1": 1.0}, {"early": 1.0}, {"embeddings": float("nan")}, {}):
        with pytest.raises(UsageError):
            check_weight(bad)


def test_combine_with_weights_per_layer_group_equals_the_per_module_sum(work: Path) -> None:
    wa, wb = {"layers 0-0": 0.3, "layers 1-1": 2.0}, {"layers 0-0": -1.0, "layers 1-1": 0.7}
    m = combine([work / "a", work / "b"], [wa, wb], method="linear")
    a, b = load_adapter(work / "a"), load_adapter(work / "b")
    for mod, lr in m.modules.items():
        exp = sum(module_weight(w, mod) * x.modules[mod].delta() for w, x in ((wa, a), (wb, b)) if mod in x.modules)
        assert torch.allclose(lr.delta(), exp, atol=1e-5), mod
    assert m.provenance["weights"] == [wa, wb]


def test_search_space_and_decoding() -> None:
    from adaptermerge.methods.registry import get_method

    groups = layer_groups(2)[1:]
    space = search_space(get_method("ties"), 3, groups)
    names = [v.name for v in space]
    assert names[:6] == ["w0[layers 0-0]", "w0[layers 1-1]", "w1[layers 0-0]", "w1[layers 1-1]", "w2[layers 0-0]", "w2[layers 1-1]"]  # fmt: skip
    assert names[6:] == ["density", "lambda"]  # normalize (bool) and space (str) keep their defaults
    weights, params = decode(space, [v.scaled(v.start) for v in space], 3)
    assert weights[0] == {"layers 0-0": pytest.approx(1 / 3, abs=1e-6), "layers 1-1": pytest.approx(1 / 3, abs=1e-6)}
    assert params == {"density": 0.2, "lambda": 1.0}
    assert [v.name for v in search_space(get_method("tsv"), 2, None)] == ["w0", "w1", "lambda"]  # keep: default 1/T
    rm = search_space(get_method("regmean"), 2, None)
    assert [v.name for v in rm] == ["w0", "w1", "alpha", "lambda"]
    # RegMean sees only the weights' ratios: they come back as shares (the L1 pull cannot shrink them for nothing)
    assert decode(rm, [0.2, 0.6, 0.5, 0.5], 2, relative=True)[0] == [0.25, 0.75]
    assert decode(rm, [0.0, 0.0, 0.5, 0.5], 2, relative=True)[0] == [0.5, 0.5]
    g = search_space(get_method("regmean"), 2, groups)
    assert decode(g, [0.1, 0.2, 0.3, 0.2, 0.5, 0.5], 2, relative=True)[0] == [
        {"layers 0-0": 0.25, "layers 1-1": 0.5},
        {"layers 0-0": 0.75, "layers 1-1": 0.5},
    ]
    # lower is better: loss as it is, accuracies as 1 - score; plus the pull towards small weights
    assert objective({"a": 2.0, "b": 1.0}, [1.0, {"x": -3.0}], "loss", 0.05) == pytest.approx(1.5 + 0.05 * 2.0)
    assert objective({"a": 0.75, "b": 0.25}, [0.0, 0.0], "char", 0.05) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------ worst-task objective


@pytest.mark.parametrize(
    "score,base,own,metric,kept",
    [
        (0.6, 0.3, 0.8, "char", 0.75),  # accuracy: score / own
        (0.0, 0.0, 0.0, "char", 1.0),  # nothing to keep
        (1.5, 2.0, 1.0, "loss", 0.5),  # loss: half the adapter's improvement over the base
        (2.5, 2.0, 1.0, "loss", -0.5),  # worse than the base: negative
        (2.0, 2.0, 2.0, "loss", 1.0),  # the adapter does not improve on the base; neither does the merge
        (2.2, 2.0, 2.0, "loss", 0.9),  # ... and the merge is 10% worse than it
    ],
)
def test_kept_share(score: float, base: float, own: float, metric: str, kept: float) -> None:
    assert kept_share(score, base, own, metric) == pytest.approx(kept)


def test_worst_objective_is_one_minus_the_smallest_kept_share() -> None:
    refs = {"a": {"base": 0.2, "own": 0.8}, "b": {"base": 0.4, "own": 0.5}}
    scores = {"a": 0.72, "b": 0.3}  # keeps 90% of a, 60% of b: mean badness 0.49, worst 0.4
    assert objective(scores, [0.5, 1.0], "char", 0.0) == pytest.approx(0.49)
    assert objective(scores, [0.5, 1.0], "char", 0.0, refs) == pytest.approx(0.4)
    assert objective(scores, [0.5, 1.0], "char", 0.1, refs) == pytest.approx(0.4 + 0.1 * 0.75)


def test_tune_with_the_worst_objective_scores_against_each_tasks_own_adapter(work: Path) -> None:
    res = tune(work / "base", [work / "a", work / "b"], _tasks(work), methods=["linear"], budget=12,
               metric="char", l1=0.0, holdout=0.0, seed=0, objective="worst")  # fmt: skip
    refs = res.settings["references"]
    assert res.settings["objective"] == "worst" and set(refs) == {"reverse", "upper"}
    own = evaluate(work / "base", [("reverse", work / "a"), ("upper", work / "b")], _tasks(work), metrics=["char"])
    for task in ("reverse", "upper"):  # the references are the task's own adapter and the base, scored by evaluate
        assert refs[task]["own"] == own.scores["char"][task][task]
        assert refs[task]["base"] == own.scores["char"]["base"][task]
    for c in res.candidates:  # every candidate's objective is 1 - its smallest kept share
        shares = [c.scores[t] / refs[t]["own"] for t in refs]
        assert c.objective == pytest.approx(1.0 - min(shares))
    assert res.best.objective == min(c.objective for c in res.candidates)
    assert "objective = 1 - min over tasks of the kept share" in tune_summary(res)
    with pytest.raises(UsageError, match="`objective` must be one of"):
        tune(work / "base", [work / "a", work / "b"], _tasks(work), objective="median")


def _report(char: dict[str, dict[str, float]], loss: dict[str, dict[str, float]]) -> object:
    kinds = {"base": "base", "a": "adapter", "b": "adapter", "tuned (linear)": "adapter"}
    scores = {m: {"char": char[m], "loss": loss[m]} for m in char}
    return report_from_scores(["char", "loss"], ["a", "b"], scores, kinds, examples={"a": 4, "b": 4})


def test_below_base_names_the_tasks_a_merge_does_worse_than_the_base() -> None:
    """The merge keeps 95% of a's own score and 90% of b's, yet on b it is worse than the plain base: a retention
    target alone does not show that, the summary must."""
    char = {"base": {"a": 0.2, "b": 0.95}, "a": {"a": 1.0, "b": 0.5}, "b": {"a": 0.1, "b": 1.0},
            "tuned (linear)": {"a": 0.95, "b": 0.9}}  # fmt: skip
    loss = {"base": {"a": 2.0, "b": 0.3}, "a": {"a": 0.1, "b": 1.0}, "b": {"a": 3.0, "b": 0.1},
            "tuned (linear)": {"a": 2.5, "b": 0.2}}  # fmt: skip
    report = _report(char, loss)
    assert below_base(report, "tuned (linear)", "char") == ["b (0.9 vs base 0.95)"]
    assert below_base(report, "tuned (linear)", "loss") == ["a (2.5 vs base 2)"]  # lower is better for the loss
    assert below_base(report, "base", "char") == [] and below_base(report, "missing", "char") == []
    best = Candidate(0, "linear", [0.5, 0.5], {}, {"a": 0.95, "b": 0.9}, 0.1, 0.01)
    settings = {"methods": ["linear"], "granularity": "adapter", "seed": 0, "metric": "char", "l1": 0.05}
    result = TuneResult(best, None, report, "held-out", [best], settings)  # type: ignore[arg-type]
    text = tune_summary(result)
    assert "**Worse than the base** on the held-out rows (char): b (0.9 vs base 0.95)" in text
    assert "objective = mean (1 - char) + 0.05 * mean |w|" in text
    char["tuned (linear)"]["b"] = 0.96
    assert "Worse than the base" not in tune_summary(TuneResult(best, None, _report(char, loss), "held-out", [best], settings))  # type: ignore[arg-type]  # fmt: skip
