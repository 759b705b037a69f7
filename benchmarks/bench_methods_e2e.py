"""End to end: every merge method (issue 11) on the Llama-7B-shaped adapter set of the combine benchmark.

The set is ``bench_combine.py``'s: three PEFT-format folders written directly (32 layers x q/k/v/o/gate/up/down =
224 modules, hidden 4096, intermediate 11008, rank 16, alpha 32, float32 unless ``--dtype bfloat16``), weights
0.5/0.3/0.2. Each method runs through the CLI in a fresh process::

    python -m adaptermerge_cli [--threads N] combine a b c --method M --weights 0.5,0.3,0.2 [--space S] \\
        -o OUT --quiet --json

once per space it declares (``delta``, ``core``, ``knots``; factored methods compute in the core space and run
once), with every method parameter at its default. Recorded per run: wall time (interpreter start, imports, load,
combine, ``save_combined``), the child's CPU time (user + system, from ``getrusage(RUSAGE_CHILDREN)``) and its
peak RSS (VmHWM sampled every 50 ms, ``bench_combine.run_sampling_rss``).

Also, in the same run:

* PEFT's peers: ``add_weighted_adapter(..., combination_type="ties_svd" | "dare_ties_svd", density=...,
  svd_rank=48)`` on ONE 4096 x 4096 Linear with three rank-16 adapters (``bench_combine.peft_model_with``),
  timed in this process (median of ``--peft-repeats`` calls after one warm-up call), extrapolated x224 (an
  estimate, and a lower bound: the 96 MLP modules are 2.7x larger). The warm-up call is ``ties_svd`` with
  weights 1/1/1, the one setting where PEFT's TIES conventions and ours coincide; its result is compared with our
  ``ties`` (delta space, rank 48) on the same module, and PEFT's dense ``ties`` with ours at the benchmark's
  weights (where the conventions differ).
* Core (and KnOTS) space against delta space, per method: ``||X_core - X_delta||_F / ||X_delta||_F`` from the two
  saved output adapters, in factored form (QR of the stacked factors, no ``out x in`` product), aggregated over
  all modules (square root of the summed squares) and the worst module.

Goals (issue 11), judged on the full set only (``--quick`` prints them as information): ``ties`` in the delta
space under 300 s with peak RSS under 3 GB (3e9 bytes = 2861 MiB); every method in the core space (and every
factored method) under 15 s; ``task_arithmetic`` equal in all spaces (relative difference < 1e-5, judged in
``--quick`` too). The exit status is 1 when a goal fails or a run fails.

Usage::

    python benchmarks/bench_methods_e2e.py --json methods_e2e.json   # full run (about 52 min on 2 quiet cores)
    python benchmarks/bench_methods_e2e.py --quick          # 2 layers, 1024/2752 wide, 1 thread: a smoke test
    python benchmarks/bench_methods_e2e.py --methods ties,task_arithmetic --spaces delta,core
    python benchmarks/bench_methods_e2e.py --no-peft --spaces core,knots
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_combine import (
    LLAMA_7B,
    fmt_s,
    lora_layers,
    peft_model_with,
    print_table,
    rel_err,
    run_sampling_rss,
    verdict,
    write_llama_adapter,
)

import adaptermerge
from adaptermerge.lowrank import LowRank
from adaptermerge.methods.registry import Kind, get_method

TIES_DELTA_GOAL_S = 300.0  # ties, delta space, whole set, end to end on 2 CPU cores
RSS_GOAL_MIB = 3e9 / 2**20  # 3 GB
CORE_GOAL_S = 15.0  # every method in the core space, whole set, end to end
TA_AGREEMENT_GOAL = 1e-5  # task_arithmetic: the spaces agree to float rounding

WEIGHTS = [0.5, 0.3, 0.2]  # as the combine benchmark's Llama set
RANK, ALPHA = 16, 32
ELEMENTWISE = [  # order of the runs: the goals first, DELLA (the slowest in the delta space) last
    "task_arithmetic",
    "ties",
    "magnitude_prune",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della_linear",
    "della",
]
FACTORED = ["linear", "svd", "tsv", "iso_c", "iso_cts", "wudi"]
SPACE_ORDER = ["core", "knots", "delta"]
QUICK_SHAPES = {mod: tuple(2752 if d == 11008 else d // 4 for d in shape) for mod, shape in LLAMA_7B.items()}


def loadavg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# --------------------------------------------------------------------------------------------------------------
# one method, one space, in a fresh process


def cli_run(method: str, space: str | None, paths: list[Path], out: Path, threads: int | None) -> dict[str, Any]:
    """``adaptermerge combine`` in a fresh process: wall and CPU time, peak RSS, and the per-module report."""
    cmd = [sys.executable, "-m", "adaptermerge_cli"] + (["--threads", str(threads)] if threads else [])
    cmd += ["combine", *map(str, paths), "--method", method, "--weights", ",".join(map(str, WEIGHTS))]
    cmd += (["--space", space] if space else []) + ["-o", str(out), "--quiet", "--json"]
    load_start = loadavg()
    cpu0 = children_cpu_s()
    t0 = time.perf_counter()
    proc, peak = run_sampling_rss(cmd)
    wall = time.perf_counter() - t0
    row: dict[str, Any] = {
        "method": method,
        "space": space or "factored",
        "wall_s": wall,
        "cpu_s": children_cpu_s() - cpu0,
        "peak_rss_mib": peak,
        "returncode": proc.returncode,
        "load_start": load_start,
        "load_end": loadavg(),
    }
    if proc.returncode != 0:
        row["error"] = proc.stderr.strip()[-2000:]
        return row
    report = json.loads(proc.stdout)
    mods = report["modules"]
    row["params"] = report["params"]
    row["modules"] = len(mods)
    row["out_ranks"] = sorted({m["rank"] for m in mods})
    row["min_kept_energy"] = min(m["kept_energy"] for m in mods)
    row["mean_kept_energy"] = sum(m["kept_energy"] for m in mods) / len(mods)
    return row


def import_floor(threads: int | None) -> float:
    """Wall time of a fresh process that only imports what the CLI's combine imports: the floor of every run."""
    code = "import torch, adaptermerge.combination, adaptermerge_cli.main"
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------------------
# core/KnOTS against delta, from the saved outputs


