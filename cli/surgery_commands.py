"""Model-surgery subcommands (merge, resize, extract)."""

from __future__ import annotations

from typing import Any

import click

from adaptermerge_cli.main import cli, emit, warn
from adaptermerge_cli.methods import MethodCommand, split_method_params
from adaptermerge_cli.tasks import parse_tasks, task_option


def format_merge(d: dict[str, Any]) -> str:
    mods = d["modules"]
    lines = [f"wrote {d['output']} ({d['bytes_written'] / 1e6:.1f} MB of tensors), {len(mods)} modules merged"]
    if mods:
        lines.append(f"delta / weight norm: max {max(m['delta_rel_norm'] for m in mods):.4g}")
    q = [m for m in mods if m.get("requant_rel_error") is not None]
    if q:
        lines.append(
            f"4-bit: re-quantization error vs W + delta max {max(m['requant_rel_error'] for m in q):.4f} "
            + (
                f"(plain absmax scales: {max(m['plain_requant_rel_error'] for m in q if m.get('plain_requant_rel_error') is not None):.4f})"
                if any(m.get("plain_requant_rel_error") is not None for m in q)
                else ""
            )
        )
        surv = [m["delta_survival"] for m in q if m.get("delta_survival") is not None]
        if surv:
            lines.append(
                f"4-bit: delta carried by the stored weights: mean {sum(surv) / len(surv):.2f}, min {min(surv):.2f}"
            )
    return "\n".join(lines)


