"""Benchmark ``adaptermerge merge`` against a plain file copy and transformers + PEFT ``merge_and_unload``.

A synthetic Llama-shaped bf16 checkpoint (sharded safetensors + index + ``config.json``, written with the key
names transformers uses) and a rank-16 all-linear PEFT adapter are built in a temporary folder. Each contender
then runs in its own subprocess, so that its peak RSS is its own (``ru_maxrss`` of a fresh child, read with
``wait4`` by a small wrapper process):

1. ``cp -r`` of the checkpoint folder (the floor for any tool that rewrites every byte), and ``cp -r`` followed by
   an ``fsync`` of the copied files (``adaptermerge`` fsyncs what it writes before renaming the output into place);
2. ``adaptermerge merge BASE ADAPTER -o OUT --quiet`` (the CLI), twice: ``adaptermerge`` with the model-class
   facts already in its on-disk cache (a base merged onto before: the usual case), and ``adaptermerge (first)``
   with an empty cache each time (the first merge onto a base imports transformers' modeling code, 2.5-3 s);
3. transformers ``AutoModelForCausalLM.from_pretrained(dtype=bfloat16)`` + ``PeftModel.from_pretrained`` +
   ``merge_and_unload()`` + ``save_pretrained(max_shard_size=...)``.

Every contender runs ``--repeat`` rounds (default 3), round-robin, each in a fresh process (cold: interpreter
start and imports included), and is reported as its median, so that adaptermerge and transformers + PEFT are
measured the same way (``--peft-rounds 1`` runs transformers + PEFT only in the first round, to save time; the
comparison then says so). ``python -c "import torch"`` is timed alongside: it is the floor of any tool
built on torch. All contenders run with a warm page cache (inputs read just before each one) and, where the
script may drop the page cache (root), once more with a cold one (``--cache`` chooses; goals are judged on the
first). The merged checkpoints of ``adaptermerge`` and PEFT are compared tensor by tensor (bf16: equal, or at most
one bf16 rounding step apart). Then ``adaptermerge merge`` runs on checkpoints of several sizes (same shard size)
to show how its peak RSS grows with the model. ``--profile`` adds a cProfile of ``merge_into_base`` in-process.
The cost of the recipe's SHA-256 of every base file is measured in-process (full runs; ``--no-hash-cost`` skips
it): the hashing alone, and the merge's wall time with and without it (it runs on a background thread).

The script first waits (up to 10 min) while another benchmark runs (``--wait-for``, default ``bench_combine``) and
prints the load average before every contender: on a shared 2-core machine, contention changes the figures.

Goals (from the issue): peak RSS at most the largest shard + 600 MB; wall time at most 2x the plain copy. The time
goal is judged against the copy with the same durability as ours (``cp`` + ``fsync``: adaptermerge fsyncs every
file before renaming the output into place); the ratio to the page-cache copy without fsync is printed beside it.

Usage::

    python benchmarks/bench_merge.py                 # ~1.5 GB checkpoint, 3 rounds, growth at 0.4/0.8/1.5 GB (~4 min)
    python benchmarks/bench_merge.py --quick         # ~200 MB, warm cache only, under a minute (smoke test)
    python benchmarks/bench_merge.py --size-gb 3 --growth 0.4 1.5 3 --threads 1 --json merge.json

The exit status is 1 when a goal or the correctness check fails. With ``--quick`` (~200 MB, where interpreter start
and imports dominate the wall time) the time goal is printed as information; the memory goal and the correctness
check are judged. All sizes are decimal (1 MB = 10^6 bytes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RSS_HEADROOM = 600e6  # goal: peak RSS <= largest shard + 600 MB
TIME_GOAL = 2.0  # goal: wall time <= 2x the plain copy
MB = 1e6

# A wrapper process runs the contender and reports the contender's own peak RSS (ru_maxrss of the child it
# waited for; the wrapper's own memory is not included) and its wall and CPU times.
WRAPPER = r"""
import json, os, sys, time
t0 = time.perf_counter()
pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
print("@@RESULT " + json.dumps({"rc": os.waitstatus_to_exitcode(status), "wall_s": wall,
    "maxrss_kib": ru.ru_maxrss, "cpu_s": ru.ru_utime + ru.ru_stime}), flush=True)
