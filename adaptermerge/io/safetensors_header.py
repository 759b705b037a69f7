"""Read safetensors headers (names, dtypes, shapes, byte offsets) without torch.

The planner of streaming jobs needs only headers; keeping this free of torch makes it
testable and fast.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


class HeaderError(ValueError):
    """The file is not a valid safetensors file."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Header:
    """A parsed safetensors header."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def read_header(path: str | os.PathLike) -> Header:
    """Parse and check a safetensors header: sizes, offsets and file length must agree.

    Raises:
        HeaderError: the file is truncated, corrupt, or not safetensors.
    """
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise HeaderError(f"{p.name} is too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100_000_000):
            raise HeaderError(
                f"{p.name} has an impossible header length {n} (file is {size} bytes): truncated or not safetensors"
            )
        try:
            head = json.loads(fh.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HeaderError(f"{p.name} has an unreadable header ({e}): corrupt or not safetensors") from None
    if not isinstance(head, dict):
        raise HeaderError(f"{p.name} header is not a JSON object")
    meta = head.pop("__metadata__", None) or {}
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, info in head.items():
        try:
            dtype = info["dtype"]
            shape = tuple(int(s) for s in info["shape"])
            b, e = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise HeaderError(f"{p.name}: malformed entry for tensor {name!r}") from None
        if dtype not in DTYPE_SIZES:
            raise HeaderError(f"{p.name}: tensor {name!r} has unknown dtype {dtype}")
        ti = TensorInfo(name, dtype, shape, data_start + b, data_start + e)
        if ti.nbytes != ti.numel * DTYPE_SIZES[dtype] or e < b:
            raise HeaderError(f"{p.name}: tensor {name!r} byte range does not match its shape and dtype")
        if ti.end > size:
            raise HeaderError(f"{p.name} is truncated: tensor {name!r} ends at byte {ti.end} but the file has {size}")
        tensors[name] = ti
    return Header(p, tensors, dict(meta), data_start, size)
