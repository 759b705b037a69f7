"""The subcommands. Each parses, calls the library and prints; no math lives here."""

from __future__ import annotations

from typing import Any

import click

from adaptermerge_cli.main import cli, emit
from adaptermerge_cli.methods import MethodCommand, split_method_params
from adaptermerge_cli.tasks import parse_tasks, task_option


def format_adapter(d: dict[str, Any], verbose: bool) -> str:
    lines = [
        f"adapter     {d['path']}",
        f"base model  {d['base_model'] or '(not recorded)'}",
        f"task type   {d['task_type'] or '-'}",
        f"modules     {d['num_modules']}  ranks {', '.join(f'r={r} x{n}' for r, n in d['ranks'].items())}",
        f"dtype       {d['dtype']}   params {d['num_parameters']:,}   file {d['size_bytes'] / 1e6:.2f} MB",
        f"flags       rslora={d['use_rslora']} dora={d['use_dora']} conv1d={d['fan_in_fan_out']}"
        + (f" modules_to_save={d['modules_to_save']}" if d["modules_to_save"] else "")
        + "".join(f" trainable_tokens[{n}]={k}" for n, k in d.get("trainable_tokens", {}).items()),
    ]
    mods = d["modules"] if verbose else d["modules"][:8]
    lines.append("")
    lines.append(f"{'module':60s} {'rank':>4s} {'scaling':>8s} {'shape':>14s} {'|delta|_F':>10s}")
    for m in mods:
        shape = "x".join(map(str, m["shape"]))
        lines.append(
            f"{m['name'][-60:]:60s} {m['rank']:4d} {m.get('scaling', 1.0):8.4g} {shape:>14s} {_norm_text(m.get('delta_norm')):>10s}"
        )
    if len(d["modules"]) > len(mods):
        lines.append(f"... {len(d['modules']) - len(mods)} more (use --all or --json)")
    return "\n".join(lines)


