"""Benchmark ``adaptermerge merge`` into a bitsandbytes NF4 checkpoint against transformers + PEFT.

Inputs (built once and cached in ``--work``, since quantizing takes minutes on 2 cores):

- a Llama-shaped checkpoint (hidden 2048, MLP 5632, 8 layers, vocab 32000 by default) with random N(0, 0.02)
  weights, saved bf16 (``bench_merge.build_checkpoint``), then loaded by transformers with
  ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)`` on CPU
  and saved with ``save_pretrained``: the NF4 checkpoint (about 474 MB at 8 layers);
- a rank-16 all-linear PEFT adapter (``LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
  init_lora_weights=False)`` on the bf16 model, saved with PEFT's ``save_pretrained``), with each module's
  ``lora_B`` rescaled so that ``||delta||_F = --delta-ratio x ||W||_F`` (default 2%, a typical fine-tune; PEFT's
  default-initialised random factors would give deltas larger than the weights).

Contenders, each in a fresh subprocess timed end to end (interpreter start and imports included), with its own
peak RSS (``ru_maxrss`` of the child, read by ``bench_merge``'s wrapper), round-robin for ``--repeat`` rounds
(default 3) with a warm page cache, judged on medians:

1. ``copy+fsync``: ``cp -r`` of the NF4 checkpoint and ``sync`` of the copied files (a durable copy, the floor of
   any tool that rewrites the checkpoint; adaptermerge fsyncs its output before renaming it into place);
2. ``adaptermerge``: the CLI, ``adaptermerge merge BASE ADAPTER -o OUT --quiet``;
3. ``library``: ``merge_into_base(BASE, ADAPTER, OUT)`` in a fresh interpreter, and ``library, no report``:
   the same with the per-module 4-bit error report switched off (``FourBit.report = False``): the difference
   is the report's cost;
4. ``transformers+peft``: ``AutoModelForCausalLM.from_pretrained(BASE, device_map="cpu")`` +
   ``PeftModel.from_pretrained`` + ``merge_and_unload()``. It does not save: transformers 5 cannot
   ``save_pretrained`` a pre-quantized model after changing it (see docs/formats-bnb4.md), so this contender
   does less work than ours;
5. ``import torch``: the floor of any tool built on torch.

Then (``--check``, default on) the errors of both merges against ``dequant(W4) + delta`` on a few modules
(ours must be no worse than PEFT's), and (``--growth``) our peak RSS on checkpoints with more layers, to show
that it does not grow with the model. ``--profile`` adds a cProfile of ``merge_into_base`` in-process.

Goals (issue 10): our wall time <= transformers + PEFT's load + ``merge_and_unload``; the error report at most
10% of our time; peak RSS bounded by the largest module, not growing with the model.

Usage::

    python benchmarks/bench_merge4.py                       # 8 layers, 3 rounds (~6 min; first run builds ~5 min)
    python benchmarks/bench_merge4.py --quick               # 2 layers, 1 round, no growth (~1.5 min after build)
    python benchmarks/bench_merge4.py --growth 4 8 16 --threads 1 --json merge4.json

The exit status is 1 when a goal or the correctness check fails. Sizes are decimal (1 MB = 10^6 bytes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_merge as bm  # noqa: E402  (the shared checkpoint builder and process wrapper)

BUILD_VERSION = 1  # bump when the inputs change, so cached ones are rebuilt
REPORT_GOAL = 0.10  # goal: the error report costs at most 10% of the merge
MB = 1e6

PEFT_MODE, LIBRARY_MODE, PROFILE_MODE, CHECK_MODE = "_peft", "_library", "_profile", "_check"
CHECK_MODULES = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


# --------------------------------------------------------------------------------------------------------------
# the inputs (cached)


def build_inputs(work: Path, shape: bm.Shape, delta_ratio: float) -> dict[str, Any]:
    """The NF4 checkpoint and the adapter for ``shape`` in ``work`` (reused when already built the same way)."""
    key = {"build": BUILD_VERSION, "shape": asdict(shape), "delta_ratio": delta_ratio}
    folder = work / f"llama-{shape.hidden}x{shape.layers}-{shape.intermediate}-r{delta_ratio:g}"
    meta_path = folder / "inputs.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            return meta
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    dense = bm.build_checkpoint(folder / "bf16", shape, 10**12)
    t1 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "_quantize", str(folder / "bf16"), str(folder / "nf4")], check=True)
    t2 = time.perf_counter()
    subprocess.run(
        [sys.executable, __file__, "_adapter", str(folder / "bf16"), str(folder / "adapter"), str(delta_ratio)],
        check=True,
    )
    t3 = time.perf_counter()
    shutil.rmtree(folder / "bf16")
    meta = {
        "key": key,
        "base": str(folder / "nf4"),
        "adapter": str(folder / "adapter"),
        "base_bytes": bm.folder_bytes(folder / "nf4"),
        "adapter_bytes": bm.folder_bytes(folder / "adapter"),
        "largest_module_fp32_bytes": 4 * max(o * i for o, i in shape.linear_shapes().values()),
        "largest_tensor_bytes": dense["largest_tensor_bytes"],
        "build_s": {"bf16": t1 - t0, "quantize": t2 - t1, "adapter": t3 - t2},
    }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def quantize_child(bf16: str, out: str) -> None:
    """transformers + bitsandbytes quantize the bf16 checkpoint to NF4 (double quantization) on CPU and save it."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(bf16, quantization_config=cfg, device_map="cpu", dtype=torch.bfloat16)
    model.save_pretrained(out)


