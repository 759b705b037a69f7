"""The offline end-to-end demo: the library's main job on a model built here, in a few minutes on a laptop CPU.

``adaptermerge demo [-o DIR]`` (or ``python -m adaptermerge.demo``):

1. builds a small Llama-style base from a config with a character tokenizer, and teaches it (a short full
   training) to copy words and, a little, the three task formats, so that LoRA adaptation is meaningful;
2. trains one LoRA adapter per synthetic task (reverse, upper-case, Caesar shift) with :func:`train_adapter`;
   each adapter's data also replays the base's copy task, as practitioners do to limit forgetting;
3. combines the adapters with every method in the registry (RegMean's task inputs come from the training rows;
   new methods appear by themselves; a method that refuses these inputs is listed with its reason), merges the
   exact sum into the base checkpoint and into a 4-bit (NF4) base;
4. evaluates the base, every adapter and every merge on every task (completion loss and per-character
   accuracy of greedy decoding), with retention against each task's own adapter;
5. prints the table, writes it as JSON and as a PNG chart, and lists the output folders.

Everything is written under one folder (default ``./adaptermerge-demo``), which must be empty or absent;
``overwrite`` replaces an earlier demo folder (and only a folder the demo wrote).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

from adaptermerge.errors import AdapterMergeError, OutputExistsError

DEFAULT_DIR = "adaptermerge-demo"
MARKER = "adaptermerge-demo.json"  # written first: marks a folder the demo may replace
TASKS = ("reverse", "upper", "shift")
# Per-method demo parameters; methods not listed run with their defaults. svd is shown at a rank below the
# adapters' (8), so that its loss against the exact sum is visible.
METHOD_PARAMS: dict[str, dict[str, Any]] = {"svd": {"rank": 4}}
STAT_ROWS = 256  # training rows per task whose inputs data-aware methods (RegMean) collect


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and lengths of one demo run (``FULL`` for users, ``FAST`` for the test suite)."""

    hidden: int = 64
    layers: int = 2
    base_rows: int = 3000
    base_task_share: float = 0.15  # fraction of the base's data drawn from each adapter task
    base_steps: int = 1200
    base_lr: float = 3e-3
    adapter_rows: int = 2000
    adapter_steps: int = 300
    adapter_lr: float = 3e-3
    rank: int = 8
    alpha: float = 16.0
    batch_size: int = 32
    eval_rows: int = 64
    max_length: int = 48


FULL = DemoSettings()
FAST = DemoSettings(base_rows=800, base_steps=150, adapter_rows=400, adapter_steps=40, eval_rows=16)


