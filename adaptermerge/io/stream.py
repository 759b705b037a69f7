"""Tensor-by-tensor safetensors I/O: read one tensor, write a file whose header is planned up front.

Memory stays bounded by the tensor being processed: tensors are read with plain file reads (no mmap of
the shard), and unchanged tensors are copied file-to-file by the kernel.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from adaptermerge.dtypes import ST_TO_TORCH, TORCH_TO_ST
from adaptermerge.io.safetensors_header import DTYPE_SIZES, TensorInfo


def read_tensor(fh: BinaryIO, info: TensorInfo) -> torch.Tensor:
    """Read one tensor's bytes from an open safetensors file into a fresh tensor."""
    buf = bytearray(info.nbytes)
    fh.seek(info.start)
    view = memoryview(buf)
    got = 0
    while got < info.nbytes:
        n = fh.readinto(view[got:])
        if not n:
            raise OSError(f"unexpected end of file reading {info.name}")
        got += n
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=ST_TO_TORCH[info.dtype])
    return torch.frombuffer(buf, dtype=ST_TO_TORCH[info.dtype]).reshape(info.shape)


def read_rows(fh: BinaryIO, info: TensorInfo, r0: int, r1: int, buf: bytearray | None = None) -> torch.Tensor:
    """Rows ``r0:r1`` of a 2-D tensor, read straight from the file (no other rows touched)."""
    n = info.shape[1]
    isz = DTYPE_SIZES[info.dtype]
    nbytes = (r1 - r0) * n * isz
    if buf is None or len(buf) < nbytes:
        buf = bytearray(nbytes)
    view = memoryview(buf)[:nbytes]
    fh.seek(info.start + r0 * n * isz)
    got = 0
    while got < nbytes:
        k = fh.readinto(view[got:])
        if not k:
            raise OSError(f"unexpected end of file reading {info.name}")
        got += k
    return torch.frombuffer(view, dtype=ST_TO_TORCH[info.dtype]).reshape(r1 - r0, n)


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of an output file: name, safetensors dtype, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPE_SIZES[self.dtype]
        for s in self.shape:
            n *= s
        return n