@cli.command("merge", cls=MethodCommand)
@click.argument("base", metavar="BASE", required=False, type=click.Path(exists=True, file_okay=False))
@click.argument("adapters", metavar="ADAPTER [ADAPTER ...]", nargs=-1, type=click.Path(exists=True, file_okay=False))
@click.option(
    "--weights",
    "weights_s",
    metavar="W [W ...]",
    help="One weight per adapter (default: 1 for one adapter, equal otherwise).",
)
@click.option(
    "--rank",
    type=click.IntRange(min=1),
    help="Apply the method's rank rule before merging, as combine does (linear: the exact sum is added unless given).",
)
@click.option(
    "--energy",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    help="As --rank, by the fraction of ||delta||_F^2 kept per module.",
)
@click.option(
    "--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="Convert floating tensors (default: keep)."
)
@click.option(
    "--quantize",
    type=click.Choice(["nf4", "fp4"]),
    help="Write a 4-bit checkpoint of the merged weights (16-bit base), the layers transformers quantizes.",
)
@click.option("--dequantize", is_flag=True, help="4-bit base: write a 16-bit checkpoint of dequant(W4) + delta.")
@click.option(
    "--optimize-scales",
    is_flag=True,
    help="4-bit: choose each block's scale to minimise the error of W + delta (slower; default: absmax like PEFT).",
)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="Where the per-module arithmetic runs.",
)
@click.option("--allow-different-base", is_flag=True, help="Merge adapters whose base_model_name_or_path differ.")
@click.option(
    "--force",
    is_flag=True,
    help="Merge an adapter that the base's own recipe says is already merged into it (adds its delta twice).",
)
@task_option(
    "Data-aware methods (regmean): a task and its JSONL file, one per adapter in the adapters' order (repeat); "
    "its inputs are collected on BASE with that adapter."
)
@click.option("--recipe", "recipe_path", type=click.Path(exists=True, dir_okay=False), help="Replay a merge recipe.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output checkpoint folder.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--json", "as_json", is_flag=True, help="Per-module report as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar and no warnings (errors still print).")
def merge_cmd(
    base: str | None,
    adapters: tuple[str, ...],
    weights_s: str | None,
    rank: int | None,
    energy: float | None,
    dtype: str | None,
    quantize: str | None,
    dequantize: bool,
    optimize_scales: bool,
    device: str,
    allow_different_base: bool,
    force: bool,
    tasks: tuple[str, ...],
    recipe_path: str | None,
    output: str,
    overwrite: bool,
    as_json: bool,
    quiet: bool,
    **method_kwargs: Any,
) -> None:
    """Fold adapters into a base checkpoint (merge_and_unload without loading the model).

    Streams tensor by tensor: memory stays at the largest tensor, whatever the model size. The output has the
    base's tensor names, dtypes and sharding, its config and tokenizer files, a model card and a recipe.
    Several adapters are combined by --method first; elementwise methods (ties, dare_*, ...) add their dense
    result per module, nothing lost to re-factoring. 4-bit bitsandbytes bases are dequantized, merged and
    re-quantized per module, with the error reported.

    \b
    Examples:
      adaptermerge merge ./Llama-3-8B ./my-adapter -o ./merged
      adaptermerge merge ./base ./math ./code --weights 0.7 0.3 -o ./merged
      adaptermerge merge ./base ./math ./code --method ties --density 0.3 -o ./merged-ties
      adaptermerge merge ./Llama-3-8B-nf4 ./qlora-adapter -o ./merged-nf4
      adaptermerge merge ./Llama-3-8B-nf4 ./qlora-adapter --dequantize -o ./merged-bf16
      adaptermerge merge ./Llama-3-8B ./my-adapter --quantize nf4 -o ./merged-nf4
      adaptermerge merge ./base ./a ./b --method regmean --task a=a.jsonl --task b=b.jsonl -o ./merged-rm
    """
    from adaptermerge.errors import UsageError
    from adaptermerge.surgery.merge import merge_into_base
    from adaptermerge_cli.main import parse_floats, refuse_with_recipe, warn

    method, method_params = split_method_params(method_kwargs)
    if recipe_path:
        refuse_with_recipe(base, adapters, weights_s, rank, energy, dtype, quantize, dequantize, tasks, method_params)
        from adaptermerge.recipe import load_merge_recipe

        kwargs = load_merge_recipe(recipe_path)
    else:
        if not base or not adapters:
            raise UsageError("give a base checkpoint folder and at least one adapter folder")
        kwargs = dict(
            base=base,
            adapters=list(adapters),
            weights=parse_floats(weights_s, "--weights"),
            method=method,
            rank=rank,
            energy=energy,
            dtype=dtype,
            quantize=quantize,
            dequantize=dequantize,
            allow_different_base=allow_different_base,
            tasks=parse_tasks(tasks) or None,
            **method_params,
        )
    rep = merge_into_base(
        **kwargs,
        out=output,
        optimize_scales=optimize_scales,
        device=device,
        overwrite=overwrite,
        force=force,
        progress=not quiet,
        threads=click.get_current_context().meta.get("adaptermerge.threads"),
    )
    d = rep.to_dict()
    warn(rep.warnings, quiet)
    emit(d, as_json, format_merge(d))


def format_ranked(d: dict[str, Any]) -> str:
    mods = d["modules"]
    lines = [f"wrote {d['output']}: {len(mods)} modules, ranks {sorted({m['rank'] for m in mods})}"]
    if mods:
        ke = [m["kept_energy"] for m in mods]
        lines.append(f"kept energy: lowest {min(ke):.6f}, mean {sum(ke) / len(ke):.6f}")
    gaps = [m["energy_gap_estimate"] for m in mods if m.get("energy_gap_estimate") is not None]
    if gaps:
        lines.append(
            f"randomized SVD on {len(gaps)} modules: estimated kept-energy gap to the exact truncation at most {max(gaps):.2e}"
        )
    if d.get("modules_to_save"):
        lines.append(f"modules_to_save: {len(d['modules_to_save'])} tensors copied in full")
    return "\n".join(lines)