"""

# The transformers + PEFT contender (run as ``python bench_merge.py _peft BASE ADAPTER OUT SHARD``), and the
# in-process profile of ``merge_into_base`` (``python bench_merge.py _profile BASE ADAPTER OUT``).
PEFT_MODE = "_peft"
PROFILE_MODE = "_profile"
HASH_MODE = "_hashcost"
FIRST = "adaptermerge (first)"


# --------------------------------------------------------------------------------------------------------------
# the synthetic checkpoint and adapter


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int = 32000

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Per decoder layer: module -> (out, in) of the Linear layers an all-linear adapter targets."""
        h, i = self.hidden, self.intermediate
        return {
            "self_attn.q_proj": (h, h),
            "self_attn.k_proj": (h, h),
            "self_attn.v_proj": (h, h),
            "self_attn.o_proj": (h, h),
            "mlp.gate_proj": (i, h),
            "mlp.up_proj": (i, h),
            "mlp.down_proj": (h, i),
        }

    @property
    def nbytes(self) -> int:
        """bf16 bytes of the checkpoint's tensors (untied embeddings and head)."""
        per_layer = sum(o * i for o, i in self.linear_shapes().values()) + 2 * self.hidden
        return 2 * (self.layers * per_layer + 2 * self.vocab * self.hidden + self.hidden)


def shape_for(size_gb: float, hidden: int = 2048, intermediate: int = 5632, heads: int = 16) -> Shape:
    """The Llama shape with the given widths whose bf16 checkpoint is closest to ``size_gb``."""
    one = Shape(hidden, intermediate, 1, heads)
    per_layer = Shape(hidden, intermediate, 2, heads).nbytes - one.nbytes
    fixed = one.nbytes - per_layer
    layers = max(1, round((size_gb * 1e9 - fixed) / per_layer))
    return Shape(hidden, intermediate, layers, heads)


def llama_config(shape: Shape):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        vocab_size=shape.vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        dtype="bfloat16",
        bos_token_id=1,
        eos_token_id=2,
    )


def build_checkpoint(folder: Path, shape: Shape, shard_bytes: int, seed: int = 0) -> dict[str, Any]:
    """Write a bf16 Llama checkpoint the way ``save_pretrained`` shards it: names and shapes from a meta-device
    ``LlamaForCausalLM``, random N(0, 0.02) weights, norms at 1, greedy shards of at most ``shard_bytes``."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    folder.mkdir(parents=True)
    cfg = llama_config(shape)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    specs = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    del model
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shp in specs:
        nb = 2 * math.prod(shp)
        if groups[-1] and size + nb > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shp))
        size += nb
    # Random N(0, 0.02) values: one pool, each tensor a copy of a random window of it (fast to build; every
    # tensor still differs from its neighbours, which is all the comparison needs).
    gen = torch.Generator().manual_seed(seed)
    largest = max(math.prod(shp) for _, shp in specs)
    pool = torch.randn(largest + 2**20, generator=gen).mul_(0.02).to(torch.bfloat16)
    weight_map, total = {}, 0
    for n, group in enumerate(groups, start=1):
        fname = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shp in group:
            numel = math.prod(shp)
            if len(shp) == 1:
                t = torch.ones(shp, dtype=torch.bfloat16)
            else:
                off = int(torch.randint(0, pool.numel() - numel + 1, (1,), generator=gen))
                t = pool[off : off + numel].reshape(shp).clone()
            tensors[name] = t
            weight_map[name] = fname
            total += numel * 2
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    cfg.save_pretrained(str(folder))
    shard_sizes = [p.stat().st_size for p in sorted(folder.glob("*.safetensors"))]
    largest_merged = max(o * i for o, i in shape.linear_shapes().values()) * 2
    largest = max(largest_merged, 2 * shape.vocab * shape.hidden)
    return {
        "shape": asdict(shape),
        "tensor_bytes": total,
        "folder_bytes": sum(p.stat().st_size for p in folder.iterdir()),
        "shards": len(shard_sizes),
        "largest_shard_bytes": max(shard_sizes),
        "largest_tensor_bytes": largest,
        "largest_merged_tensor_bytes": largest_merged,
    }


def build_adapter(folder: Path, shape: Shape, r: int = 16, alpha: int = 32, seed: int = 1) -> dict[str, Any]:
    """A rank-``r`` all-linear LoRA adapter in PEFT's format, with random non-zero A and B."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shape.layers):
        for mod, (out_f, in_f) in shape.linear_shapes().items():
            p = f"base_model.model.model.layers.{layer}.{mod}"
            a = torch.randn(r, in_f, generator=gen) / math.sqrt(in_f)
            b = torch.randn(out_f, r, generator=gen) * 0.01
            tensors[f"{p}.lora_A.weight"] = a.to(torch.bfloat16)
            tensors[f"{p}.lora_B.weight"] = b.to(torch.bfloat16)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    targets = sorted({m.split(".")[-1] for m in shape.linear_shapes()})
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM")
    cfg.base_model_name_or_path = "synthetic-llama"
    cfg.inference_mode = True
    cfg.save_pretrained(str(folder))
    return {"r": r, "alpha": alpha, "modules": shape.layers * len(targets), "bytes": folder_bytes(folder)}


