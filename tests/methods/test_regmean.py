"""RegMean: the factored merge equals the dense least-squares solution (pure, and on a tiny model against inputs
captured independently through PEFT), reduces to the weighted mean when the Gram matrices are equal, and reaches
combine/merge/CLI/recipes with task data checked before any model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from adaptermerge.combination import combine, save_combined
from adaptermerge.errors import InvalidData, UsageError
from adaptermerge.lowrank import LowRank
from adaptermerge.methods.regmean import ModuleInputs, RegMeanParams, regmean, solve_gram
from adaptermerge.surgery.merge import merge_into_base
from adaptermerge.synthetic import char_tokenizer, make_examples, save_tiny_base, write_jsonl
from adaptermerge_cli.main import cli
from tests.helpers import adapter_on_folder

# ------------------------------------------------------------------------------------------------ pure method


def _lr(out: int, inn: int, r: int, seed: int) -> LowRank:
    g = torch.Generator().manual_seed(seed)
    return LowRank(
        A=torch.randn(r, inn, generator=g, dtype=torch.float64), B=torch.randn(out, r, generator=g, dtype=torch.float64)
    )


def _rows(n: int, inn: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, inn, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, inn, dtype=torch.float64)


def _dense_reference(deltas, xs, weights, alpha):
    """argmin_D sum_i w_i (alpha ||X_i (D - D_i)^T||^2 + (1 - alpha) sum_k d_ik ||(D - D_i)[:, k]||^2) by least
    squares on the stacked (weighted, augmented) rows, D_i = 0 for a task whose adapter leaves the module."""
    blocks, targets = [], []
    shape = next(d.shape for d in deltas if d is not None)
    for d, x, w in zip(deltas, xs, weights, strict=True):
        rows = [alpha**0.5 * x]
        if alpha < 1:
            rows.append((1 - alpha) ** 0.5 * torch.diag((x**2).sum(0).sqrt()))
        m = w**0.5 * torch.cat(rows)
        blocks.append(m)
        targets.append(m @ (torch.zeros(shape[::-1], dtype=torch.float64) if d is None else d.T))
    sol = torch.linalg.lstsq(torch.cat(blocks), torch.cat(targets), driver="gelsd").solution
    return sol.T


@pytest.mark.parametrize("alpha", [1.0, 0.9, 0.3])
def test_factored_result_equals_the_dense_least_squares_solution(alpha: float) -> None:
    out, inn = 12, 10
    lrs = [_lr(out, inn, 2, 1), _lr(out, inn, 3, 2), None]  # the third task's adapter leaves this module
    xs = [_rows(15, inn, 3), _rows(40, inn, 4), _rows(9, inn, 5)]
    weights = [0.5, 1.5, 1.0]
    terms = [(w, lr, ModuleInputs(rows=x) if i % 2 else ModuleInputs(gram=x.T @ x, tokens=len(x)))
             for i, (w, lr, x) in enumerate(zip(weights, lrs, xs, strict=True))]  # fmt: skip
    b, a = regmean(terms, RegMeanParams(alpha=alpha))
    assert a.shape[0] == b.shape[1] == 5  # rank <= the sum of the adapters' ranks, exactly factored
    ref = _dense_reference([None if m is None else m.delta(torch.float64) for m in lrs], xs, weights, alpha)
    assert torch.allclose(b @ a, ref, atol=1e-9, rtol=1e-9)
    b2, a2 = regmean(terms, RegMeanParams(alpha=alpha, lambda_=0.5))
    assert torch.allclose(b2 @ a2, 0.5 * ref, atol=1e-9)


def test_equal_gram_matrices_give_the_weighted_mean() -> None:
    out, inn = 8, 6
    lrs = [_lr(out, inn, 2, s) for s in (1, 2, 3)]
    x = ModuleInputs(rows=_rows(20, inn, 9))
    weights = [0.2, 0.5, 1.3]
    for alpha in (1.0, 0.9, 0.0):
        b, a = regmean([(w, m, x) for w, m in zip(weights, lrs, strict=True)], RegMeanParams(alpha=alpha))
        mean = sum(w * m.delta(torch.float64) for w, m in zip(weights, lrs, strict=True)) / sum(weights)
        assert torch.allclose(b @ a, mean, atol=1e-10), alpha
    # and scaling every weight alike changes nothing (the weights weigh the tasks' errors)
    b, a = regmean([(3 * w, m, x) for w, m in zip(weights, lrs, strict=True)], RegMeanParams())
    assert torch.allclose(b @ a, mean, atol=1e-10)


def test_singular_gram_takes_the_pseudo_inverse_and_keeps_unvisited_directions_at_the_base() -> None:
    out, inn = 6, 10
    lr1, lr2 = _lr(out, inn, 2, 1), _lr(out, inn, 2, 2)
    x1, x2 = _rows(3, inn, 3), _rows(4, inn, 4)  # 7 tokens < 10 features: G is singular at alpha = 1
    b, a = regmean([(1.0, lr1, ModuleInputs(rows=x1)), (1.0, lr2, ModuleInputs(rows=x2))], RegMeanParams(alpha=1.0))
    ref = _dense_reference([lr1.delta(torch.float64), lr2.delta(torch.float64)], [x1, x2], [1.0, 1.0], 1.0)
    assert torch.allclose(b @ a, ref, atol=1e-9)  # gelsd: the minimum-norm solution
    null = torch.linalg.svd(torch.cat([x1, x2]), full_matrices=True).Vh[7:]  # input directions no task visits
    assert float(((b @ a) @ null.T).abs().max()) < 1e-9
    assert torch.allclose(
        solve_gram(torch.zeros(3, 3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64)),
        torch.zeros(2, 3, dtype=torch.float64),
    )


def test_embedding_modules_take_the_weighted_mean_and_bad_weights_are_refused() -> None:
    lr1, lr2 = _lr(5, 4, 2, 1), _lr(5, 4, 1, 2)
    b, a = regmean([(1.0, lr1, None), (3.0, lr2, None), (4.0, None, None)], RegMeanParams())
    assert torch.allclose(b @ a, (lr1.delta(torch.float64) + 3 * lr2.delta(torch.float64)) / 8, atol=1e-12)
    x = ModuleInputs(rows=_rows(9, 4, 1))
    with pytest.raises(UsageError, match="weights must be >= 0"):
        regmean([(-1.0, lr1, x), (1.0, lr2, x)], RegMeanParams())
    with pytest.raises(UsageError, match="at least one positive weight"):
        regmean([(0.0, lr1, x)], RegMeanParams())


# ------------------------------------------------------------------------------------------------ tiny model

TASKS = ("upper", "shift")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    w = tmp_path_factory.mktemp("regmean")
    save_tiny_base(w / "base", init_range=0.2)
    for t in TASKS:
        write_jsonl(w / f"{t}.jsonl", make_examples(t, 6, seed=5))
    # b_scale: deltas comparable to the base weights, so the merge is far from every simple mean
    adapter_on_folder(w / "base", w / "upper", 1, ["q_proj", "v_proj", "down_proj"], b_scale=20.0)
    adapter_on_folder(w / "base", w / "shift", 2, ["q_proj", "o_proj", "down_proj"], b_scale=20.0)
    return w


def _ids(row: dict) -> list[int]:
    """Hand tokenization (BOS, one id per character, EOS), independent of the library's."""
    vocab = char_tokenizer().get_vocab()
    return [1] + [vocab[c] for c in row["prompt"] + row["completion"]] + [2]


