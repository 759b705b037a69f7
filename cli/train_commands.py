"""``train`` and ``evaluate``: produce task adapters, and test them separately and together."""

from __future__ import annotations

import json
from typing import Any

import click

from adaptermerge_cli.main import cli, emit
from adaptermerge_cli.tasks import parse_tasks, task_option


def _setting_options(f: Any) -> Any:
    """The training settings (defaults as in :class:`adaptermerge.train.TrainConfig`)."""
    opts = [
        click.option("--rank", "-r", type=int, default=16, show_default=True, help="LoRA rank r."),
        click.option("--alpha", type=float, default=32.0, show_default=True, help="lora_alpha (alpha = 2r is usual)."),
        click.option("--dropout", type=float, default=0.05, show_default=True, help="lora_dropout."),
        click.option(
            "--targets",
            default="all-linear",
            show_default=True,
            help="'all-linear' (every linear layer but the output head) or names: q_proj,v_proj,...",
        ),
        click.option(
            "--quantize",
            type=click.Choice(["nf4", "fp4"]),
            help="QLoRA: load the base in 4 bits (double quantization, prepare_model_for_kbit_training).",
        ),
        click.option("--steps", type=int, help="Optimizer steps (overrides --epochs)."),
        click.option("--epochs", type=float, help="Passes over the data (default 3)."),
        click.option("--lr", type=float, default=2e-4, show_default=True, help="Learning rate."),
        click.option("--batch-size", type=int, default=4, show_default=True, help="Examples per device per step."),
        click.option("--grad-accum", type=int, default=4, show_default=True, help="Gradient accumulation steps."),
        click.option("--max-length", type=int, help="Longest tokenized example (default: model limit, <= 2048)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed (init, dropout, data order)."),
        click.option("--save-steps", type=int, help="Checkpoint (and evaluate) every N steps (default: 4 per run)."),
        click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations to save memory."),
        click.option("--bf16", is_flag=True, help="Compute in bfloat16 (base loaded in bf16; QLoRA compute dtype)."),
        click.option("--dora", is_flag=True, help="DoRA (weight-decomposed LoRA)."),
        click.option("--rslora", is_flag=True, help="rsLoRA scaling alpha/sqrt(r)."),
        click.option("--skip-bad-rows", is_flag=True, help="Leave out bad data rows (listed) instead of refusing."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


SETTING_NAMES = (
    "rank", "alpha", "dropout", "targets", "quantize", "steps", "epochs", "lr", "batch_size", "grad_accum",
    "max_length", "seed", "save_steps", "gradient_checkpointing", "bf16", "dora", "rslora", "skip_bad_rows",
)  # fmt: skip


@cli.command("train")
@click.option("--base", type=str, help="Base model folder with its tokenizer (or a Hub id already in the cache).")
@click.option(
    "--data",
    type=click.Path(dir_okay=False),
    help="Training data: JSONL rows of prompt+completion, text, or chat messages.",
)
@click.option("--eval-data", type=click.Path(dir_okay=False), help="Evaluation data (JSONL) for the eval loss.")
@_setting_options
@click.option("--recipe", "recipe_path", type=click.Path(exists=True, dir_okay=False), help="Replay a training recipe.")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint of an interrupted run.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), help="Checkpoints (default: OUT.checkpoints).")
@click.option("--keep-checkpoints", is_flag=True, help="Keep the checkpoints after a successful run.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output adapter folder.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder and discard old checkpoints.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (output, steps, losses, tokens, throughput, warnings).")  # fmt: skip
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_cmd(
    base: str | None,
    data: str | None,
    eval_data: str | None,
    recipe_path: str | None,
    resume: bool,
    checkpoint_dir: str | None,
    keep_checkpoints: bool,
    output: str,
    overwrite: bool,
    as_json: bool,
    quiet: bool,
    **settings: Any,
) -> None:
    """Train a LoRA (or QLoRA with --quantize nf4) task adapter with transformers' Trainer and PEFT.

    Data rows: {"prompt","completion"} (loss on the completion only), {"text"}, or chat {"messages":[...]}
    (rendered with the tokenizer's chat template, loss on assistant turns). The output is a PEFT adapter
    folder with a model card and a recipe that replays the run. Runs unchanged under
    `torchrun --nproc_per_node N -m adaptermerge_cli train ...` or `accelerate launch -m adaptermerge_cli train ...`.

    \b
    Examples:
      adaptermerge train --base ./base --data math.jsonl -o ./adapters/math
      adaptermerge train --base ./base --data math.jsonl --quantize nf4 --rank 64 --alpha 128 -o ./qlora
      adaptermerge train --base ./base --data math.jsonl -o ./adapters/math --resume
      adaptermerge train --recipe ./adapters/math/adaptermerge_recipe.yaml -o ./math-again
    """
    from adaptermerge.errors import UsageError
    from adaptermerge.train import TrainConfig, train_adapter
    from adaptermerge.train.run import is_main_process

    if recipe_path:
        from adaptermerge.train.outputs import load_train_recipe

        if base or data or eval_data or _given_settings(settings):
            raise UsageError("--recipe replays everything it records; give only -o/--overwrite/--resume with it")
        kwargs = load_train_recipe(recipe_path)
    else:
        if not base or not data:
            raise UsageError("give --base BASE and --data FILE.jsonl (or --recipe FILE)")
        kwargs = {"base": base, "data": data, "eval_data": eval_data, "config": TrainConfig(**settings)}
    res = train_adapter(
        **kwargs, out=output, resume=resume, overwrite=overwrite, checkpoint_dir=checkpoint_dir,
        keep_checkpoints=keep_checkpoints, progress=not quiet,
    )  # fmt: skip
    if not is_main_process():
        return
    d = {
        "output": str(res.output), "steps": res.steps, "train_loss": res.train_loss, "eval_loss": res.eval_loss,
        "tokens": res.tokens, "train_runtime": res.train_runtime, "tokens_per_second": res.tokens_per_second,
        "world_size": res.world_size, "warnings": res.warnings,
    }  # fmt: skip
    loss = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    text = (
        f"wrote {d['output']}\n"
        f"steps {res.steps}  train loss {loss(res.train_loss)}  eval loss {loss(res.eval_loss)}  "
        f"{res.tokens:,} tokens in {res.train_runtime:.1f} s ({res.tokens_per_second:,.0f} tokens/s, "
        f"{res.world_size} process{'es' if res.world_size > 1 else ''})"
    )
    emit(d, as_json, text)