# --------------------------------------------------------------------------------------------------------------
# running contenders


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def loadavg() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def drop_caches() -> bool:
    """Write back dirty pages and drop the page cache (needs root); False where that is not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def warm(*folders: Path) -> None:
    """Read every file once so that the contender finds its inputs in the page cache."""
    for folder in folders:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                with open(f, "rb") as fh:
                    while fh.read(64 << 20):
                        pass


def prepare(cache: str, *inputs: Path) -> None:
    os.sync()  # the previous contender's dirty pages are written back now, not during the next one
    if cache == "cold":
        if not drop_caches():
            raise RuntimeError("cannot drop the page cache (not root?); use --cache warm")
    else:
        warm(*inputs)


def measure(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` in a fresh child; its wall time, CPU time, peak RSS, and any JSON line it printed."""
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, *cmd],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    lines = proc.stdout.splitlines()
    res = [json.loads(line[len("@@RESULT ") :]) for line in lines if line.startswith("@@RESULT ")]
    if proc.returncode != 0 or not res or res[0]["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out = res[0]
    out["rss_bytes"] = out.pop("maxrss_kib") * 1024
    phases = [json.loads(line[len("@@PHASES ") :]) for line in lines if line.startswith("@@PHASES ")]
    if phases:
        out["phases"] = phases[0]
    return out


def warm_facts(base: Path, env: dict[str, str]) -> None:
    """Put the base's model-class facts in the cache ``env`` names (what any earlier merge onto it leaves there)."""
    code = (
        "import sys; from adaptermerge.io.checkpoint import open_checkpoint; "
        "from adaptermerge.surgery.arch import tie_groups, weight_layouts; "
        "ck = open_checkpoint(sys.argv[1]); weight_layouts(ck); tie_groups(ck)"
    )
    subprocess.run([sys.executable, "-c", code, str(base)], env={**os.environ, **env}, check=True)


def cli_command() -> list[str]:
    exe = Path(sys.executable).parent / "adaptermerge"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "adaptermerge_cli"]


def contenders(base: Path, adapter: Path, outs: dict[str, Path], shard_mb: int) -> dict[str, list[str]]:
    """name -> command line; each writes to ``outs[name]``."""
    b, a, o = str(base), str(adapter), {k: str(v) for k, v in outs.items()}
    return {
        "copy": ["cp", "-r", b, o["copy"]],
        "copy+fsync": ["sh", "-c", 'cp -r "$1" "$2" && sync "$2"/*', "sh", b, o["copy+fsync"]],
        "adaptermerge": [*cli_command(), "merge", b, a, "-o", o["adaptermerge"], "--quiet"],
        FIRST: [*cli_command(), "merge", b, a, "-o", o[FIRST], "--quiet"],
        "transformers+peft": [sys.executable, str(Path(__file__).resolve()), PEFT_MODE, b, a, o["transformers+peft"]]
        + [str(shard_mb)],
    }


def run_contender(
    name: str, cmd: list[str], cache: str, base: Path, adapter: Path, out: Path, env: dict[str, str] | None = None
) -> dict[str, Any]:
    if out.exists():
        shutil.rmtree(out)
    prepare(cache, base, adapter)
    la = loadavg()
    r = measure(cmd, env)
    r["loadavg_before"] = la
    r["out_bytes"] = folder_bytes(out)
    print(
        f"  {name:<20} {r['wall_s']:7.2f} s wall {r['cpu_s']:7.2f} s cpu  peak RSS {r['rss_bytes'] / MB:7.0f} MB"
        f"  (load {la})",
        flush=True,
    )
    return r


def peft_child(base: str, adapter: str, out: str, shard_mb: str) -> None:
    """transformers + PEFT, the usual way; prints the time of each phase."""
    t = [time.perf_counter()]
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t.append(time.perf_counter())
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    t.append(time.perf_counter())
    pm = PeftModel.from_pretrained(model, adapter)
    t.append(time.perf_counter())
    merged = pm.merge_and_unload()
    t.append(time.perf_counter())
    merged.save_pretrained(out, max_shard_size=f"{shard_mb}MB")
    t.append(time.perf_counter())
    names = ["import", "load_model", "load_adapter", "merge_and_unload", "save"]
    print("@@PHASES " + json.dumps({n: b - a for n, a, b in zip(names, t, t[1:])}), flush=True)


