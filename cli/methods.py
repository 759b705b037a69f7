"""Method options for the commands that merge (combine, merge): generated from the registry's declarations.

The registry is read when such a command is used (parsing its arguments or printing its help), not when the CLI
starts, so ``adaptermerge --help`` and the other commands never import torch for it.
"""

from __future__ import annotations

from typing import Any

import click

_TYPES = {int: click.INT, float: click.FLOAT}


def method_choice_help() -> str:
    from adaptermerge.methods.registry import METHODS, method_names

    return "Merge method: " + "; ".join(f"{n}: {METHODS[n].title}" for n in method_names()) + "."


def method_options() -> list[click.Option]:
    """``--method`` and one option per method parameter (their union over the registry)."""
    from adaptermerge.methods.registry import all_params, method_names

    opts = [
        click.Option(
            ["--method"],
            type=click.Choice(method_names()),
            default="linear",
            show_default=True,
            help=method_choice_help() + " See docs/methods.md.",
        )
    ]
    for name, uses in sorted(all_params().items()):
        p = uses[0][0]
        methods = sorted({m for _, m in uses})
        text = f"{p.help} [{', '.join(methods)}; range {p.range_text()}; default per method]"
        if p.type is bool:
            opts.append(click.Option([f"{p.option}/--no-{p.option[2:]}", name], default=None, help=text))
        else:
            kind = click.Choice(p.choices) if p.choices else _TYPES.get(p.type, click.STRING)
            opts.append(click.Option([p.option, name], type=kind, default=None, help=text))
    return opts


class MethodCommand(click.Command):
    """A command whose ``--method`` and method options come from the registry, read on first use."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if not getattr(self, "_methods_added", False):
            at = next((i for i, p in enumerate(self.params) if p.name == "rank"), len(self.params))
            self.params[at:at] = method_options()
            self._methods_added = True
        return super().get_params(ctx)


def split_method_params(kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(method, its parameters)`` out of a command's keyword arguments (the generated options; None = not given)."""
    from adaptermerge.methods.registry import all_params

    method = kwargs.pop("method", "linear")
    params = {name: kwargs.pop(name) for name in list(all_params()) if name in kwargs}
    return method, {k: v for k, v in params.items() if v is not None}
