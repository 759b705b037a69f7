"""Training throughput of ``adaptermerge train`` against the same PEFT + Trainer script written by hand.

Both sides train the same LoRA (r=16, alpha=32, all linear layers but the head, dropout 0.05) on the same
Llama-shaped base (built from a config, saved with a character tokenizer) with the same data (prompt /
completion rows, loss on the completion only), batch size, learning rate, steps and seed, in one process,
alternating in rounds after an untimed warm-up call of each. Throughput is Trainer's own count of non-padding input tokens
(``include_num_input_tokens_seen="non_padding"``) divided by the loop's time, so both sides are
measured around the same loop by the same callback, on two clocks: wall time and the process's CPU time (the
steadier one on a shared machine; runs are single-threaded by default). The end-to-end time of each call
(loading included) is printed beside it. The goal: ``adaptermerge`` adds no overhead (CPU-time ratio >= 0.95).

    python benchmarks/bench_train.py                 # hidden 256, 4 layers, 40 steps x 5 rounds (3-6 min)
    python benchmarks/bench_train.py --quick         # hidden 128, 2 layers, 15 steps x 2 rounds (~40 s)
    python benchmarks/bench_train.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")


def build(work: Path, hidden: int, layers: int, rows: int) -> tuple[Path, Path]:
    import torch
    from transformers import LlamaForCausalLM

    from adaptermerge.synthetic import char_tokenizer, make_examples, tiny_llama_config, write_jsonl

    torch.manual_seed(0)
    cfg = tiny_llama_config(hidden=hidden, layers=layers, max_positions=128)
    LlamaForCausalLM(cfg).save_pretrained(work / "base")
    char_tokenizer().save_pretrained(work / "base")
    data = []
    for task in ("reverse", "upper", "shift", "sort"):
        data += make_examples(task, rows // 4, seed=1)
    return work / "base", write_jsonl(work / "data.jsonl", data)


class LoopClock:
    """A TrainerCallback timing the training loop on both clocks: wall time and this process's CPU time.

    On a shared machine the wall clock also counts the time other processes held the cores; the CPU time of a
    single-threaded run counts only the work done, so it is the steadier measure of overhead.
    """

    def __new__(cls) -> Any:
        from transformers import TrainerCallback

        class _Clock(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                self.wall, self.cpu = time.perf_counter(), time.process_time()

            def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

        return _Clock()


def ours(base: Path, data: Path, out: Path, a: argparse.Namespace) -> dict[str, float]:
    from adaptermerge.train import train_adapter

    clock = LoopClock()
    t0 = time.perf_counter()
    res = train_adapter(
        base, data, out, steps=a.steps, batch_size=a.batch_size, grad_accum=1, lr=2e-4, max_length=64,
        save_steps=10**6, progress=False, overwrite=True, log=lambda _m: None, callbacks=[clock],
    )  # fmt: skip
    return {"tokens": res.tokens, "runtime": clock.wall, "cpu": clock.cpu, "call": time.perf_counter() - t0}


def by_hand(base: Path, data: Path, out: Path, a: argparse.Namespace) -> dict[str, float]:
    """The script a user would write from the PEFT and transformers docs, with the same settings."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(base)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    examples = []
    for r in rows:
        p = tok(r["prompt"])["input_ids"]
        c = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        examples.append({"input_ids": p + c, "labels": [-100] * len(p) + c})
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=a.batch_size, gradient_accumulation_steps=1,
        learning_rate=2e-4, max_steps=a.steps, logging_steps=max(1, min(10, a.steps // 10)), save_strategy="no",
        report_to="none",
        disable_tqdm=True, seed=0, include_num_input_tokens_seen="non_padding", use_cpu=True,
    )  # fmt: skip
    clock = LoopClock()
    trainer = Trainer(
        model=model, args=args, train_dataset=examples, callbacks=[clock],
        data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
    )  # fmt: skip
    trainer.train()
    model.save_pretrained(out / "adapter")
    return {
        "tokens": trainer.state.num_input_tokens_seen,
        "runtime": clock.wall,
        "cpu": clock.cpu,
        "call": time.perf_counter() - t0,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadier on shared machines)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", dest="json_path")
    a = ap.parse_args()
    if a.quick:
        a.hidden, a.layers, a.steps, a.rounds = 128, 2, 15, 2
    import torch

    torch.set_num_threads(a.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    print(
        f"load average {os.getloadavg()[0]:.2f}; hidden {a.hidden}, {a.layers} layers, {a.steps} steps x batch {a.batch_size}, {a.threads} thread(s)"
    )
    res: dict[str, list[dict[str, Any]]] = {"adaptermerge": [], "by hand": []}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        base, data = build(work, a.hidden, a.layers, rows=a.steps * a.batch_size)
        warm = argparse.Namespace(**{**vars(a), "steps": 3})
        ours(base, data, work / "warm-ours", warm)  # first-call costs (lazy imports, allocator) out of the rounds
        by_hand(base, data, work / "warm-hand", warm)
        for r in range(a.rounds):
            for name, fn in (
                (("adaptermerge", ours), ("by hand", by_hand))
                if r % 2 == 0
                else (("by hand", by_hand), ("adaptermerge", ours))
            ):
                m = fn(base, data, work / f"{name.replace(' ', '-')}-{r}", a)
                m["tokens_per_s"] = m["tokens"] / m["runtime"]
                m["tokens_per_cpu_s"] = m["tokens"] / m["cpu"]
                res[name].append(m)
                print(
                    f"round {r + 1} {name:12s} {m['tokens']:7d} tokens: loop {m['runtime']:6.2f} s wall "
                    f"({m['tokens_per_s']:7.0f} tokens/s), {m['cpu']:6.2f} s CPU ({m['tokens_per_cpu_s']:7.0f} tokens/CPU-s); "
                    f"call {m['call']:.2f} s"
                )
    figures = {
        "cpu_median": {k: statistics.median(m["tokens_per_cpu_s"] for m in v) for k, v in res.items()},
        "wall_best": {k: max(m["tokens_per_s"] for m in v) for k, v in res.items()},
        "wall_median": {k: statistics.median(m["tokens_per_s"] for m in v) for k, v in res.items()},
    }
    ratios = {k: f["adaptermerge"] / f["by hand"] for k, f in figures.items()}
    same_tokens = len({m["tokens"] for v in res.values() for m in v}) == 1
    for k, f in figures.items():
        print(
            f"{k:12s} tokens/s: adaptermerge {f['adaptermerge']:8.0f}, by hand {f['by hand']:8.0f}; ratio {ratios[k]:.3f}"
        )
    print(
        f"goal: CPU-time ratio >= 0.95; same token count on both sides: {same_tokens}; load average {os.getloadavg()[0]:.2f}"
    )
    if a.json_path:
        Path(a.json_path).write_text(
            json.dumps({"args": vars(a), "rounds": res, "figures": figures, "ratios": ratios}, indent=2)
        )
    ratio = ratios["cpu_median"]
    return 0 if ratio >= 0.95 and same_tokens else 1


if __name__ == "__main__":
    sys.exit(main())