def adapter_child(bf16: str, out: str, delta_ratio: str) -> None:
    """A rank-16 all-linear PEFT adapter on the bf16 model, ``lora_B`` scaled so ``||delta|| = ratio * ||W||``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.bfloat16)
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    pm = get_peft_model(model, cfg)
    with torch.no_grad():
        for mod in pm.modules():
            if not hasattr(mod, "lora_A") or "default" not in mod.lora_A:
                continue
            a, b = mod.lora_A["default"].weight.float(), mod.lora_B["default"].weight.float()
            s = mod.scaling["default"]
            # ||B A||_F^2 = trace((B^T B)(A A^T)): the delta's norm without forming it
            dn = s * math.sqrt(float(((b.T @ b) * (a @ a.T)).sum()))
            wn = float(mod.base_layer.weight.float().norm())
            mod.lora_B["default"].weight.mul_(float(delta_ratio) * wn / dn)
    pm.save_pretrained(out)


# --------------------------------------------------------------------------------------------------------------
# contenders


def peft_child(base: str, adapter: str) -> None:
    """transformers + PEFT, the usual way (no save: transformers cannot save it); prints each phase's time."""
    t = [time.perf_counter()]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t.append(time.perf_counter())
    model = AutoModelForCausalLM.from_pretrained(base, device_map="cpu")
    t.append(time.perf_counter())
    pm = PeftModel.from_pretrained(model, adapter)
    t.append(time.perf_counter())
    pm.merge_and_unload()
    t.append(time.perf_counter())
    names = ["import", "load_model", "load_adapter", "merge_and_unload"]
    print("@@PHASES " + json.dumps({n: b - a for n, a, b in zip(names, t, t[1:])}), flush=True)


def library_child(base: str, adapter: str, out: str, report: str) -> None:
    """``merge_into_base`` in a fresh interpreter, with the 4-bit error report on or off; prints phase times."""
    t = [time.perf_counter()]
    from adaptermerge.surgery import quant
    from adaptermerge.surgery.merge import merge_into_base

    t.append(time.perf_counter())
    quant.FourBit.report = report == "1"
    merge_into_base(base, adapter, out)
    t.append(time.perf_counter())
    print("@@PHASES " + json.dumps({"import": t[1] - t[0], "merge_into_base": t[2] - t[1]}), flush=True)


