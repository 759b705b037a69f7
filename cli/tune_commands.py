"""``tune``: search merge methods, weights and parameters on a few examples per task; ``distill``: refine a merge
until it behaves like each task's own adapter on that task's examples."""

from __future__ import annotations

import json
from typing import Any

import click

from adaptermerge.distillation import DistillSettings
from adaptermerge_cli.main import cli, emit
from adaptermerge_cli.tasks import parse_tasks, task_option


def format_tune(d: dict[str, Any], summary: str) -> str:
    return f"wrote {d['output']}\n{summary}" if d.get("output") else summary


def distill_options(prefix: str) -> Any:
    """``--{prefix}steps``, ``--{prefix}lr`` and ``--{prefix}batch-size``: one declaration for distill and tune."""
    d = DistillSettings()
    zero = "; 0 (the default): no distillation" if prefix else ""
    opts = [
        click.option(
            f"--{prefix}steps", type=click.IntRange(min=0 if prefix else 1), default=0 if prefix else d.steps,
            show_default=True, help=f"Distillation steps (each takes a batch from every task){zero}.",
        ),
        click.option(f"--{prefix}lr", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=d.lr, show_default=True,
                     help="Distillation learning rate (Adam, on the merged factors)."),
        click.option(f"--{prefix}batch-size", type=click.IntRange(min=1), default=d.batch_size, show_default=True,
                     help="Rows per task per distillation step."),
    ]  # fmt: skip

    def wrap(f: Any) -> Any:
        for o in reversed(opts):
            f = o(f)
        return f

    return wrap


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
@distill_options("distill-")
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
    distill_steps: int,
    distill_lr: float,
    distill_batch_size: int,
    quiet: bool,
) -> None:
    """Find the merge that keeps every task: a gradient-free search (CMA-ES) over methods, weights and parameters.

    Each candidate is merged in memory and scored on a few examples per task with its deltas set in place on
    BASE, loaded once; part of each task file (--holdout) is kept out of the search and scored at the end, so you
    see whether the search overfit. With --distill-steps N the winner is then refined by distillation on the same
    tuning rows (see `adaptermerge distill`) and the held-out table shows it before and after. Writes OUTPUT/adapter (the best merge, with a model card and a recipe that
    replays it without searching), OUTPUT/tune_log.json (every candidate) and OUTPUT/tune_report.json/.png (the
    held-out scores of the winner, each method's defaults, the single adapters and the base).

    \b
    Examples:
      adaptermerge tune ./math ./code --base ./base --task math=math.jsonl --task code=code.jsonl -o ./tuned
      adaptermerge tune ./a ./b ./c --base ./base --task a=a.jsonl --task b=b.jsonl --task c=c.jsonl \\
          --methods linear,ties,tsv,regmean --granularity layer-group --budget 300 --metric char -o ./abc
      adaptermerge tune ./a ./b --base ./base --task a=a.jsonl --task b=b.jsonl --metric char --objective worst -o ./ab
      adaptermerge tune ./a ./b --base ./base --task a=a.jsonl --task b=b.jsonl --distill-steps 300 -o ./ab
    """
    from adaptermerge.tuning import tune, tune_summary

    if not distill_steps:
        from click.core import ParameterSource

        ctx = click.get_current_context()
        if given := [n for n in ("distill_lr", "distill_batch_size") if ctx.get_parameter_source(n) is ParameterSource.COMMANDLINE]:  # fmt: skip
            raise click.UsageError(f"--{given[0].replace('_', '-')} takes effect with --distill-steps N only")
    distill = (
        DistillSettings(steps=distill_steps, lr=distill_lr, batch_size=distill_batch_size, seed=seed)
        if distill_steps
        else None
    )
    result = tune(
        base, list(adapters), parse_tasks(tasks), methods=[m.strip() for m in methods.split(",") if m.strip()],
        granularity=granularity, budget=budget, metric=metric, seed=seed, holdout=holdout, l1=l1, objective=objective,
        out=output,
        overwrite=overwrite, max_examples=max_examples, batch_size=batch_size, device=device, progress=not quiet,
        distill=distill,
    )  # fmt: skip
    d = result.to_dict()
    if as_json:
        click.echo(json.dumps(d, indent=2, default=str))
    else:
        emit(d, False, format_tune(d, tune_summary(result)))