@cli.command("resize")
@click.argument("adapter", type=click.Path(exists=True, file_okay=False))
@click.option("--rank", type=click.IntRange(min=1), help="Target rank per module (cap when --energy is given).")
@click.option(
    "--energy",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    help="Keep the smallest rank holding this fraction of ||delta||_F^2.",
)
@click.option(
    "--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Where the algebra runs."
)
@click.option(
    "--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="Output dtype (default: the input's)."
)
@click.option("-o", "--output", required=True, type=click.Path(), help="Output adapter folder.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--json", "as_json", is_flag=True, help="Per-module report as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar and no warnings (errors still print).")
def resize_cmd(
    adapter: str,
    rank: int | None,
    energy: float | None,
    device: str,
    dtype: str | None,
    output: str,
    overwrite: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Re-rank one adapter by factored SVD (best rank-k per module, or by kept energy).

    \b
    Examples:
      adaptermerge resize ./my-adapter --rank 16 -o ./my-adapter-r16
      adaptermerge resize ./my-adapter --energy 0.95 --rank 64 -o ./my-adapter-small
    """
    from adaptermerge.combination import save_combined
    from adaptermerge.io.atomic import check_output_path
    from adaptermerge.surgery.resize import resize_adapter

    check_output_path(output, [adapter], overwrite=overwrite)
    result = resize_adapter(adapter, rank=rank, energy=energy, device=device, dtype=dtype, progress=not quiet)
    out = save_combined(result, output, overwrite=overwrite)
    d = {"output": str(out), "modules": result.provenance["modules"], "warnings": result.warnings}
    warn(d.get("warnings", []), quiet)
    emit(d, as_json, format_ranked(d))


@cli.command("extract")
@click.argument("base", required=False, type=click.Path(exists=True, file_okay=False))
@click.argument("tuned", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--rank", type=click.IntRange(min=1), help="Rank per module (cap when --energy is given).")
@click.option(
    "--energy",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    help="Smallest rank per module keeping this fraction of ||tuned - base||_F^2.",
)
@click.option(
    "--skip-undecomposable",
    is_flag=True,
    help="Skip changed norms/biases instead of saving their modules in full (modules_to_save).",
)
@click.option(
    "--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Where the algebra runs."
)
@click.option(
    "--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="Adapter dtype (default: the checkpoint's)."
)
@click.option(
    "--recipe",
    "recipe_path",
    type=click.Path(exists=True, dir_okay=False),
    help="Replay an extract recipe (adaptermerge_recipe.yaml) instead of giving the checkpoints.",
)
@click.option("-o", "--output", required=True, type=click.Path(), help="Output adapter folder.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--json", "as_json", is_flag=True, help="Per-module report as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar and no warnings (errors still print).")
def extract_cmd(
    base: str | None, tuned: str | None, rank: int | None, energy: float | None, skip_undecomposable: bool,
    device: str, dtype: str | None, recipe_path: str | None, output: str, overwrite: bool, as_json: bool,
    quiet: bool,
) -> None:  # fmt: skip
    """Extract a LoRA adapter approximating a fully fine-tuned checkpoint (tuned - base per layer).

    Streams both checkpoints; large modules use a randomized SVD with power iterations, and the report
    estimates how far each is from the exact truncation.

    \b
    Examples:
      adaptermerge extract ./Llama-3-8B ./Llama-3-8B-finetuned --rank 64 -o ./extracted
      adaptermerge extract ./base ./tuned --energy 0.9 --rank 128 --skip-undecomposable -o ./extracted
    """
    from adaptermerge.dtypes import resolve_dtype
    from adaptermerge.errors import UsageError
    from adaptermerge.io.atomic import check_output_path
    from adaptermerge.surgery.extract import extract_lora, save_extracted
    from adaptermerge_cli.main import refuse_with_recipe

    if recipe_path:
        refuse_with_recipe(base, tuned, rank, energy, skip_undecomposable, dtype)
        from adaptermerge.recipe import load_extract_recipe

        kwargs = load_extract_recipe(recipe_path)
    elif not (base and tuned):
        raise UsageError("give the base and the fine-tuned checkpoint folders (or --recipe FILE)")
    else:
        kwargs = dict(base=base, tuned=tuned, rank=rank, energy=energy, skip_undecomposable=skip_undecomposable,
                      dtype=dtype)  # fmt: skip
    check_output_path(output, [kwargs["base"], kwargs["tuned"]], overwrite=overwrite)
    kwargs["dtype"] = resolve_dtype(kwargs["dtype"])
    adapter, report = extract_lora(**kwargs, device=device, progress=not quiet)
    out = save_extracted(adapter, report, output, overwrite=overwrite)
    d = {"output": str(out), **report.to_dict()}
    warn(d.get("warnings", []), quiet)
    emit(d, as_json, format_ranked(d))


@cli.command("convert")
@click.argument("adapter", required=False, type=click.Path(exists=True, file_okay=False))
@click.option(
    "--base",
    type=click.Path(exists=True, file_okay=False),
    help="Base checkpoint the adapter was trained on: the init term is recomputed from it (pissa, olora).",
)
@click.option(
    "--initial-adapter",
    type=click.Path(exists=True, file_okay=False),
    help="Adapter folder saved right after get_peft_model, before training (any of pissa, pissa_niter_K, olora, "
    "corda, lora_ga).",
)
@click.option(
    "--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Where the algebra runs."
)
@click.option(
    "--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="Output dtype (default: the adapter's)."
)
@click.option("--recipe", "recipe_path", type=click.Path(exists=True, dir_okay=False), help="Replay a convert recipe.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output adapter folder.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def convert_cmd(
    adapter: str | None, base: str | None, initial_adapter: str | None, device: str, dtype: str | None,
    recipe_path: str | None, output: str, overwrite: bool, as_json: bool,
) -> None:  # fmt: skip
    """Convert a PiSSA/OLoRA/CorDA/LoRA-GA adapter into the plain LoRA adapter of the same trained model.

    These initialisations subtract an initial product from the base before training, so the trained model is
    (W0 - init) + s*B@A. The output holds s*B@A - init per module (rank 2r), as PEFT's
    save_pretrained(path_initial_model_for_weight_conversion=...) writes it: it loads on the unchanged base and
    combines or merges like any LoRA adapter. The init term comes from the base (pissa, olora: recomputed as PEFT
    does when it loads the adapter) or from the initial adapter (required for pissa_niter_K, corda, lora_ga).

    \b
    Examples:
      adaptermerge convert ./pissa-adapter --base ./Llama-3-8B -o ./pissa-as-lora
      adaptermerge convert ./pissa-niter-adapter --initial-adapter ./pissa-init -o ./as-lora
      adaptermerge convert --recipe ./pissa-as-lora/adaptermerge_recipe.yaml -o ./again
    """
    from adaptermerge.dtypes import resolve_dtype
    from adaptermerge.errors import UsageError
    from adaptermerge.io.atomic import check_output_path
    from adaptermerge.surgery.init_conversion import convert_to_plain_lora, load_convert_recipe, save_converted
    from adaptermerge_cli.main import refuse_with_recipe

    if recipe_path:
        refuse_with_recipe(adapter, base, initial_adapter, dtype)
        kwargs = load_convert_recipe(recipe_path)
    elif not adapter:
        raise UsageError("give the adapter folder to convert (or --recipe FILE)")
    else:
        kwargs = dict(adapter=adapter, base=base, initial_adapter=initial_adapter, dtype=dtype)
    out_dtype = resolve_dtype(kwargs.pop("dtype"))
    check_output_path(output, [p for p in kwargs.values() if p], overwrite=overwrite)
    result = convert_to_plain_lora(**kwargs, device=device)
    out = save_converted(result, output, dtype=out_dtype, overwrite=overwrite)
    ranks = sorted(set(result.ranks.values()))
    d = {"output": str(out), **result.provenance["converted"], "ranks": ranks, "warnings": result.warnings}
    text = [
        f"wrote {out}: init_lora_weights={d['init_lora_weights']!r} as plain LoRA, {len(result.modules)} modules, ranks {ranks}"
    ]
    warn(result.warnings)
    emit(d, as_json, "\n".join(text))
