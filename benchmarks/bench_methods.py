"""Per-module timings of the merge methods (issue 11) on Llama-7B-shaped modules, 3 adapters of rank 16.

For each module shape (default 4096 x 4096 and 11008 x 4096) and every method, the time of ``merge_module``
(project, merge, map back / re-factor) in each space, and for ``ties`` in the delta space the split into its
steps (dense deltas, trim, election + disjoint merge, re-factoring). Also the top-k selection alternatives on
one flattened module (``torch.kthvalue``, ``torch.topk``, ours), and the peak RSS of a fresh process running
``ties`` end to end on the largest module.

Usage::

    python benchmarks/bench_methods.py                 # both shapes
    python benchmarks/bench_methods.py --shapes 4096x4096 --threads 2
    python benchmarks/bench_methods.py --quick         # 1024 x 1024 smoke run
    python benchmarks/bench_methods.py --model 32 --method ties --space delta   # whole Llama-7B shape
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

from adaptermerge.lowrank import LowRank
from adaptermerge.methods.spaces import delta_space, merge_module
from adaptermerge.methods.sparsify import keep_count, kth_largest, trim_rule
from adaptermerge.methods.subspace import SUBSPACE_METHODS
from adaptermerge.methods.task_arithmetic import ELEMENTWISE_METHODS, TiesParams, ties
from adaptermerge.refactor import refactor_dense


def terms_for(out: int, inn: int, rank: int = 16, tasks: int = 3, seed: int = 0) -> list[tuple[float, LowRank]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            1.0 / tasks,
            LowRank(A=torch.randn(rank, inn, generator=g) / inn**0.5, B=torch.randn(out, rank, generator=g) * 0.01),
        )
        for _ in range(tasks)
    ]


def timed(fn, repeat: int = 1):
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def bench_selection(out: int, inn: int) -> None:
    d = terms_for(out, inn)[0][1].delta()
    a = d.abs().reshape(-1)
    k = keep_count(0.2, a.numel())
    print(f"\ntop-k threshold on |delta| of {out} x {inn} (k = 20%):")
    t, v1 = timed(lambda: torch.kthvalue(a, a.numel() - k + 1).values, 2)
    print(f"  torch.kthvalue          {t * 1000:8.0f} ms")
    t, v2 = timed(lambda: torch.topk(a, k, sorted=False).values.min(), 2)
    print(f"  torch.topk              {t * 1000:8.0f} ms")
    t, v3 = timed(lambda: kth_largest(a, k), 2)
    print(f"  kth_largest (ours)      {t * 1000:8.0f} ms   (same value: {float(v1) == float(v2) == float(v3)})")


def bench_ties_steps(out: int, inn: int) -> None:
    terms = terms_for(out, inn)
    w = [t[0] for t in terms]
    print(f"\nties (density 0.2) in delta space, {out} x {inn}, steps:")
    t, proj = timed(lambda: delta_space([m for _, m in terms]))
    print(f"  dense deltas (3 x B@A)  {t * 1000:8.0f} ms")
    t, _ = timed(lambda: [trim_rule(x, 0.2) for x in proj.reps], 2)
    print(f"  top-k rules (3 tasks)   {t * 1000:8.0f} ms")
    t, merged = timed(lambda: ties(proj.reps, w, TiesParams()), 2)
    print(f"  ties (rules + blocks)   {t * 1000:8.0f} ms")
    hint = torch.cat([m.B for _, m in terms], dim=1)
    t, r = timed(lambda: refactor_dense(merged, default_rank=48, hint=hint), 2)
    print(
        f"  re-factor, rank 48      {t * 1000:8.0f} ms   ({r.algorithm}, B hint, 1 power iteration, kept {r.kept_energy:.4f})"
    )
    t, r = timed(lambda: refactor_dense(merged, default_rank=48), 2)
    print(f"  ... no hint, 2 iters    {t * 1000:8.0f} ms   ({r.algorithm}, kept {r.kept_energy:.4f})")
    t, r = timed(lambda: refactor_dense(merged, default_rank=48, power_iterations=1), 2)
    print(f"  ... no hint, 1 iter     {t * 1000:8.0f} ms   ({r.algorithm}, kept {r.kept_energy:.4f})")


def bench_methods(out: int, inn: int, spaces: list[str]) -> None:
    terms = terms_for(out, inn)
    print(f"\nmerge_module, {out} x {inn}, 3 adapters of rank 16 (seconds):")
    print(f"  {'method':18s}" + "".join(f"{s:>10s}" for s in spaces))
    for m in ELEMENTWISE_METHODS:
        row = []
        for s in spaces:
            t, _ = timed(
                lambda m=m, s=s: merge_module(terms, m, m.params_cls(), s, generator=torch.Generator().manual_seed(0)),
                repeat=1 if s == "delta" else 3,
            )
            row.append(t)
        print(f"  {m.name:18s}" + "".join(f"{t:10.3f}" for t in row))
    for m in SUBSPACE_METHODS:
        t, _ = timed(lambda m=m: merge_module(terms, m, m.params_cls(), space="core"), repeat=3)
        print(f"  {m.name:18s}" + f"{'':>10s}" * spaces.index("core") + f"{t:10.3f}  (factored)")


def bench_space_differences(out: int, inn: int) -> None:
    """How far the core/KnOTS results of each elementwise method are from its delta-space result (relative
    Frobenius distance of the stored adapters), and each from task arithmetic (by design they differ)."""
    terms = terms_for(out, inn)
    ta = sum(w * m.delta() for w, m in terms)
    print(f"\nspace differences, {out} x {inn}: ||X - X_delta|| / ||X_delta||  (and ||X - TA|| / ||TA||)")
    for m in ELEMENTWISE_METHODS:
        dense = {}
        for s in ("delta", "core", "knots"):
            r = merge_module(terms, m, m.params_cls(), s, generator=torch.Generator().manual_seed(0))
            dense[s] = r.B @ r.A
        ref = dense["delta"]
        cells = [f"{s} {float((dense[s] - ref).norm() / ref.norm()):.3f}" for s in ("core", "knots")]
        vs_ta = [f"{s} {float((dense[s] - ta).norm() / ta.norm()):.3f}" for s in ("delta", "core", "knots")]
        print(f"  {m.name:18s} " + "  ".join(cells) + "   vs TA: " + "  ".join(vs_ta))


def _hwm_mib() -> float:
    """Peak RSS of this process (VmHWM; unlike ru_maxrss it is not inherited from the parent across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child_peak(out: int, inn: int) -> None:
    terms = terms_for(out, inn)
    base = _hwm_mib()
    t0 = time.perf_counter()
    r = merge_module(terms, next(m for m in ELEMENTWISE_METHODS if m.name == "ties"), TiesParams(), space="delta")
    dt = time.perf_counter() - t0
    dense = out * inn * 4 / 2**20
    print(
        f"  ties delta {out} x {inn}: {dt:.2f} s, peak RSS {_hwm_mib():.0f} MiB (after imports: {base:.0f} MiB; "
        f"one dense fp32 module = {dense:.0f} MiB), rank {r.rank}"
    )


LLAMA7B_MODULES = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]  # q k v o gate up down