def run_demo(
    out: str | os.PathLike | None = None,
    fast: bool = False,
    overwrite: bool = False,
    echo: Callable[[str], None] = click.echo,
    progress: bool = True,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Run the demo into ``out`` (default ``./adaptermerge-demo``); returns the report and the output paths.

    ``threads``: torch CPU threads (default 1: the demo's model is so small that a second thread gains little,
    and on a machine whose cores are busy, threads waiting at OpenMP barriers make it several times slower).

    Raises:
        OutputExistsError: ``out`` is not empty (and, with ``overwrite``, is not an earlier demo folder).
    """
    from adaptermerge.surgery.merge import torch_threads

    _quiet_libraries()
    s = FAST if fast else FULL
    root = _prepare(Path(out or DEFAULT_DIR), overwrite, s)
    import torch

    with torch_threads(threads or torch.get_num_threads()):
        return _run(root, s, echo, progress)


def _run(root: Path, s: DemoSettings, echo: Callable[[str], None], progress: bool) -> dict[str, Any]:
    clock = _Clock(echo)
    base = _teach_base(root, s, clock)
    adapters = _train_adapters(root, base, s, clock, progress)
    merges, skipped = _combine_all(root, base, adapters, clock)
    checkpoints = _merge_into_bases(root, base, merges["linear"], clock)
    report = _evaluate(root, base, adapters, merges, checkpoints, s, clock)
    return _present(root, report, skipped, clock, echo)


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _prepare(root: Path, overwrite: bool, s: DemoSettings) -> Path:
    """An empty output folder, or an earlier demo folder emptied with ``overwrite``; never someone else's files."""
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        if not overwrite:
            raise OutputExistsError(f"{root} exists and is not empty; pass `overwrite` or choose another -o folder")
        if not (root / MARKER).is_file():
            raise OutputExistsError(f"{root} is not an earlier demo folder (no {MARKER}); choose another -o folder")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text(json.dumps({"settings": asdict(s)}, indent=2), encoding="utf-8")
    return root.resolve()


class _Clock:
    """Prints each phase with its duration."""

    def __init__(self, echo: Callable[[str], None]):
        self.echo, self.t0, self.last, self.phases = echo, time.perf_counter(), time.perf_counter(), {}

    def done(self, key: str, msg: str) -> None:
        now = time.perf_counter()
        self.phases[key] = round(now - self.last, 2)
        self.echo(f"{msg} ({now - self.last:.1f} s)")
        self.last = now


def _task_rows(task: str, n: int, seed: int) -> list[dict[str, str]]:
    from adaptermerge.synthetic import make_examples

    return make_examples(task, n, seed=seed)


def teach_base(root: Path, s: DemoSettings = FAST) -> tuple[Path, float]:
    """Full training of a fresh tiny Llama on copying words plus a little of each task format.

    Writes ``root/data/base-mix.jsonl`` and the base (model and tokenizer) to ``root/base``; returns the base
    folder and the final training loss. A random base cannot be adapted (its output head is random and
    near zero, so its logits stay near uniform whatever the LoRA layers do); a taught one can.
    """
    import torch
    from transformers import LlamaForCausalLM

    from adaptermerge.data import read_task_file, tokenize_task
    from adaptermerge.io.atomic import atomic_dir
    from adaptermerge.synthetic import char_tokenizer, tiny_llama_config, write_jsonl
    from adaptermerge.train.config import TrainConfig
    from adaptermerge.train.run import build_trainer

    n_task = int(s.base_rows * s.base_task_share)
    rows = _task_rows("copy", s.base_rows - n_task * len(TASKS), seed=10)
    for t in TASKS:
        rows += _task_rows(t, n_task, seed=10)
    random.Random(0).shuffle(rows)
    data = write_jsonl(root / "data" / "base-mix.jsonl", rows)
    tok = char_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(hidden=s.hidden, layers=s.layers))
    cfg = TrainConfig(steps=s.base_steps, lr=s.base_lr, batch_size=s.batch_size, grad_accum=1, max_length=s.max_length)
    cfg.check()
    examples, _ = tokenize_task(read_task_file(data), tok, s.max_length)
    trainer = build_trainer(model, tok, examples, None, cfg, root / ".base-run", False, ())
    trainer.args.save_strategy = "no"
    trainer.train()
    with atomic_dir(root / "base") as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    shutil.rmtree(root / ".base-run", ignore_errors=True)
    return root / "base", next(h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h)


def _teach_base(root: Path, s: DemoSettings, clock: _Clock) -> Path:
    base, loss = teach_base(root, s)
    clock.done(
        "base",
        f"[1/5] base: Llama hidden {s.hidden}, {s.layers} layers, {s.base_steps} full-training steps, loss {loss:.3f} -> {root / 'base'}",
    )
    return base