def profile_child(base: str, adapter: str, out: str) -> None:
    """``bench_merge.profile_child`` with the 16 functions of most own time."""
    bm.profile_child(base, adapter, out, top=16)


def contenders(base: Path, adapter: Path, outs: dict[str, Path]) -> dict[str, list[str]]:
    """name -> command line; each writes (if anything) to ``outs[name]``."""
    me = str(Path(__file__).resolve())
    b, a, o = str(base), str(adapter), {k: str(v) for k, v in outs.items()}
    return {
        "import torch": [sys.executable, "-c", "import torch"],
        "copy+fsync": ["sh", "-c", 'cp -r "$1" "$2" && sync "$2"/*', "sh", b, o["copy+fsync"]],
        "adaptermerge": [*bm.cli_command(), "merge", b, a, "-o", o["adaptermerge"], "--quiet"],
        "library": [sys.executable, me, LIBRARY_MODE, b, a, o["library"], "1"],
        "library, no report": [sys.executable, me, LIBRARY_MODE, b, a, o["library, no report"], "0"],
        "transformers+peft": [sys.executable, me, PEFT_MODE, b, a],
    }


def rounds_of(cmds: dict[str, list[str]], outs: dict[str, Path], base: Path, adapter: Path, repeat: int, env):
    """Every contender ``repeat`` times, round-robin (a noisy minute hits all alike); name -> list of runs."""
    rounds: dict[str, list[dict[str, Any]]] = {}
    for i in range(repeat):
        print(f"round {i + 1}/{repeat}:", flush=True)
        names = list(cmds)
        if i % 2:  # the report's pair in either order, so that neither always runs first
            a, b = names.index("library"), names.index("library, no report")
            names[a], names[b] = names[b], names[a]
        for name in names:
            cmd, out = cmds[name], outs.get(name)
            if out is not None:
                shutil.rmtree(out, ignore_errors=True)
            bm.prepare("warm", base, adapter)
            la = bm.loadavg()
            r = bm.measure(cmd, env)
            r["loadavg_before"] = la
            rounds.setdefault(name, []).append(r)
            ph = r.get("phases", {})
            print(
                f"  {name:<20} {r['wall_s']:7.2f} s wall {r['cpu_s']:7.2f} s cpu  peak RSS {r['rss_bytes'] / MB:6.0f} MB"
                f"  (load {la})" + ("  " + ", ".join(f"{k} {v:.2f}" for k, v in ph.items()) if ph else ""),
                flush=True,
            )
            if out is not None and name != "adaptermerge":
                shutil.rmtree(out, ignore_errors=True)
    return rounds


# --------------------------------------------------------------------------------------------------------------
# correctness: both merges against dequant(W4) + delta


def check_child(base: str, adapter: str, ours: str) -> None:
    """Relative error ``||W' - (dequant(W4) + delta)|| / ||dequant(W4) + delta||`` of PEFT's merged 4-bit weight and
    of ours (read from our output with our own codec), on the first and last layer's CHECK_MODULES."""
    import bitsandbytes as bnb
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from adaptermerge.io import bnb4
    from adaptermerge.io.checkpoint import open_checkpoint

    model = AutoModelForCausalLM.from_pretrained(base, device_map="cpu")
    layers = model.config.num_hidden_layers
    names = [f"model.layers.{i}.{m}" for i in sorted({0, layers - 1}) for m in CHECK_MODULES]
    ckpt = open_checkpoint(Path(base))
    out_ckpt = open_checkpoint(Path(ours))

    def group(ck, folder: str, name: str) -> dict[str, torch.Tensor]:
        keys = bnb4.group_quantized(list(ck.weight_map))[name + ".weight"]
        res = {}
        for k in keys:
            with safe_open(str(Path(folder) / ck.weight_map[k]), "pt") as fh:
                res[k] = fh.get_tensor(k)
        return res

    w4 = {n: bnb4.dequantize(group(ckpt, base, n), n + ".weight") for n in names}
    pm = PeftModel.from_pretrained(model, adapter)
    mods = dict(pm.base_model.model.named_modules())
    deltas = {n: mods[n].get_delta_weight("default").float() for n in names}
    merged = dict(pm.merge_and_unload().named_modules())
    rows = {}
    for n in names:
        lin = merged[n]
        assert isinstance(lin, bnb.nn.Linear4bit)
        st = lin.weight.quant_state.as_dict(packed=True)
        theirs = bnb4.dequantize({n + ".weight": lin.weight.data, **{f"{n}.weight.{k}": v for k, v in st.items()}},
                                 n + ".weight")  # fmt: skip
        ours_w = bnb4.dequantize(group(out_ckpt, ours, n), n + ".weight")
        target = w4[n] + deltas[n]
        tn = float(target.norm())
        rows[n] = {"peft": float((theirs - target).norm()) / tn, "ours": float((ours_w - target).norm()) / tn}
    print("@@CHECK " + json.dumps(rows), flush=True)