def _norm_text(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def format_checkpoint(d: dict[str, Any]) -> str:
    lines = [
        f"checkpoint  {d['path']}",
        f"model type  {d['model_type']}  {d['architectures'] or ''}",
        f"shards      {d['num_shards']}   tensors {d['num_tensors']}   size {d['size_bytes'] / 1e6:.1f} MB",
        f"elements    {d['num_elements']:,}  by dtype {d['elements_by_dtype']}",
        f"largest     {d['largest_tensor']['name']} ({d['largest_tensor']['bytes'] / 1e6:.1f} MB)",
    ]
    if d["quantization"]:
        lines.append(
            f"quantized   {d['quantized_4bit_modules']} modules 4-bit {d['quant_types']}  config {d['quantization'].get('quant_method')}"
        )
    return "\n".join(lines)


@cli.command("inspect")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--all", "verbose", is_flag=True, help="List every module, not the first eight.")
@click.option("--no-norms", is_flag=True, help="Skip per-module delta norms (faster on huge adapters).")
def inspect_cmd(path: str, as_json: bool, verbose: bool, no_norms: bool) -> None:
    """Describe an adapter folder or a base checkpoint folder.

    For an adapter: base model, modules and ranks, scaling, dtype, parameter count and size,
    per-module delta norms, and warnings (unusual alpha/r, high rank, serving limits). For a
    checkpoint: shards, tensors, dtypes, quantization.

    \b
    Examples:
      adaptermerge inspect ./my-adapter
      adaptermerge inspect ./Llama-3-8B --json
    """
    from adaptermerge.inspection import describe
    from adaptermerge_cli.main import warn

    d = describe(path, norms=not no_norms)
    text = format_adapter(d, verbose) if d["kind"] == "adapter" else format_checkpoint(d)
    warn(d["warnings"])
    emit(d, as_json, text)


def format_combine(d: dict[str, Any]) -> str:
    from adaptermerge.layers import describe_weight

    mods = d["modules"]
    ranks = sorted({m["rank"] for m in mods})
    weights = " ".join(describe_weight(w) if isinstance(w, dict) else f"{w:.4g}" for w in d["weights"])
    lines = [
        f"wrote {d['output']}",
        f"method {d['method']}  weights {weights}  modules {len(mods)}  output ranks {ranks}",
    ]
    errs = [m["rel_error_vs_exact"] for m in mods if m.get("rel_error_vs_exact") is not None]
    if errs:  # a method that is not the weighted sum: its error is the figure, not the kept energy of its own factors
        lines.append(f"relative error vs the exact weighted sum: mean {sum(errs) / len(errs):.4f}, max {max(errs):.4f}")
    else:
        ke = [m["kept_energy"] for m in mods]
        lines.append(f"kept energy: lowest {min(ke, default=1.0):.6f}, mean {sum(ke) / max(len(ke), 1):.6f}")
    return "\n".join(lines)


@cli.command("combine", cls=MethodCommand)
@click.argument("adapters", nargs=-1, type=click.Path(exists=True, file_okay=False))
@click.option(
    "--weights",
    "weights_s",
    metavar="W [W ...]",
    help="One weight per adapter, space- or comma-separated (default: equal, summing to 1).",
)
@click.option(
    "--rank",
    type=click.IntRange(min=1),
    help="Output rank, as the method's rank rule says (svd: default the largest input rank; linear: truncates).",
)
@click.option(
    "--energy",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    help="Keep the smallest rank per module holding this fraction of ||delta||_F^2 (capped by --rank).",
)
@click.option(
    "--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Where the algebra runs."
)
@click.option(
    "--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="Output dtype (default: the inputs' dtype)."
)
@click.option(
    "--compute-dtype",
    type=click.Choice(["float32", "float64"]),
    default="float32",
    show_default=True,
    help="Precision of the algebra.",
)
@click.option("--allow-different-base", is_flag=True, help="Combine adapters whose base_model_name_or_path differ.")
@click.option(
    "--base",
    type=click.Path(exists=True, file_okay=False),
    help="Base checkpoint the adapters were trained on; needed for PiSSA/OLoRA adapters (converted to plain LoRA "
    "against it), for trained token rows (trainable_token_indices) combined with weights that do not sum to 1, and "
    "for data-aware methods (regmean).",
)
@task_option(
    "Data-aware methods (regmean): a task and its JSONL file, one per adapter in the adapters' order (repeat); "
    "its inputs are collected on BASE with that adapter."
)
@click.option(
    "--recipe",
    "recipe_path",
    type=click.Path(exists=True, dir_okay=False),
    help="Replay a recipe (adaptermerge_recipe.yaml) instead of giving adapters.",
)
@click.option(
    "-o", "--output", required=True, type=click.Path(), help="Output adapter folder (must not exist or be empty)."
)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the per-module report as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar and no warnings (errors still print).")
def combine_cmd(
    adapters: tuple[str, ...],
    weights_s: str | None,
    rank: int | None,
    energy: float | None,
    device: str,
    dtype: str | None,
    compute_dtype: str,
    allow_different_base: bool,
    base: str | None,
    tasks: tuple[str, ...],
    recipe_path: str | None,
    output: str,
    overwrite: bool,
    as_json: bool,
    quiet: bool,
    **method_kwargs: Any,
) -> None:
    """Combine LoRA adapters into one PEFT adapter folder (exact sums, SVD, TIES/DARE, subspace methods).

    Every method is listed under --method and in docs/methods.md with its formula and paper; its own
    parameters (--density, --lambda, --space, ...) follow. linear is the exact weighted sum of the deltas
    (unlike PEFT's 'linear', which is factor-linear here). The output carries a model card and a recipe that
    replays the merge byte for byte.

    \b
    Examples:
      adaptermerge combine ./math ./code --weights 0.7 0.3 -o ./math-code
      adaptermerge combine ./a ./b ./c --method svd --rank 32 -o ./abc
      adaptermerge combine ./a ./b --method ties --density 0.3 -o ./ab-ties
      adaptermerge combine ./a ./b --method dare_ties --density 0.5 --seed 1 --space core -o ./ab-dare
      adaptermerge combine ./pissa-adapter ./lora-adapter --base ./Llama-3-8B -o ./mixed
      adaptermerge combine ./a ./b --method regmean --base ./base --task a=a.jsonl --task b=b.jsonl -o ./ab-rm
      adaptermerge combine --recipe ./ab/adaptermerge_recipe.yaml -o ./ab-again
    """
    from adaptermerge.combination import combine, save_combined
    from adaptermerge.errors import UsageError
    from adaptermerge_cli.main import parse_floats, refuse_with_recipe, warn

    method, method_params = split_method_params(method_kwargs)
    if recipe_path:
        refuse_with_recipe(adapters, weights_s, rank, energy, dtype, base, tasks, method != "linear", method_params)
        from adaptermerge.recipe import load_recipe, recipe_arguments

        kwargs = recipe_arguments(load_recipe(recipe_path), recipe_path)
    else:
        if not adapters:
            raise UsageError("give at least one adapter folder (or --recipe FILE)")
        kwargs = dict(
            adapters=list(adapters),
            weights=parse_floats(weights_s, "--weights"),
            method=method,
            rank=rank,
            energy=energy,
            dtype=dtype,
            compute_dtype=compute_dtype,
            allow_different_base=allow_different_base,
            base=base,
            tasks=parse_tasks(tasks) or None,
            **method_params,
        )
    from adaptermerge.io.atomic import check_output_path

    check_output_path(
        output, [*kwargs["adapters"], *([kwargs["base"]] if kwargs.get("base") else [])], overwrite=overwrite
    )
    result = combine(**kwargs, device=device, progress=not quiet)
    out = save_combined(result, output, overwrite=overwrite)
    prov = result.provenance
    d = {
        "output": str(out),
        "method": prov["method"],
        "weights": prov["weights"],
        "params": prov.get("params", {}),
        "modules": prov["modules"],
        "warnings": result.warnings,
    }
    warn(result.warnings, quiet)
    emit(d, as_json, format_combine(d))


@cli.command("demo")
@click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False),
    default="adaptermerge-demo",
    show_default=True,
    help="Folder for everything the demo makes (must be empty or absent).",
)
@click.option("--overwrite", is_flag=True, help="Replace an earlier demo folder (only one the demo wrote).")
@click.option("--fast", is_flag=True, help="A shorter run with smaller data (what the test suite runs).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo_cmd(output: str, overwrite: bool, fast: bool, quiet: bool) -> None:
    """Run the offline end-to-end demo: train task adapters, merge them every way, evaluate everything.

    Builds a small Llama-style base with its own tokenizer and teaches it, trains a LoRA adapter per
    synthetic task, combines them with every merge method, merges into the base and into a 4-bit base,
    and evaluates every model on every task. Prints the table (with retention against each task's own
    adapter), writes results.json and results.png, and lists the folders. Nothing is downloaded; about
    2 minutes on 2 CPU cores.

    \b
    Examples:
      adaptermerge demo
      adaptermerge demo -o ./demo-out --overwrite
      adaptermerge --threads 2 demo          # torch threads (default for the demo: 1)
    """
    from adaptermerge.demo import run_demo

    threads = click.get_current_context().find_root().meta.get("adaptermerge.threads")
    run_demo(output, fast=fast, overwrite=overwrite, progress=not quiet, threads=threads or 1)
