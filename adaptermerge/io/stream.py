"""Tensor-by-tensor safetensors I/O: read one tensor, write a file whose header is planned up front.

Memory stays bounded by the tensor being processed: tensors are read with plain file reads (no mmap of
the shard), and unchanged tensors are copied file-to-file by the kernel.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from adaptermerge.io.safetensors_header import DTYPE_SIZES, TensorInfo

ST_TO_TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
for _st, _name in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _name):  # torch >= 2.3
        ST_TO_TORCH[_st] = getattr(torch, _name)
TORCH_TO_ST = {v: k for k, v in ST_TO_TORCH.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


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


def copy_range(src: BinaryIO, dst: BinaryIO, start: int, length: int) -> None:
    """Copy ``length`` bytes at ``start`` of ``src`` to the current position of ``dst`` (kernel copy where possible)."""
    dst.flush()
    src_fd, dst_fd = src.fileno(), dst.fileno()
    off = start
    left = length
    try:
        while left > 0:
            n = os.copy_file_range(src_fd, dst_fd, left, off)
            if n == 0:
                break
            off += n
            left -= n
        if left == 0:
            dst.seek(0, os.SEEK_END)
            return
    except (AttributeError, OSError):
        pass
    src.seek(off)
    dst.seek(0, os.SEEK_END)
    while left > 0:
        chunk = src.read(min(left, 16 << 20))
        if not chunk:
            raise OSError("unexpected end of file while copying")
        dst.write(chunk)
        left -= len(chunk)


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
    """Write a safetensors file whose header is fixed before any data: tensors must come in plan order."""

    def __init__(
        self, path: str | os.PathLike, tensors: Sequence[PlannedTensor], metadata: dict[str, str] | None = None
    ):
        self.path = Path(path)
        self.plan = list(tensors)
        self.fh = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self.fh.write(header_bytes(self.plan, metadata))
        self.i = 0

    def _next(self, name: str) -> PlannedTensor:
        if self.i >= len(self.plan) or self.plan[self.i].name != name:
            expected = self.plan[self.i].name if self.i < len(self.plan) else "(end)"
            raise RuntimeError(f"write order broken: got {name}, planned {expected}")
        t = self.plan[self.i]
        self.i += 1
        return t

    def write_tensor(self, name: str, tensor: torch.Tensor) -> None:
        t = self._next(name)
        if TORCH_TO_ST[tensor.dtype] != t.dtype or tuple(tensor.shape) != t.shape:
            raise RuntimeError(f"{name}: planned {t.dtype}{list(t.shape)}, got {tensor.dtype}{list(tensor.shape)}")
        data = tensor.detach().contiguous().cpu()
        if data.numel():
            self.fh.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))

    def write_chunks(self, name: str, chunks) -> None:
        """Write one planned tensor as a sequence of row chunks (contiguous tensors of its dtype)."""
        t = self._next(name)
        want = ST_TO_TORCH[t.dtype]
        done = 0
        for c in chunks:
            if c.dtype != want:
                raise RuntimeError(f"{name}: chunk dtype {c.dtype}, planned {t.dtype}")
            data = c.detach().contiguous().cpu()
            self.fh.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
            done += data.numel() * data.element_size()
        if done != t.nbytes:
            raise RuntimeError(f"{name}: wrote {done} bytes, planned {t.nbytes}")

    def copy_tensor(self, name: str, src: BinaryIO, info: TensorInfo) -> None:
        t = self._next(name)
        if info.nbytes != t.nbytes:
            raise RuntimeError(f"{name}: planned {t.nbytes} bytes, source has {info.nbytes}")
        copy_range(src, self.fh, info.start, info.nbytes)

    def close(self) -> None:
        if self.i != len(self.plan):
            self.fh.close()
            raise RuntimeError(f"{self.path.name}: {len(self.plan) - self.i} planned tensors were not written")
        self.fh.flush()  # durability: the atomic folder fsyncs every file once before the rename
        self.fh.close()
