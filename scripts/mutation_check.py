"""Mutation check: plant known bugs in the core, one at a time, and see whether the targeted tests catch each.

A fixed, declared list of small mistakes (the kind a refactor or a hurried fix makes: a dropped weight, a sign, a
transpose, an off-by-one, a wrong dtype) is applied one at a time to a temporary copy of the repository, never to
the working tree. For each, only the tests named for it run (``pytest -x``, in the copy, with the copy first on
``sys.path`` and on ``PYTHONPATH`` so that CLI subprocesses run the mutated code too). A mutation is **killed** when
a test fails, **survived** when they all pass. The script first runs every named test on the unmutated copy
(they must pass, else a kill would mean nothing) and checks that each mutation's original snippet occurs exactly
once in its file (a snippet the code no longer contains is reported as **stale**: update the list).

Usage::

    python scripts/mutation_check.py                    # every mutation (about 9 min on 2 shared cores)
    python scripts/mutation_check.py --list             # the list, nothing run
    python scripts/mutation_check.py --only combine-bias-unweighted default-weights-one
    python scripts/mutation_check.py --skip-baseline --json mutations.json

The exit status is 0 when every mutation is killed, 1 when one survives (or is stale, or its tests could not
run). See docs/testing.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    """One planted bug: in ``file``, the exact ``original`` snippet (occurring once) becomes ``mutated``."""

    name: str
    file: str
    original: str
    mutated: str
    tests: tuple[str, ...]
    what: str


M = Mutation
MUTATIONS: list[Mutation] = [
    # ---------------------------------------------------------------- the audit's table (each survived once)
    M(
        "combine-bias-unweighted",
        "adaptermerge/combination.py",
        "biases[mod] = sum(wi * b.to(dev, cdtype) for wi, b in bs) if bs else None",
        "biases[mod] = sum(b.to(dev, cdtype) for wi, b in bs) if bs else None",
        ("tests/test_combine.py::test_lora_bias_combined_with_plain_adapter",),
        "combine sums lora_bias without the weights",
    ),
    M(
        "modules-to-save-first-adapter",
        "adaptermerge/combination.py",
        "acc = sum(w * t.double() for w, t in zip(weights, ts, strict=True)) / total",
        "acc = ts[0].double()",
        ("tests/test_combine.py::test_modules_to_save_are_the_normalised_weighted_average",),
        "modules_to_save tensors taken from the first adapter instead of averaged",
    ),
    M(
        "factor-linear-sign-dropped",
        "adaptermerge/methods/basic.py",
        "sign = 1.0 if ws >= 0 else -1.0",
        "sign = 1.0",
        ("tests/test_combine.py::test_factor_linear_is_peft_linear_for_weights_of_both_signs",),
        "factor-linear drops the sign of negative weights",
    ),
    M(
        "inspect-norm-doubled",
        "adaptermerge/inspection.py",
        'entry["delta_norm"] = m.frobenius_norm()',
        'entry["delta_norm"] = 2 * m.frobenius_norm()',
        ("tests/cli/test_inspect.py::test_inspect_figures_are_peft_s",),
        "inspect reports delta norms x2",
    ),
    M(
        "survival-scaled",
        "adaptermerge/surgery/quant.py",
        "res.delta_survival = float(((deq - w).double() * delta).sum()) / dn2 if dn2 > 0 else 1.0",
        "res.delta_survival = 0.7 * float(((deq - w).double() * delta).sum()) / dn2 if dn2 > 0 else 1.0",
        ("tests/surgery/test_quant.py::test_requantized_merge_no_worse_than_peft",),
        "the 4-bit 'delta survival' figure x0.7",
    ),
    M(
        "default-weights-one",
        "adaptermerge/combination.py",
        "return [1.0 / n] * n",
        "return [1.0] * n",
        (
            "tests/test_lowrank.py::test_default_weights_are_equal_and_sum_to_one",
            "tests/surgery/test_merge.py::test_several_adapters_default_weights_are_equal",
        ),
        "default weights 1 instead of 1/n",
    ),
    M(
        "combine-dtype-fp32",
        "adaptermerge/combination.py",
        "out_dtype = dts.pop() if len(dts) == 1 else torch.float32",
        "out_dtype = torch.float32",
        ("tests/test_combine.py::test_output_dtype_rules", "tests/test_combine.py::test_output_dtype_of_peft_folders"),
        "combine output dtype forced to fp32",
    ),
    M(
        "merge-ignores-rank-energy",
        "adaptermerge/surgery/merge.py",
        "return combine(loaded, weights, method=m, rank=rank, energy=energy, base=ckpt), loaded",
        "return combine(loaded, weights, method=m, base=ckpt), loaded",
        ("tests/surgery/test_merge.py::test_several_adapters_svd_rank_and_energy",),
        "merge with several adapters ignores --rank/--energy",
    ),
    M(
        "cli-weights-reversed",
        "cli/main.py",
        'vals.extend(x for x in args[i].split(",") if x)',
        'vals[:0] = [x for x in args[i].split(",") if x]',
        (
            "tests/cli/test_inspect.py::test_weights_normalization",
            "tests/test_combine.py::test_weights_with_equals_sign",
        ),
        "--weights 0.7 0.3 parsed reversed",
    ),
    # ---------------------------------------------------------------- more of the same classes
    M(
        "modules-to-save-not-normalised",
        "adaptermerge/combination.py",
        "acc = sum(w * t.double() for w, t in zip(weights, ts, strict=True)) / total",
        "acc = sum(w * t.double() for w, t in zip(weights, ts, strict=True))",
        ("tests/test_combine.py::test_modules_to_save_are_the_normalised_weighted_average",),
        "modules_to_save averaged without dividing by the sum of the weights",
    ),
    M(
        "factor-linear-embedding-sign-side",
        "adaptermerge/methods/basic.py",
        "a_term, b_term = root * a_raw, sign * root * b_raw",
        "a_term, b_term = sign * root * a_raw, root * b_raw",
        ("tests/test_combine.py::test_factor_linear_is_peft_linear_for_weights_of_both_signs",),
        "factor-linear puts the sign on the wrong factor of an embedding (PEFT stores them the other way round)",
    ),
    M(
        "factor-linear-error-sign",
        "adaptermerge/combination.py",
        "diff = LowRank(A=torch.cat([a, exact.A]), B=torch.cat([b, -exact.B], dim=1))",
        "diff = LowRank(A=torch.cat([a, exact.A]), B=torch.cat([b, exact.B], dim=1))",
        ("tests/test_combine.py::test_factor_linear_warns_with_measured_error",),
        "factor-linear's reported error measures the sum instead of the difference",
    ),
    M(
        "cli-parse-floats-reversed",
        "cli/main.py",
        'vals = [float(x) for x in value.split(",") if x.strip()]',
        'vals = [float(x) for x in value.split(",") if x.strip()][::-1]',
        ("tests/test_combine.py::test_weights_with_equals_sign",),
        "--weights 0.7,0.3 parsed reversed",
    ),
    M(
        "cli-merge-drops-rank",
        "cli/surgery_commands.py",
        "            rank=rank,\n            energy=energy,\n            dtype=dtype,\n            quantize=quantize,",
        "            rank=None,\n            energy=energy,\n            dtype=dtype,\n            quantize=quantize,",
        ("tests/surgery/test_merge.py::test_several_adapters_svd_rank_and_energy",),
        "the merge command does not pass --rank on",
    ),
    M(
        "svd-default-rank-min",
        "adaptermerge/combination.py",
        "(max(input_ranks[mod]) if energy is None else big_r)",
        "(min(input_ranks[mod]) if energy is None else big_r)",
        ("tests/test_combine.py::test_svd_default_rank_is_the_largest_input_rank_like_peft",),
        "svd's default rank is the smallest input rank instead of the largest",
    ),
    M(
        "linear-ignores-rank",
        "adaptermerge/combination.py",
        'if spec.refactor == "lossless" and rank is None and energy is None:',
        'if spec.refactor == "lossless":',
        ("tests/test_lowrank.py::test_linear_with_rank_is_the_truncated_sum",),
        "linear ignores --rank/--energy (keeps the numerical rank)",
    ),
    M(
        "stack-weight-sign",
        "adaptermerge/lowrank.py",
        "a = torch.cat([w * A.to(device=device, dtype=dtype) for w, A, _ in terms], dim=0)",
        "a = torch.cat([abs(w) * A.to(device=device, dtype=dtype) for w, A, _ in terms], dim=0)",
        ("tests/test_lowrank.py::test_negation",),
        "the exact sum loses the sign of negative weights",
    ),
    # ---------------------------------------------------------------- lowrank.py
    M(
        "energy-rank-on-S",
        "adaptermerge/lowrank.py",
        "    sq = S.double() ** 2\n    total = float(sq.sum())\n    if total == 0.0:\n        return 0",
        "    sq = S.double()\n    total = float(sq.sum())\n    if total == 0.0:\n        return 0",
        ("tests/test_lowrank.py::test_energy_keeps_at_least_requested",),
        "the energy rank is computed on S instead of S^2",
    ),
    M(
        "kept-energy-on-S",
        "adaptermerge/lowrank.py",
        "    sq = S.double() ** 2\n    total = float(sq.sum())\n    return 1.0",
        "    sq = S.double()\n    total = float(sq.sum())\n    return 1.0",
        ("tests/test_lowrank.py::test_energy_keeps_at_least_requested",),
        "the reported kept energy is computed on S instead of S^2",
    ),
    M(
        "kept-energy-always-one",
        "adaptermerge/lowrank.py",
        "return 1.0 if total == 0.0 else float(sq[:k].sum()) / total",
        "return 1.0",
        ("tests/test_lowrank.py::test_energy_keeps_at_least_requested",),
        "the reported kept energy is always 1.0",
    ),
    M(
        "truncation-off-by-one",
        "adaptermerge/lowrank.py",
        "    return min(k, S.numel())",
        "    return min(k + 1, S.numel())",
        ("tests/test_lowrank.py::test_energy_keeps_at_least_requested",),
        "the energy truncation keeps one singular value too many",
    ),
    M(
        "factored-svd-core",
        "adaptermerge/lowrank.py",
        "core = rb @ ra.transpose(-1, -2)",
        "core = rb @ ra",
        ("tests/test_lowrank.py::test_factored_svd_matches_dense",),
        "the factored SVD's core misses a transpose",
    ),
    M(
        "conv1d-weight-shape",
        "adaptermerge/lowrank.py",
        'return (inn, out) if self.layout == "conv1d" else (out, inn)',
        "return (out, inn)",
        ("tests/surgery/test_merge.py::test_gpt2_conv1d_and_lora_bias",),
        "a Conv1D delta's stored shape is not transposed",
    ),
    M(
        "frobenius-squared",
        "adaptermerge/lowrank.py",
        "return float(torch.sqrt(torch.clamp(sq, min=0.0)))",
        "return float(torch.clamp(sq, min=0.0))",
        ("tests/cli/test_inspect.py::test_inspect_figures_are_peft_s",),
        "the factored Frobenius norm forgets the square root",
    ),
    # ---------------------------------------------------------------- io/adapter.py
    M(
        "rslora-sqrt-dropped",
        "adaptermerge/io/adapter.py",
        'scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r',
        "scale = alpha / r",
        ("tests/io/test_roundtrip.py::test_random_configs_round_trip_exactly",),
        "rsLoRA scaling alpha/sqrt(r) read as alpha/r",
    ),
    M(
        "pattern-match-order",
        "adaptermerge/io/adapter.py",
        "    for key in pattern_keys:\n        if re.match",
        "    for key in reversed(pattern_keys):\n        if re.match",
        (
            "tests/io/test_adapter.py::test_pattern_matching_like_peft",
            "tests/io/test_adapter.py::test_round_trip_matches_peft[overlapping-patterns]",
        ),
        "rank/alpha patterns matched last-first instead of PEFT's first-first",
    ),
    M(
        "embedding-read-transpose",
        "adaptermerge/io/adapter.py",
        'lr = LowRank(A=eb.float().T.contiguous() * scale, B=ea.float().T.contiguous(), layout="embedding", scale=scale)',
        'lr = LowRank(A=ea.float() * scale, B=eb.float(), layout="embedding", scale=scale)',
        ("tests/io/test_adapter.py::test_round_trip_matches_peft",),
        "embedding factors read without the transpose to the weight layout",
    ),
    M(
        "bias-scale-dropped",
        "adaptermerge/io/adapter.py",
        "bias=None if bias is None else bias.float() * scale,",
        "bias=None if bias is None else bias.float(),",
        ("tests/test_combine.py::test_lora_bias_combined_with_plain_adapter",),
        "lora_B bias read without the scaling",
    ),
    M(
        "save-fan-in-fan-out-always",
        "adaptermerge/io/adapter.py",
        '"fan_in_fan_out": any(m.layout == "conv1d" for m in adapter.modules.values()),',
        '"fan_in_fan_out": any(m.layout != "embedding" for m in adapter.modules.values()),',
        ("tests/io/test_roundtrip.py::test_save_load_is_exact",),
        "a Linear adapter is written with fan_in_fan_out (it comes back as Conv1D)",
    ),
    # ---------------------------------------------------------------- the merge executor and planner
    M(
        "merge-conv1d-no-transpose",
        "adaptermerge/surgery/merge.py",
        "ws.addmm_(aa.T, bb.T)",
        "ws.addmm_(bb, aa)",
        ("tests/surgery/test_merge.py::test_gpt2_conv1d_and_lora_bias",),
        "a Conv1D weight receives delta instead of delta^T",
    ),
    M(
        "dora-norm-axis",
        "adaptermerge/surgery/merge.py",
        'dim = 0 if lr.layout == "conv1d" else 1',
        'dim = 1 if lr.layout == "conv1d" else 0',
        ("tests/surgery/test_merge.py::test_dora_matches_peft",),
        "the DoRA norm is taken over the wrong axis",
    ),
    M(
        "merge-rounds-to-bf16",
        "adaptermerge/surgery/merge.py",
        'writer.write_tensor(name, new.to("cpu", want))',
        'writer.write_tensor(name, new.to("cpu", torch.bfloat16).to(want))',
        ("tests/surgery/test_merge.py::test_dora_matches_peft",),
        "a merged weight is rounded to bf16 before the stored dtype",
    ),
    M(
        "quantize-from-unrounded",
        "adaptermerge/surgery/quant.py",
        "dense = ex.merged_weight(job.module, read_tensor(ex.fh(job.src_file), job.src), stored).to(stored)",
        "dense = ex.merged_weight(job.module, read_tensor(ex.fh(job.src_file), job.src), stored).clone()",
        ("tests/surgery/test_quantize_archs.py::test_quantize_equals_transformers",),
        "--quantize quantizes the fp32 merge, not the weight rounded to the stored dtype (bf16 bases)",
    ),
    M(
        "report-norm-squared",
        "adaptermerge/surgery/merge.py",
        "        wn = math.sqrt(wsq)\n",
        "        wn = wsq\n",
        ("tests/surgery/test_merge.py::test_report_delta_norms_are_peft_delta_over_weight",),
        "the streamed merge reports norm(delta) / norm(W)^2",
    ),
    M(
        "merge-rows-block-offset",
        "adaptermerge/surgery/merge.py",
        "self._add_delta(ws, job.module, b[r0:r1], a, False, ST_TO_TORCH[job.src.dtype])",
        "self._add_delta(ws, job.module, b[r0 - b0 : r1 - b0], a, False, ST_TO_TORCH[job.src.dtype])",
        ("tests/surgery/test_merge.py::test_small_buffers_change_nothing",),
        "the streamed merge adds the wrong rows of B @ A after the first read block",
    ),
    M(
        "planner-prefix-not-added",
        "adaptermerge/surgery/plan.py",
        "    return add + name[len(strip) :] if name.startswith(strip) else name",
        "    return name[len(strip) :] if name.startswith(strip) else name",
        ("tests/surgery/test_merge.py::test_bare_adapter_on_task_checkpoint",),
        "the planner strips the adapter's prefix but does not add the checkpoint's",
    ),
    # ---------------------------------------------------------------- bnb4 codec
    M(
        "bnb4-dequant-nibble-order",
        "adaptermerge/io/bnb4.py",
        "nib = torch.stack([byte >> 4, byte & 15], dim=1)",
        "nib = torch.stack([byte & 15, byte >> 4], dim=1)",
        ("tests/io/test_bnb4.py::test_dequantize_equals_bitsandbytes",),
        "4-bit codes unpacked low nibble first",
    ),
    M(
        "bnb4-pack-nibble-order",
        "adaptermerge/io/bnb4.py",
        "packed = (q[0::2] << 4) | q[1::2]",
        "packed = (q[1::2] << 4) | q[0::2]",
        ("tests/io/test_bnb4.py::test_plain_path_is_bitsandbytes_quantize_4bit",),
        "4-bit codes packed low nibble first",
    ),
    M(
        "bnb4-nested-offset",
        "adaptermerge/io/bnb4.py",
        "return code8.index_select(0, absmax.to(torch.int32)) * per_block + offset",
        "return code8.index_select(0, absmax.to(torch.int32)) * per_block",
        ("tests/io/test_bnb4.py::test_dequantize_equals_bitsandbytes",),
        "double-quantized scales decoded without the nested offset",
    ),
]


# --------------------------------------------------------------------------------------------------------------


def tree_files(root: Path) -> list[str]:
    """The files git would carry: tracked, and untracked ones that are not ignored."""
    p = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    return [f for f in p.stdout.split("\0") if f and (root / f).is_file()]


def make_copy(dest: Path) -> None:
    """Copy the working tree to ``dest``; ``adaptermerge_cli`` (``cli/`` in the tree) becomes a link to ``cli``."""
    for f in tree_files(ROOT):
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)
    (dest / "adaptermerge_cli").symlink_to("cli", target_is_directory=True)


def env_for(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def check_imports(copy: Path) -> None:
    """Both packages must come from the copy (ahead of the editable install of the working tree)."""
    code = "import adaptermerge, adaptermerge_cli; print(adaptermerge.__file__); print(adaptermerge_cli.__file__)"
    p = subprocess.run([sys.executable, "-c", code], cwd=copy, env=env_for(copy), capture_output=True, text=True)
    files = p.stdout.split()
    if p.returncode != 0 or len(files) != 2 or not all(Path(f).resolve().is_relative_to(copy.resolve()) for f in files):
        raise SystemExit(f"the copy's packages are not the ones imported there: {p.stdout} {p.stderr}")


def run_tests(copy: Path, tests: list[str], timeout: float) -> tuple[str, float, str]:
    """``(outcome, seconds, first failing test or detail)``; outcome: passed, failed, error or timeout."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:warnings", "-rf", "--hypothesis-seed=0", *tests]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=copy, env=env_for(copy), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - t0, f"no result within {timeout:.0f} s"
    dt = time.perf_counter() - t0
    out = p.stdout + p.stderr
    if p.returncode == 0:
        return "passed", dt, ""
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
    if p.returncode in (1, 2) and (failed or "error" in out.lower()):
        return "failed", dt, failed[0] if failed else out.strip().splitlines()[-1]
    return "error", dt, f"pytest exit {p.returncode}: {out.strip().splitlines()[-1] if out.strip() else ''}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="print the mutations and exit")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutations")
    ap.add_argument("--skip-baseline", action="store_true", help="do not run the targeted tests unmutated first")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per pytest run (default 900)")
    ap.add_argument("--json", dest="json_path", help="also write the results to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy (printed)")
    args = ap.parse_args(argv)

    chosen = MUTATIONS
    if args.only:
        unknown = set(args.only) - {m.name for m in MUTATIONS}
        if unknown:
            ap.error(f"unknown mutation(s): {', '.join(sorted(unknown))}")
        chosen = [m for m in MUTATIONS if m.name in args.only]
    names = [m.name for m in MUTATIONS]
    assert len(names) == len(set(names)), "mutation names must be unique"
    if args.list:
        for m in chosen:
            print(f"{m.name:34} {m.file:34} {m.what}")
            for t in m.tests:
                print(f"{'':34}   {t}")
        return 0

    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="mutation_check_"))
    copy = tmp / "repo"
    copy.mkdir()
    results: list[dict] = []
    try:
        make_copy(copy)
        check_imports(copy)
        print(f"mutation check: {len(chosen)} mutations, copy of {ROOT} in {copy}", flush=True)
        stale = []
        for m in chosen:
            n = (copy / m.file).read_text(encoding="utf-8").count(m.original)
            if n != 1:
                stale.append(m)
                results.append({**asdict(m), "outcome": "stale", "seconds": 0.0, "detail": f"snippet found {n} times"})
        live = [m for m in chosen if m not in stale]
        if not args.skip_baseline and live:
            tests = sorted({t for m in live for t in m.tests})
            print(f"baseline: {len(tests)} targeted tests, unmutated ...", flush=True)
            outcome, dt, detail = run_tests(copy, tests, args.timeout * 2)
            print(f"baseline {outcome} in {dt:.0f} s {detail}", flush=True)
            if outcome != "passed":
                print("the targeted tests fail without any mutation: fix them first", file=sys.stderr)
                return 1
        for i, m in enumerate(live, 1):
            path = copy / m.file
            original = path.read_text(encoding="utf-8")
            try:
                path.write_text(original.replace(m.original, m.mutated), encoding="utf-8")
                outcome, dt, detail = run_tests(copy, list(m.tests), args.timeout)
            finally:
                path.write_text(original, encoding="utf-8")
            verdict = {"failed": "killed", "timeout": "killed (timeout)", "passed": "SURVIVED"}.get(outcome, "ERROR")
            print(f"[{i:2d}/{len(live)}] {verdict:16} {m.name:34} {dt:6.1f} s  {detail}", flush=True)
            results.append({**asdict(m), "outcome": verdict, "seconds": round(dt, 1), "detail": detail})
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    total = time.perf_counter() - t_start
    bad = [r for r in results if not r["outcome"].startswith("killed")]
    killed = len(results) - len(bad)
    print(f"\n{killed} of {len(results)} mutations killed in {total:.0f} s")
    for r in bad:
        print(f"  {r['outcome']}: {r['name']} ({r['file']}): {r['what']} {r['detail']}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"seconds": round(total), "results": results}, indent=2) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
