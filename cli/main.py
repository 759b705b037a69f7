"""Click application: parse, call the library, print. Errors become one line and an exit code.

Exit codes: 0 success, 1 bad data (corrupt/incompatible inputs), 2 usage errors, 130 interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from typing import Any

import click

from adaptermerge.errors import AdapterMergeError

# bitsandbytes logs at import, on CPUs with AVX512-BF16, that an optional kernel package is missing; peft imports
# it on every command. We never use that kernel, and a command's errors must stay one line on stderr.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

_FLOAT = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_MULTI_VALUE_OPTIONS = ("--weights", "--density")


def _is_number_list(tok: str) -> bool:
    parts = [x for x in tok.split(",") if x]
    return bool(parts) and all(_FLOAT.match(x) for x in parts)


def normalize_multi_values(args: list[str]) -> list[str]:
    """Turn ``--weights 0.7 0.3`` into ``--weights 0.7,0.3`` so click sees one value.

    Only tokens that are numbers (or comma-separated numbers) are gathered; anything else is left
    for click to parse and report.
    """
    out: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        i += 1
        if "=" in a and a.split("=", 1)[0] in _MULTI_VALUE_OPTIONS:  # --weights=0.7 0.3
            a, first = a.split("=", 1)
            args = [*args[:i], first, *args[i:]]
        out.append(a)
        if a in _MULTI_VALUE_OPTIONS:
            vals: list[str] = []
            while i < len(args) and _is_number_list(args[i]):
                vals.extend(x for x in args[i].split(",") if x)
                i += 1
            if vals:
                out.append(",".join(vals))
    return out


GLOBAL_FLAGS = ("--debug",)
GLOBAL_VALUED = ("--threads",)


def hoist_global_options(args: list[str]) -> list[str]:
    """Move global options given after the subcommand (``merge ... --threads 2 --debug``) in front of it.

    No subcommand defines an option of the same name, so the move never changes what a subcommand receives.
    """
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        name = a.split("=", 1)[0]
        if a in GLOBAL_FLAGS or (name in GLOBAL_VALUED and "=" in a):
            front.append(a)
        elif a in GLOBAL_VALUED and i + 1 < len(args):
            front += [a, args[i + 1]]
            i += 1
        else:
            rest.append(a)
        i += 1
    return front + rest


def parse_floats(value: str | None, name: str) -> list[float] | None:
    """Parse ``0.7,0.3`` into floats, or raise a usage error naming the option."""
    if value is None:
        return None
    try:
        vals = [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(
            f"expected numbers like '0.7 0.3' or '0.7,0.3', got {value!r}", param_hint=name
        ) from None
    if not vals:
        raise click.BadParameter("give at least one number", param_hint=name)
    return vals


def refuse_with_recipe(*given: Any) -> None:
    """A recipe replays everything it records: refuse other inputs or merge options beside it."""
    if any(g is not None and g is not False and g != () and g != {} for g in given):
        from adaptermerge.errors import UsageError

        raise UsageError("--recipe replays everything it records; give only -o/--overwrite/--device with it")


class AppGroup(click.Group):
    """A group that accepts space-separated multi-value options and maps errors to one line."""

    def main(self, args: Any = None, prog_name: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:  # type: ignore[override]
        if args is None:
            args = sys.argv[1:]
        args = hoist_global_options(normalize_multi_values(list(args)))
        if not args:  # bare `adaptermerge`: the help, not an error
            args = ["--help"]
        debug = "--debug" in args or os.environ.get("ADAPTERMERGE_DEBUG") == "1"
        if not standalone_mode:
            return super().main(args, prog_name=prog_name, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name=prog_name or "adaptermerge", standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.exceptions.UsageError as e:
            cmd = e.ctx.command_path if e.ctx else "adaptermerge"
            click.echo(f"error: {e.format_message()} (see '{cmd} --help')", err=True)
            sys.exit(2)
        except click.exceptions.Abort:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except AdapterMergeError as e:
            if debug:
                raise
            click.echo(f"error: {cli_message(str(e))}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted; no output was written", err=True)
            sys.exit(130)
        except OSError as e:
            if debug:
                raise
            click.echo(f"error: {_one_line(str(e))}", err=True)
            sys.exit(1)
        except Exception as e:  # noqa: BLE001 - the edge where everything becomes one line
            if debug:
                raise
            click.echo(
                f"error: internal error {type(e).__name__}: {_one_line(str(e))} (rerun with --debug for a traceback and report it)",
                err=True,
            )
            sys.exit(1)
        if isinstance(rv, int) and rv:
            sys.exit(rv)
        sys.exit(0)


def _one_line(msg: str) -> str:
    return " ".join(msg.split())


def cli_message(msg: str) -> str:
    """A library message as the CLI says it: the library names its parameters in backticks (`allow_different_base`),
    the CLI names the option that sets them (--allow-different-base). One line."""
    flags = _option_flags()

    def flag(m: re.Match) -> str:
        return flags.get(m.group(1), m.group(1))

    return _one_line(re.sub(r"`([a-z_][a-z0-9_]*)`", flag, msg))


def _option_flags() -> dict[str, str]:
    """Python parameter name -> the long option that sets it, over every command."""
    out: dict[str, str] = {}
    for cmd in [cli, *cli.commands.values()]:
        for p in cmd.params:
            if isinstance(p, click.Option) and p.name and p.name not in out:
                longs = [o for o in p.opts if o.startswith("--")]
                out[p.name] = longs[0] if longs else p.opts[0]
    return out


def emit(data: dict[str, Any], as_json: bool, text: str) -> None:
    """The result on stdout: ``data`` as JSON (parseable whatever else is printed) or ``text`` for people."""
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        click.echo(text)


def warn(warnings: list[str], quiet: bool = False) -> None:
    """Warnings on stderr, one line each, in the CLI's words (results stay alone on stdout)."""
    if quiet:
        return
    for w in warnings:
        click.echo(f"warning: {cli_message(w)}", err=True)


@click.group(cls=AppGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="adaptermerge", prog_name="adaptermerge")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    help="CPU threads for torch (default: torch's choice; 1 is steadier on shared machines).",
)
def cli(debug: bool, threads: int | None) -> None:
    """LoRA adapter merging and model surgery on PEFT folders and safetensors checkpoints.

    \b
    Examples:
      adaptermerge inspect ./my-adapter
      adaptermerge combine ./math ./code --weights 0.7 0.3 -o ./math-code
    """
    click.get_current_context().meta["adaptermerge.threads"] = threads
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _register() -> None:
    from adaptermerge_cli import (  # noqa: F401  (registers subcommands)
        commands,
        surgery_commands,
        train_commands,
        tune_commands,
        validate_commands,
    )

    for cmd in cli.commands.values():  # the command list shows each first sentence whole, never cut mid-phrase
        if cmd.short_help is None and cmd.help:
            first = cmd.help.strip().split("\n\n")[0]
            cmd.short_help = " ".join(first.split(". ")[0].split()).rstrip(".")


def main() -> None:
    """Console-script entry point.

    Once a command has finished (its outputs written, fsynced and renamed into place), the process ends
    with ``os._exit`` after flushing stdout/stderr: the interpreter's teardown with torch loaded takes about
    a second here and does nothing a finished command needs. ``--debug`` keeps the normal exit.
    """
    try:
        cli.main()
        code: object = 0
    except SystemExit as e:
        code = e.code
    if "--debug" in sys.argv or os.environ.get("ADAPTERMERGE_DEBUG") == "1":
        sys.exit(code)
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (``| head``) or stream: nothing left to deliver
            pass
    os._exit(code)


_register()
