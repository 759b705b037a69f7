"""The tune command spells its choices and defaults out (its help answers without importing torch); they must be
the library's own."""

from __future__ import annotations

import inspect

import click

from adaptermerge import tuning
from adaptermerge.evaluation import METRICS
from adaptermerge_cli.main import cli


def _options() -> dict[str, click.Option]:
    cmd = cli.commands["tune"]
    return {p.name: p for p in cmd.params if isinstance(p, click.Option)}


def test_tune_options_match_the_library() -> None:
    o = _options()
    assert tuple(o["granularity"].type.choices) == tuning.GRANULARITIES
    assert tuple(o["objective"].type.choices) == tuning.OBJECTIVES
    assert tuple(o["metric"].type.choices) == METRICS
    assert o["methods"].default == ",".join(tuning.DEFAULT_METHODS)
    assert o["budget"].default == tuning.DEFAULT_BUDGET
    assert o["holdout"].default == tuning.DEFAULT_HOLDOUT
    assert o["l1"].default == tuning.DEFAULT_L1
    sig = inspect.signature(tuning.tune).parameters
    for name in ("granularity", "metric", "objective", "seed", "budget", "holdout", "l1", "batch_size", "device"):
        assert o[name].default == sig[name].default, name
