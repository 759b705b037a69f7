"""The subcommands. Each parses, calls the library and prints; no math lives here."""

from __future__ import annotations

from typing import Any

import click

from adaptermerge_cli.main import cli, emit


def format_adapter(d: dict[str, Any], verbose: bool) -> str:
    lines = [
        f"adapter     {d['path']}",
        f"base model  {d['base_model'] or '(not recorded)'}",
        f"task type   {d['task_type'] or '-'}",
        f"modules     {d['num_modules']}  ranks {', '.join(f'r={r} x{n}' for r, n in d['ranks'].items())}",
        f"dtype       {d['dtype']}   params {d['num_parameters']:,}   file {d['size_bytes'] / 1e6:.2f} MB",
        f"flags       rslora={d['use_rslora']} dora={d['use_dora']} conv1d={d['fan_in_fan_out']}"
        + (f" modules_to_save={d['modules_to_save']}" if d["modules_to_save"] else ""),
    ]
    mods = d["modules"] if verbose else d["modules"][:8]
    lines.append("")
    lines.append(f"{'module':60s} {'rank':>4s} {'scaling':>8s} {'shape':>14s} {'|delta|_F':>10s}")
    for m in mods:
        shape = "x".join(map(str, m["shape"]))
        lines.append(f"{m['name'][-60:]:60s} {m['rank']:4d} {m.get('scaling', 1.0):8.4g} {shape:>14s} {m.get('delta_norm', float('nan')):10.4g}")
    if len(d["modules"]) > len(mods):
        lines.append(f"... {len(d['modules']) - len(mods)} more (use --all or --json)")
    for w in d["warnings"]:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def format_checkpoint(d: dict[str, Any]) -> str:
    lines = [
        f"checkpoint  {d['path']}",
        f"model type  {d['model_type']}  {d['architectures'] or ''}",
        f"shards      {d['num_shards']}   tensors {d['num_tensors']}   size {d['size_bytes'] / 1e6:.1f} MB",
        f"elements    {d['num_elements']:,}  by dtype {d['elements_by_dtype']}",
        f"largest     {d['largest_tensor']['name']} ({d['largest_tensor']['bytes'] / 1e6:.1f} MB)",
    ]
    if d["quantization"]:
        lines.append(f"quantized   {d['quantized_4bit_modules']} modules 4-bit {d['quant_types']}  config {d['quantization'].get('quant_method')}")
    for w in d["warnings"]:
        lines.append(f"warning: {w}")
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

    d = describe(path, norms=not no_norms)
    text = format_adapter(d, verbose) if d["kind"] == "adapter" else format_checkpoint(d)
    emit(d, as_json, text)