def hash_cost_child(base: str, adapter: str, out: str) -> None:
    """What the recipe's hashes cost: hashing every base file alone, and the merge with and without it."""
    import adaptermerge.surgery.merge as merge_mod
    from adaptermerge.recipe import checkpoint_hashes

    t0 = time.perf_counter()
    hashed = checkpoint_hashes(base)
    t_hash = time.perf_counter() - t0
    size = sum(os.path.getsize(os.path.join(base, n)) for n in hashed)

    def merged(label: str) -> float:
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        merge_mod.merge_into_base(base, adapter, out)
        return time.perf_counter() - t

    merged("warm-up")  # imports and the model-class facts, paid once
    real = merge_mod.checkpoint_hashes
    walls: dict[str, list[float]] = {"with": [], "without": []}
    for _ in range(2):
        walls["with"].append(merged("with"))
        merge_mod.checkpoint_hashes = lambda folder, names=None: {}
        try:
            walls["without"].append(merged("without"))
        finally:
            merge_mod.checkpoint_hashes = real
    shutil.rmtree(out, ignore_errors=True)
    w, wo = min(walls["with"]), min(walls["without"])
    print(
        f"  SHA-256 of {len(hashed)} base files ({size / MB:,.0f} MB) alone: {t_hash:.2f} s "
        f"({size / MB / t_hash:,.0f} MB/s, one thread);  merge_into_base (best of 2, in-process) with the hashes "
        f"{w:.2f} s, without {wo:.2f} s: {w - wo:+.2f} s ({(w - wo) / wo:+.0%})"
    )
    print("@@HASH " + json.dumps({"hash_s": t_hash, "bytes": size, "merge_with_s": walls["with"],
                                  "merge_without_s": walls["without"]}), flush=True)  # fmt: skip


def profile_child(base: str, adapter: str, out: str, top: int = 12) -> None:
    """Import time, then ``merge_into_base`` under cProfile: where the time goes (the ``top`` functions)."""
    import cProfile
    import pstats

    t0 = time.perf_counter()
    from adaptermerge.surgery.merge import merge_into_base

    t1 = time.perf_counter()
    prof = cProfile.Profile()
    prof.enable()
    merge_into_base(base, adapter, out)
    prof.disable()
    t2 = time.perf_counter()
    print(f"  import {t1 - t0:.2f} s, merge_into_base {t2 - t1:.2f} s (profiled); top functions by own time:")
    stats = pstats.Stats(prof)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    for (file, line, fn), (_, calls, own, cum, _) in rows:
        where = fn if file == "~" else f"{Path(file).name}:{line}({fn})"
        print(f"    {own:7.2f} s own {cum:7.2f} s cum {calls:6d} calls  {where}")


# --------------------------------------------------------------------------------------------------------------
# correctness: ours vs PEFT


def bf16_ulp(x):
    """The spacing of bf16 numbers at ``|x|`` (8 significant bits), as float64."""
    import torch

    ax = x.abs().double().clamp_min(2.0**-126)
    return torch.exp2(torch.floor(torch.log2(ax)) - 7)


def compare_outputs(ours: Path, theirs: Path, base: Path) -> dict[str, Any]:
    """Every tensor of both merged checkpoints: equal, or at most one bf16 rounding step apart."""
    import torch
    from safetensors import safe_open

    def index(p: Path) -> dict[str, str]:
        return json.loads((p / "model.safetensors.index.json").read_text())["weight_map"]

    wo, wt, wb = index(ours), index(theirs), index(base)
    res: dict[str, Any] = {
        "same_names": set(wo) == set(wt),
        "only_ours": sorted(set(wo) - set(wt))[:5],
        "only_peft": sorted(set(wt) - set(wo))[:5],
    }
    n = equal = elems = differ = 0
    worst_ulps = 0.0
    changed_by_merge = 0
    merged_elems = 0
    dtypes_ok = True
    for name in sorted(set(wo) & set(wt)):
        with safe_open(str(ours / wo[name]), "pt") as fo, safe_open(str(theirs / wt[name]), "pt") as ft:
            a, b = fo.get_tensor(name), ft.get_tensor(name)
        dtypes_ok &= a.dtype == b.dtype == torch.bfloat16 and a.shape == b.shape
        n += 1
        elems += a.numel()
        ne = a != b
        k = int(ne.sum())
        if k == 0:
            equal += 1
        else:
            differ += k
            ulps = ((a[ne].double() - b[ne].double()).abs() / bf16_ulp(torch.maximum(a[ne].abs(), b[ne].abs()))).max()
            worst_ulps = max(worst_ulps, float(ulps))
        if name.endswith("proj.weight"):
            with safe_open(str(base / wb[name]), "pt") as fb:
                w = fb.get_tensor(name)
            changed_by_merge += int((a != w).sum())
            merged_elems += a.numel()
    res.update(
        tensors=n,
        tensors_equal=equal,
        elements=elems,
        elements_differing=differ,
        worst_ulps=worst_ulps,
        dtypes_and_shapes_ok=dtypes_ok,
        merged_fraction_changed=changed_by_merge / max(merged_elems, 1),
    )
    res["ok"] = bool(res["same_names"] and dtypes_ok and worst_ulps <= 1.0 and res["merged_fraction_changed"] > 0.5)
    return res


