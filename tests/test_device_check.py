"""The prepared GPU check script keeps working, and its checks can fail.

``benchmarks/device_check.py --device cpu`` can only compare the CPU with itself on the "device against CPU" side of
each check, so that side passes trivially here. Each check therefore also compares the device result with a
reference that does not use adaptermerge's code (PEFT's deltas and merge, transformers + bitsandbytes quantization,
a dense SVD, bitsandbytes' dequantization): the dry run below exercises those comparisons on real results, so a
wrong result of a path (wrong weights, transpose, rank, rounding, codes) fails here even without a GPU. The second
test feeds each comparison a perturbed result of the size a real bug produces and asserts that it fails, so that a
comparison which always passes (a tolerance too loose, a result compared with itself) is caught too.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import load_benchmark

ROOT = Path(__file__).resolve().parent.parent
CHECKS = [
    "combine linear", "combine svd", "merge fp32", "merge bf16", "quantize nf4", "4-bit output on device",
    "cli combine", "cli merge", "evaluate on device", "regmean on device", "distill on device", "tune on device",
]  # fmt: skip


def device_check():
    return load_benchmark("device_check")


def test_device_check_dry_run_on_cpu() -> None:
    p = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--device", "cpu"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    passed = [line.split(":")[0][len("PASS  ") :] for line in p.stdout.splitlines() if line.startswith("PASS  ")]
    assert passed == CHECKS and "all checks passed" in p.stdout
    for needle in ("vs PEFT weighted sum", "vs rank-8 truncated SVD of the PEFT", "vs W + PEFT deltas", "from bf16(W + PEFT",
                   "vs transformers + bitsandbytes", "vs fp32 model of the dequantized weights", "vs PEFT KL"):  # fmt: skip
        assert needle in p.stdout


def test_each_comparison_fails_on_a_perturbed_result() -> None:
    import bitsandbytes.functional as bnbf

    dc = device_check()
    g = torch.Generator().manual_seed(0)
    x = {f"m{i}": torch.randn(48, 32, generator=g) for i in range(3)}
    # relative error: equal passes; a 2e-5 relative change of one tensor, or a missing one, fails
    assert dc.worst_rel(x, dict(x)) == 0.0
    assert dc.worst_rel({**x, "m1": x["m1"] * (1 + 2e-5)}, x) > dc.REL_TOL
    assert dc.worst_rel({k: v for k, v in x.items() if k != "m2"}, x) > dc.REL_TOL
    # bf16 steps: the same rounding passes; two steps (2^-6 relative) or another dtype fails
    b = {k: v.to(torch.bfloat16) for k, v in x.items()}
    assert dc.worst_bf16_steps(b, dict(b)) == 0.0
    assert dc.worst_bf16_steps({**b, "m0": (b["m0"].float() * (1 + 2**-6)).bfloat16()}, b) > dc.BF16_STEPS
    assert dc.worst_bf16_steps({**b, "m0": b["m0"].half()}, b) > dc.BF16_STEPS
    # truncated SVD: the best rank-8 approximation passes; rank 7, or rank 8 of a matrix 1% away, fails
    exact = {k: v.double() @ torch.randn(32, 32, generator=g, dtype=torch.float64) for k, v in x.items()}

    def best(m: torch.Tensor, k: int) -> torch.Tensor:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return (u[:, :k] * s[:k]) @ vh[:k]

    assert dc.truncation_error({k: best(v, 8) for k, v in exact.items()}, exact, 8) < 1e-10
    assert (
        dc.truncation_error({**{k: best(v, 8) for k, v in exact.items()}, "m1": best(exact["m1"], 7)}, exact, 8) > 1e-2
    )
    other = {k: best(v + 0.01 * torch.randn(v.shape, generator=g, dtype=v.dtype), 8) for k, v in exact.items()}
    assert dc.truncation_error(other, exact, 8) > dc.SVD_TOL
    # 4-bit codes: the same tensors pass; 1% of the packed bytes changed, or a scale changed, fails
    q, st = bnbf.quantize_4bit(
        torch.randn(64, 64, generator=g), blocksize=64, quant_type="nf4", compress_statistics=True
    )
    packed = {"w.weight": q, **{f"w.weight.{k}": v for k, v in st.as_dict(packed=True).items()}}
    assert dc.codes_differ(dict(packed), packed) == 0.0
    flipped = q.clone()
    flipped[:: max(1, q.numel() // 20)] ^= 0x11
    assert dc.codes_differ({**packed, "w.weight": flipped}, packed) > dc.CODES_TOL
    stats = next(k for k, v in packed.items() if v.is_floating_point() and v.numel() > 1)
    assert dc.codes_differ({**packed, stats: packed[stats] * 1.01}, packed) == 1.0
    # the packed quant state (JSON as bytes): an offset printed with another number of digits (float32 rounding on
    # the device) agrees; another block size, or an offset off by more than rounding, does not
    import json

    key = next(k for k in packed if ".quant_state." in k)
    state = json.loads(bytes(packed[key].tolist()).decode())

    def pack(**change: object) -> torch.Tensor:
        return torch.tensor(list(json.dumps({**state, **change}).encode()), dtype=torch.uint8)

    off = state["nested_offset"]
    assert dc.codes_differ({**packed, key: pack(nested_offset=float(torch.tensor(off * (1 + 2e-7)).item()))}, packed) == 0.0  # fmt: skip
    assert dc.codes_differ({**packed, key: pack(nested_offset=off * 1.01)}, packed) == 1.0
    assert dc.codes_differ({**packed, key: pack(blocksize=128)}, packed) == 1.0
    assert "packed quant states differ" in dc.codes_mismatch({**packed, key: pack(blocksize=128)}, packed)


def test_device_check_refuses_a_missing_device() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    p = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "device_check.py")], capture_output=True, text=True, cwd=ROOT
    )
    assert p.returncode == 2 and "no CUDA device" in p.stderr and "PASS" not in p.stdout