def _given_settings(settings: dict[str, Any]) -> bool:
    """Whether any training setting differs from its default (not allowed beside --recipe)."""
    from adaptermerge.train import TrainConfig

    default = TrainConfig()
    return any(settings[n] != getattr(default, n) for n in SETTING_NAMES)


@cli.command("evaluate")
@click.argument("base", type=str)
@click.argument("models", nargs=-1, type=str)
@task_option("A task and its JSONL file (repeat).", dest="task_items")
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    type=click.Choice(["loss", "exact", "char"]),
    help="loss (default), exact (greedy exact match), char (per-character accuracy); repeat for several.",
)
@click.option("--max-examples", type=click.IntRange(min=1), help="Use the first N rows of each task file.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Examples per batch.")
@click.option("--max-length", type=click.IntRange(min=2), default=1024, show_default=True, help="Longest example.")
@click.option(
    "--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Where the models run."
)
@click.option("--no-base", is_flag=True, help="Leave out the base row (and the loss retention).")
@click.option("--json", "as_json", is_flag=True, help="Print the scores, retention and mean retention as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write a PNG bar chart.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def evaluate_cmd(
    base: str,
    models: tuple[str, ...],
    task_items: tuple[str, ...],
    metrics: tuple[str, ...],
    max_examples: int | None,
    batch_size: int,
    max_length: int,
    device: str,
    no_base: bool,
    as_json: bool,
    plot_path: str | None,
    quiet: bool,
) -> None:
    """Score the base, adapters and merged checkpoints on each task (test adapters before merging them).

    MODELS are adapter folders (applied to BASE, loaded once, switched with PEFT) and merged checkpoint
    folders (loaded as their own models), named by folder or NAME=PATH. An adapter named like a task is
    that task's own adapter: every model's retention on the task is measured against it.

    \b
    Examples:
      adaptermerge evaluate ./base ./adapters/math ./adapters/code --task math=math.jsonl --task code=code.jsonl
      adaptermerge evaluate ./base math=./runs/a17 ./merged --task math=m.jsonl --metric loss --metric exact
      adaptermerge evaluate ./base ./adapters/* --task math=m.jsonl --json --plot scores.png
    """
    from adaptermerge.evaluation import evaluate

    report = evaluate(
        base, list(models), parse_tasks(task_items), metrics=list(metrics) or ["loss"], max_examples=max_examples,
        device=device, batch_size=batch_size, max_length=max_length, include_base=not no_base, progress=not quiet,
    )  # fmt: skip
    d = report.to_dict()
    if plot_path:
        from adaptermerge.plot import plot_report

        d["plot"] = str(plot_report(report, plot_path))
    text = report.table() + (f"\nchart: {d['plot']}" if plot_path else "")
    if as_json:
        click.echo(json.dumps(d, indent=2))
    else:
        emit(d, False, text)