# --------------------------------------------------------------------------------------------------------------
# main


def wait_idle(patterns: list[str], every_s: float, max_s: float) -> str:
    """Wait while other benchmarks (``pgrep -f PATTERN``) run; a note of what was seen."""
    t0 = time.time()
    waited = False
    names = ", ".join(patterns)
    while True:
        pids = []
        for pattern in patterns:
            p = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
            pids += [x for x in p.stdout.split() if int(x) != os.getpid()]
        if not pids:
            return f"waited {time.time() - t0:.0f} s for {names}" if waited else f"none running ({names})"
        if time.time() - t0 > max_s:
            return f"{names} still running after {max_s:.0f} s (pids {pids}); figures may be noisy"
        waited = True
        print(f"  {names} running (pids {pids}), waiting {every_s:.0f} s ...", flush=True)
        time.sleep(every_s)


def versions() -> dict[str, str]:
    import peft
    import safetensors
    import torch
    import transformers

    import adaptermerge

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
        "adaptermerge": getattr(adaptermerge, "__version__", "?"),
    }


def cache_modes(requested: str, quick: bool) -> list[str]:
    """``auto``: warm, then cold where the page cache may be dropped (full runs only)."""
    if requested == "both":
        return ["warm", "cold"]
    if requested != "auto":
        return [requested]
    if quick or not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        return ["warm"]
    return ["warm", "cold"]