def _captured_inputs(work: Path, task: str) -> dict[str, torch.Tensor]:
    """Each module's inputs on the task's examples, one unpadded example at a time, through PEFT."""
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "base"), str(work / task)).eval()
    mods = dict(pm.base_model.model.named_modules())
    names = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj")]  # fmt: skip
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [mods[n].register_forward_hook(lambda m, a, o, n=n: seen[n].append(a[0][0].double())) for n in names]
    rows = [json.loads(line) for line in (work / f"{task}.jsonl").read_text().splitlines()]
    with torch.no_grad():
        for r in rows:
            pm(input_ids=torch.tensor([_ids(r)]))
    for h in hooks:
        h.remove()
    deltas = {
        n: mod.get_delta_weight("default").double() for n, mod in mods.items() if hasattr(mod, "get_delta_weight")
    }
    return {n: torch.cat(v) for n, v in seen.items()}, deltas


@pytest.mark.parametrize("alpha", [0.9, 1.0])
def test_regmean_on_a_tiny_model_equals_the_dense_reference(work: Path, alpha: float) -> None:
    merged = combine(
        [work / t for t in TASKS], [1.0, 2.0], method="regmean", base=work / "base",
        tasks={t: work / f"{t}.jsonl" for t in TASKS}, alpha=alpha, compute_dtype="float64",
    )  # fmt: skip
    captured = [_captured_inputs(work, t) for t in TASKS]
    assert set(merged.modules) == set(captured[0][0])
    for mod, lr in merged.modules.items():
        xs = [c[0][mod] for c in captured]
        ds = [c[1].get(mod) for c in captured]  # None where the task's adapter leaves the module (W_i = W0)
        ref = _dense_reference(ds, xs, [1.0, 2.0], alpha)
        err = float((lr.delta(torch.float64) - ref).norm() / ref.norm())
        # fp32 statistics; plain least squares (alpha = 1) multiplies their rounding by cond(G) ~ 1e3
        assert err < (1e-4 if alpha < 1 else 2e-3), (mod, err)
        mean = sum(w * d for w, d in zip([1.0, 2.0], ds, strict=True) if d is not None) / 3.0
        assert float((ref - mean).norm() / ref.norm()) > 0.05  # far from a weighted mean: the test can fail
    assert merged.provenance["tasks"][0]["name"] == "upper" and "lines" not in merged.provenance["tasks"][0]


