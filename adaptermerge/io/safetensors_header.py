"""Read safetensors headers (names, dtypes, shapes, byte offsets) without torch, as strictly as safetensors.

Why not ``safetensors.safe_open``: the streaming merge needs each tensor's absolute byte range in the file, to
copy untouched tensors with ``copy_file_range`` and to plan the output header before any data is written, and
the safetensors library does not expose offsets. So we parse the header ourselves, and refuse every file the
safetensors library itself would refuse (checked in ``tests/io/test_safetensors_header.py``): a header that is not a
JSON object starting with ``{``, duplicate names, unknown dtypes, a byte range that does not match shape x dtype,
and offsets that are not contiguous, start at 0 and cover the whole data section (no gaps, no overlaps, no
trailing bytes). Keeping this free of torch makes the planner testable and fast.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

# Every dtype safetensors 0.8 knows, in bits per element (sub-byte types pack several elements per byte).
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip
# Bytes per element of the byte-addressable dtypes (the only ones we read as tensors; the others are copied).
DTYPE_SIZES = {k: v // 8 for k, v in DTYPE_BITS.items() if v % 8 == 0}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


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
        head, n = _read_json(fh, p.name, size)
    meta = head.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise HeaderError(f"{p.name}: __metadata__ must map strings to strings")
    data_start = 8 + n
    tensors = {name: _entry(p.name, name, info, data_start) for name, info in head.items()}
    _check_coverage(p.name, tensors, data_start, size)
    return Header(p, tensors, dict(meta), data_start, size)


def _read_json(fh, fname: str, size: int) -> tuple[dict, int]:
    raw = fh.read(8)
    if len(raw) < 8:
        raise HeaderError(f"{fname} is too short to be a safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", raw)
    if n > min(size - 8, MAX_HEADER_BYTES):
        raise HeaderError(
            f"{fname} has an impossible header length {n} (file is {size} bytes): truncated or not safetensors"
        )
    text = fh.read(n)

    def no_duplicates(pairs: list[tuple[str, object]]) -> dict:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise HeaderError(f"{fname}: the header names a tensor twice")
        return dict(pairs)

    try:
        head = json.loads(text.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HeaderError(f"{fname} has an unreadable header ({e}): corrupt or not safetensors") from None
    if not isinstance(head, dict):
        raise HeaderError(f"{fname} header is not a JSON object")
    return head, n


def _entry(fname: str, name: str, info: object, data_start: int) -> TensorInfo:
    try:
        dtype = info["dtype"]  # type: ignore[index]
        shape = tuple(int(s) for s in info["shape"])  # type: ignore[index]
        b, e = (int(x) for x in info["data_offsets"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        raise HeaderError(f"{fname}: malformed entry for tensor {name!r}") from None
    if dtype not in DTYPE_BITS:
        raise HeaderError(f"{fname}: tensor {name!r} has unknown dtype {dtype}")
    if any(s < 0 for s in shape) or b < 0 or e < b:
        raise HeaderError(f"{fname}: tensor {name!r} has a negative size or offset")
    ti = TensorInfo(name, dtype, shape, data_start + b, data_start + e)
    bits = ti.numel * DTYPE_BITS[dtype]
    if bits % 8 or ti.nbytes != bits // 8:
        raise HeaderError(f"{fname}: tensor {name!r} byte range does not match its shape and dtype")
    return ti


def _check_coverage(fname: str, tensors: dict[str, TensorInfo], data_start: int, size: int) -> None:
    """Byte ranges must tile the data section exactly, as safetensors requires."""
    pos = data_start
    for ti in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if ti.start != pos:
            what = "overlaps the previous tensor" if ti.start < pos else "leaves a gap before it"
            raise HeaderError(f"{fname}: tensor {ti.name!r} {what} (invalid offsets)")
        if ti.end > size:
            raise HeaderError(f"{fname} is truncated: tensor {ti.name!r} ends at byte {ti.end} but the file has {size}")
        pos = ti.end
    if pos != size:
        raise HeaderError(f"{fname}: {size - pos} bytes after the last tensor are not covered by the header")