def fmt_mb(b: float) -> str:
    return f"{b / MB:,.0f} MB"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def median(xs: list[float]) -> float:
    ys = sorted(xs)
    n = len(ys)
    return ys[n // 2] if n % 2 else 0.5 * (ys[n // 2 - 1] + ys[n // 2])


def comparison(
    cache: str,
    base: Path,
    adapter: Path,
    ck: dict[str, Any],
    tmp: Path,
    shard_mb: int,
    peft: bool,
    check: bool,
    env: dict[str, str],
    repeat: int = 1,
    peft_rounds: int | None = None,
    judge_time: bool = True,
) -> dict[str, Any]:
    """Every contender ``repeat`` times, round-robin, with the page cache in state ``cache``; medians and goals.

    Every contender runs in every round (transformers+PEFT in the first ``peft_rounds``, default all), so that a
    noisy minute of a shared machine hits all of them alike and all are medians of fresh processes. Goals are
    judged on the medians; the comparison with transformers+PEFT is information.
    """
    peft_rounds = repeat if peft_rounds is None else peft_rounds
    print(f"\n{cache} page cache ({repeat} round{'s' if repeat > 1 else ''}):", flush=True)
    names = ("copy", "copy+fsync", "adaptermerge", FIRST, "transformers+peft")
    outs = {n: tmp / ("out-" + "".join(c if c.isalnum() else "-" for c in n)) for n in names}
    cmds = contenders(base, adapter, outs, shard_mb)
    cmds = {"import torch": [sys.executable, "-c", "import torch"], **cmds}
    outs["import torch"] = tmp / "out-none"
    rounds: dict[str, list[dict[str, Any]]] = {}
    res: dict[str, Any] = {"cache": cache, "rounds": rounds}
    try:
        for i in range(repeat):
            for name, cmd in cmds.items():
                if name == "transformers+peft" and (not peft or i >= peft_rounds):
                    continue
                fresh = tmp / f"facts-first-{i}"  # FIRST: an empty model-facts cache, as on a first merge
                run_env = {**env, "ADAPTERMERGE_CACHE": str(fresh)} if name == FIRST else env
                rounds.setdefault(name, []).append(run_contender(name, cmd, cache, base, adapter, outs[name], run_env))
                shutil.rmtree(fresh, ignore_errors=True)
                if name not in ("adaptermerge", "transformers+peft") or i > 0:
                    shutil.rmtree(outs[name], ignore_errors=True)
            if i == 0 and check and "transformers+peft" in rounds:
                cmp = compare_outputs(outs["adaptermerge"], outs["transformers+peft"], base)
                print(
                    f"  correctness: {cmp['tensors']} tensors, {cmp['tensors_equal']} bit-equal, "
                    f"{cmp['elements_differing']:,} of {cmp['elements']:,} elements differ, at most "
                    f"{cmp['worst_ulps']:.2g} bf16 ulp; {cmp['merged_fraction_changed']:.0%} of merged weights "
                    f"changed by the merge -> {verdict(cmp['ok'])}",
                    flush=True,
                )
                res["correctness"] = cmp
            shutil.rmtree(outs["adaptermerge"], ignore_errors=True)
            shutil.rmtree(outs["transformers+peft"], ignore_errors=True)
    finally:
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)

    runs = {
        name: {
            "wall_s": median([r["wall_s"] for r in rs]),
            "wall_s_all": [r["wall_s"] for r in rs],
            "cpu_s": median([r["cpu_s"] for r in rs]),
            "rss_bytes": max(r["rss_bytes"] for r in rs),
            **({"phases": rs[0]["phases"]} if "phases" in rs[0] else {}),
        }
        for name, rs in rounds.items()
    }
    res["runs"] = runs
    copy_s, durable_s = runs["copy"]["wall_s"], runs["copy+fsync"]["wall_s"]
    rss_goal = ck["largest_shard_bytes"] + RSS_HEADROOM
    ours = runs["adaptermerge"]
    res.update(
        rss_goal_bytes=rss_goal,
        time_goal_s=TIME_GOAL * durable_s,
        time_judged=judge_time,
        time_ok=ours["wall_s"] <= TIME_GOAL * durable_s,
        time_ok_page_cache_copy=ours["wall_s"] <= TIME_GOAL * copy_s,
        rss_ok=ours["rss_bytes"] <= rss_goal,
    )
    print(
        f"\n{'contender (median)':<20} {'wall':>9} {'cpu':>9} {'x copy':>7} {'x copy+fsync':>12} {'peak RSS':>10} {'x RSS goal':>10}  runs"
    )
    for name, r in runs.items():
        print(
            f"{name:<20} {r['wall_s']:8.2f}s {r['cpu_s']:8.2f}s {r['wall_s'] / copy_s:7.2f} {r['wall_s'] / durable_s:12.2f} "
            f"{r['rss_bytes'] / MB:7,.0f} MB {r['rss_bytes'] / rss_goal:10.2f}  "
            + " ".join(f"{w:.2f}" for w in r["wall_s_all"])
        )
    if "phases" in runs.get("transformers+peft", {}):
        ph = runs["transformers+peft"]["phases"]
        print("transformers+peft phases: " + ", ".join(f"{k} {v:.2f} s" for k, v in ph.items()))
    print(
        f"goal wall <= {TIME_GOAL:g} x the copy with the same durability (copy+fsync, {TIME_GOAL * durable_s:.2f} s): "
        f"{ours['wall_s']:.2f} s ({ours['wall_s'] / durable_s:.2f}x) -> "
        + (verdict(res["time_ok"]) if judge_time else "info (--quick: the goal is judged on the full-size checkpoint)")
    )
    print(
        f"     against the page-cache copy (no fsync, {copy_s:.2f} s): {ours['wall_s'] / copy_s:.2f}x -> "
        f"{verdict(res['time_ok_page_cache_copy']) if judge_time else 'info'}  (import torch alone: {runs['import torch']['wall_s']:.2f} s = "
        f"{runs['import torch']['wall_s'] / copy_s:.2f}x this copy)"
    )
    print(
        f"goal peak RSS <= largest shard + 600 MB ({fmt_mb(rss_goal)}): {fmt_mb(ours['rss_bytes'])} "
        f"({ours['rss_bytes'] / rss_goal:.2f}x) -> {verdict(res['rss_ok'])}"
    )
    if "transformers+peft" in runs:
        p = runs["transformers+peft"]
        n_p, n_o = len(p["wall_s_all"]), len(ours["wall_s_all"])
        like = "" if n_p == n_o else f"; PEFT {n_p} round(s), ours {n_o}: not like for like"
        print(
            f"info (no goal): transformers+peft {fmt_mb(p['rss_bytes'])} peak RSS ({p['rss_bytes'] / ours['rss_bytes']:.1f}x"
            f" ours), median {p['wall_s']:.2f} s ({p['wall_s'] / ours['wall_s']:.1f}x ours; medians of fresh processes"
            f"{like})",
            flush=True,
        )
    return res


