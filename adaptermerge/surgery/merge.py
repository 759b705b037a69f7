"""Fold adapters into a base checkpoint, streaming tensor by tensor.

``W' = W + delta`` in fp32, rounded once to the stored dtype; DoRA as PEFT merges it
(``W' = m * (W + delta) / ||W + delta||_row``); GPT-2 ``Conv1D`` weights receive ``delta.T``;
bitsandbytes 4-bit weights are dequantized, merged and re-quantized the same way. Peak memory is the
largest tensor being merged (plus the adapter), never a shard or the model.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from adaptermerge.adapter import Adapter
from adaptermerge.combination import combine, resolve_device, resolve_dtype
from adaptermerge.errors import InvalidCheckpoint, NumericalError, UsageError
from adaptermerge.io.atomic import atomic_dir, check_output_path
from adaptermerge.io.checkpoint import INDEX_NAME, Checkpoint, open_checkpoint
from adaptermerge.io.stream import ST_TO_TORCH, TORCH_TO_ST, ShardWriter, read_rows, read_tensor
from adaptermerge.lowrank import LowRank
from adaptermerge.surgery.plan import MergePlan, ShardPlan, non_weight_files, plan_merge
from adaptermerge.surgery.report import MergeReport, ModuleResult
from adaptermerge.surgery.tokens import fold_rows

QUANT_CHOICES = ("nf4", "fp4")
CHUNK_BYTES = 2 << 20  # fp32 bytes per row chunk of a streamed merge (cache-sized)
READ_BYTES = 8 << 20  # source bytes read at a time by a streamed merge


def check_range(ws: torch.Tensor, want: torch.dtype, module: str, sumsq: float | None = None) -> None:
    """Refuse NaN/Inf in a merged fp32 weight, and values that would overflow the stored dtype.

    ``sumsq`` (the sum of squares, when the caller has it) settles the common case without another pass: a
    finite sum of squares means every value is finite and below 1.9e19, inside bf16/fp32/fp64 range (fp16 and
    fp8 targets are always checked).
    """
    if sumsq is not None and math.isfinite(sumsq) and want in (torch.float32, torch.bfloat16, torch.float64):
        return
    lo, hi = (float(v) for v in torch.aminmax(ws))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise NumericalError(f"module {module}: the merged weight has NaN or Inf; nothing was written")
    _refuse_beyond(f"module {module}: merged values", max(-lo, hi), want)


def check_narrowing(t: torch.Tensor, want: torch.dtype, name: str) -> None:
    """Refuse converting finite values beyond the range of a narrower float dtype (they would become Inf)."""
    if not (t.is_floating_point() and want.is_floating_point and t.numel()):
        return
    if torch.finfo(want).max >= torch.finfo(t.dtype).max:
        return
    lo, hi = (float(v) for v in torch.aminmax(t))
    if math.isfinite(max(-lo, hi)):  # Inf/NaN already in the input stay as they are
        _refuse_beyond(f"tensor {name}: values", max(-lo, hi), want)


def _refuse_beyond(what: str, top: float, want: torch.dtype) -> None:
    limit = torch.finfo(want).max if want.is_floating_point else math.inf
    if top > limit:
        raise NumericalError(
            f"{what} reach {top:.4g}, beyond the largest {want} ({limit:.4g}); nothing was written. "
            "Choose a wider --dtype (bfloat16 or float32)"
        )


def _as_adapter(
    adapters: Sequence[Adapter | str | os.PathLike] | Adapter | str | os.PathLike,
    weights: Sequence[float] | None,
    method: str,
    rank: int | None,
    energy: float | None,
    ckpt: Checkpoint,
) -> tuple[Adapter, list[Adapter]]:
    from adaptermerge.surgery.init_conversion import plain_adapters

    if isinstance(adapters, (Adapter, str, os.PathLike)):
        adapters = [adapters]
    loaded = plain_adapters(adapters, base=ckpt)  # PiSSA/OLoRA: W0 - init + s*B@A, init recomputed from this base
    if len(loaded) == 1 and weights is None and method == "linear" and rank is None and energy is None:
        return loaded[0], loaded
    # linear in merge = exact sum: 'cat' gives it without any decomposition (the delta is formed densely per module)
    m = "cat" if method == "linear" and rank is None and energy is None else method
    return combine(loaded, weights, method=m, rank=rank, energy=energy, base=ckpt), loaded


def merge_into_base(
    base: str | os.PathLike,
    adapters: Sequence[Adapter | str | os.PathLike] | Adapter | str | os.PathLike,
    out: str | os.PathLike,
    weights: Sequence[float] | None = None,
    method: str = "linear",
    rank: int | None = None,
    energy: float | None = None,
    dtype: str | torch.dtype | None = None,
    quantize: str | None = None,
    dequantize: bool = False,
    optimize_scales: bool = False,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = False,
    threads: int | None = None,
) -> MergeReport:
    """Merge one or more adapters into a checkpoint folder and write a new checkpoint folder.

    Args:
        base: Hugging Face checkpoint folder (``config.json`` + ``*.safetensors`` [+ index]); 16-bit, fp32,
            or bitsandbytes 4-bit (NF4/FP4) as transformers saves it.
        adapters: one or several adapter folders or :class:`Adapter` objects.
        out: output folder: same tensor names, dtypes and sharding; non-weight files copied; model card
            and recipe added. Written atomically.
        weights, method, rank, energy: how several adapters are combined (see :func:`adaptermerge.combine`);
            ``linear`` is the exact weighted sum, formed per module.
        dtype: convert every floating tensor to ``float32``/``bfloat16``/``float16`` (default: keep).
        quantize: ``nf4``/``fp4`` to write a 4-bit checkpoint of the merged weights (16-bit bases): the layers
            transformers' bitsandbytes integration quantizes for the model class in ``config.json``, exactly as
            ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` quantizes the merged checkpoint.
        dequantize: on a 4-bit base, write a 16-bit checkpoint of ``dequant(W4) + delta`` (GPT-2 ``Conv1D``
            weights in their dense ``in x out`` layout).
        optimize_scales: when (re-)quantizing, choose each block's scale to minimise the error of
            ``W + delta`` (never worse than absmax scaling; about 7% lower error, about 10x slower on CPU).
        device: where the per-module arithmetic runs.
        overwrite: replace a non-empty output folder.
        progress: show a progress bar (bytes and modules).
        threads: CPU threads for the arithmetic of a 16-bit/fp32 merge. Default: one fewer than torch's
            current setting (at least 1), because a writer thread moves the bytes meanwhile and idle OpenMP
            threads spinning at their barriers would take its core (measured: 1.3-1.7x faster on 2 cores).
            4-bit work keeps torch's setting.

    Returns:
        A :class:`MergeReport` with per-module figures (relative delta size; for 4-bit, requantization
        error and how much of the delta survives).

    Example:
        >>> import adaptermerge
        >>> adaptermerge.merge_into_base("Llama-3-8B", "my-adapter", "merged")  # doctest: +SKIP
    """
    base_p = Path(base)
    if not base_p.is_dir():
        raise InvalidCheckpoint(f"{base_p} is not a folder; pass a Hugging Face checkpoint folder")
    adapter_paths = [
        a for a in (adapters if isinstance(adapters, (list, tuple)) else [adapters]) if not isinstance(a, Adapter)
    ]
    out_p = check_output_path(out, [base_p, *adapter_paths], overwrite=overwrite)
    if quantize is not None and quantize not in QUANT_CHOICES:
        raise UsageError(f"--quantize must be one of {', '.join(QUANT_CHOICES)}")
    if threads is not None and threads < 1:
        raise UsageError(f"threads must be at least 1, got {threads}")
    dev = resolve_device(device)
    out_dtype = resolve_dtype(dtype)
    ckpt = open_checkpoint(base_p)
    adapter, loaded = _as_adapter(adapters, weights, method, rank, energy, ckpt)

    from adaptermerge.surgery import quant

    groups, specs = quant.checkpoint_groups(ckpt)
    if groups and quantize:
        raise UsageError(
            "the base is already 4-bit; --quantize applies to 16-bit bases (it re-quantizes 4-bit ones anyway)"
        )
    if dequantize and not groups:
        raise UsageError("--dequantize needs a 4-bit (bitsandbytes) base")
    if out_dtype is None and dequantize:
        out_dtype = specs_dtype(specs)
    plan = plan_merge(
        ckpt,
        adapter,
        out_dtype=TORCH_TO_ST[out_dtype] if out_dtype is not None else None,
        quantized_members=groups,
        quant_specs={k: (s.shape, s.quant_type) for k, s in specs.items()},
    )
    report = MergeReport(output=str(out_p), warnings=list(adapter.warnings) + plan.warnings)
    copy_files, skipped = non_weight_files(base_p, ckpt.shards)
    if skipped:
        report.warnings.append(
            f"skipped pickle files {skipped} (never loaded or copied; the merged weights are in safetensors)"
        )

    executor = _Executor(
        ckpt, adapter, plan, dev, groups, specs, quantize, dequantize, optimize_scales, report, out_dtype
    )
    if threads is None:
        cpu_stream = not groups and not quantize and dev.type == "cpu"
        threads = max(1, torch.get_num_threads() - 1) if cpu_stream else torch.get_num_threads()
    with torch_threads(threads), atomic_dir(out_p, overwrite=overwrite) as tmp:
        out_plan = executor.output_plan()
        from tqdm.auto import tqdm

        bar = tqdm(
            total=sum(s.nbytes for s in out_plan), unit="B", unit_scale=True, desc="merging",
            disable=not (progress and sys.stderr.isatty()),
        )  # fmt: skip
        executor.bar = bar
        from concurrent.futures import ThreadPoolExecutor

        # each finished shard is flushed to disk in the background while the next one is computed
        with ThreadPoolExecutor(max_workers=1) as syncer:
            futures = []
            for shard in out_plan:
                executor.write_shard(tmp / shard.file, shard)
                futures.append(syncer.submit(_fsync_file, tmp / shard.file))
            for f in futures:
                f.result()
        bar.close()
        report.bytes_written = sum(s.nbytes for s in out_plan)
        for f in copy_files:
            shutil.copy2(f, tmp / f.name)
        _write_config(tmp, ckpt, out_dtype, quantize, dequantize, specs, executor)
        if len(ckpt.shards) > 1 or (base_p / INDEX_NAME).is_file():
            _write_index(tmp, ckpt, out_plan, plan.rename[1])
        from adaptermerge.surgery.card import merge_card, merge_recipe

        recipe = merge_recipe(base_p, loaded, adapter, weights, method, rank, energy, out_dtype, quantize, dequantize)
        (tmp / "README.md").write_text(merge_card(ckpt, adapter, report, recipe), encoding="utf-8")
        from adaptermerge.recipe import dump_recipe

        (tmp / "adaptermerge_recipe.yaml").write_text(dump_recipe(recipe, "merge"), encoding="utf-8")
    quant.warn_lost_deltas(report)
    return report


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` torch CPU threads, restoring the previous setting afterwards."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def specs_dtype(specs: dict[str, Any]) -> torch.dtype:
    dts = {s.dtype for s in specs.values()}
    return dts.pop() if len(dts) == 1 else torch.bfloat16


