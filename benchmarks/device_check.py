"""GPU check: the ``--device cuda`` paths against the CPU ones and against independent references.

Run it once on a machine with a CUDA device (a minute or two)::

    python benchmarks/device_check.py                 # device cuda
    python benchmarks/device_check.py --device cpu    # dry run of the same checks on CPU (CI-safe logic test)

Each check compares the result computed on the device twice: with the same computation on the CPU (the device
must not change the result), and with a reference that does not use adaptermerge's code (PEFT's deltas and
models, transformers + bitsandbytes, a dense torch SVD), so that a wrong result computed the same way on both
devices fails too. With ``--device cpu`` the first comparison is trivially met; the second still checks the
logic of every path. Checks, each printed as PASS/FAIL with its figures:

1. ``combine`` linear: every module's ``B @ A`` equals the CPU result and ``0.7 delta_a + 0.3 delta_b`` (PEFT);
   ``combine`` svd rank 8: equals the CPU result and the best rank-8 approximation of that sum (dense SVD);
2. ``merge_into_base`` fp32: every tensor equals the CPU merge and ``W + sum_i w_i delta_i`` (PEFT's deltas);
   bf16: at most one rounding step from the CPU merge and from ``bf16(W + sum_i w_i delta_i)``;
3. ``merge --quantize nf4``: 4-bit codes equal to the CPU ones and to what transformers + bitsandbytes write for
   PEFT's merged model (``merge_and_unload``), except at rounding ties;
4. a 4-bit base re-quantized by a device merge loads in transformers on the device as ``Linear4bit`` with no
   missing or unexpected keys; its logits match the same checkpoint on CPU and the fp32 model holding the weights
   bitsandbytes dequantizes from it; each merged weight is no further from ``dequant(W4) + delta`` (PEFT) than
   bitsandbytes' own quantization of that target;
5. the CLI ``adaptermerge --threads 2 combine ... --device DEVICE`` and ``merge ... --device DEVICE`` run and
   write PEFT's weighted sum (svd: its dense rank-8 truncation) and PEFT's merge;
6. the paths on a base loaded once with adapters swapped in place (:class:`adaptermerge.live.LiveModel`):
   ``evaluate`` (per-task loss equal to the CPU's and to PEFT's model on the CPU), RegMean (statistics collected on
   the device: the merge equal to the CPU's), ``distill`` (its first loss equal to the CPU's and to the mean KL that
   PEFT's models give; after its steps PEFT's KL to each teacher is lower than the init's) and ``tune`` (the same
   candidates and held-out scores as on the CPU, to float tolerance).

The comparison functions are importable (``tests/test_device_check.py`` checks that each fails on a perturbed
result). The exit status is 1 when a check fails, 2 when the device is not available.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FAILED: list[str] = []
WEIGHTS = [0.7, 0.3]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# tolerances of the comparisons below
REL_TOL = 1e-5  # fp32 products and tensors, relative Frobenius error
SVD_TOL = 1e-4  # relative error against the dense truncated SVD
BF16_STEPS = 1.0  # |a - b| / (|b| 2^-7): one bf16 rounding step
CODES_TOL = 1e-3  # fraction of 4-bit codes that may differ (rounding ties)
LOGITS_TOL = 1e-3  # device 4-bit kernels against the CPU reference kernel


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------- comparisons


def worst_rel(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """The largest relative Frobenius error over the tensors of ``want`` (inf when the names differ)."""
    if set(got) != set(want) or not want:
        return float("inf")
    return max(rel(got[k], want[k]) for k in want)


def worst_bf16_steps(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """The largest ``|got - want| / (|want| 2^-7)`` (bf16 rounding steps; inf when names or dtypes differ)."""
    if set(got) != set(want) or not want or any(got[k].dtype != want[k].dtype for k in want):
        return float("inf")
    worst = 0.0
    for k in want:
        g, w = got[k].double().cpu(), want[k].double().cpu()
        worst = max(worst, float(((g - w).abs() / (w.abs() * 2.0**-7).clamp_min(1e-30)).max()))
    return worst


def truncation_error(got: dict[str, torch.Tensor], exact: dict[str, torch.Tensor], rank: int) -> float:
    """The largest relative error against the best rank-``rank`` approximation of the exact sum (dense SVD; unique
    where ``s_rank > s_rank+1``, which the check's adapters give by 8% of ``s_1`` or more); inf when names differ."""
    if set(got) != set(exact) or not exact:
        return float("inf")
    worst = 0.0
    for k, e in exact.items():
        u, s, vh = torch.linalg.svd(e.double().cpu(), full_matrices=False)
        worst = max(worst, rel(got[k], (u[:, :rank] * s[:rank]) @ vh[:rank]))
    return worst


def codes_differ(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """Fraction of differing bytes over the 4-bit codes of ``want`` (packed weights and double-quantized scales);
    1.0 when names, shapes or dtypes differ, or when another tensor is not equal to float32 rounding."""
    state = [k for k in want if ".quant_state." in k]
    if set(got) != set(want) or any(got[k].shape != want[k].shape or got[k].dtype != want[k].dtype for k in want if k not in state):  # fmt: skip
        return 1.0
    if any(not states_agree(got[k], want[k]) for k in state):
        return 1.0
    codes = [k for k in want if want[k].dtype == torch.uint8 and "quant_state" not in k]
    others = [k for k in want if k not in codes and "quant_state" not in k]
    if not codes or any(not torch.allclose(got[k].double(), want[k].double(), rtol=1e-5, atol=1e-7) for k in others):
        return 1.0
    return sum(int((got[k] != want[k]).sum()) for k in codes) / sum(want[k].numel() for k in codes)


def states_agree(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Two packed bitsandbytes quant states (``...weight.quant_state.bitsandbytes__nf4``: JSON text as bytes) agree:
    the same fields, equal except ``nested_offset`` (the mean of the block scales, computed on the device), which
    may differ by float32 rounding and so print with another number of digits."""
    import json

    try:
        g, w = (json.loads(bytes(t.tolist()).decode()) for t in (got, want))
    except (ValueError, UnicodeDecodeError):
        return False
    if set(g) != set(w):
        return False
    return all(abs(g[k] - w[k]) <= 1e-6 * max(abs(w[k]), 1e-12) if k == "nested_offset" else g[k] == w[k] for k in w)


def codes_mismatch(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> str:
    """Why :func:`codes_differ` gave 1.0: the first names, shapes, dtypes or non-code tensors that differ."""
    if set(got) != set(want):
        return f"names differ: only in result {sorted(set(got) - set(want))[:3]}, only in reference {sorted(set(want) - set(got))[:3]}"  # fmt: skip
    if bad_state := [k for k in want if ".quant_state." in k and not states_agree(got[k], want[k])]:
        return f"{len(bad_state)} packed quant states differ, e.g. {bad_state[0]}"
    bad = [f"{k} {tuple(got[k].shape)} {got[k].dtype} vs {tuple(want[k].shape)} {want[k].dtype}" for k in want
           if ".quant_state." not in k and (got[k].shape != want[k].shape or got[k].dtype != want[k].dtype)]  # fmt: skip
    if bad:
        return f"{len(bad)} tensors differ in shape or dtype, e.g. {bad[0]}"
    others = [
        k for k in want if not (want[k].dtype == torch.uint8 and "quant_state" not in k) and "quant_state" not in k
    ]
    diff = [(k, float((got[k].double() - want[k].double()).abs().max())) for k in others
            if not torch.allclose(got[k].double(), want[k].double(), rtol=1e-5, atol=1e-7)]  # fmt: skip
    if diff:
        return f"{len(diff)} non-code tensors differ, e.g. {diff[0][0]} by up to {diff[0][1]:.3g}"
    return "no 4-bit code tensors" if not any(v.dtype == torch.uint8 for v in want.values()) else "codes differ"


# ------------------------------------------------------------------------------------------- references


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def peft_weighted_sum(adapters: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """``sum_i w_i delta_i`` per LoRA module, from PEFT's ``get_delta_weight`` (float64)."""
    from tests.helpers import peft_deltas, peft_model, tiny_llama

    pm = peft_model(tiny_llama, *adapters)
    out: dict[str, torch.Tensor] = {}
    for i, w in enumerate(weights):
        for name, d in peft_deltas(pm, f"a{i}").items():
            out[name] = out.get(name, 0) + w * d.double()
    return out


def merged_reference(base: Path, exact: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor of ``base`` with ``W + delta`` (fp32, rounded once to the stored dtype) on the LoRA layers."""
    ref = tensors(base)
    for name, d in exact.items():
        w = ref[f"{name}.weight"]
        ref[f"{name}.weight"] = (w.float() + d.float()).to(w.dtype)
    return ref


def adapter_products(folder: Path) -> dict[str, torch.Tensor]:
    """The deltas PEFT reads from an adapter folder (``get_delta_weight``)."""
    from tests.helpers import peft_deltas, peft_model, tiny_llama

    return peft_deltas(peft_model(tiny_llama, folder), "a0")


def peft_task_loss(base: Path, adapter: Path, task_file: Path) -> float:
    """Token-mean completion loss of PEFT's model (base + adapter from the folders, on the CPU): the reference."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adaptermerge.data import read_task_file, tokenize_row
    from adaptermerge.evaluation import pad_batch
    from adaptermerge.models import load_tokenizer

    tok = load_tokenizer(base)
    rows = [t for t in (tokenize_row(r, tok, 48) for r in read_task_file(task_file).rows) if t is not None]
    ids, labels, mask = pad_batch(rows, tok.pad_token_id)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100))


def peft_kl(base: Path, teacher: Path, student: Path, task_file: Path) -> float:
    """Mean over real tokens of KL(teacher || student), both PEFT models on the CPU: distillation's reference."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adaptermerge.data import read_task_file, tokenize_row
    from adaptermerge.evaluation import pad_batch
    from adaptermerge.models import load_tokenizer

    tok = load_tokenizer(base)
    rows = [t for t in (tokenize_row(r, tok, 48) for r in read_task_file(task_file).rows) if t is not None]
    ids, _, mask = pad_batch(rows, tok.pad_token_id)
    out = []
    for folder in (teacher, student):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder).eval()
        with torch.no_grad():
            out.append(torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1))
    t, s = out
    return float((t.exp() * (t - s)).sum(-1)[mask.bool()].mean())


def live_checks(tmp: Path, dev: str) -> None:
    """Check 6: evaluate, RegMean, distill and tune on ``dev`` against the CPU and PEFT's models on the CPU."""
    import adaptermerge
    from adaptermerge.combination import save_combined
    from adaptermerge.synthetic import make_examples, save_tiny_base, write_jsonl
    from tests.helpers import adapter_on_folder

    base = save_tiny_base(tmp / "base", init_range=0.2)
    ads = [adapter_on_folder(base, tmp / n, s, ["q_proj", "v_proj", "up_proj", "down_proj"], alpha=4, b_scale=6.0)
           for n, s in (("a", 1), ("b", 2))]  # fmt: skip
    tasks = {t: write_jsonl(tmp / f"{t}.jsonl", make_examples(t, 12, seed=3)) for t in ("reverse", "upper")}

    rep = {d: adaptermerge.evaluate(base, [("a", ads[0])], tasks, metrics=["loss"], device=d) for d in (dev, "cpu")}
    got, cpu = rep[dev].scores["loss"]["a"], rep["cpu"].scores["loss"]["a"]
    ref = {t: peft_task_loss(base, ads[0], f) for t, f in tasks.items()}
    vs_cpu = max(abs(got[t] - cpu[t]) / cpu[t] for t in tasks)
    vs_ref = max(abs(got[t] - ref[t]) / ref[t] for t in tasks)
    check(
        "evaluate on device",
        vs_cpu < 1e-4 and vs_ref < 1e-4,
        f"loss rel. error vs CPU {vs_cpu:.2e}, vs PEFT {vs_ref:.2e}",
    )

    rm = {d: adaptermerge.combine(ads, method="regmean", base=base, tasks=tasks, device=d) for d in (dev, "cpu")}
    err = worst_rel({m: lr.delta() for m, lr in rm[dev].modules.items()}, {m: lr.delta() for m, lr in rm["cpu"].modules.items()})  # fmt: skip
    check("regmean on device", err < 1e-4, f"worst module rel. error vs CPU {err:.2e}")

    settings = adaptermerge.DistillSettings(steps=20, lr=3e-3, batch_size=6)
    init = adaptermerge.combine(ads, method="linear")
    dist = {d: adaptermerge.distill(base, ads, tasks, init=init, settings=settings, device=d) for d in (dev, "cpu")}
    first = {d: m.provenance["distill"]["loss_first"] for d, m in dist.items()}
    start, done = save_combined(init, tmp / "init"), adaptermerge.save_distilled(dist[dev], tmp / "distilled")
    before = [peft_kl(base, a, start, f) for a, f in zip(ads, tasks.values(), strict=True)]
    after = [peft_kl(base, a, done, f) for a, f in zip(ads, tasks.values(), strict=True)]
    one = adaptermerge.distill(base, ads, tasks, init=init, settings=adaptermerge.DistillSettings(steps=1, batch_size=12), device=dev)  # fmt: skip
    vs_ref = abs(one.provenance["distill"]["loss_first"] - sum(before) / 2) / (sum(before) / 2)
    drift = worst_rel({m: lr.delta() for m, lr in dist[dev].modules.items()}, {m: lr.delta() for m, lr in dist["cpu"].modules.items()})  # fmt: skip
    check(
        "distill on device",
        abs(first[dev] - first["cpu"]) / first["cpu"] < 1e-4
        and vs_ref < 1e-4
        and all(x < y for x, y in zip(after, before, strict=True))
        and drift < 1e-2,  # fmt: skip
        f"first loss vs CPU {abs(first[dev] - first['cpu']) / first['cpu']:.2e}, vs PEFT KL {vs_ref:.2e}; PEFT KL "
        f"{' / '.join(f'{x:.3f}' for x in before)} -> {' / '.join(f'{x:.3f}' for x in after)}; merge vs CPU run {drift:.2e}",
    )

    runs = {d: adaptermerge.tune(base, ads, tasks, methods=["linear", "regmean"], budget=6, seed=1, device=d) for d in (dev, "cpu")}  # fmt: skip
    same = [c.method for c in runs[dev].candidates] == [c.method for c in runs["cpu"].candidates]
    obj = max(abs(x.objective - y.objective) / abs(y.objective) for x, y in zip(runs[dev].candidates, runs["cpu"].candidates, strict=True))  # fmt: skip
    check("tune on device", same and obj < 1e-3, f"{len(runs[dev].candidates)} candidates; worst objective rel. difference vs CPU {obj:.2e}")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="device to check against the CPU (default cuda)")
    args = ap.parse_args()
    dev = args.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: torch sees no CUDA device (torch {torch.__version__}); nothing was checked", file=sys.stderr)
        return 2
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import adaptermerge
    from tests.helpers import input_ids, make_adapter, peft_deltas, tiny_llama, use_reference_4bit_kernels

    use_reference_4bit_kernels()  # CPU 4-bit layers: dequantize + fp32 matmul, comparable at fp32 tolerances

    name = torch.cuda.get_device_name(0) if dev.startswith("cuda") else "cpu"
    print(f"device_check: {dev} ({name}); torch {torch.__version__}, bitsandbytes {bnb.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="device_check_") as tmp_s:
        tmp = Path(tmp_s)
        a = make_adapter(tmp / "a", tiny_llama, r=8, lora_alpha=16, target_modules=TARGETS, seed=1)
        b = make_adapter(tmp / "b", tiny_llama, r=4, lora_alpha=4, target_modules=TARGETS, seed=2)
        exact = peft_weighted_sum([a, b], WEIGHTS)

        # 1. combine
        for method, kw in (("linear", {}), ("svd", {"rank": 8})):
            t0 = time.perf_counter()
            on_dev = adaptermerge.combine([a, b], WEIGHTS, method=method, device=dev, **kw)
            t1 = time.perf_counter()
            on_cpu = adaptermerge.combine([a, b], WEIGHTS, method=method, device="cpu", **kw)
            d_dev = {m: lr.delta() for m, lr in on_dev.modules.items()}
            vs_cpu = worst_rel(d_dev, {m: lr.delta() for m, lr in on_cpu.modules.items()})
            vs_ref = worst_rel(d_dev, exact) if method == "linear" else truncation_error(d_dev, exact, 8)
            tol = REL_TOL if method == "linear" else SVD_TOL
            ref_what = "PEFT weighted sum" if method == "linear" else "rank-8 truncated SVD of the PEFT weighted sum"
            check(
                f"combine {method}",
                vs_cpu < REL_TOL and vs_ref < tol,
                f"worst module rel. error vs CPU {vs_cpu:.2e}, vs {ref_what} {vs_ref:.2e} ({t1 - t0:.2f} s)",
            )

        # 2. merge, fp32 and bf16
        for dtype in (torch.float32, torch.bfloat16):
            base = tmp / f"base-{dtype}".replace("torch.", "")
            tiny_llama(dtype=dtype).save_pretrained(base, max_shard_size="60KB")
            t0 = time.perf_counter()
            adaptermerge.merge_into_base(base, [a, b], tmp / "m-dev", weights=WEIGHTS, device=dev)
            t1 = time.perf_counter()
            adaptermerge.merge_into_base(base, [a, b], tmp / "m-cpu", weights=WEIGHTS, device="cpu")
            td, tc, ref = tensors(tmp / "m-dev"), tensors(tmp / "m-cpu"), merged_reference(base, exact)
            if dtype == torch.float32:
                vs_cpu, vs_ref = worst_rel(td, tc), worst_rel(td, ref)
                check("merge fp32", vs_cpu < 1e-6 and vs_ref < 1e-6, f"worst tensor rel. error vs CPU {vs_cpu:.2e}, vs W + PEFT deltas {vs_ref:.2e}")  # fmt: skip
            else:
                vs_cpu, vs_ref = worst_bf16_steps(td, tc), worst_bf16_steps(td, ref)
                check("merge bf16", vs_cpu <= BF16_STEPS and vs_ref <= BF16_STEPS, f"at most {vs_cpu:.2f} bf16 steps from CPU, {vs_ref:.2f} from bf16(W + PEFT deltas)")  # fmt: skip
            print(f"      ({dtype}: device merge {t1 - t0:.2f} s)")
            for p in (tmp / "m-dev", tmp / "m-cpu"):
                shutil.rmtree(p)

        # 3. --quantize nf4 on the device
        fp32 = tmp / "base-float32"
        cfg = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )  # fmt: skip
        adaptermerge.merge_into_base(fp32, a, tmp / "q-dev", quantize="nf4", device=dev)
        adaptermerge.merge_into_base(fp32, a, tmp / "q-cpu", quantize="nf4", device="cpu")
        PeftModel.from_pretrained(tiny_llama(), str(a)).merge_and_unload().save_pretrained(tmp / "peft-dense")
        AutoModelForCausalLM.from_pretrained(tmp / "peft-dense", quantization_config=cfg, device_map="cpu").save_pretrained(tmp / "q-ref")  # fmt: skip
        qd, qc, qr = tensors(tmp / "q-dev"), tensors(tmp / "q-cpu"), tensors(tmp / "q-ref")
        vs_cpu, vs_ref = codes_differ(qd, qc), codes_differ(qd, qr)
        check("quantize nf4", vs_cpu <= CODES_TOL and vs_ref <= CODES_TOL, f"packed bytes differing: {vs_cpu:.2e} vs CPU, {vs_ref:.2e} vs transformers + bitsandbytes on PEFT's merge")  # fmt: skip
        for what, want in (("CPU", qc), ("reference", qr)):
            if codes_differ(qd, want) == 1.0:
                print(f"      vs {what}: {codes_mismatch(qd, want)}")

        # 4. a 4-bit base, merged on the device, loaded on the device
        AutoModelForCausalLM.from_pretrained(fp32, quantization_config=cfg, device_map="cpu").save_pretrained(
            tmp / "nf4"
        )
        rep = adaptermerge.merge_into_base(tmp / "nf4", a, tmp / "nf4-merged", device=dev)
        m_dev, info = AutoModelForCausalLM.from_pretrained(tmp / "nf4-merged", device_map=dev, output_loading_info=True)
        m_cpu = AutoModelForCausalLM.from_pretrained(tmp / "nf4-merged", device_map="cpu")
        q_base = AutoModelForCausalLM.from_pretrained(tmp / "nf4", device_map="cpu")

        def dequantized(model: torch.nn.Module) -> dict[str, torch.Tensor]:
            return {
                n: bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state).float().cpu()
                for n, m in model.named_modules()
                if isinstance(m, bnb.nn.Linear4bit)
            }

        ours, w4 = dequantized(m_cpu), dequantized(q_base)
        dense = tiny_llama()
        mods = dict(dense.named_modules())
        with torch.no_grad():
            for n, w in ours.items():
                mods[n].weight.copy_(w)
        deltas = peft_deltas(PeftModel.from_pretrained(tiny_llama(), str(a)), "default")
        worse = []
        for n, d in deltas.items():
            target = w4[n] + d
            q, st = bnbf.quantize_4bit(target, blocksize=64, quant_type="nf4", compress_statistics=True)
            if rel(ours[n], target) > rel(bnbf.dequantize_4bit(q, st).float(), target) + 1e-6:
                worse.append(n)
        n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in m_dev.modules())
        ids = input_ids()
        with torch.no_grad():
            ld = m_dev(input_ids=ids.to(dev)).logits.float().cpu()
            lc = m_cpu(input_ids=ids).logits.float()
            lr = dense(input_ids=ids).logits.float()
        err, err_ref = rel(ld, lc), rel(ld, lr)
        ok = n4 == len(q_base.model.layers) * len(TARGETS) and len(rep.modules) == len(deltas) and not worse
        ok = (
            ok
            and not info["missing_keys"]
            and not info["unexpected_keys"]
            and err < LOGITS_TOL
            and err_ref < LOGITS_TOL
        )
        check(
            "4-bit output on device",
            ok,
            f"{n4} Linear4bit modules, logits rel. error vs CPU {err:.2e}, vs fp32 model of the dequantized weights "
            f"{err_ref:.2e}; {len(deltas) - len(worse)} of {len(deltas)} merged weights no further from "
            "dequant(W4) + delta than bitsandbytes' own quantization of it",
        )

        # 5. the CLI
        cli = [sys.executable, "-m", "adaptermerge_cli", "--threads", "2"]
        runs = {
            "cli combine": [*cli, "combine", str(a), str(b), "--weights", "0.7", "0.3", "--method", "svd",
                            "--rank", "8", "-o", str(tmp / "cli-c"), "--device", dev, "--quiet"],
            "cli merge": [*cli, "merge", str(fp32), str(a), "-o", str(tmp / "cli-m"), "--device", dev, "--quiet"],
        }  # fmt: skip
        for label, cmd in runs.items():
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if p.returncode != 0:
                check(label, False, f"exit {p.returncode} {p.stderr.strip()[-300:]}")
            elif label == "cli combine":
                err = truncation_error(adapter_products(tmp / "cli-c"), exact, 8)
                check(label, err < SVD_TOL, f"exit 0; rel. error vs rank-8 truncated SVD of the PEFT sum {err:.2e}")
            else:
                vs_ref = worst_rel(tensors(tmp / "cli-m"), merged_reference(fp32, peft_weighted_sum([a], [1.0])))
                check(label, vs_ref < 1e-6, f"exit 0; worst tensor rel. error vs W + PEFT delta {vs_ref:.2e}")
        # 6. LiveModel paths: evaluate, regmean, distill, tune
        live_checks(tmp / "live", dev)
    print(f"\n{'all checks passed' if not FAILED else 'FAILED: ' + ', '.join(FAILED)}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