def growth_table(
    sizes: list[float],
    wide: dict[str, int],
    shard_mb: int,
    cache: str,
    tmp: Path,
    reuse: dict[str, Any],
    env: dict[str, str],
) -> dict[str, Any]:
    """``adaptermerge merge`` on checkpoints of several sizes (same shard size): peak RSS per size."""
    print(f"\nmemory growth (adaptermerge merge, {shard_mb} MB shards, {cache} page cache):", flush=True)
    startup = measure([sys.executable, "-c", "import adaptermerge.surgery.merge, adaptermerge_cli.main"], env)
    print(f"  baseline: importing the CLI and library takes {fmt_mb(startup['rss_bytes'])} peak RSS", flush=True)
    rows = []
    base, adapter, out = tmp / "growth-base", tmp / "growth-adapter", tmp / "growth-out"
    for gb in sorted(set(sizes)):
        shp = shape_for(gb, **wide)
        if reuse and asdict(shp) == reuse["checkpoint"]["shape"]:
            rows.append(reuse)
            continue
        try:
            c = build_checkpoint(base, shp, shard_mb * 10**6)
            build_adapter(adapter, shp)
            warm_facts(base, env)  # as for the main comparison: the model-class facts of this base are cached
            cmd = [*cli_command(), "merge", str(base), str(adapter), "-o", str(out), "--quiet"]
            r = run_contender(f"{c['tensor_bytes'] / 1e9:.2f} GB", cmd, cache, base, adapter, out, env)
        finally:
            for p in (base, adapter, out):
                shutil.rmtree(p, ignore_errors=True)
        rows.append({"checkpoint": c, "run": r})
    rows.sort(key=lambda row: row["checkpoint"]["tensor_bytes"])
    print(
        f"{'model':>9} {'layers':>6} {'shards':>6} {'largest shard':>13} {'largest merged tensor':>21} "
        f"{'peak RSS':>9} {'RSS - import':>12} {'wall':>8}"
    )
    for row in rows:
        c, r = row["checkpoint"], row["run"]
        print(
            f"{c['tensor_bytes'] / 1e9:7.2f}GB {c['shape']['layers']:6d} {c['shards']:6d} "
            f"{fmt_mb(c['largest_shard_bytes']):>13} {fmt_mb(c['largest_merged_tensor_bytes']):>21} "
            f"{fmt_mb(r['rss_bytes']):>9} {fmt_mb(r['rss_bytes'] - startup['rss_bytes']):>12} {r['wall_s']:7.2f}s"
        )
    res: dict[str, Any] = {"rows": rows, "import_rss_bytes": startup["rss_bytes"]}
    sizes_b = [row["checkpoint"]["tensor_bytes"] for row in rows]
    if len(rows) > 1 and sizes_b[-1] - sizes_b[0] >= 0.5e9:  # a slope over a smaller span is noise
        rss = [row["run"]["rss_bytes"] for row in rows]
        slope = (rss[-1] - rss[0]) / max(sizes_b[-1] - sizes_b[0], 1)
        print(
            f"peak RSS {fmt_mb(min(rss))} .. {fmt_mb(max(rss))} over {sizes_b[0] / 1e9:.2f} .. {sizes_b[-1] / 1e9:.2f} GB"
            f" ({slope * 1e3:+.1f} MB per GB of model)",
            flush=True,
        )
        res["mb_per_gb"] = slope * 1e3
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="~200 MB checkpoint, 50 MB shards (smoke test)")
    ap.add_argument("--size-gb", type=float, default=None, help="checkpoint size for the comparison (default 1.5)")
    ap.add_argument("--shard-mb", type=int, default=None, help="max shard size (default 300; --quick 50)")
    ap.add_argument("--growth", type=float, nargs="*", default=None, help="sizes (GB) for the growth table")
    ap.add_argument(
        "--cache",
        choices=["auto", "warm", "cold", "both"],
        default="auto",
        help="page cache before each contender: warm (inputs read once), cold (dropped; needs root), both; "
        "auto: both where the cache may be dropped, else warm (--quick: warm)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS/MKL_NUM_THREADS for adaptermerge and transformers+peft (default: torch's choice)",
    )
    ap.add_argument("--no-peft", action="store_true", help="skip the transformers + PEFT contender")
    ap.add_argument("--repeat", type=int, default=None, help="rounds of every contender (default 3; --quick 1)")
    ap.add_argument(
        "--peft-rounds", type=int, default=None, help="run transformers+PEFT in the first N rounds only (default: all)"
    )
    ap.add_argument(
        "--wait-for",
        nargs="*",
        default=["bench_combine"],
        metavar="PATTERN",
        help="wait (up to 10 min) while processes matching these pgrep -f patterns run (default: bench_combine)",
    )
    ap.add_argument("--no-wait", action="store_true", help="do not wait for other benchmarks")
    ap.add_argument("--profile", action="store_true", help="also profile merge_into_base in-process (cProfile)")
    ap.add_argument("--no-hash-cost", action="store_true", help="skip measuring what the recipe's hashing costs")
    ap.add_argument("--tmp", default=None, help="parent folder for the data (default: the system temp folder)")
    ap.add_argument("--json", default=None, help="write every figure to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args(argv)

    size = args.size_gb if args.size_gb is not None else (0.2 if args.quick else 1.5)
    shard_mb = args.shard_mb if args.shard_mb is not None else (50 if args.quick else 300)
    growth = args.growth if args.growth is not None else ([0.1, size] if args.quick else [0.4, 0.8, size])
    wide = dict(hidden=1024, intermediate=2816, heads=8) if args.quick else {}
    modes = cache_modes(args.cache, args.quick)
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    env = {} if args.threads is None else {k: str(args.threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}

    t_start = time.perf_counter()
    noise = "not checked (--no-wait)" if args.no_wait else wait_idle(args.wait_for, 30, 600)
    info: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}",
        "versions": versions(),
        "cache": modes,
        "other_benchmarks": noise,
        "loadavg_start": loadavg(),
        "shard_mb": shard_mb,
        "threads": args.threads or "default",
    }
    print(f"bench_merge: {info['date']}  {info['machine']}  load {info['loadavg_start']}")
    print("  " + "  ".join(f"{k} {v}" for k, v in info["versions"].items()))
    print(
        f"  page cache before each contender: {' then '.join(modes)};  threads: {info['threads']};  "
        f"other benchmarks: {noise}"
    )

    tmp = Path(tempfile.mkdtemp(prefix="bench_merge_", dir=args.tmp))
    results: dict[str, Any] = {"info": info, "comparisons": []}
    failed = False
    try:
        shape = shape_for(size, **wide)
        base, adapter = tmp / "base", tmp / "adapter"
        t0 = time.perf_counter()
        ck = build_checkpoint(base, shape, shard_mb * 10**6)
        ad = build_adapter(adapter, shape)
        print(
            f"\ncheckpoint: Llama {shape.layers} layers x {shape.hidden} (mlp {shape.intermediate}, vocab {shape.vocab})"
            f", bf16, {fmt_mb(ck['tensor_bytes'])} in {ck['shards']} shards (largest {fmt_mb(ck['largest_shard_bytes'])})"
            f";  adapter: rank 16 all-linear, {ad['modules']} modules, {fmt_mb(ad['bytes'])}"
            f"  (built in {time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
        results["checkpoint"], results["adapter"] = ck, ad
        env["ADAPTERMERGE_CACHE"] = str(tmp / "facts-cache")  # the benchmark's own, warmed for this base below
        warm_facts(base, env)
        for i, mode in enumerate(modes):
            judge_time = not args.quick  # at ~200 MB, interpreter start and imports dominate: information only
            res = comparison(
                mode, base, adapter, ck, tmp, shard_mb, not args.no_peft, i == 0, env, repeat, args.peft_rounds,
                judge_time,
            )  # fmt: skip
            results["comparisons"].append(res)
            failed |= not res.get("correctness", {"ok": True})["ok"]
            if i == 0:  # the goals are judged on the first mode (warm by default; see the docs)
                failed |= not ((res["time_ok"] or not judge_time) and res["rss_ok"])
        if not args.quick and not args.no_hash_cost:
            print("\nrecipe hashing (in-process, warm page cache):", flush=True)
            prepare("warm", base, adapter)
            cmd = [sys.executable, str(Path(__file__).resolve()), HASH_MODE, str(base), str(adapter), str(tmp / "o-h")]
            p = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
            print("\n".join(line for line in p.stdout.splitlines() if not line.startswith("@@")), flush=True)
            got = [json.loads(x[len("@@HASH ") :]) for x in p.stdout.splitlines() if x.startswith("@@HASH ")]
            if p.returncode != 0 or not got:
                raise RuntimeError(f"hash-cost child failed:\n{p.stderr[-3000:]}")
            results["hash_cost"] = got[0]
        if args.profile:
            print("\nprofile of merge_into_base (in-process, warm page cache):", flush=True)
            prepare("warm", base, adapter)
            script = str(Path(__file__).resolve())
            cmd = [sys.executable, script, PROFILE_MODE, str(base), str(adapter), str(tmp / "out-profile")]
            subprocess.run(cmd, env={**os.environ, **env})
            shutil.rmtree(tmp / "out-profile", ignore_errors=True)
        shutil.rmtree(base)
        shutil.rmtree(adapter)
        first = results["comparisons"][0]
        reuse = {"checkpoint": ck, "run": first["rounds"]["adaptermerge"][0]}
        results["growth"] = growth_table(growth, wide, shard_mb, modes[0], tmp, reuse, env)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    info["loadavg_end"] = loadavg()
    info["total_s"] = time.perf_counter() - t_start
    print(f"\ntotal {info['total_s']:.0f} s; load {info['loadavg_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == PEFT_MODE:
        peft_child(*sys.argv[2:6])
    elif len(sys.argv) > 1 and sys.argv[1] == PROFILE_MODE:
        profile_child(*sys.argv[2:5])
    elif len(sys.argv) > 1 and sys.argv[1] == HASH_MODE:
        hash_cost_child(*sys.argv[2:5])
    else:
        sys.exit(main())