class _Executor:
    """Runs a plan: reads, computes and writes each output tensor in planned order."""

    def __init__(
        self,
        ckpt: Checkpoint,
        adapter: Adapter,
        plan: MergePlan,
        dev: torch.device,
        groups,
        specs,
        quantize,
        dequantize,
        optimize,
        report,
        out_dtype: torch.dtype | None = None,
    ):
        # the planned adapter: layouts fixed per layer, a tied head's copy dropped
        self.ckpt, self.adapter, self.plan, self.dev = ckpt, plan.adapter or adapter, plan, dev
        self.groups, self.specs = groups, specs
        self.quantize, self.dequantize, self.optimize = quantize, dequantize, optimize
        self.report = report
        self.out_dtype = out_dtype
        self.bar = None
        self.handles: dict[str, Any] = {}
        self.pending: dict[str, dict[str, torch.Tensor]] = {}  # 4-bit group -> computed member tensors
        self.key_to_module = {v[len(plan.rename[1]) :]: m for m, v in plan.modules.items()}
        from adaptermerge.surgery import quant

        self.quant = quant
        self.new_quant: dict[str, Any] = {}  # --quantize: source weight key -> quant.NewQuant
        self.transposed: set[str] = set()  # --dequantize: 4-bit groups written back as Conv1D (in x out)
        self.workspace: dict[tuple, torch.Tensor] = {}
        self.delta_norms: dict[str, float] = {}
        self.read_buf: bytearray | None = None
        # modules of an adapter converted from PiSSA/OLoRA: factor rows [:k] are s*B@A, rows [k:] the init term
        self.residual: dict[str, int] = adapter.provenance.get("converted", {}).get("trained_ranks", {})

    def output_plan(self) -> list[ShardPlan]:
        """The plan with 4-bit changes applied (new tensors for --quantize, dense tensors for --dequantize)."""
        return self.quant.adjust_plan(self)

    def fh(self, f: str):
        if f not in self.handles:
            self.handles[f] = open(self.ckpt.path / f, "rb")  # noqa: SIM115 - closed at the end
        return self.handles[f]

    def read(self, key: str) -> torch.Tensor:
        f = self.ckpt.weight_map[key]
        return read_tensor(self.fh(f), self.ckpt.info(key))

    def merged_weight(self, module: str, w: torch.Tensor, want: torch.dtype = torch.float32) -> torch.Tensor:
        """``W + delta`` (DoRA-normalised where the adapter has a magnitude), fp32, stored layout.

        Refuses NaN/Inf and values beyond the range of ``want`` (the dtype the result will be stored in).
        Works in one fp32 workspace per shape, reused across modules (``addmm_`` adds ``B @ A`` in
        place), so a merge allocates no per-module dense temporaries. The result is valid until the
        next call.
        """
        lr: LowRank = self.adapter.modules[module]
        ws = self.workspace.get(tuple(w.shape))
        if ws is None:
            ws = self.workspace[tuple(w.shape)] = torch.empty(w.shape, dtype=torch.float32, device=self.dev)
        ws.copy_(w)
        wn = float(torch.linalg.vector_norm(ws))
        a = lr.A.to(self.dev, torch.float32)
        b = lr.B.to(self.dev, torch.float32)
        self._add_delta(ws, module, b, a, lr.layout == "conv1d", w.dtype)
        if lr.magnitude is not None:  # per output channel: rows of the canonical layout
            dim = 0 if lr.layout == "conv1d" else 1
            norm = torch.linalg.vector_norm(ws, dim=dim, keepdim=True)
            mag = lr.magnitude.to(self.dev, torch.float32)
            ws.mul_((mag.unsqueeze(0) if dim == 0 else mag.unsqueeze(1)) / norm)
        check_range(ws, want, module)
        dn = self.delta_norms.get(module)
        if dn is None:
            dn = self.delta_norms[module] = lr.frobenius_norm()
        self.last = ModuleResult(module, self.plan.modules[module], dn / wn if wn else float("inf"))
        return ws

    def _add_delta(
        self, ws: torch.Tensor, module: str, b: torch.Tensor, a: torch.Tensor, conv1d: bool, stored: torch.dtype
    ) -> None:
        """``ws += B @ A`` (``(B @ A)^T`` for a Conv1D weight stored in x out).

        For a module converted from PiSSA/OLoRA, the init term is added first and ``W0 - init`` rounded to the stored
        dtype: PEFT's base layer holds it in that dtype during training and at reload, so the result is the trained
        model rounded once (a no-op for fp32 bases).
        """
        k = self.residual.get(module)
        parts = [(b, a)] if k is None else [(b[:, k:], a[k:]), (b[:, :k], a[:k])]
        for i, (bb, aa) in enumerate(parts):
            if i and stored.is_floating_point and stored != torch.float32:
                ws.copy_(ws.to(stored))
            if conv1d:
                ws.addmm_(aa.T, bb.T)
            else:
                ws.addmm_(bb, aa)

    def _streamable(self, job) -> bool:
        lr: LowRank = self.adapter.modules[job.module]
        plain = lr.layout != "conv1d" and lr.magnitude is None and job.extra_key is None
        return plain and len(job.src.shape) == 2 and job.src.numel > 0

    def _merge_rows(self, job, want: torch.dtype):
        """``W + B @ A`` computed and yielded in fp32 row chunks that stay in cache (linear/embedding, no DoRA).

        The source is read in blocks of :data:`READ_BYTES` into a reused buffer (plain reads: a source file
        changed under us is an ``OSError``, never a ``SIGBUS`` as with a memory map); each chunk is widened
        to fp32 in a reused buffer, gets ``B[rows] @ A`` added in place and is range-checked; the writer
        rounds it once to the stored dtype. A yielded chunk is overwritten by the next one.
        """
        lr: LowRank = self.adapter.modules[job.module]
        m, n = job.src.shape
        rows = max(1, CHUNK_BYTES // (4 * n))
        row_bytes = job.src.nbytes // m
        block = max(rows, READ_BYTES // row_bytes // rows * rows)
        ws_full = self.workspace.get(("rows", rows, n))
        if ws_full is None:
            ws_full = self.workspace[("rows", rows, n)] = torch.empty(rows, n, dtype=torch.float32, device=self.dev)
        a = lr.A.to(self.dev, torch.float32)
        b = lr.B.to(self.dev, torch.float32)
        fh = self.fh(job.src_file)
        if self.read_buf is None or len(self.read_buf) < block * row_bytes:
            self.read_buf = bytearray(block * row_bytes)
        wsq = 0.0
        for b0 in range(0, m, block):
            b1 = min(m, b0 + block)
            src = read_rows(fh, job.src, b0, b1, self.read_buf)
            for r0 in range(b0, b1, rows):
                r1 = min(b1, r0 + rows)
                ws = ws_full[: r1 - r0]
                ws.copy_(src[r0 - b0 : r1 - b0])
                flat = ws.view(-1)
                wsq += float(torch.dot(flat, flat))
                self._add_delta(ws, job.module, b[r0:r1], a, False, ST_TO_TORCH[job.src.dtype])
                check_range(ws, want, job.module, float(torch.dot(flat, flat)))
                yield ws
        dn = self.delta_norms.get(job.module)
        if dn is None:
            dn = self.delta_norms[job.module] = lr.frobenius_norm()
        wn = math.sqrt(wsq)
        if not math.isfinite(wn):  # fp32 overflow of the sum of squares (|w| > 1e19): measure it exactly
            wn = float(torch.linalg.vector_norm(self.read_src(job).to(torch.float64)))
        self.last = ModuleResult(job.module, self.plan.modules[job.module], dn / wn if wn else float("inf"))

    def write_shard(self, path: Path, shard: ShardPlan) -> None:
        writer = ShardWriter(path, [j.out for j in shard.jobs], shard.metadata)
        try:
            for job in shard.jobs:
                self._write_job(writer, job)
                if self.bar is not None:
                    self.bar.update(job.out.nbytes)
                    if job.action in ("merge", "quant", "newquant", "dequant") and job.module is not None:
                        self.bar.set_postfix(modules=len(self.report.modules), refresh=False)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:  # the writer has finished with the source files (queued copies read them)
            for h in self.handles.values():
                h.close()
            self.handles.clear()

    def _write_job(self, writer: ShardWriter, job) -> None:
        name = job.out.name
        if job.action == "copy":  # bytes only: any dtype safetensors knows, sub-byte ones included
            writer.copy_tensor(name, self.fh(job.src_file), job.src)
            return
        want = ST_TO_TORCH[job.out.dtype]
        if job.action == "convert":
            src = self.read_src(job)
            check_narrowing(src, want, name)
            writer.write_tensor(name, src.to(want))
        elif job.action == "merge" and self._streamable(job):
            writer.write_chunks(name, self._merge_rows(job, want))
            self.report.modules.append(self.last)
        elif job.action == "merge":
            base = self.adapter.extra_tensors[job.extra_key] if job.extra_key else self.read_src(job)
            new = self.merged_weight(job.module, base, want)
            self.report.modules.append(self.last)
            writer.write_tensor(name, new.to("cpu", want))
        elif job.action == "bias":
            b = self.read_src(job).to(torch.float32) + self.adapter.modules[job.module].bias.to(torch.float32)
            check_range(b, want, f"{job.module} (bias)")
            writer.write_tensor(name, b.to(want))
        elif job.action == "tokens":
            rows = self.adapter.token_rows[job.module]
            check_narrowing(rows.rows, want, f"{name} (token rows of {job.module})")
            new, rel = fold_rows(self.read_src(job), rows, want)
            self.report.modules.append(ModuleResult(job.module, name, rel))
            writer.write_tensor(name, new)
        elif job.action in ("replace", "add"):
            extra = self.adapter.extra_tensors[job.extra_key]
            check_narrowing(extra, want, name)
            writer.write_tensor(name, extra.to(want))
        elif job.action in ("quant", "dequant", "newquant"):
            writer.write_tensor(name, self.quant.member_tensor(self, job).to(want))
        else:  # pragma: no cover - planner bug
            raise RuntimeError(f"unknown job action {job.action}")

    def read_src(self, job) -> torch.Tensor:
        return read_tensor(self.fh(job.src_file), job.src)


def _write_config(tmp: Path, ckpt: Checkpoint, out_dtype, quantize, dequantize, specs, executor) -> None:
    cfg_path = tmp / "config.json"
    if not cfg_path.is_file():
        return
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if executor.plan.untie:
        cfg["tie_word_embeddings"] = False
    if out_dtype is not None:
        name = str(out_dtype).replace("torch.", "")
        for k in ("torch_dtype", "dtype"):
            if k in cfg or k == "dtype":
                cfg[k] = name
    if dequantize:
        cfg.pop("quantization_config", None)
    if quantize:
        cfg["quantization_config"] = executor.quant.quantization_config(quantize, executor)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_index(tmp: Path, ckpt: Checkpoint, shards: list[ShardPlan], prefix: str) -> None:
    meta = dict(ckpt.index_metadata)
    meta["total_size"] = sum(s.nbytes for s in shards)
    if isinstance(meta.get("total_parameters"), int):
        # transformers counts logical parameters (4-bit packed weights twice), so re-quantizing changes
        # nothing; only tensors the base lacked (a head from modules_to_save) add to the count
        # (as do untied copies of a tied tensor)
        meta["total_parameters"] += sum(
            math.prod(j.out.shape) for s in shards for j in s.jobs if j.src is None or j.out.name != prefix + j.src.name
        )
    weight_map = {j.out.name: s.file for s in shards for j in s.jobs}
    (tmp / INDEX_NAME).write_text(
        json.dumps({"metadata": meta, "weight_map": weight_map}, indent=2) + "\n", encoding="utf-8"
    )


__all__ = ["MergeReport", "ModuleResult", "merge_into_base"]
