"""Run a merge plan: read, compute and write each output tensor in planned order, one handler per action.

The planner (:mod:`adaptermerge.surgery.plan`) decides what each output tensor is; this module only carries it
out. Each :class:`~adaptermerge.surgery.plan.Action` has one handler here; the 4-bit actions are handled by
:class:`adaptermerge.surgery.quant.FourBit`, which receives this executor's public services (reading tensors,
forming ``W + delta``) as arguments. A handler returns the module's figures (or None); the executor collects them.

``W' = W + delta`` is computed in fp32 and rounded once to the stored dtype; DoRA as PEFT merges it
(``W' = m * (W + delta) / ||W + delta||_row``); GPT-2 ``Conv1D`` weights receive ``delta.T``. Peak memory is the
largest tensor being merged (plus the adapter), never a shard or the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import torch

from adaptermerge.dtypes import ST_TO_TORCH
from adaptermerge.errors import NumericalError
from adaptermerge.io.checkpoint import Checkpoint
from adaptermerge.io.files import SourceFiles
from adaptermerge.io.stream import ShardWriter, read_rows, read_tensor
from adaptermerge.lowrank import LowRank
from adaptermerge.surgery.plan import Action, Job, MergePlan, ShardPlan
from adaptermerge.surgery.report import ModuleResult
from adaptermerge.surgery.tokens import fold_rows

if TYPE_CHECKING:
    from adaptermerge.surgery.quant import FourBit

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
            "Choose a wider `dtype` (bfloat16 or float32)"
        )


class Executor:
    """Carries out a :class:`MergePlan` (see the module docstring).

    Args:
        ckpt: the base checkpoint the plan reads.
        plan: the plan; its ``adapter`` is the adapter as planned (each module's layout its layer's).
        device: where the arithmetic runs.
        four_bit: the 4-bit state of the merge (groups of a 4-bit base, ``--quantize``, ``--dequantize``), if any.
    """

    def __init__(self, ckpt: Checkpoint, plan: MergePlan, device: torch.device, four_bit: FourBit | None = None):
        assert plan.adapter is not None, "plan_merge sets the planned adapter"
        self.ckpt, self.plan, self.adapter, self.dev, self.four_bit = ckpt, plan, plan.adapter, device, four_bit
        self.results: list[ModuleResult] = []
        self.progress: Callable[[int, int], None] | None = None  # (bytes written, modules merged so far)
        self._files = SourceFiles(ckpt.path)
        self._workspace: dict[tuple, torch.Tensor] = {}
        self._delta_norms: dict[str, float] = {}
        self._read_buf: bytearray | None = None
        self.rows_result: ModuleResult | None = None  # figures of the last merge_rows
        # modules of an adapter converted from PiSSA/OLoRA: factor rows [:k] are s*B@A, rows [k:] the init term
        self._residual: dict[str, int] = self.adapter.provenance.get("converted", {}).get("trained_ranks", {})

    # ------------------------------------------------------------------------------------------- services

    def read(self, key: str) -> torch.Tensor:
        """A checkpoint tensor by name."""
        return read_tensor(self.file(self.ckpt.weight_map[key]), self.ckpt.info(key))

    def source(self, job: Job) -> torch.Tensor:
        """The job's source tensor."""
        return read_tensor(self.file(job.src_file), job.src)

    def merged_weight(
        self, module: str, w: torch.Tensor, want: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, ModuleResult]:
        """``W + delta`` (DoRA-normalised where the adapter has a magnitude), fp32, stored layout, and its figures.

        Refuses NaN/Inf and values beyond the range of ``want`` (the dtype the result will be stored in). Works in
        one fp32 workspace per shape, reused across modules (``addmm_`` adds ``B @ A`` in place), so a merge
        allocates no per-module dense temporaries. The result is valid until the next call.
        """
        lr = self.adapter.modules[module]
        ws = self._workspace.get(tuple(w.shape))
        if ws is None:
            ws = self._workspace[tuple(w.shape)] = torch.empty(w.shape, dtype=torch.float32, device=self.dev)
        ws.copy_(w)
        wn = float(torch.linalg.vector_norm(ws))
        if isinstance(lr, LowRank):
            a = lr.A.to(self.dev, torch.float32)
            b = lr.B.to(self.dev, torch.float32)
            self._add_delta(ws, module, b, a, lr.layout == "conv1d", w.dtype)
        else:  # a method's dense result (combination.DenseModule), already in the stored layout
            ws.add_(lr.weight_delta(torch.float32).to(self.dev))
        if lr.magnitude is not None:  # per output channel: rows of the canonical layout
            dim = 0 if lr.layout == "conv1d" else 1
            norm = torch.linalg.vector_norm(ws, dim=dim, keepdim=True)
            mag = lr.magnitude.to(self.dev, torch.float32)
            ws.mul_((mag.unsqueeze(0) if dim == 0 else mag.unsqueeze(1)) / norm)
        check_range(ws, want, module)
        return ws, self._result(module, wn)

    # ------------------------------------------------------------------------------------------- running

    def write_shard(self, path: Path, shard: ShardPlan) -> None:
        """Write one output shard; every job's handler in planned order."""
        writer = ShardWriter(path, [j.out for j in shard.jobs], shard.metadata)
        try:
            for job in shard.jobs:
                result = HANDLERS[job.action](self, writer, job)
                if result is not None:
                    self.results.append(result)
                if self.progress is not None:
                    self.progress(job.out.nbytes, len(self.results))
            writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:  # the writer has finished with the source files (queued copies read them)
            self._files.close()

    def file(self, f: str) -> BinaryIO:
        """An open source shard (opened once, closed when the shard being written is done)."""
        return self._files.get(f)

    def _result(self, module: str, wn: float) -> ModuleResult:
        dn = self._delta_norms.get(module)
        if dn is None:
            dn = self._delta_norms[module] = self.adapter.modules[module].frobenius_norm()
        return ModuleResult(module, self.plan.modules[module], dn / wn if wn else float("inf"))

    def _add_delta(
        self, ws: torch.Tensor, module: str, b: torch.Tensor, a: torch.Tensor, conv1d: bool, stored: torch.dtype
    ) -> None:
        """``ws += B @ A`` (``(B @ A)^T`` for a Conv1D weight stored in x out).

        For a module converted from PiSSA/OLoRA, the init term is added first and ``W0 - init`` rounded to the stored
        dtype: PEFT's base layer holds it in that dtype during training and at reload, so the result is the trained
        model rounded once (a no-op for fp32 bases).
        """
        k = self._residual.get(module)
        parts = [(b, a)] if k is None else [(b[:, k:], a[k:]), (b[:, :k], a[:k])]
        for i, (bb, aa) in enumerate(parts):
            if i and stored.is_floating_point and stored != torch.float32:
                ws.copy_(ws.to(stored))
            if conv1d:
                ws.addmm_(aa.T, bb.T)
            else:
                ws.addmm_(bb, aa)

    def streamable(self, job: Job) -> bool:
        """A plain Linear/embedding merge of a stored tensor: computed row chunk by row chunk."""
        lr = self.adapter.modules[job.module]
        plain = isinstance(lr, LowRank) and lr.layout != "conv1d" and lr.magnitude is None and job.extra_key is None
        return plain and len(job.src.shape) == 2 and job.src.numel > 0

    def merge_rows(self, job: Job, want: torch.dtype) -> Iterator[torch.Tensor]:
        """``W + B @ A`` computed and yielded in fp32 row chunks that stay in cache (linear/embedding, no DoRA).

        The source is read in blocks of :data:`READ_BYTES` into a reused buffer (plain reads: a source file
        changed under us is an ``OSError``, never a ``SIGBUS`` as with a memory map); each chunk is widened
        to fp32 in a reused buffer, gets ``B[rows] @ A`` added in place and is range-checked; the writer
        rounds it once to the stored dtype. A yielded chunk is overwritten by the next one. The module's figures
        are in ``rows_result`` once the generator is exhausted.
        """
        lr: LowRank = self.adapter.modules[job.module]
        m, n = job.src.shape
        rows = max(1, CHUNK_BYTES // (4 * n))
        row_bytes = job.src.nbytes // m
        block = max(rows, READ_BYTES // row_bytes // rows * rows)
        ws_full = self._workspace.get(("rows", rows, n))
        if ws_full is None:
            ws_full = self._workspace[("rows", rows, n)] = torch.empty(rows, n, dtype=torch.float32, device=self.dev)
        a = lr.A.to(self.dev, torch.float32)
        b = lr.B.to(self.dev, torch.float32)
        fh = self.file(job.src_file)
        if self._read_buf is None or len(self._read_buf) < block * row_bytes:
            self._read_buf = bytearray(block * row_bytes)
        wsq = 0.0
        for b0 in range(0, m, block):
            b1 = min(m, b0 + block)
            src = read_rows(fh, job.src, b0, b1, self._read_buf)
            for r0 in range(b0, b1, rows):
                r1 = min(b1, r0 + rows)
                ws = ws_full[: r1 - r0]
                ws.copy_(src[r0 - b0 : r1 - b0])
                flat = ws.view(-1)
                wsq += float(torch.dot(flat, flat))
                self._add_delta(ws, job.module, b[r0:r1], a, False, ST_TO_TORCH[job.src.dtype])
                check_range(ws, want, job.module, float(torch.dot(flat, flat)))
                yield ws
        wn = math.sqrt(wsq)
        if not math.isfinite(wn):  # fp32 overflow of the sum of squares (|w| > 1e19): measure it exactly
            wn = float(torch.linalg.vector_norm(self.source(job).to(torch.float64)))
        self.rows_result = self._result(job.module, wn)


# ----------------------------------------------------------------------------------------------- handlers
# Each writes the job's output tensor and returns the module's figures, or None.

Handler = Callable[[Executor, ShardWriter, Job], "ModuleResult | None"]


def _want(job: Job) -> torch.dtype:
    return ST_TO_TORCH[job.out.dtype]


def _copy(ex: Executor, writer: ShardWriter, job: Job) -> None:
    """Bytes unchanged: any dtype safetensors knows, sub-byte ones included."""
    writer.copy_tensor(job.out.name, ex.file(job.src_file), job.src)


def _convert(ex: Executor, writer: ShardWriter, job: Job) -> None:
    src = ex.source(job)
    check_narrowing(src, _want(job), job.out.name)
    writer.write_tensor(job.out.name, src.to(_want(job)))


def _merge(ex: Executor, writer: ShardWriter, job: Job) -> ModuleResult:
    """``W + delta``; streamed in row chunks when it can be, else in one fp32 workspace; ``W`` is the adapter's
    saved base layer when the job names one (``extra_key``)."""
    want = _want(job)
    if ex.streamable(job):
        writer.write_chunks(job.out.name, ex.merge_rows(job, want))
        return ex.rows_result
    base = ex.adapter.extra_tensors[job.extra_key] if job.extra_key else ex.source(job)
    new, result = ex.merged_weight(job.module, base, want)
    writer.write_tensor(job.out.name, new.to("cpu", want))
    return result


def _bias(ex: Executor, writer: ShardWriter, job: Job) -> None:
    want = _want(job)
    b = ex.source(job).to(torch.float32) + ex.adapter.modules[job.module].bias.to(torch.float32)
    check_range(b, want, f"{job.module} (bias)")
    writer.write_tensor(job.out.name, b.to(want))


def _tokens(ex: Executor, writer: ShardWriter, job: Job) -> ModuleResult:
    rows = ex.adapter.token_rows[job.module]
    check_narrowing(rows.rows, _want(job), f"{job.out.name} (token rows of {job.module})")
    new, rel = fold_rows(ex.source(job), rows, _want(job))
    writer.write_tensor(job.out.name, new)
    return ModuleResult(job.module, job.out.name, rel)


def _replace(ex: Executor, writer: ShardWriter, job: Job) -> None:
    """An adapter tensor in place of (``replace``) or beside (``add``) the base's: a modules_to_save copy."""
    extra = ex.adapter.extra_tensors[job.extra_key]
    check_narrowing(extra, _want(job), job.out.name)
    writer.write_tensor(job.out.name, extra.to(_want(job)))


def _four_bit(ex: Executor, writer: ShardWriter, job: Job) -> ModuleResult | None:
    """A member tensor of a 4-bit group (re-quantized, dequantized, or newly quantized): see FourBit."""
    assert ex.four_bit is not None, "the planner makes 4-bit jobs only for a 4-bit merge"
    tensor, result = ex.four_bit.member(ex, job)
    writer.write_tensor(job.out.name, tensor.to(_want(job)))
    return result


HANDLERS: dict[Action, Handler] = {
    Action.COPY: _copy,
    Action.CONVERT: _convert,
    Action.MERGE: _merge,
    Action.BIAS: _bias,
    Action.TOKENS: _tokens,
    Action.REPLACE: _replace,
    Action.ADD: _replace,
    Action.QUANT: _four_bit,
    Action.DEQUANT: _four_bit,
    Action.NEWQUANT: _four_bit,
}