@torch.no_grad()
def factored_distance(x: LowRank, y: LowRank) -> tuple[float, float]:
    """``(||B_x A_x - B_y A_y||_F, ||B_y A_y||_F)`` in float64 without the ``out x in`` product: thin QR of the
    stacked factors ``[B_x | -B_y]`` and ``[A_x; A_y]^T``; the norm is that of the small core ``R_B R_A^T``."""
    b = torch.cat([x.B.double(), -y.B.double()], dim=1)
    a = torch.cat([x.A.double(), y.A.double()], dim=0)
    _, rb = torch.linalg.qr(b, mode="reduced")
    _, ra = torch.linalg.qr(a.T, mode="reduced")
    _, rby = torch.linalg.qr(y.B.double(), mode="reduced")
    _, ray = torch.linalg.qr(y.A.double().T, mode="reduced")
    return float((rb @ ra.T).norm()), float((rby @ ray.T).norm())


def space_difference(out_x: Path, out_ref: Path) -> dict[str, Any]:
    """Relative Frobenius distance of two combined adapters, over all modules and per module (the worst)."""
    x, ref = adaptermerge.load_adapter(out_x), adaptermerge.load_adapter(out_ref)
    if x.modules.keys() != ref.modules.keys():
        raise RuntimeError(f"{out_x} and {out_ref} hold different modules")
    num = den = 0.0
    worst, worst_name = 0.0, ""
    for name, m in ref.modules.items():
        d, n = factored_distance(x.modules[name], m)
        num, den = num + d * d, den + n * n
        if d / max(n, 1e-30) > worst:
            worst, worst_name = d / max(n, 1e-30), name
    return {"rel_diff": (num / max(den, 1e-300)) ** 0.5, "worst_module_rel_diff": worst, "worst_module": worst_name}


# --------------------------------------------------------------------------------------------------------------
# PEFT's ties_svd / dare_ties_svd on one module


