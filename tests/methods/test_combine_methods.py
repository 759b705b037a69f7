"""The task-arithmetic family and the subspace methods through combine and merge, against PEFT's own deltas and
dense references written here: the output loads in PEFT with the deltas we report; merge adds the dense result."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import adaptermerge
from adaptermerge.methods.registry import get_method
from tests.helpers import input_ids, make_adapter, peft_deltas, peft_model, rel_err, tiny_gpt2, tiny_llama
from tests.methods.helpers import reference_ties, reference_topk

ELEMENTWISE = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "breadcrumbs",
               "breadcrumbs_ties", "della", "della_linear"]  # fmt: skip
SUBSPACE = ["tsv", "iso_c", "iso_cts", "wudi"]


@pytest.fixture(scope="module")
def trio(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Three Llama adapters of different ranks on partly different modules."""
    d = tmp_path_factory.mktemp("methods")
    a = make_adapter(d / "a", tiny_llama, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=1)
    b = make_adapter(d / "b", tiny_llama, r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"], seed=2)
    c = make_adapter(d / "c", tiny_llama, r=3, lora_alpha=6, target_modules=["q_proj"], use_rslora=True, seed=3)
    return a, b, c


def deltas_of(paths: list[Path]) -> list[dict[str, torch.Tensor]]:
    return [peft_deltas(peft_model(tiny_llama, p), "a0") for p in paths]


@pytest.mark.parametrize("method", ELEMENTWISE + SUBSPACE)
def test_output_loads_in_peft_with_the_reported_deltas(tmp_path: Path, trio, method: str) -> None:
    """Mixed ranks and target modules; the saved adapter's PEFT deltas are the ones the combined adapter holds."""
    m = adaptermerge.combine(list(trio), [0.5, 0.3, 0.2], method=method)
    out = adaptermerge.save_combined(m, tmp_path / "out")
    got = peft_deltas(peft_model(tiny_llama, out), "a0")
    assert set(got) == set(m.modules) == {n for d in deltas_of(list(trio)) for n in d}
    for name, lr in m.modules.items():
        assert rel_err(got[name], lr.delta()) < 1e-5, name
        assert torch.isfinite(got[name]).all()
    assert m.provenance["method"] == method and get_method(method).name in (out / "README.md").read_text()


def test_ties_in_delta_space_is_the_dense_definition(trio) -> None:
    """Against a dense reference on PEFT's own deltas: trim to the top density by magnitude, elect, disjoint mean;
    an adapter that does not touch a module is not counted there."""
    weights = [0.5, 0.3, 0.2]
    full_rank = 10_000  # refactor at full size: exact
    m = adaptermerge.combine(list(trio), weights, method="ties", density=0.3, rank=full_rank)
    ds = deltas_of(list(trio))
    for name, lr in m.modules.items():
        present = [(w, d[name].double()) for w, d in zip(weights, ds, strict=True) if name in d]
        trimmed = [d * reference_topk(d.abs(), round(0.3 * d.numel())) for _, d in present]
        want = reference_ties(trimmed, [w for w, _ in present])
        assert rel_err(lr.delta(torch.float64), want) < 1e-5, name


def test_task_arithmetic_is_exact_in_every_space(trio) -> None:
    weights = [1.0, -1.0, 0.5]
    ds = deltas_of(list(trio))
    for space in ("delta", "core", "knots"):
        m = adaptermerge.combine(list(trio), weights, method="task_arithmetic", space=space, lambda_=None)
        for name, lr in m.modules.items():
            want = sum(w * d[name] for w, d in zip(weights, ds, strict=True) if name in d)
            assert rel_err(lr.delta(), want) < 1e-5, (space, name)


def test_dare_is_byte_identical_per_seed_and_differs_across_seeds(trio) -> None:
    run = lambda seed: adaptermerge.combine(list(trio), method="dare_ties", seed=seed)  # noqa: E731
    a, b, c = run(7), run(7), run(8)
    for name in a.modules:
        assert torch.equal(a.modules[name].A, b.modules[name].A) and torch.equal(a.modules[name].B, b.modules[name].B)
    assert any(not torch.equal(a.modules[n].delta(), c.modules[n].delta()) for n in a.modules)


@pytest.mark.parametrize("model_fn,targets,fan_in_fan_out", [(tiny_llama, ["q_proj", "down_proj"], False),
                                                             (tiny_gpt2, ["c_attn", "c_proj"], True)])  # fmt: skip
def test_merge_adds_the_dense_result_into_the_base(tmp_path: Path, model_fn, targets, fan_in_fan_out) -> None:
    """merge BASE a b --method ties: base + the dense TIES result, nothing lost to re-factoring (GPT-2: Conv1D)."""
    model_fn(0).save_pretrained(tmp_path / "base")
    kw = dict(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=fan_in_fan_out)
    a = make_adapter(tmp_path / "a", model_fn, seed=1, **kw)
    b = make_adapter(tmp_path / "b", model_fn, seed=2, **kw)
    adaptermerge.merge_into_base(tmp_path / "base", [a, b], tmp_path / "out", weights=[0.6, 0.4], method="ties",
                                 density=0.4)  # fmt: skip
    ds = [peft_deltas(peft_model(model_fn, p), "a0") for p in (a, b)]
    expected = model_fn(0)
    mods = dict(expected.named_modules())
    with torch.no_grad():
        for name in ds[0]:
            dd = [d[name].double().contiguous() for d in ds]
            trimmed = [x * reference_topk(x.abs(), round(0.4 * x.numel())) for x in dd]
            mods[name].weight += reference_ties(trimmed, [0.6, 0.4]).float()
        want = expected(input_ids=input_ids()).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "out")(input_ids=input_ids()).logits
    assert rel_err(got, want) < 1e-5
    recipe = (tmp_path / "out" / "adaptermerge_recipe.yaml").read_text()
    assert "merge_method: ties" in recipe and "density: 0.4" in recipe


