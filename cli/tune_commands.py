"""``tune``: search merge methods, weights and parameters on a few examples per task."""

from __future__ import annotations

import json
from typing import Any

import click

from adaptermerge_cli.main import cli, emit
from adaptermerge_cli.tasks import parse_tasks, task_option


def format_tune(d: dict[str, Any], summary: str) -> str:
    return f"wrote {d['output']}\n{summary}" if d.get("output") else summary


@cli.command("tune")
@click.argument("adapters", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--base", required=True, type=str, help="The base model folder the adapters were trained on.")
@task_option("A task and its JSONL file, one per adapter in the adapters' order (repeat); NAME labels it in tables.")
@click.option(
    "--methods",
    default="linear,ties,regmean",
    show_default=True,
    help="Comma-separated registry methods to search; the budget is split evenly between them.",
)
@click.option(
    "--granularity",
    type=click.Choice(["adapter", "layer-group"]),
    default="adapter",
    show_default=True,
    help="One weight per adapter, or one per adapter and layer group (embeddings / early / middle / late thirds).",
)
@click.option("--budget", type=click.IntRange(min=1), default=120, show_default=True, help="Candidate evaluations.")
@click.option(
    "--metric",
    type=click.Choice(["loss", "exact", "char"]),
    default="loss",
    show_default=True,
    help="Score to optimise: loss (lower is better), exact match or per-character accuracy of greedy decoding.",
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the search.")
@click.option(
    "--holdout",
    type=click.FloatRange(0.0, 1.0, max_open=True),
    default=0.3,
    show_default=True,
    help="Share of each task file kept out of the search and scored at the end (0: none).",
)
@click.option(
    "--l1",
    type=click.FloatRange(min=0.0),
    default=0.05,
    show_default=True,
    help="Weight of the pull towards small weights in the objective (LoraHub's 0.05).",
)
@click.option(
    "--objective",
    type=click.Choice(["mean", "worst"]),
    default="mean",
    show_default=True,
    help="Score a candidate by its mean over the tasks (LoraHub's), or by the task it serves worst: 1 - the smallest "
    "share of its own adapter's score any task keeps.",
)
@click.option("--max-examples", type=click.IntRange(min=1), help="Use the first N rows of each task file.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Examples per batch.")
@click.option(
    "--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Where the model runs."
)
@click.option("-o", "--output", required=True, type=click.Path(), help="Output folder (must not exist or be empty).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def tune_cmd(
    adapters: tuple[str, ...],
    base: str,
    tasks: tuple[str, ...],
    methods: str,
    granularity: str,
    budget: int,
    metric: str,
    seed: int,
    holdout: float,
    l1: float,
    objective: str,
    max_examples: int | None,
    batch_size: int,
    device: str,
    output: str,
    overwrite: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Find the merge that keeps every task: a gradient-free search (CMA-ES) over methods, weights and parameters.

    Each candidate is merged in memory and scored on a few examples per task with its deltas set in place on
    BASE, loaded once; part of each task file (--holdout) is kept out of the search and scored at the end, so you
    see whether the search overfit. Writes OUTPUT/adapter (the best merge, with a model card and a recipe that
    replays it without searching), OUTPUT/tune_log.json (every candidate) and OUTPUT/tune_report.json/.png (the
    held-out scores of the winner, each method's defaults, the single adapters and the base).

    \b
    Examples:
      adaptermerge tune ./math ./code --base ./base --task math=math.jsonl --task code=code.jsonl -o ./tuned
      adaptermerge tune ./a ./b ./c --base ./base --task a=a.jsonl --task b=b.jsonl --task c=c.jsonl \\
          --methods linear,ties,tsv,regmean --granularity layer-group --budget 300 --metric char -o ./abc
      adaptermerge tune ./a ./b --base ./base --task a=a.jsonl --task b=b.jsonl --metric char --objective worst -o ./ab
    """
    from adaptermerge.tuning import tune, tune_summary

    result = tune(
        base, list(adapters), parse_tasks(tasks), methods=[m.strip() for m in methods.split(",") if m.strip()],
        granularity=granularity, budget=budget, metric=metric, seed=seed, holdout=holdout, l1=l1, objective=objective,
        out=output,
        overwrite=overwrite, max_examples=max_examples, batch_size=batch_size, device=device, progress=not quiet,
    )  # fmt: skip
    d = result.to_dict()
    if as_json:
        click.echo(json.dumps(d, indent=2, default=str))
    else:
        emit(d, False, format_tune(d, tune_summary(result)))