def header_bytes(tensors: Sequence[PlannedTensor], metadata: dict[str, str] | None) -> bytes:
    """The safetensors header (8-byte length + JSON padded to 8 bytes) for tensors written in this order."""
    head: dict[str, object] = {}
    if metadata:
        head["__metadata__"] = dict(metadata)
    off = 0
    for t in tensors:
        head[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
        off += t.nbytes
    raw = json.dumps(head, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


class ShardWriter:
    """Write a safetensors file whose header is fixed before any data: tensors must come in plan order.

    The bytes go to the kernel on a background thread while the caller computes the next tensor. Tensors
    and computed chunks are converted (or copied) into a few large staging buffers, because the kernel takes
    multi-megabyte writes several times faster than megabyte ones; unchanged tensors are queued as kernel
    file-to-file copies. At most :attr:`STAGES` buffers of :attr:`STAGE_BYTES` exist, so memory stays
    bounded. Call :meth:`close` to finish (it waits for the queue and reports any write error) or
    :meth:`abort` after a failure.
    """

    STAGE_BYTES = 8 << 20
    STAGES = 3

    def __init__(
        self, path: str | os.PathLike, tensors: Sequence[PlannedTensor], metadata: dict[str, str] | None = None
    ):
        self.path = Path(path)
        self.plan = list(tensors)
        self.i = 0
        header = header_bytes(self.plan, metadata)
        self._todo: queue.SimpleQueue = queue.SimpleQueue()
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        self._stages = 0
        self._stage: torch.Tensor | None = None
        self._pos = 0
        self._error: BaseException | None = None
        self._closed = False
        self._todo.put(("bytes", header, 0))
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self._thread = threading.Thread(target=self._run, name=f"write {self.path.name}", daemon=True)
        try:
            self._thread.start()
        except BaseException:
            os.close(self.fd)
            raise

    # -- the writer thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._todo.get()
            if item is None:
                return
            kind, data, arg = item
            try:
                if self._error is not None:
                    continue
                if kind == "bytes":
                    _write_all(self.fd, memoryview(data))
                elif kind == "stage":
                    _write_all(self.fd, memoryview(data.numpy())[:arg])
                else:  # "copy": (source fd, start), length
                    _copy_fd(data[0], self.fd, data[1], arg)
            except Exception as e:  # noqa: BLE001 - reported to the caller by the next call or by close()
                self._error = e
            finally:
                if kind == "stage":
                    self._free.put(data)

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    # -- staging -------------------------------------------------------------------------------------------

    def _flush(self) -> None:
        if self._stage is not None and self._pos:
            self._todo.put(("stage", self._stage, self._pos))
            self._stage, self._pos = None, 0
        self._raise_error()

    def _room(self, itemsize: int) -> torch.Tensor:
        """The current staging buffer, with room for at least one item at an aligned position."""
        if self._stage is not None and (self._pos % itemsize or self._pos + itemsize > self.STAGE_BYTES):
            self._flush()
        if self._stage is None:
            if self._stages < self.STAGES:
                self._stages += 1
                self._stage = torch.empty(self.STAGE_BYTES, dtype=torch.uint8)
            else:
                self._stage = self._free.get()  # waits until the writer thread has written one
            self._pos = 0
            self._raise_error()
        return self._stage

    def _put(self, flat: torch.Tensor, dtype: torch.dtype) -> None:
        """Convert a 1-D tensor to ``dtype`` into the staging buffers (one rounding; a copy when equal)."""
        isz = dtype.itemsize
        i, k = 0, flat.numel()
        while i < k:
            stage = self._room(isz)
            take = min(k - i, (self.STAGE_BYTES - self._pos) // isz)
            stage[self._pos : self._pos + take * isz].view(dtype).copy_(flat[i : i + take])
            self._pos += take * isz
            i += take

    # -- the public interface ----------------------------------------------------------------------------

    def _next(self, name: str) -> PlannedTensor:
        if self._closed:
            raise RuntimeError(f"{self.path.name}: {name} written after close() or abort()")
        if self.i >= len(self.plan) or self.plan[self.i].name != name:
            expected = self.plan[self.i].name if self.i < len(self.plan) else "(end)"
            raise RuntimeError(f"write order broken: got {name}, planned {expected}")
        t = self.plan[self.i]
        self.i += 1
        return t

    def write_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Write one planned tensor (its dtype and shape must be the planned ones)."""
        t = self._next(name)
        if TORCH_TO_ST[tensor.dtype] != t.dtype or tuple(tensor.shape) != t.shape:
            raise RuntimeError(f"{name}: planned {t.dtype}{list(t.shape)}, got {tensor.dtype}{list(tensor.shape)}")
        if tensor.numel():
            data = tensor.detach().cpu().contiguous().reshape(-1)
            if data.element_size() == 1:  # bool, int8, fp8: copied as bytes
                data = data.view(torch.uint8)
            self._put(data, data.dtype)

    def write_chunks(self, name: str, chunks: Iterable[torch.Tensor]) -> None:
        """Write one planned tensor from row chunks (in order), each rounded once to the planned dtype.

        A chunk may be reused by its producer as soon as the next one is asked for: it is converted into
        the staging buffers before this method takes another.
        """
        t = self._next(name)
        want = ST_TO_TORCH[t.dtype]
        isz = DTYPE_SIZES[t.dtype]
        done = 0
        for c in chunks:
            if not (c.is_floating_point() and want.is_floating_point) and c.dtype != want:
                raise RuntimeError(f"{name}: chunk dtype {c.dtype}, planned {t.dtype}")
            self._put(c.detach().reshape(-1), want)
            done += c.numel() * isz
        if done != t.nbytes:
            raise RuntimeError(f"{name}: wrote {done} bytes, planned {t.nbytes}")

    def copy_tensor(self, name: str, src: BinaryIO, info: TensorInfo) -> None:
        """Queue a kernel copy of a tensor's bytes from ``src`` (which must stay open until :meth:`close`)."""
        t = self._next(name)
        if info.nbytes != t.nbytes:
            raise RuntimeError(f"{name}: planned {t.nbytes} bytes, source has {info.nbytes}")
        self._flush()
        self._todo.put(("copy", (src.fileno(), info.start), info.nbytes))

    def close(self) -> None:
        """Write what is queued, wait for it, and close the file; raises the first write error."""
        if self._closed:
            return
        if self.i != len(self.plan):
            self.abort()
            raise RuntimeError(f"{self.path.name}: {len(self.plan) - self.i} planned tensors were not written")
        try:
            self._flush()
        finally:
            self._finish()
        self._raise_error()  # durability: the atomic folder fsyncs every file once before the rename

    def abort(self) -> None:
        """Stop after a failure: drop what is queued and close the file (the caller removes it)."""
        if self._closed:
            return
        self._error = self._error or RuntimeError("aborted")
        self._finish()

    def _finish(self) -> None:
        self._closed = True
        self._todo.put(None)
        try:
            self._thread.join()
        finally:
            os.close(self.fd)


def _write_all(fd: int, view: memoryview) -> None:
    while len(view):
        n = os.write(fd, view)
        view = view[n:]


def _copy_fd(src_fd: int, dst_fd: int, start: int, length: int) -> None:
    """Append ``length`` bytes at ``start`` of ``src_fd`` to ``dst_fd`` (kernel copy where possible)."""
    off, left = start, length
    try:
        while left > 0:
            n = os.copy_file_range(src_fd, dst_fd, left, off)
            if n == 0:
                break
            off += n
            left -= n
    except (AttributeError, OSError):
        pass
    while left > 0:
        chunk = os.pread(src_fd, min(left, 16 << 20), off)
        if not chunk:
            raise OSError("unexpected end of file while copying")
        _write_all(dst_fd, memoryview(chunk))
        off += len(chunk)
        left -= len(chunk)