def bench_model(layers: int, method: str, space: str) -> None:
    """A whole Llama-7B-shaped merge, module by module (factors made per module, then dropped), in this process:
    total time and peak RSS."""
    info = next(m for m in (*ELEMENTWISE_METHODS, *SUBSPACE_METHODS) if m.name == method)
    base = _hwm_mib()
    t0 = time.perf_counter()
    kept = []
    for layer in range(layers):
        for j, (out, inn) in enumerate(LLAMA7B_MODULES):
            terms = terms_for(out, inn, seed=layer * 7 + j)
            r = merge_module(terms, info, info.params_cls(), space, generator=torch.Generator().manual_seed(layer))
            kept.append(r.kept_energy)
            del terms, r
    dt = time.perf_counter() - t0
    n = layers * len(LLAMA7B_MODULES)
    print(
        f"{method} in {space} space, {n} Llama-7B-shaped modules, 3 adapters of rank 16: {dt:.1f} s "
        f"({dt / n:.2f} s/module), peak RSS {_hwm_mib():.0f} MiB (after imports {base:.0f} MiB), "
        f"mean kept energy {sum(kept) / len(kept):.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x4096,11008x4096")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", type=int, default=None, metavar="LAYERS", help="whole-model run over LAYERS layers")
    ap.add_argument("--method", default="ties")
    ap.add_argument("--space", default="delta")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
        bench_model(args.model, args.method, args.space)
        return
    if args.child:
        out, inn = map(int, args.child.split("x"))
        child_peak(out, inn)
        return
    shapes = ["1024x1024"] if args.quick else args.shapes.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    for shape in shapes:
        out, inn = map(int, shape.split("x"))
        bench_selection(out, inn)
        bench_ties_steps(out, inn)
        bench_methods(out, inn, ["delta", "core", "knots"])
        bench_space_differences(out, inn)
    print("\npeak RSS of a fresh process (ties, delta space, end to end):")
    for shape in shapes:
        cmd = [sys.executable, __file__, "--child", shape] + (["--threads", str(args.threads)] if args.threads else [])
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
