"""``--task NAME=FILE``: one parser and one option for every command that reads task files (evaluate, combine and
merge with a data-aware method, tune)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


def parse_tasks(items: tuple[str, ...]) -> dict[str, str]:
    """``NAME=FILE`` items to an ordered ``{name: file}``; malformed or repeated names are usage errors."""
    tasks: dict[str, str] = {}
    for it in items:
        name, sep, path = it.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"expected NAME=FILE.jsonl, got {it!r}", param_hint="--task")
        if name in tasks:
            raise click.BadParameter(f"task {name!r} given twice", param_hint="--task")
        tasks[name] = path
    return tasks


def task_option(help_text: str, dest: str = "tasks") -> Callable[[Any], Any]:
    """The repeatable ``--task NAME=FILE`` option."""
    return click.option("--task", dest, multiple=True, metavar="NAME=FILE", help=help_text)