def test_merge_folds_the_regmean_adapter_into_the_base_and_recipes_replay(work: Path, tmp_path: Path) -> None:
    tasks = [(t, work / f"{t}.jsonl") for t in TASKS]
    merged = combine([work / t for t in TASKS], method="regmean", base=work / "base", tasks=tasks)
    out = save_combined(merged, tmp_path / "rm")
    res = CliRunner().invoke(
        cli, ["combine", "--recipe", str(out / "adaptermerge_recipe.yaml"), "-o", str(tmp_path / "again"), "--quiet"]
    )
    assert res.exit_code == 0, res.output
    first, again = (
        load_file(out / "adapter_model.safetensors"),
        load_file(tmp_path / "again" / "adapter_model.safetensors"),
    )
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    merge_into_base(work / "base", [work / t for t in TASKS], tmp_path / "m", method="regmean", tasks=tasks)
    w0, w1 = load_file(work / "base" / "model.safetensors"), load_file(tmp_path / "m" / "model.safetensors")
    for mod, lr in merged.modules.items():
        assert torch.allclose(w1[mod + ".weight"] - w0[mod + ".weight"], lr.delta(), atol=1e-5), mod
    res = CliRunner().invoke(
        cli,
        ["merge", "--recipe", str(tmp_path / "m" / "adaptermerge_recipe.yaml"), "-o", str(tmp_path / "m2"), "--quiet"],
    )
    assert res.exit_code == 0, res.output
    assert all(torch.equal(w1[k], v) for k, v in load_file(tmp_path / "m2" / "model.safetensors").items())


def test_cli_combine_and_refusals(work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ads = [str(work / t) for t in TASKS]
    tasks = [a for t in TASKS for a in ("--task", f"{t}={work / f'{t}.jsonl'}")]
    res = CliRunner().invoke(cli, ["combine", *ads, "--method", "regmean", "--base", str(work / "base"), *tasks,
                                   "--alpha", "0.5", "-o", str(tmp_path / "c"), "--quiet"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "method regmean" in res.output and (tmp_path / "c" / "adapter_model.safetensors").is_file()

    def run(*args: str) -> tuple[int, str]:
        r = CliRunner().invoke(cli, ["combine", *ads, *args, "-o", str(tmp_path / "x")])
        return r.exit_code, r.output.strip()

    code, out = run("--method", "regmean", *tasks)
    assert code == 2 and "needs the base (--base)" in out and "--task" in out and len(out.splitlines()) == 1
    code, out = run("--method", "regmean", "--base", str(work / "base"), *tasks[:2])
    assert code == 2 and "one --task entry per adapter" in out
    code, out = run("--method", "linear", *tasks)
    assert code == 2 and "uses no task data" in out
    code, out = run("--method", "regmean", "--base", str(work / "base"), *tasks, "--alpha", "1.5")
    assert code == 2 and "--alpha" in out and "[0, 1]" in out
    assert not (tmp_path / "x").exists()

    # a bad task file is reported with its line before any model is loaded
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3}\n')

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("adaptermerge.live.load_causal_lm", no_model)
    with pytest.raises(InvalidData, match="line 2"):
        combine(ads, method="regmean", base=work / "base", tasks={"upper": bad, "shift": work / "shift.jsonl"})
    code, out = run("--method", "regmean", "--base", str(work / "base"), "--task", f"upper={bad}", tasks[2], tasks[3])
    assert code == 1 and "line 2" in out and len(out.splitlines()) == 1


def test_statistics_share_inputs_and_switch_from_rows_to_gram(work: Path) -> None:
    from adaptermerge.data import read_task_file
    from adaptermerge.io.adapter import load_adapter
    from adaptermerge.statistics import task_statistics

    ads = [load_adapter(work / t) for t in TASKS]
    modules = sorted({m for a in ads for m in a.modules})
    rows = [(t, read_task_file(work / f"{t}.jsonl").rows) for t in TASKS]
    stats = task_statistics(work / "base", ads, rows, modules)
    q0, v0, down0 = (
        stats.modules[f"model.layers.0.{m}"] for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    )
    assert all(q is v for q, v in zip(q0, v0, strict=True))  # q and v read the same hidden state: one record
    n = stats.tokens[0]
    assert 64 < n < 128  # hidden 64: more tokens than features -> Gram; down_proj (128 wide) -> rows
    assert q0[0].gram is not None and q0[0].gram.shape == (64, 64) and q0[0].tokens == n
    assert down0[0].rows is not None and down0[0].rows.shape == (n, 128)
    # the Gram equals the rows' Gram, captured independently
    x = _captured_inputs(work, "upper")[0]["model.layers.0.self_attn.q_proj"]
    assert torch.allclose(q0[0].gram.double(), x.T @ x, rtol=1e-4, atol=1e-3)
