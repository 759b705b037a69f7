"""The exported method table is consistent with the params dataclasses and functions it points to."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from adaptermerge.errors import UsageError
from adaptermerge.methods.catalog import OUTPUT_RANK_RULES, SPACES, MethodInfo
from adaptermerge.methods.subspace import SUBSPACE_METHODS
from adaptermerge.methods.task_arithmetic import ELEMENTWISE_METHODS

ALL: tuple[MethodInfo, ...] = ELEMENTWISE_METHODS + SUBSPACE_METHODS
ISSUE_11 = {
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "tsv",
    "iso_c",
    "iso_cts",
    "wudi",
}


def test_every_method_of_the_issue_is_declared_once():
    names = [m.name for m in ALL]
    assert len(names) == len(set(names))
    assert set(names) == ISSUE_11


@pytest.mark.parametrize("method", ALL, ids=lambda m: m.name)
def test_declaration_matches_the_dataclass_and_function(method: MethodInfo):
    fields = {f.name: f for f in dataclasses.fields(method.params_cls)}
    for p in method.params:
        assert p.attr in fields, (method.name, p.attr)
        assert fields[p.attr].default == p.default, (method.name, p.name)
        assert p.type in (float, int, bool)
    undeclared = set(fields) - {p.attr for p in method.params}
    # dataclasses shared by two methods may carry a field the other uses (normalize for dare_linear, ...)
    assert undeclared <= {"normalize"}, (method.name, undeclared)
    assert method.kind in ("elementwise", "factored")
    assert set(method.spaces) <= set(SPACES) and method.spaces
    assert method.output_rank in OUTPUT_RANK_RULES
    assert method.paper and method.url.startswith("https://") and method.formula
    params = list(inspect.signature(method.fn).parameters)
    expected = ["tensors", "weights", "params", "generator"] if method.kind == "elementwise" else ["terms", "params"]
    assert params == expected
    assert method.stochastic == any(p.name == "seed" for p in method.params)


@pytest.mark.parametrize("method", ALL, ids=lambda m: m.name)
def test_make_params_uses_cli_names_and_refuses_unknown_ones(method: MethodInfo):
    default = method.make_params()
    assert default == method.params_cls()
    scaled = method.make_params(**{"lambda": 0.5})
    assert scaled.lambda_ == 0.5
    with pytest.raises(UsageError, match="no parameter"):
        method.make_params(bogus=1)
    with pytest.raises(UsageError):
        method.make_params(**{"lambda": float("inf")})


def test_ranges_print_for_the_docs():
    by_name = {p.name: p for m in ALL for p in m.params}
    assert by_name["density"].describe_range() == "(0, 1]"
    assert by_name["gamma"].describe_range() == "[0, 1)"
    assert by_name["lambda"].describe_range() == "any"
    assert by_name["seed"].describe_range() == "[0, inf)"
