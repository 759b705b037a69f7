"""``validate`` and ``push``: parse, call the library, print. No checks or HTTP live here."""

from __future__ import annotations

from typing import Any

import click

from adaptermerge.guidelines import SERVING_TARGETS
from adaptermerge_cli.main import cli, emit, parse_floats


@cli.command("validate")
@click.argument("path", type=click.Path())
@click.option("--base", type=click.Path(exists=True, file_okay=False), help="The base checkpoint it runs on (adapter: modules, shapes, identity, vocabulary; checkpoint: every base tensor present).")  # fmt: skip
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    type=click.Path(exists=True, file_okay=False),
    help="Repeatable. Adapter PATH: others to combine with it. Checkpoint PATH: the adapters merged into --base.",
)
@click.option("--weights", "weights_s", metavar="W [W ...]", help="One weight per adapter (default: the recipe's, else equal).")  # fmt: skip
@click.option("--probe", type=click.Path(exists=True, dir_okay=False), help="Faithfulness probes, JSONL rows of text, prompt or input_ids (default: 4 x 32 random token ids, fixed seed).")  # fmt: skip
@click.option("--tolerance", type=float, help="Largest accepted relative logit error of a merged checkpoint (default: 1e-4 fp32, 1e-2 fp16, 5e-2 bf16; 4-bit merges get a drift warning unless given).")  # fmt: skip
@click.option("--for", "target", type=click.Choice(SERVING_TARGETS), help="Also check what this serving target accepts.")  # fmt: skip
@click.option("--write-card", is_flag=True, help="Add the validation summary to PATH's README.md.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the whole report as JSON (schema, ok, path, kind, inputs, summary, checks).",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def validate_cmd(
    path: str, base: str | None, adapters: tuple[str, ...], weights_s: str | None, probe: str | None,
    tolerance: float | None, target: str | None, write_card: bool, as_json: bool, quiet: bool,
) -> int:  # fmt: skip
    """Check an adapter or a merged checkpoint before it ships; exit 1 when a check fails.

    \b
    Adapter: files, NaN/Inf, ranks/shapes/keys, dtype, flags, delta norms and outliers, effective rank,
    anti-patterns; with --base: modules and shapes in the base, base identity, vocabulary; with --adapter:
    whether they combine and how much they interfere. Merged checkpoint: every base tensor present, dtypes,
    NaN/Inf, and with --base and --adapter (or its merge recipe) the logits of the merged model against
    base + adapters run unmerged in PEFT.

    \b
    Examples:
      adaptermerge validate ./my-adapter --base ./Llama-3-8B --for vllm
      adaptermerge validate ./math --adapter ./code --weights 0.7 0.3
      adaptermerge validate ./merged --base ./Llama-3-8B --adapter ./my-adapter --json
    """
    from adaptermerge.validation import validate

    report = validate(
        path,
        base=base,
        adapters=list(adapters),
        weights=parse_floats(weights_s, "--weights"),
        probe=probe,
        tolerance=tolerance,
        target=target,
        write_card=write_card,
        progress=not quiet,
    )
    emit(report.to_dict(), as_json, report.to_text())
    return 0 if report.ok else 1


def format_push(d: dict[str, Any]) -> str:
    head = "dry run: would upload" if d["dry_run"] else "uploaded"
    where = f"branch {d['revision'] or 'main'}, {'private' if d['private'] else 'public'} if created"
    lines = [f"{head} {len(d['files'])} files ({_size(d['total_bytes'])}) to {d['repo_id']} ({where})"]
    width = max(len(f["path"]) for f in d["files"])
    lines += [f"  {f['path']:{width}s}  {_size(f['size']):>10s}" for f in d["files"]]
    card = d["card"]
    if card is None:
        lines.append("card: none")
    else:
        lines.append(
            f"card: library_name {card.get('library_name')}, base_model {card.get('base_model', '-')}, "
            f"tags {', '.join(card.get('tags') or [])}"
        )
    token = (
        f"from {d['token_source']} (not shown)" if d["token_source"] else "none found (set HF_TOKEN or `hf auth login`)"
    )
    lines.append(f"token: {token}")
    if d["dry_run"] and d["card_text"]:
        lines += ["", "--- README.md ---", d["card_text"].rstrip(), "--- end of README.md ---"]
    if not d["dry_run"]:
        lines.append(f"commit: {d['commit_url']}")
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


@cli.command("push")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", help="Branch to commit to (created from main when missing).")
@click.option("--message", help="Commit message.")
@click.option("--dry-run", is_flag=True, help="List the files, sizes and card; send nothing.")
@click.option("--require-valid", is_flag=True, help="Refuse to push when `adaptermerge validate PATH` fails.")
@click.option("--base", type=click.Path(exists=True, file_okay=False), help="With --require-valid: the base to validate against.")  # fmt: skip
@click.option("--adapter", "adapters", multiple=True, type=click.Path(exists=True, file_okay=False), help="With --require-valid: adapters (repeatable).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def push_cmd(
    path: str, repo_id: str, private: bool, revision: str | None, message: str | None, dry_run: bool,
    require_valid: bool, base: str | None, adapters: tuple[str, ...], as_json: bool,
) -> None:  # fmt: skip
    """Upload an output folder to the Hugging Face Hub (repo created if needed).

    The token comes from HF_TOKEN or the stored login (`hf auth login`) and is never printed. HF_ENDPOINT
    selects another Hub.

    \b
    Examples:
      adaptermerge push ./merged me/llama-math-code --dry-run
      adaptermerge push ./my-adapter me/my-adapter --private --require-valid
      adaptermerge push ./merged me/llama-math-code --revision v2 --message "merge v2"
    """
    from adaptermerge.errors import UsageError
    from adaptermerge.hub import push

    if (base or adapters) and not require_valid:
        raise UsageError("--base/--adapter are only used with --require-valid")
    result = push(
        path,
        repo_id,
        private=private,
        revision=revision,
        message=message,
        dry_run=dry_run,
        require_valid=require_valid,
        validate_options={"base": base, "adapters": list(adapters)},
    )
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    d = result.to_dict()
    emit(d, as_json, format_push(d))
