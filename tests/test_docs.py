"""The docs name every registered method and CLI command (they are generated from the same declarations)."""

from pathlib import Path

from adaptermerge.methods.registry import METHODS, method_names
from adaptermerge_cli.main import cli

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_every_method_documented() -> None:
    text = (DOCS / "methods.md").read_text()
    for name in method_names():
        assert f"## `{name}`" in text, name
        assert METHODS[name].name in text


def test_every_command_documented() -> None:
    text = (DOCS / "cli.md").read_text()
    for name in cli.commands:
        assert f"`adaptermerge {name}" in text, name