def bench_peft(dim: int, repeats: int, n_modules: int) -> dict[str, Any]:
    from peft.utils import merge_utils

    specs = [(f"t{i}", RANK, ALPHA, 31 + i) for i in range(3)]
    names = [s[0] for s in specs]
    pm = peft_model_with(dim, 1, specs)
    (mod_name, layer), *_ = lora_layers(pm).items()
    densities = {"ties_svd": get_method("ties").param("density").default}
    densities["dare_ties_svd"] = get_method("dare_ties").param("density").default
    svd_rank = 3 * RANK  # our delta-space default: the sum of the input ranks

    def call(kind: str, weights: list[float], name: str) -> float:
        torch.manual_seed(0)  # dare_ties_svd draws from the global generator
        t0 = time.perf_counter()
        pm.add_weighted_adapter(names, weights, name, combination_type=kind, density=densities[kind], svd_rank=svd_rank)
        return time.perf_counter() - t0

    # Warm-up, also the agreement check: with weights 1/1/1 PEFT's TIES and ours coincide (see the docs).
    t_first = call("ties_svd", [1.0, 1.0, 1.0], "unit")
    times: dict[str, list[float]] = {}
    for kind in ("ties_svd", "dare_ties_svd"):
        times[kind] = []
        for i in range(repeats):
            times[kind].append(call(kind, WEIGHTS, f"{kind}{i}"))
            pm.delete_adapter(f"{kind}{i}")

    ties = get_method("ties")
    params = ties.make_params(ties.resolve_params({}))
    with torch.no_grad():
        terms = [(layer.lora_B[n].weight.float(), layer.lora_A[n].weight.float() * layer.scaling[n]) for n in names]
        mods = [LowRank(A=a, B=b) for b, a in terms]
        peft_unit = layer.get_delta_weight("unit").double()
        from adaptermerge.methods.spaces import merge_module

        ours_unit = merge_module([(1.0, m) for m in mods], ties, params, "delta")
        dense = [m.delta() for m in mods]
        w = torch.tensor(WEIGHTS)
        peft_dense = merge_utils.ties(dense, w, densities["ties_svd"], "total").double()
        ours_dense = ties.fn(dense, WEIGHTS, params, None).double()
        peft_dense_unit = merge_utils.ties(dense, torch.ones(3), densities["ties_svd"], "total").double()
        ours_dense_unit = ties.fn(dense, [1.0, 1.0, 1.0], params, None).double()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "dim": dim,
        "module": mod_name,
        "ranks": [RANK] * 3,
        "alpha": ALPHA,
        "weights": WEIGHTS,
        "densities": densities,
        "svd_rank": svd_rank,
        "majority_sign_method": "total",
        "first_call_unit_weights_s": t_first,
        "times_s": times,
        "median_s": med,
        "extrapolated_s": {k: v * n_modules for k, v in med.items()},
        "extrapolated_to_modules": n_modules,
        "unit_weights_ties_svd_vs_ours_ties_delta": rel_err(ours_unit.B.double() @ ours_unit.A.double(), peft_unit),
        # both rank-48 results against the dense TIES result they approximate: near-optimal truncations of one matrix
        "unit_weights_truncation_err_peft": rel_err(peft_unit, ours_dense_unit),
        "unit_weights_truncation_err_ours": rel_err(ours_unit.B.double() @ ours_unit.A.double(), ours_dense_unit),
        "unit_weights_dense_ties_peft_vs_ours": rel_err(ours_dense_unit, peft_dense_unit),
        "bench_weights_dense_ties_peft_vs_ours": rel_err(ours_dense, peft_dense),
        "bench_weights_norm_ratio_ours_over_peft": float(ours_dense.norm() / peft_dense.norm()),
    }


# --------------------------------------------------------------------------------------------------------------
# report


def judge(run: dict[str, Any], full: bool) -> tuple[str, bool | None]:
    """The goal text of a run and whether it is met (``None``: information only)."""
    if run["returncode"] != 0:
        return "runs", False
    if run["method"] == "ties" and run["space"] == "delta":
        ok = run["wall_s"] < TIES_DELTA_GOAL_S and (run["peak_rss_mib"] or 0) < RSS_GOAL_MIB
        return f"< {TIES_DELTA_GOAL_S:.0f} s, < {RSS_GOAL_MIB:.0f} MiB", ok if full else None
    if run["space"] in ("core", "factored"):
        return f"< {CORE_GOAL_S:.0f} s", run["wall_s"] < CORE_GOAL_S if full else None
    return "info", None