def test_dense_results_are_not_saved_as_adapters(trio, tmp_path: Path) -> None:
    m = adaptermerge.combine(list(trio), method="ties", dense=True)
    with pytest.raises(adaptermerge.UsageError, match="dense result"):
        adaptermerge.save_adapter(m, tmp_path / "x")


def test_recipe_replays_the_method_parameters(trio, tmp_path: Path) -> None:
    """Falsy values (gamma 0, normalize false) and non-defaults reach the method, the recipe records them, and a
    replay of the recipe gives the same bytes; the result is the dense breadcrumbs-TIES reference on PEFT's deltas
    (gamma 0: no outlier dropped, so the masks are the top-density magnitudes; plain sum without normalize)."""
    import yaml

    from adaptermerge.recipe import RECIPE_NAME, load_recipe, recipe_arguments

    weights = [0.5, 0.3, 0.2]
    params = dict(density=0.4, gamma=0.0, normalize=False)
    m = adaptermerge.combine(list(trio), weights, method="breadcrumbs_ties", rank=10_000, **params)
    ds = deltas_of(list(trio))
    for name, lr in m.modules.items():
        present = [(w, d[name].double()) for w, d in zip(weights, ds, strict=True) if name in d]
        masked = [d * reference_topk(d.abs(), round(0.4 * d.numel())) for _, d in present]
        want = reference_ties(masked, [w for w, _ in present], normalize=False)
        assert rel_err(lr.delta(torch.float64), want) < 1e-5, name
    out = adaptermerge.save_combined(m, tmp_path / "out")
    recorded = yaml.safe_load((out / RECIPE_NAME).read_text())["parameters"]
    assert {k: recorded[k] for k in params} == params and recorded["lambda"] == 1.0
    replay = adaptermerge.combine(**recipe_arguments(load_recipe(out / RECIPE_NAME), out / RECIPE_NAME))
    assert replay.provenance["params"] == m.provenance["params"]
    for name, lr in m.modules.items():
        assert torch.equal(replay.modules[name].A, lr.A) and torch.equal(replay.modules[name].B, lr.B), name
