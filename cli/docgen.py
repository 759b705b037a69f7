"""The option tables of docs/cli.md, generated from the commands themselves (their click declarations).

Each command's section in docs/cli.md holds its table between ``<!-- options:NAME:start -->`` and
``<!-- options:NAME:end -->``; the prose around it is written by hand. ``tests/cli/test_docs.py`` fails when a
table is out of date; ``python -m adaptermerge_cli.docgen docs/cli.md`` rewrites them.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click

_BLOCK = re.compile(r"(<!-- options:([a-z-]+):start -->\n).*?(<!-- options:\2:end -->)", re.S)


def options_table(command: click.Command) -> str:
    """A markdown table of ``command``'s options: flags (with metavar or choices) and help, defaults included."""
    ctx = click.Context(command, info_name=command.name)
    rows = ["| option | meaning |", "|---|---|"]
    for param in command.get_params(ctx):
        if not isinstance(param, click.Option) or param.hidden or "--help" in param.opts:
            continue
        rows.append(f"| {_flags(param, ctx)} | {_meaning(param)} |")
    return "\n".join(rows) + "\n"


def _flags(param: click.Option, ctx: click.Context) -> str:
    names = " / ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])
    if param.is_flag or param.count:
        return names
    if isinstance(param.type, click.Choice):
        return f"{names} `{'|'.join(map(str, param.type.choices))}`".replace("|", "\\|")
    return f"{names} `{param.make_metavar(ctx)}`"


def _meaning(param: click.Option) -> str:
    if param.name == "method":  # its help lists every method; the docs link the page that explains them
        text = "Merge method, one of those listed; each one's formula, paper and parameters: [methods.md](methods.md)."
    else:
        text = " ".join((param.help or "").split())
    if param.show_default and param.default not in (None, False, ()):
        text += f" Default: `{param.default}`."
    if isinstance(param.type, click.types._NumberRangeBase) and not param.type.clamp:  # noqa: SLF001
        text += f" Range: `{param.type._describe_range()}`."  # noqa: SLF001
    if param.required:
        text += " Required."
    return text.replace("|", "\\|")


def render(text: str) -> str:
    """``text`` (docs/cli.md) with every options block regenerated from the commands."""
    from adaptermerge_cli.main import cli

    def table(m: re.Match[str]) -> str:
        command = cli.commands.get(m.group(2))
        if command is None:
            raise KeyError(f"docs/cli.md has an options block for {m.group(2)!r}, which is not a command")
        return m.group(1) + options_table(command) + m.group(3)

    return _BLOCK.sub(table, text)


def blocks(text: str) -> list[str]:
    """The command names that have an options block in ``text``."""
    return [m.group(2) for m in _BLOCK.finditer(text)]


if __name__ == "__main__":  # python -m adaptermerge_cli.docgen docs/cli.md
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/cli.md")
    path.write_text(render(path.read_text()))
