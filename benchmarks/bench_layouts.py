"""How long learning the layer kinds of a checkpoint takes, and ``adaptermerge extract`` end to end.

``weight_layouts`` builds the model class on the meta device to tell Conv1D from Linear layers. Each figure is
the median of ``--repeat`` fresh processes (imports included, as a command pays them), on a tiny GPT-2 and a
tiny Llama (hidden 64, 2-3 layers) whose fine-tuned copy differs in every weight:

* ``weight_layouts``: the call alone, in a process that has imported ``adaptermerge`` and opened the checkpoint;
* ``extract``: ``adaptermerge extract BASE TUNED --rank 4 -o OUT --quiet`` as a subprocess (interpreter start
  and every import included), also with ``--threads 1``.

To compare two versions of the code, run the script with each on ``PYTHONPATH`` (``--label`` names the run).

    python benchmarks/bench_layouts.py --repeat 5 --label after
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROBE = """
import json, sys, time
from adaptermerge.io.checkpoint import open_checkpoint
from adaptermerge.surgery.arch import weight_layouts
ckpt = open_checkpoint(sys.argv[1])
t = time.perf_counter()
weight_layouts(ckpt)
print(json.dumps(time.perf_counter() - t))
"""


def build(folder: Path) -> dict[str, tuple[Path, Path]]:
    """Tiny GPT-2 and Llama checkpoints and fine-tuned copies (every tensor changed a little)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.helpers import tiny_gpt2, tiny_llama

    out = {}
    for name, fn in (("gpt2", tiny_gpt2), ("llama", tiny_llama)):
        model = fn()
        model.save_pretrained(folder / name / "base")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        model.save_pretrained(folder / name / "tuned")
        out[name] = (folder / name / "base", folder / name / "tuned")
    return out


def run(cmd: list[str]) -> tuple[float, str]:
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {p.stderr.strip()[-500:]}")
    return time.perf_counter() - t, p.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--label", default="")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folders = build(Path(tmp))
        for name, (base, tuned) in folders.items():
            layouts, extract, extract1 = [], [], []
            for i in range(args.repeat):
                layouts.append(float(run([sys.executable, "-c", PROBE, str(base)])[1]))
                cli = [sys.executable, "-m", "adaptermerge_cli", "extract", str(base), str(tuned), "--rank", "4"]
                extract.append(run([*cli, "-o", f"{tmp}/x{name}{i}", "--quiet"])[0])
                one = [sys.executable, "-m", "adaptermerge_cli", "--threads", "1", *cli[3:]]
                extract1.append(run([*one, "-o", f"{tmp}/y{name}{i}", "--quiet"])[0])
            results[name] = {
                "weight_layouts_s": statistics.median(layouts),
                "extract_cli_s": statistics.median(extract),
                "extract_cli_threads1_s": statistics.median(extract1),
            }
            r = results[name]
            print(
                f"{args.label} {name}: weight_layouts {r['weight_layouts_s']:.2f} s, extract {r['extract_cli_s']:.2f} s, "
                f"extract --threads 1 {r['extract_cli_threads1_s']:.2f} s (medians of {args.repeat}; load "
                f"{os.getloadavg()[0]:.1f})",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps({"label": args.label, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
