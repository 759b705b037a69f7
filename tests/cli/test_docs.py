"""The docs name every registered method and CLI command (they are generated from the same declarations)."""

from pathlib import Path

from adaptermerge.methods.registry import METHODS, method_names
from adaptermerge_cli.main import cli

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_every_method_documented() -> None:
    text = (DOCS / "methods.md").read_text()
    for name in method_names():
        assert f"## `{name}`" in text, name
        assert METHODS[name].name in text


def test_every_command_documented() -> None:
    text = (DOCS / "cli.md").read_text()
    for name in cli.commands:
        assert f"`adaptermerge {name}" in text, name


def test_cli_option_tables_are_current() -> None:
    """docs/cli.md's option tables are generated from the commands; regenerate with the command in the message."""
    from adaptermerge_cli.docgen import blocks, render

    text = (DOCS / "cli.md").read_text()
    assert sorted(blocks(text)) == sorted(cli.commands), "every command has exactly one options block"
    assert render(text) == text, "run: python -m adaptermerge_cli.docgen docs/cli.md"
