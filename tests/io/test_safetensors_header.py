"""Our header parser refuses exactly what the safetensors library refuses, and accepts every dtype it writes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adaptermerge.io.safetensors_header import DTYPE_BITS, HeaderError, read_header


def write_raw(path: Path, header: dict | bytes, data: bytes) -> Path:
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)
    return path


def entry(dtype: str, shape: list[int], b: int, e: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [b, e]}


BAD = {
    "overlap": ({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, 12),
    "gap": ({"a": entry("F32", [2], 4, 12)}, 12),
    "trailing-bytes": ({"a": entry("F32", [2], 0, 8)}, 12),
    "size-mismatch": ({"a": entry("F32", [3], 0, 8)}, 8),
    "unknown-dtype": ({"a": entry("F12", [2], 0, 8)}, 8),
    "truncated": ({"a": entry("F32", [4], 0, 16)}, 8),
    "not-an-object": (b"[1, 2]", 0),
    "duplicate-name": (b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
                       b'"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}', 2),
    "bad-metadata": ({"__metadata__": {"x": 1}, "a": entry("U8", [1], 0, 1)}, 1),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_refused_like_safetensors(tmp_path: Path, case: str) -> None:
    header, n = BAD[case]
    f = write_raw(tmp_path / "x.safetensors", header, b"\0" * n)
    with pytest.raises(Exception):  # noqa: B017 - the library raises its own error types
        with safe_open(str(f), "pt") as fh:
            [fh.get_tensor(k) for k in fh.keys()]
    with pytest.raises(HeaderError):
        read_header(f)


def test_accepted_like_safetensors(tmp_path: Path) -> None:
    """Whitespace around the JSON (the format pads headers with spaces) is accepted by both."""
    f = write_raw(
        tmp_path / "x.safetensors", b' {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}  ', bytes(8)
    )
    with safe_open(str(f), "pt") as fh:
        assert fh.get_tensor("a").shape == (2,)
    assert read_header(f).tensors["a"].shape == (2,)


def test_every_dtype_safetensors_writes_is_read(tmp_path: Path) -> None:
    ts = {
        "c64": torch.zeros(3, dtype=torch.complex64),
        "e4fnuz": torch.zeros(4, dtype=torch.float8_e4m3fnuz),
        "e5fnuz": torch.zeros(2, dtype=torch.float8_e5m2fnuz),
        "e8m0": torch.zeros(5, dtype=torch.float8_e8m0fnu),
        "f4": torch.zeros(2, 3, dtype=torch.float4_e2m1fn_x2),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(1.5),
    }
    f = tmp_path / "x.safetensors"
    save_file(ts, str(f), metadata={"format": "pt"})
    h = read_header(f)
    assert {t.dtype for t in h.tensors.values()} >= {"C64", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0", "F4"}
    assert h.tensors["f4"].shape == (2, 6) and h.tensors["f4"].nbytes == 6
    assert h.metadata == {"format": "pt"} and set(h.tensors) == set(ts)
    assert set(DTYPE_BITS) >= {t.dtype for t in h.tensors.values()}


def test_exotic_dtypes_are_copied_through_a_merge(tmp_path: Path) -> None:
    """Tensors of dtypes we never compute on travel byte for byte."""
    import adaptermerge
    from tests.helpers import make_adapter, tiny_llama

    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    from safetensors.torch import load_file

    sd = load_file(str(base / "model.safetensors"))
    sd["extra.c64"] = torch.randn(3, dtype=torch.complex64)
    sd["extra.f8"] = torch.randn(4).to(torch.float8_e4m3fnuz)
    save_file(sd, str(base / "model.safetensors"), metadata={"format": "pt"})
    a = make_adapter(tmp_path / "a", tiny_llama, r=2, target_modules=["q_proj"])
    adaptermerge.merge_into_base(base, a, tmp_path / "out", dtype="bfloat16")
    src, dst = read_header(base / "model.safetensors"), read_header(tmp_path / "out" / "model.safetensors")
    for k in ("extra.c64", "extra.f8"):
        s, d = src.tensors[k], dst.tensors[k]
        assert (s.dtype, s.shape) == (d.dtype, d.shape)
        raw_s = (base / "model.safetensors").read_bytes()[s.start : s.end]
        assert raw_s == (tmp_path / "out" / "model.safetensors").read_bytes()[d.start : d.end]