def train_task_adapters(root: Path, base: Path, s: DemoSettings = FAST, progress: bool = False) -> dict[str, Any]:
    """One LoRA adapter per task with ``train_adapter`` (``root/adapters/TASK``); each task's data replays some copy
    rows. Writes ``root/data/TASK-train.jsonl`` and ``TASK-eval.jsonl``; returns ``{task: TrainResult}``."""
    from adaptermerge.synthetic import write_jsonl
    from adaptermerge.train import train_adapter

    out: dict[str, Any] = {}
    for t in TASKS:
        rows = _task_rows(t, s.adapter_rows, seed=1) + _task_rows("copy", s.adapter_rows // 2, seed=7)
        random.Random(1).shuffle(rows)
        data = write_jsonl(root / "data" / f"{t}-train.jsonl", rows)
        write_jsonl(root / "data" / f"{t}-eval.jsonl", _task_rows(t, s.eval_rows, seed=2))
        out[t] = train_adapter(
            base, data, root / "adapters" / t, rank=s.rank, alpha=s.alpha, steps=s.adapter_steps, lr=s.adapter_lr,
            batch_size=s.batch_size, grad_accum=1, max_length=s.max_length, progress=progress, log=lambda _m: None,
        )  # fmt: skip
    return out


def _train_adapters(root: Path, base: Path, s: DemoSettings, clock: _Clock, progress: bool) -> dict[str, Path]:
    results = train_task_adapters(root, base, s, progress)
    losses = [f"{t} {r.train_loss:.3f}" for t, r in results.items()]
    clock.done(
        "adapters",
        f"[2/5] trained LoRA adapters (r={s.rank}, alpha={s.alpha:g}, {s.adapter_steps} steps each; final loss {', '.join(losses)})",
    )
    return {t: r.output for t, r in results.items()}


def _combine_all(
    root: Path, base: Path, adapters: dict[str, Path], clock: _Clock
) -> tuple[dict[str, Path], dict[str, str]]:
    """Every registry method on the adapters (default weights: equal, summing to 1), or why it refused. Data-aware
    methods (RegMean) read the first STAT_ROWS rows of each task's training file, never the evaluation rows."""
    from adaptermerge.combination import combine, save_combined
    from adaptermerge.data import read_task_file
    from adaptermerge.methods.registry import get_method, method_names

    merges: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    for name in method_names():
        params = dict(METHOD_PARAMS.get(name, {}))
        label = name + "".join(f"-{k[0]}{v}" for k, v in params.items())
        if get_method(name).data:
            params.update(base=base, tasks=[(t, read_task_file(root / "data" / f"{t}-train.jsonl", max_rows=STAT_ROWS)) for t in adapters])  # fmt: skip
        try:
            res = combine(list(adapters.values()), method=name, **params)
            merges[label if name != "linear" else "linear"] = save_combined(res, root / "merges" / label)
        except AdapterMergeError as e:  # a method that needs other inputs (data, equal ranks...) says why
            skipped[name] = " ".join(str(e).split())
    clock.done(
        "combine",
        f"[3/5] combined with {', '.join(merges)} (equal weights)"
        + (f"; skipped {', '.join(skipped)}" if skipped else ""),
    )
    return merges, skipped


def _merge_into_bases(root: Path, base: Path, adapter: Path, clock: _Clock) -> dict[str, Path]:
    """The exact sum merged into the base checkpoint, and into the base quantized to NF4 by transformers."""
    from adaptermerge.io.atomic import atomic_dir
    from adaptermerge.models import load_causal_lm, load_tokenizer
    from adaptermerge.surgery.merge import merge_into_base

    merge_into_base(base, adapter, root / "merged" / "linear-into-base")
    nf4 = load_causal_lm(base, quantize="nf4")
    with atomic_dir(root / "base-nf4") as tmp:
        nf4.save_pretrained(tmp)
        load_tokenizer(base).save_pretrained(tmp)
    del nf4
    rep = merge_into_base(root / "base-nf4", adapter, root / "merged" / "linear-into-nf4-base")
    survived = min(
        (m.delta_survival for m in rep.modules if getattr(m, "delta_survival", None) is not None), default=None
    )
    note = f"; lowest share of a delta surviving re-quantization {survived:.2f}" if survived is not None else ""
    clock.done("merge", f"      merged 'linear' into the base and into an NF4 base{note}")
    return {
        "linear-into-base": root / "merged" / "linear-into-base",
        "linear-into-nf4-base": root / "merged" / "linear-into-nf4-base",
    }


def _evaluate(
    root: Path,
    base: Path,
    adapters: dict[str, Path],
    merges: dict[str, Path],
    checkpoints: dict[str, Path],
    s: DemoSettings,
    clock: _Clock,
) -> Any:
    from adaptermerge.evaluation import evaluate

    models = [*adapters.items(), *merges.items(), *checkpoints.items()]
    tasks = {t: root / "data" / f"{t}-eval.jsonl" for t in TASKS}
    report = evaluate(
        base, [(n, str(p)) for n, p in models], tasks, metrics=["loss", "char"], batch_size=64, max_length=s.max_length
    )
    clock.done(
        "evaluate", f"[4/5] evaluated {len(report.models)} models on {len(TASKS)} tasks ({s.eval_rows} examples each)"
    )
    return report


def _present(
    root: Path, report: Any, skipped: dict[str, str], clock: _Clock, echo: Callable[[str], None]
) -> dict[str, Any]:
    from adaptermerge.plot import plot_report

    d = report.to_dict()
    d["skipped_methods"] = skipped
    d["phase_seconds"] = clock.phases
    (root / "results.json").write_text(json.dumps(d, indent=2), encoding="utf-8")
    png = plot_report(report, root / "results.png", title="adaptermerge demo: base, task adapters and merges")
    clock.done("report", "[5/5] results")
    echo("")
    echo(report.table())
    for name, why in skipped.items():
        echo(f"skipped method {name}: {why}")
    echo("")
    echo(f"results: {root / 'results.json'}  chart: {png}")
    echo(
        f"folders: base {root / 'base'}, 4-bit base {root / 'base-nf4'}, adapters {root / 'adapters'}, merges {root / 'merges'}, merged checkpoints {root / 'merged'}, data {root / 'data'}"
    )
    echo(f"done in {time.perf_counter() - clock.t0:.1f} s")
    d["output"] = str(root)
    return d


if __name__ == "__main__":
    run_demo()