def run_check(base: Path, adapter: Path, ours: Path, env: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), CHECK_MODE, str(base), str(adapter), str(ours)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    lines = [x for x in proc.stdout.splitlines() if x.startswith("@@CHECK ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"check failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = json.loads(lines[0][len("@@CHECK ") :])
    ok = all(r["ours"] <= r["peft"] + 1e-6 for r in rows.values())
    worst = max(rows.values(), key=lambda r: r["ours"] - r["peft"])
    print(
        f"correctness: {len(rows)} modules, error vs dequant(W4) + delta: ours {median([r['ours'] for r in rows.values()]):.4f}"
        f", PEFT {median([r['peft'] for r in rows.values()]):.4f} (medians); worst ours - PEFT "
        f"{worst['ours'] - worst['peft']:+.2e} -> {bm.verdict(ok)}",
        flush=True,
    )
    return {"modules": rows, "ok": ok}


# --------------------------------------------------------------------------------------------------------------
# main


def median(xs: list[float]) -> float:
    return bm.median(xs)


def summary(rounds: dict[str, list[dict[str, Any]]], meta: dict[str, Any], baseline_rss: int) -> dict[str, Any]:
    """Medians, ratios and the goals."""
    runs = {
        n: {
            "wall_s": median([r["wall_s"] for r in rs]),
            "wall_s_all": [r["wall_s"] for r in rs],
            "cpu_s": median([r["cpu_s"] for r in rs]),
            "rss_bytes": max(r["rss_bytes"] for r in rs),
            **(
                {"phases": {k: median([r["phases"][k] for r in rs]) for k in rs[0]["phases"]}}
                if "phases" in rs[0]
                else {}
            ),
        }
        for n, rs in rounds.items()
    }
    ours, peft, durable = runs["adaptermerge"], runs["transformers+peft"], runs["copy+fsync"]
    share = report_share(rounds["library"], rounds["library, no report"])
    rss_over = ours["rss_bytes"] - baseline_rss
    res = {
        "runs": runs,
        "time_ratio_vs_peft": ours["wall_s"] / peft["wall_s"],
        "time_ok": ours["wall_s"] <= peft["wall_s"],
        "report_share": share,
        "report_ok": share["end_to_end"] <= REPORT_GOAL,
        "rss_over_import_bytes": rss_over,
    }
    print(
        f"\n{'contender (median)':<20} {'wall':>8} {'cpu':>8} {'x peft':>7} {'x copy+fsync':>12} {'peak RSS':>9}  runs"
    )
    for n, r in runs.items():
        print(
            f"{n:<20} {r['wall_s']:7.2f}s {r['cpu_s']:7.2f}s {r['wall_s'] / peft['wall_s']:7.2f} "
            f"{r['wall_s'] / durable['wall_s']:12.2f} {r['rss_bytes'] / MB:6.0f} MB  "
            + " ".join(f"{w:.2f}" for w in r["wall_s_all"])
        )
    if "phases" in peft:
        print("transformers+peft phases (medians): " + ", ".join(f"{k} {v:.2f} s" for k, v in peft["phases"].items()))
    print(
        f"goal wall <= transformers+peft load + merge_and_unload ({peft['wall_s']:.2f} s): adaptermerge {ours['wall_s']:.2f} s"
        f" ({res['time_ratio_vs_peft']:.2f}x) -> {bm.verdict(res['time_ok'])}"
    )
    print(
        f"goal error report <= {REPORT_GOAL:.0%} of the merge (paired rounds, medians of (with - without) / with): "
        f"{share['end_to_end']:.1%} of the wall time end to end -> {bm.verdict(res['report_ok'])};  "
        f"{share['merge_into_base']:.1%} of merge_into_base alone, {share['cpu']:.1%} of the CPU time"
    )
    print(
        f"peak RSS: adaptermerge {bm.fmt_mb(ours['rss_bytes'])} = import {bm.fmt_mb(baseline_rss)} + "
        f"{bm.fmt_mb(rss_over)} (largest module as fp32: {bm.fmt_mb(meta['largest_module_fp32_bytes'])}, largest "
        f"tensor {bm.fmt_mb(meta['largest_tensor_bytes'])}); transformers+peft {bm.fmt_mb(peft['rss_bytes'])}",
        flush=True,
    )
    return res


def report_share(with_report: list[dict[str, Any]], without: list[dict[str, Any]]) -> dict[str, float]:
    """The error report's share of the merge, from rounds run back to back with and without it: medians over the
    rounds of ``(with - without) / with`` for the wall time of the whole process (imports included), for
    ``merge_into_base`` alone, and for the CPU time."""

    def share(key) -> float:
        return median([(key(a) - key(b)) / key(a) for a, b in zip(with_report, without)])

    return {
        "end_to_end": share(lambda r: r["wall_s"]),
        "merge_into_base": share(lambda r: r["phases"]["merge_into_base"]),
        "cpu": share(lambda r: r["cpu_s"]),
    }


def growth(layers: list[int], wide: dict[str, int], work: Path, tmp: Path, delta_ratio: float, env) -> list[dict]:
    """Our peak RSS (CLI) on NF4 checkpoints with more layers: it should not grow with the model."""
    print("\nmemory growth (adaptermerge merge, warm page cache):", flush=True)
    rows = []
    for n in sorted(set(layers)):
        shape = bm.Shape(wide["hidden"], wide["intermediate"], n, wide["heads"])
        meta = build_inputs(work, shape, delta_ratio)
        out = tmp / "growth-out"
        shutil.rmtree(out, ignore_errors=True)
        base, adapter = Path(meta["base"]), Path(meta["adapter"])
        bm.prepare("warm", base, adapter)
        la = bm.loadavg()
        r = bm.measure([*bm.cli_command(), "merge", str(base), str(adapter), "-o", str(out), "--quiet"], env)
        shutil.rmtree(out, ignore_errors=True)
        row = {"layers": n, "base_bytes": meta["base_bytes"], **r, "loadavg_before": la}
        rows.append(row)
        print(
            f"  {n:3d} layers  checkpoint {bm.fmt_mb(meta['base_bytes']):>9}  {r['wall_s']:6.2f} s  "
            f"peak RSS {bm.fmt_mb(r['rss_bytes'])}  (load {la})",
            flush=True,
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--delta-ratio", type=float, default=0.02, help="||delta|| / ||W|| per module (default 0.02)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--growth", type=int, nargs="*", default=None, help="layer counts for the RSS growth table")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every contender")
    ap.add_argument("--quick", action="store_true", help="2 layers, 1 round, no growth table")
    ap.add_argument("--no-check", action="store_true", help="skip the error comparison with PEFT")
    ap.add_argument("--profile", action="store_true", help="add a cProfile of merge_into_base")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "adaptermerge-bench-merge4"))
    ap.add_argument("--tmp", default=None, help="where outputs are written (default: the system temp folder)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.quick:
        args.layers, args.repeat = 2, 1
        args.growth = args.growth or []
    growth_layers = args.growth if args.growth is not None else [4, args.layers, 2 * args.layers]
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    wide = {"hidden": args.hidden, "intermediate": args.intermediate, "heads": args.heads}

    t_start = time.perf_counter()
    noise = bm.wait_idle(["bench_combine", "bench_merge.py", "bench_train"], 30, 600)
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}",
        "versions": bm.versions(),
        "loadavg_start": bm.loadavg(),
        "threads": args.threads or "default",
        "other_benchmarks": noise,
    }
    print(f"bench_merge4: {info['date']}  {info['machine']}  load {info['loadavg_start']}")
    print("  " + "  ".join(f"{k} {v}" for k, v in info["versions"].items()))
    print(f"  threads: {info['threads']};  other benchmarks: {noise}", flush=True)

    work = Path(args.work)
    shape = bm.Shape(args.hidden, args.intermediate, args.layers, args.heads)
    t0 = time.perf_counter()
    meta = build_inputs(work, shape, args.delta_ratio)
    base, adapter = Path(meta["base"]), Path(meta["adapter"])
    print(
        f"\ncheckpoint: Llama {shape.layers} layers x {shape.hidden} (mlp {shape.intermediate}, vocab {shape.vocab}), "
        f"NF4 + double quant, {bm.fmt_mb(meta['base_bytes'])};  adapter: rank 16 all-linear, "
        f"||delta|| = {args.delta_ratio:g} ||W||, {bm.fmt_mb(meta['adapter_bytes'])}  "
        f"(ready in {time.perf_counter() - t0:.1f} s; {work})",
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench_merge4_", dir=args.tmp))
    results: dict[str, Any] = {"info": info, "inputs": meta}
    failed = False
    try:
        names = ("copy+fsync", "adaptermerge", "library", "library, no report")
        outs = {n: tmp / ("out-" + n.replace("+", "-").replace(", ", "-").replace(" ", "-")) for n in names}
        baseline = bm.measure([sys.executable, "-c", "import adaptermerge.surgery.merge, adaptermerge_cli.main"], env)
        rounds = rounds_of(contenders(base, adapter, outs), outs, base, adapter, args.repeat, env)
        results["rounds"] = rounds
        res = summary(rounds, meta, baseline["rss_bytes"])
        results.update(res)
        failed |= not (res["time_ok"] and res["report_ok"])
        if not args.no_check:
            results["check"] = run_check(base, adapter, outs["adaptermerge"], env)
            failed |= not results["check"]["ok"]
        shutil.rmtree(outs["adaptermerge"], ignore_errors=True)
        if args.profile:
            print("\nprofile of merge_into_base (in-process, warm page cache):", flush=True)
            bm.prepare("warm", base, adapter)
            cmd = [sys.executable, str(Path(__file__).resolve()), PROFILE_MODE, str(base), str(adapter)]
            subprocess.run([*cmd, str(tmp / "out-profile")], env={**os.environ, **env})
            shutil.rmtree(tmp / "out-profile", ignore_errors=True)
        if growth_layers:
            results["growth"] = growth(growth_layers, wide, work, tmp, args.delta_ratio, env)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info["loadavg_end"] = bm.loadavg()
    info["total_s"] = time.perf_counter() - t_start
    print(f"\ntotal {info['total_s']:.0f} s; load {info['loadavg_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    modes = {
        "_quantize": quantize_child,
        "_adapter": adapter_child,
        PEFT_MODE: peft_child,
        LIBRARY_MODE: library_child,
        PROFILE_MODE: profile_child,
        CHECK_MODE: check_child,
    }
    if len(sys.argv) > 1 and sys.argv[1] in modes:
        modes[sys.argv[1]](*sys.argv[2:])
    else:
        sys.exit(main())
