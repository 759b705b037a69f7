"""How much task data RegMean needs, on the demo's tasks: retention of ``regmean`` (alpha 0.9 and 1.0) merged with
8, 32, 128 and 512 examples per task (``--examples``), scored like ``bench_tune.py`` (per-character accuracy and
loss retention against each task's own adapter on the demo's 64 evaluation rows per task, never seen by a merge).

The examples are fresh synthetic rows (seed 3, as in ``bench_tune.py``): neither the adapters' training rows nor the
evaluation rows. Needs a folder ``adaptermerge demo`` (or ``bench_tune.py --keep``) wrote.

    python benchmarks/bench_regmean_data.py --demo ./adaptermerge-demo [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

TASKS = ("reverse", "upper", "shift")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, required=True, help="a folder `adaptermerge demo` wrote")
    ap.add_argument("--examples", default="8,32,128,512", help="examples per task, comma-separated")
    ap.add_argument("--alphas", default="0.9,1.0", help="RegMean's alpha values, comma-separated")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--json", type=Path, help="write every figure here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from adaptermerge.combination import combine, save_combined
    from adaptermerge.evaluation import evaluate
    from adaptermerge.synthetic import make_examples, write_jsonl

    demo = args.demo
    adapters = [demo / "adapters" / t for t in TASKS]
    work = Path(tempfile.mkdtemp(prefix="bench_regmean_data_"))
    models: list[tuple[str, Path]] = [(t, demo / "adapters" / t) for t in TASKS]
    seconds: dict[str, float] = {}
    for n in (int(x) for x in args.examples.split(",")):
        few = {t: write_jsonl(work / str(n) / f"{t}.jsonl", make_examples(t, n, seed=3)) for t in TASKS}
        for alpha in (float(x) for x in args.alphas.split(",")):
            name = f"regmean n={n} alpha={alpha:g}"
            t0 = time.perf_counter()
            res = combine(adapters, method="regmean", base=demo / "base", tasks=few, alpha=alpha)
            seconds[name] = time.perf_counter() - t0
            models.append((name, save_combined(res, work / "merges" / name.replace(" ", "_"))))
    tasks = {t: demo / "data" / f"{t}-eval.jsonl" for t in TASKS}
    report = evaluate(demo / "base", models, tasks, metrics=["loss", "char"], batch_size=64, max_length=48)
    print(f"{'model':28s} " + " ".join(f"{t + ' char':>13s}" for t in TASKS) + " " + " ".join(f"{t + ' loss':>13s}" for t in TASKS) + f" {'min char':>9s} {'merge s':>8s}")  # fmt: skip
    rows = {}
    for model in report.models:
        if model == "base" or model in TASKS:
            continue
        char, loss = report.retention["char"][model], report.retention["loss"][model]
        rows[model] = {"char_retention": char, "loss_retention": loss, "seconds": seconds[model]}
        cells = [f"{char[t]:13.1%}" for t in TASKS] + [f"{loss[t]:13.1%}" for t in TASKS]
        print(f"{model:28s} " + " ".join(cells) + f" {min(char.values()):9.1%} {seconds[model]:8.2f}")
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2, default=str) + "\n")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