def params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items() if k not in ("lambda", "space"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 layers, 1024/2752 wide, 1 thread: a smoke test")
    ap.add_argument("--layers", type=int, help="decoder layers (default 32, quick 2)")
    ap.add_argument("--methods", help="comma-separated methods (default: every one listed in the docstring)")
    ap.add_argument(
        "--spaces",
        help="comma-separated spaces of the elementwise methods (default delta,core,knots; "
        "quick: delta,core, and knots for ties)",
    )
    ap.add_argument("--threads", type=int, help="torch threads, here and in every child (quick default: 1)")
    ap.add_argument("--peft-repeats", type=int, default=2, help="timed PEFT calls per type (median; ~20-50 s each)")
    ap.add_argument("--no-peft", action="store_true", help="skip the PEFT peer")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="storage dtype of the set")
    ap.add_argument("--json", dest="json_path", help="write every figure to this JSON file (also after each run)")
    ap.add_argument("--keep", action="store_true", help="keep the inputs and outputs (the folder is printed)")
    args = ap.parse_args(argv)
    layers = args.layers or (2 if args.quick else 32)
    shapes = QUICK_SHAPES if args.quick else LLAMA_7B
    full = not args.quick and layers == 32
    n_modules = layers * len(shapes)
    if args.quick and args.threads is None:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    methods = args.methods.split(",") if args.methods else ELEMENTWISE + FACTORED
    for m in methods:
        get_method(m)  # refuses unknown names
    spaces = args.spaces.split(",") if args.spaces else (["delta", "core"] if args.quick else SPACE_ORDER)
    spaces = [s for s in SPACE_ORDER if s in spaces]

    def spaces_of(method: str) -> list[str | None]:
        info = get_method(method)
        if info.kind is not Kind.ELEMENTWISE:
            return [None]
        chosen = [s for s in spaces if s in info.spaces]
        if args.quick and not args.spaces and method == "ties":
            chosen = [s for s in SPACE_ORDER if s in info.spaces]
        return chosen

    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "adaptermerge": adaptermerge.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "threads_option": args.threads,
        "mode": "quick" if args.quick else "full",
        "loadavg_start": loadavg(),
    }
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:
        pass
    print("adaptermerge methods end-to-end benchmark  " + "  ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    results: dict[str, Any] = {"env": env, "runs": [], "space_differences": [], "peft": None}

    def save_json() -> None:
        if args.json_path:
            Path(args.json_path).write_text(json.dumps(results, indent=2) + "\n")

    tmp = Path(tempfile.mkdtemp(prefix="bench_methods_e2e_"))
    try:
        t0 = time.perf_counter()
        dtype = getattr(torch, args.dtype)
        made = [
            write_llama_adapter(tmp / f"in_{j}", layers, RANK, ALPHA, seed=10 + j, dtype=dtype, shapes=shapes)
            for j in range(3)
        ]
        paths = [p for p, _ in made]
        results["set"] = {
            "layers": layers,
            "modules": n_modules,
            "shapes": {k: list(v) for k, v in shapes.items()},
            "rank": RANK,
            "alpha": ALPHA,
            "dtype": args.dtype,
            "weights": WEIGHTS,
            "input_mib_each": made[0][1] / 2**20,
            "write_s": time.perf_counter() - t0,
        }
        print(f"inputs: 3 x {made[0][1] / 2**20:.0f} MiB ({args.dtype}), {n_modules} modules, in {tmp}", flush=True)
        results["import_floor_s"] = import_floor(args.threads)
        print(f"import floor (fresh process importing torch + adaptermerge): {results['import_floor_s']:.2f} s")

        if not args.no_peft:
            dim = 1024 if args.quick else 4096
            print(f"PEFT ties_svd / dare_ties_svd on one {dim} x {dim} module (load {loadavg()}) ...", flush=True)
            results["peft"] = bench_peft(dim, args.peft_repeats, n_modules)
            p = results["peft"]
            print(
                f"  median ties_svd {p['median_s']['ties_svd']:.2f} s, dare_ties_svd "
                f"{p['median_s']['dare_ties_svd']:.2f} s (first call {p['first_call_unit_weights_s']:.2f} s)",
                flush=True,
            )
            save_json()

        for method in methods:
            outs: dict[str, Path] = {}
            for space in spaces_of(method):
                out = tmp / f"out_{method}_{space or 'factored'}"
                print(f"{method:17s} {space or 'factored':8s} (load {loadavg()}) ... ", end="", flush=True)
                run = cli_run(method, space, paths, out, args.threads)
                results["runs"].append(run)
                save_json()
                if run["returncode"] != 0:
                    print(f"FAILED ({run['returncode']}): {run['error'][-500:]}", flush=True)
                    continue
                outs[space or "factored"] = out
                print(
                    f"{run['wall_s']:.1f} s, CPU {run['cpu_s']:.1f} s, peak RSS {run['peak_rss_mib']:.0f} MiB, "
                    f"ranks {run['out_ranks']}, min kept energy {run['min_kept_energy']:.4f}",
                    flush=True,
                )
            if "delta" in outs:
                for space in ("core", "knots"):
                    if space in outs:
                        diff = {"method": method, "space": space, **space_difference(outs[space], outs["delta"])}
                        results["space_differences"].append(diff)
                        print(
                            f"  {space} vs delta: {diff['rel_diff']:.3e} (worst module {diff['worst_module_rel_diff']:.3e})"
                        )
                save_json()
            if not args.keep:
                for out in outs.values():
                    shutil.rmtree(out, ignore_errors=True)
        env["loadavg_end"] = loadavg()
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    # ----------------------------------------------------------------------------------------------------------
    rows = []
    failed = False
    for run in results["runs"]:
        goal, ok = judge(run, full)
        failed |= ok is False
        run["goal"], run["result"] = goal, verdict(ok)
        if run["returncode"] != 0:
            rows.append((run["method"], run["space"], "-", "-", "-", "", run["load_start"].split("/")[0], goal, "FAIL"))
            continue
        rows.append(
            (
                run["method"],
                run["space"],
                f"{run['wall_s']:.1f}",
                f"{run['cpu_s']:.1f}",
                f"{run['peak_rss_mib']:.0f}",
                params_text(run["params"]),
                f"{run['load_start'].split('/')[0]}-{run['load_end'].split('/')[0]}",
                goal if full or goal == "info" else f"info ({goal})",
                verdict(ok),
            )
        )
    print(f"\nruns (fresh CLI process each, {n_modules} modules, threads {args.threads or 'torch default'}):")
    head = ("method", "space", "wall s", "CPU s", "peak RSS MiB", "parameters", "load 1 min", "goal", "result")
    print_table(rows, head)

    if results["space_differences"]:
        print("\n||X_space - X_delta||_F / ||X_delta||_F over all modules (worst module):")
        drows = []
        for d in results["space_differences"]:
            ok = d["rel_diff"] < TA_AGREEMENT_GOAL and d["worst_module_rel_diff"] < TA_AGREEMENT_GOAL
            judged = d["method"] == "task_arithmetic"
            d["result"] = verdict(ok if judged else None)
            failed |= judged and not ok
            goal = f"< {TA_AGREEMENT_GOAL:.0e}" if judged else "info"
            drows.append(
                (
                    d["method"],
                    d["space"],
                    f"{d['rel_diff']:.3e}",
                    f"{d['worst_module_rel_diff']:.3e}",
                    goal,
                    d["result"],
                )
            )
        print_table(drows, ("method", "space", "rel. diff", "worst module", "goal", "result"))

    p = results["peft"]
    if p:
        ours = {r["method"] + "/" + r["space"]: r["wall_s"] for r in results["runs"] if r["returncode"] == 0}
        print(
            f"\nPEFT, one {p['dim']} x {p['dim']} module, 3 x rank {RANK}, svd_rank {p['svd_rank']}, median of "
            f"{args.peft_repeats} after a warm-up; x{n_modules} is an estimate (a lower bound for the full set):"
        )
        prow = []
        for kind, our_method in (("ties_svd", "ties"), ("dare_ties_svd", "dare_ties")):
            est = p["extrapolated_s"][kind]
            for space in ("delta", "core"):
                t = ours.get(f"{our_method}/{space}")
                prow.append(
                    (
                        f"{kind} (density {p['densities'][kind]}) vs {our_method} {space}",
                        fmt_s(p["median_s"][kind]),
                        f"{est:.0f} s",
                        "-" if t is None else f"{t:.1f} s",
                        "-" if t is None else f"{t / est:.3f}",
                    )
                )
        print_table(prow, ("comparison", "PEFT 1 module", f"PEFT x{n_modules} (est.)", "ours e2e", "ours / PEFT"))
        print(
            f"weights 1/1/1: PEFT ties_svd vs our ties (delta, rank {p['svd_rank']}) "
            f"{p['unit_weights_ties_svd_vs_ours_ties_delta']:.2e} (truncation error against the dense TIES result: PEFT "
            f"{p['unit_weights_truncation_err_peft']:.6f}, ours {p['unit_weights_truncation_err_ours']:.6f}); dense "
            f"ties PEFT vs ours {p['unit_weights_dense_ties_peft_vs_ours']:.2e}"
        )
        print(
            f"weights {'/'.join(map(str, WEIGHTS))}: dense ties PEFT vs ours {p['bench_weights_dense_ties_peft_vs_ours']:.3f}"
            f" (||ours|| / ||PEFT|| = {p['bench_weights_norm_ratio_ours_over_peft']:.3f}; conventions differ)"
        )
    print(
        f"\nload average start {env['loadavg_start']}, end {env.get('loadavg_end')} (above {os.cpu_count()}: contention)"
    )
    results["failed"] = failed
    save_json()
    if args.json_path:
        print(f"wrote {args.json_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
