"""GPU check: the ``--device cuda`` paths against the CPU ones, and 4-bit outputs loaded on the GPU.

Run it once on a machine with a CUDA device (a minute or two)::

    python benchmarks/device_check.py                 # device cuda
    python benchmarks/device_check.py --device cpu    # dry run of the same checks on CPU (CI-safe logic test)

Checks, each printed as PASS/FAIL with its figures:

1. ``combine`` (linear, svd rank 8) computed on the device equals the CPU result (relative error of every
   module's product ``B @ A``);
2. ``merge_into_base`` on the device equals the CPU merge: fp32 checkpoint (relative error), bf16 checkpoint
   (at most one bf16 rounding step apart);
3. ``merge --quantize nf4`` on the device: 4-bit codes equal to the CPU ones except at rounding ties;
4. a 4-bit base re-quantized by a device merge loads in transformers on the device as ``Linear4bit`` with no
   missing or unexpected keys, and its logits match the same checkpoint loaded on CPU;
5. the CLI ``adaptermerge --threads 2 combine ... --device DEVICE`` and ``merge ... --device DEVICE`` run.

The exit status is 1 when a check fails, 2 when the device is not available.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FAILED: list[str] = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="device to check against the CPU (default cuda)")
    args = ap.parse_args()
    dev = args.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: torch sees no CUDA device (torch {torch.__version__}); nothing was checked", file=sys.stderr)
        return 2
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import adaptermerge
    from tests.helpers import input_ids, make_adapter, tiny_llama

    name = torch.cuda.get_device_name(0) if dev.startswith("cuda") else "cpu"
    print(f"device_check: {dev} ({name}); torch {torch.__version__}, bitsandbytes {bnb.__version__}", flush=True)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    with tempfile.TemporaryDirectory(prefix="device_check_") as tmp_s:
        tmp = Path(tmp_s)
        a = make_adapter(tmp / "a", tiny_llama, r=8, lora_alpha=16, target_modules=targets, seed=1)
        b = make_adapter(tmp / "b", tiny_llama, r=4, lora_alpha=4, target_modules=targets, seed=2)

        # 1. combine
        for method, kw in (("linear", {}), ("svd", {"rank": 8})):
            t0 = time.perf_counter()
            on_dev = adaptermerge.combine([a, b], [0.7, 0.3], method=method, device=dev, **kw)
            t1 = time.perf_counter()
            on_cpu = adaptermerge.combine([a, b], [0.7, 0.3], method=method, device="cpu", **kw)
            worst = max(rel(on_dev.modules[m].delta(), on_cpu.modules[m].delta()) for m in on_cpu.modules)
            check(f"combine {method}", worst < 1e-5, f"worst module rel. error {worst:.2e} ({t1 - t0:.2f} s)")

        # 2. merge, fp32 and bf16
        for dtype, tol in ((torch.float32, None), (torch.bfloat16, "ulp")):
            base = tmp / f"base-{dtype}".replace("torch.", "")
            tiny_llama(dtype=dtype).save_pretrained(base, max_shard_size="60KB")
            t0 = time.perf_counter()
            adaptermerge.merge_into_base(base, [a, b], tmp / "m-dev", weights=[0.7, 0.3], device=dev)
            t1 = time.perf_counter()
            adaptermerge.merge_into_base(base, [a, b], tmp / "m-cpu", weights=[0.7, 0.3], device="cpu")
            td, tc = tensors(tmp / "m-dev"), tensors(tmp / "m-cpu")
            if tol is None:
                worst = max(rel(td[k], tc[k]) for k in tc)
                check("merge fp32", td.keys() == tc.keys() and worst < 1e-6, f"worst tensor rel. error {worst:.2e}")
            else:
                steps = max(
                    float(
                        ((td[k].float() - tc[k].float()).abs() / (tc[k].float().abs() * 2.0**-7).clamp_min(1e-30)).max()
                    )
                    for k in tc
                )
                check("merge bf16", td.keys() == tc.keys() and steps <= 1.0, f"at most {steps:.2f} bf16 ulp apart")
            print(f"      ({dtype}: device merge {t1 - t0:.2f} s)")
            for p in (tmp / "m-dev", tmp / "m-cpu"):
                import shutil

                shutil.rmtree(p)

        # 3. --quantize nf4 on the device
        fp32 = tmp / "base-float32"
        adaptermerge.merge_into_base(fp32, a, tmp / "q-dev", quantize="nf4", device=dev)
        adaptermerge.merge_into_base(fp32, a, tmp / "q-cpu", quantize="nf4", device="cpu")
        qd, qc = tensors(tmp / "q-dev"), tensors(tmp / "q-cpu")
        packed = [k for k in qc if k.endswith(".weight") and qc[k].dtype == torch.uint8]
        diff = sum(int((qd[k] != qc[k]).sum()) for k in packed)
        total = sum(qc[k].numel() for k in packed)
        check("quantize nf4", qd.keys() == qc.keys() and diff <= total * 1e-3, f"{diff} of {total} packed bytes differ")

        # 4. a 4-bit base, merged on the device, loaded on the device
        cfg = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )  # fmt: skip
        AutoModelForCausalLM.from_pretrained(fp32, quantization_config=cfg, device_map="cpu").save_pretrained(
            tmp / "nf4"
        )
        rep = adaptermerge.merge_into_base(tmp / "nf4", a, tmp / "nf4-merged", device=dev)
        m_dev, info = AutoModelForCausalLM.from_pretrained(tmp / "nf4-merged", device_map=dev, output_loading_info=True)
        m_cpu = AutoModelForCausalLM.from_pretrained(tmp / "nf4-merged", device_map="cpu")
        n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in m_dev.modules())
        ids = input_ids()
        with torch.no_grad():
            ld = m_dev(input_ids=ids.to(dev)).logits.float().cpu()
            lc = m_cpu(input_ids=ids).logits.float()
        err = rel(ld, lc)
        ok = n4 == len(rep.modules) and not info["missing_keys"] and not info["unexpected_keys"] and err < 1e-3
        check("4-bit output on device", ok, f"{n4} Linear4bit modules, logits rel. error vs CPU {err:.2e}")

        # 5. the CLI
        cli = [sys.executable, "-m", "adaptermerge_cli", "--threads", "2"]
        runs = {
            "cli combine": [*cli, "combine", str(a), str(b), "--weights", "0.7", "0.3", "--method", "svd",
                            "--rank", "8", "-o", str(tmp / "cli-c"), "--device", dev, "--quiet"],
            "cli merge": [*cli, "merge", str(fp32), str(a), "-o", str(tmp / "cli-m"), "--device", dev, "--quiet"],
        }  # fmt: skip
        for label, cmd in runs.items():
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            check(label, p.returncode == 0, f"exit {p.returncode} {p.stderr.strip()[-300:]}")
    print(f"\n{'all checks passed' if not FAILED else 'FAILED: ' + ', '.join(FAILED)}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
