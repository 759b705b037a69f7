"""The registry is the only dispatch: every method's declaration is complete, consistent with its function and
params dataclass, and reaches the CLI, the recipe schema and docs/methods.md."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
from click.testing import CliRunner

from adaptermerge.errors import UsageError
from adaptermerge.methods.registry import (
    METHODS,
    SPACES,
    BaseMerge,
    Kind,
    Method,
    RankRule,
    get_method,
    method_names,
    methods_markdown,
)

ISSUE_11 = {
    "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "breadcrumbs", "breadcrumbs_ties",
    "della", "della_linear", "tsv", "iso_c", "iso_cts", "wudi",
}  # fmt: skip
ALL = [get_method(n) for n in method_names()]


def test_the_methods_of_the_issues_are_registered() -> None:
    assert set(method_names()) >= ISSUE_11 | {"linear", "cat", "svd", "factor-linear"}


@pytest.mark.parametrize("method", ALL, ids=lambda m: m.name)
def test_declaration_is_complete_and_matches_its_function(method: Method) -> None:
    assert method.title and method.formula and isinstance(method.kind, Kind)
    assert isinstance(method.rank_rule, RankRule) and isinstance(method.base_merge, BaseMerge)
    assert method.paper is None or (method.url or "").startswith("https://")
    params = list(inspect.signature(method.fn).parameters)
    expected = ["tensors", "weights", "params", "generator"] if method.kind is Kind.ELEMENTWISE else ["terms", "params"]
    assert params == expected
    assert set(method.spaces) <= set(SPACES)
    if method.kind is Kind.ELEMENTWISE:
        assert method.spaces == SPACES and method.base_merge is BaseMerge.DENSE
    if method.params_cls is not None:
        fields = {f.name: f for f in dataclasses.fields(method.params_cls)}
        for p in method.params:
            assert p.field in fields and fields[p.field].default == p.default, (method.name, p.name)
        assert set(fields) - {p.field for p in method.params} <= {"normalize"}  # shared dataclasses


@pytest.mark.parametrize("method", ALL, ids=lambda m: m.name)
def test_parameters_resolve_with_defaults_and_refuse_unknown_ones(method: Method) -> None:
    resolved = method.resolve_params({})
    assert set(resolved) == {p.name for p in method.all_params}
    method.make_params(resolved)  # the dataclass accepts the defaults
    with pytest.raises(UsageError, match="does not take `bogus`"):
        method.resolve_params({"bogus": 1})
    if method.param("lambda") is not None:
        assert method.make_params(method.resolve_params({"lambda": 0.5})).lambda_ == 0.5
        with pytest.raises(UsageError, match="finite"):
            method.resolve_params({"lambda": float("inf")})


def test_param_ranges_are_printed_as_intervals() -> None:
    p = {q.name: q for m in ALL for q in m.all_params}
    assert p["density"].range_text() == "(0, 1]" and p["gamma"].range_text() == "[0, 1)"
    assert p["lambda"].range_text() == "any" and p["seed"].range_text() == "[0, inf)"
    assert p["space"].range_text() == "delta | core | knots"
    with pytest.raises(UsageError, match=r"`density` must be in \(0, 1\]"):
        p["density"].check(0.0)


def test_every_method_reaches_the_cli_the_recipe_schema_and_the_docs(tmp_path: Path) -> None:
    from adaptermerge_cli.main import cli

    combine_help = CliRunner().invoke(cli, ["combine", "--help"]).output
    merge_help = CliRunner().invoke(cli, ["merge", "--help"]).output
    docs = (Path(__file__).resolve().parents[2] / "docs" / "methods.md").read_text()
    for m in ALL:
        assert m.name in combine_help and m.name in merge_help, m.name
        assert f"## `{m.name}`" in docs, m.name
        for p in m.all_params:
            assert p.option in combine_help, (m.name, p.option)
    assert methods_markdown() in docs  # the page's method sections are the generated ones


def test_recipe_schema_checks_the_method_parameters(tmp_path: Path) -> None:
    import yaml

    from adaptermerge.recipe import recipe_arguments

    recipe = {"operation": "combine", "merge_method": "ties", "parameters": {"density": 0.3},
              "models": [{"model": str(tmp_path)}]}  # fmt: skip
    assert recipe_arguments(recipe)["density"] == 0.3
    recipe["parameters"] = {"gamma": 0.1}
    with pytest.raises(UsageError, match="ties has no parameter 'gamma'"):
        recipe_arguments(recipe)
    recipe["parameters"] = {"density": 2.0}
    with pytest.raises(UsageError, match="density"):
        recipe_arguments(recipe)
    assert yaml.safe_dump(recipe)


def test_every_registered_method_is_declared_in_a_methods_module() -> None:
    """Adding a method is one module in adaptermerge/methods that calls register(): the registry finds it."""
    import adaptermerge.methods as pkg

    modules = {m.fn.__module__ for m in METHODS.values()}
    assert all(mod.startswith(pkg.__name__ + ".") for mod in modules)
