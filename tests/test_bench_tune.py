"""The tune benchmark's base presets and ``--set`` overrides build the settings they name, and refuse what they
do not know (the benchmark's figures in docs/benchmarks.md depend on these settings)."""

from __future__ import annotations

import pytest

from tests.helpers import load_benchmark


def bench_tune():
    return load_benchmark("bench_tune")


def test_presets_and_overrides() -> None:
    from adaptermerge.demo import FULL

    mod = bench_tune()
    assert mod.demo_settings("demo", []) == FULL
    larger = mod.demo_settings("larger", ["eval_rows=200", "base_task_share=0.005"])
    assert (larger.hidden, larger.layers, larger.base_steps) == (128, 4, 2000)
    assert larger.eval_rows == 200 and isinstance(larger.eval_rows, int)
    assert larger.base_task_share == 0.005 and larger.rank == FULL.rank


@pytest.mark.parametrize("item", ["hiddn=128", "hidden", "layers=two"])
def test_bad_override_is_refused(item: str) -> None:
    with pytest.raises(SystemExit):
        bench_tune().demo_settings("demo", [item])


def test_undefined_retention_is_shown_not_fatal() -> None:
    """Where a task's own adapter is no better than the base (a base that already solves it), its retention is
    undefined: the table shows "-" and the lowest retention ignores it, instead of the run failing at the end."""
    mod = bench_tune()
    assert mod._lowest({"a": None, "b": 0.8, "c": 0.95}) == 0.8
    assert mod._lowest({"a": None}) is None
    assert mod._pct(None, 5) == "    -" and mod._pct(0.5, 6) == " 50.0%"


def test_verdict_meets_the_ratio_and_names_the_tasks_below_the_base() -> None:
    """A merge that keeps >= 90% of every adapter's per-character score meets the goal's letter; the verdict still
    names the task on which it is worse than the base."""
    from adaptermerge.evaluation import report_from_scores

    mod = bench_tune()
    char = {"base": (0.5, 0.95, 0.4), "reverse": (1.0, 0.6, 0.3), "upper": (0.4, 1.0, 0.3),
            "shift": (0.3, 0.7, 1.0), "tuned": (0.92, 0.93, 0.95)}  # fmt: skip
    scores = {m: {"char": dict(zip(mod.TASKS, v)), "loss": dict(zip(mod.TASKS, (1.0, 1.0, 1.0)))} for m, v in char.items()}  # fmt: skip
    kinds = {m: "base" if m == "base" else "adapter" for m in char}
    report = report_from_scores(["char", "loss"], mod.TASKS, scores, kinds)
    verdict = mod.summarize(report, {"tuned": {"wall_s": 12.0}})["verdicts"]["tuned"]
    assert verdict["met"] and verdict["keeps_every_task"] and verdict["under_10_min"]
    assert verdict["below_base_char"] == ["upper (0.93 vs base 0.95)"]


def test_a_distill_run_without_a_search_prints_its_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    """``--distill`` adds a run that is not a search (no tune result): the table and verdicts still print it."""
    from adaptermerge.evaluation import report_from_scores

    mod = bench_tune()
    char = {"base": (0.5, 0.5, 0.5), "reverse": (1.0, 0.4, 0.4), "upper": (0.4, 1.0, 0.4),
            "shift": (0.4, 0.4, 1.0), "distill (regmean init)": (0.91, 0.95, 0.9)}  # fmt: skip
    scores = {m: {"char": dict(zip(mod.TASKS, v)), "loss": dict(zip(mod.TASKS, (1.0, 1.0, 1.0)))} for m, v in char.items()}  # fmt: skip
    report = report_from_scores(["char", "loss"], mod.TASKS, scores, {m: "adapter" for m in char} | {"base": "base"})
    runs = {"distill (regmean init)": {"result": None, "wall_s": 9.0}}
    mod.print_table(mod.summarize(report, runs), runs)
    out = capsys.readouterr().out
    assert "distill (regmean init): 9.0 s -> keeps >= 90% of every task: yes (lowest 90.0%)" in out
    assert "goal MET" in out