@cli.command("distill")
@click.argument("adapters", nargs=-1, type=click.Path(exists=True, file_okay=False))
@click.option("--base", type=str, help="The base model folder the adapters were trained on.")
@task_option("A task and its JSONL file, one per adapter in the adapters' order (repeat); every row is used.")
@click.option(
    "--init",
    default="regmean",
    show_default=True,
    help="The registry method whose merge (at its defaults, with --weights) the distillation starts from.",
)
@click.option("--weights", type=str, help="The init method's weights, e.g. 0.5 0.3 0.2 (default: its own).")
@distill_options("")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the batch order.")
@click.option("--max-length", type=click.IntRange(min=2), default=1024, show_default=True, help="Tokens kept per row.")
@click.option(
    "--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Where the model runs."
)
@click.option("--recipe", "recipe_path", type=click.Path(exists=True, dir_okay=False), help="Replay a distill recipe.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output folder (must not exist or be empty).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def distill_cmd(
    adapters: tuple[str, ...],
    base: str | None,
    tasks: tuple[str, ...],
    init: str,
    weights: str | None,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    max_length: int,
    device: str,
    recipe_path: str | None,
    output: str,
    overwrite: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Merge adapters, then train the merge until it behaves like each task's own adapter on that task's examples.

    Starts from a merge (--init, RegMean by default) and trains its factors (same rank; the base never changes)
    so that on each task's rows the next-token distributions of BASE with the merge match those of BASE with that
    task's adapter (mean KL over every token). Data-free and per-module methods cannot see how module errors add
    up through the layers; distillation does, and keeps far more of every task on conflicting tasks (docs/distill.md).
    Writes an adapter folder with a model card and a recipe that replays both stages (--recipe).

    \b
    Examples:
      adaptermerge distill ./math ./code --base ./base --task math=math.jsonl --task code=code.jsonl -o ./mc
      adaptermerge distill ./a ./b ./c --base ./base --task a=a.jsonl --task b=b.jsonl --task c=c.jsonl \\
          --init ties --steps 500 --lr 5e-4 -o ./abc
      adaptermerge distill --recipe ./mc/adaptermerge_recipe.yaml -o ./mc-again
    """
    from click.core import ParameterSource

    from adaptermerge.distillation import distill, distill_summary, load_distill_recipe, save_distilled
    from adaptermerge.errors import UsageError
    from adaptermerge.io.atomic import check_output_path
    from adaptermerge_cli.main import parse_floats, refuse_with_recipe

    if recipe_path:
        ctx = click.get_current_context()
        typed = [
            n
            for n in ("init", "steps", "lr", "batch_size", "seed", "max_length")
            if ctx.get_parameter_source(n) is ParameterSource.COMMANDLINE
        ]
        refuse_with_recipe(adapters, base, tasks, weights, typed or None)
        check_output_path(output, overwrite=overwrite)  # before the init is made again (it may read the base)
        kwargs = load_distill_recipe(recipe_path)
    else:
        if not adapters or not base or not tasks:
            raise UsageError("give the adapters, --base and one --task per adapter (or --recipe FILE)")
        kwargs = {
            "base": base, "adapters": list(adapters), "tasks": parse_tasks(tasks), "init": init,
            "weights": parse_floats(weights, "--weights"),
            "settings": DistillSettings(steps=steps, lr=lr, batch_size=batch_size, seed=seed, max_length=max_length),
        }  # fmt: skip
    inputs = [getattr(a, "source", a) for a in kwargs["adapters"]] + [kwargs["base"]]
    check_output_path(output, [p for p in inputs if p], overwrite=overwrite)  # before any training
    merged = distill(**kwargs, device=device, progress=not quiet)
    path = save_distilled(merged, output, overwrite=overwrite)
    d = {"output": str(path), "distill": merged.provenance["distill"], "method": merged.provenance["method"]}
    emit(d, as_json, f"wrote {path}\n{distill_summary(merged)}")
