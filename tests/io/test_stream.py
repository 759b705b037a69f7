"""Streaming safetensors I/O: the background ShardWriter and row mapping, against the safetensors library."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from adaptermerge.dtypes import TORCH_TO_ST
from adaptermerge.io.safetensors_header import read_header
from adaptermerge.io.stream import PlannedTensor, ShardWriter, read_rows, read_tensor


def plan_of(tensors: dict[str, torch.Tensor]) -> list[PlannedTensor]:
    return [PlannedTensor(k, TORCH_TO_ST[v.dtype], tuple(v.shape)) for k, v in tensors.items()]


def mixed_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "flag": torch.tensor([True, False, True]),  # 3 bytes: the next tensor starts unaligned
        "w.bf16": torch.randn(37, 29, generator=g).to(torch.bfloat16),
        "ids": torch.arange(11, dtype=torch.int64),
        "w.f32": torch.randn(53, 7, generator=g),
        "q": torch.randint(0, 255, (17,), generator=g, dtype=torch.uint8),
        "empty": torch.zeros(0, 4),
        "s": torch.tensor(2.5, dtype=torch.float16),
    }


@pytest.mark.parametrize("stage", [8, 24, 1000, 8 << 20])
def test_writer_matches_safetensors(tmp_path: Path, stage: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny staging buffers force every tensor across buffer boundaries and alignment flushes."""
    monkeypatch.setattr(ShardWriter, "STAGE_BYTES", stage)
    monkeypatch.setattr(ShardWriter, "STAGES", 2)
    ts = mixed_tensors()
    w = ShardWriter(tmp_path / "ours.safetensors", plan_of(ts), {"format": "pt"})
    for k, v in ts.items():
        w.write_tensor(k, v)
    w.close()
    got = load_file(str(tmp_path / "ours.safetensors"))
    assert got.keys() == ts.keys()
    for k, v in ts.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_chunks_are_rounded_once_and_copies_queued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ShardWriter, "STAGE_BYTES", 64)
    src = mixed_tensors(1)
    save_file(src, str(tmp_path / "src.safetensors"))
    infos = read_header(tmp_path / "src.safetensors").tensors
    x = torch.randn(40, 9, dtype=torch.float32)
    plan = [PlannedTensor("x", "BF16", (40, 9)), PlannedTensor("ids", "I64", (11,)), PlannedTensor("y", "F16", (40, 9))]
    w = ShardWriter(tmp_path / "out.safetensors", plan)
    buf = torch.empty(7, 9)

    def chunks(t: torch.Tensor):  # reuses one buffer, as the merge does
        for r0 in range(0, 40, 7):
            n = min(7, 40 - r0)
            buf[:n].copy_(t[r0 : r0 + n])
            yield buf[:n]

    w.write_chunks("x", chunks(x))
    with open(tmp_path / "src.safetensors", "rb") as fh:
        w.copy_tensor("ids", fh, infos["ids"])
        w.write_chunks("y", chunks(x))
        w.close()
    got = load_file(str(tmp_path / "out.safetensors"))
    assert torch.equal(got["x"], x.to(torch.bfloat16))
    assert torch.equal(got["y"], x.to(torch.float16))
    assert torch.equal(got["ids"], src["ids"])


def test_writer_refuses_plan_violations(tmp_path: Path) -> None:
    plan = [PlannedTensor("a", "F32", (2,)), PlannedTensor("b", "F32", (3,))]
    w = ShardWriter(tmp_path / "x.safetensors", plan)
    with pytest.raises(RuntimeError, match="write order"):
        w.write_tensor("b", torch.zeros(3))
    with pytest.raises(RuntimeError, match="planned F32"):
        w.write_tensor("a", torch.zeros(2, dtype=torch.float64))
    w.abort()
    w = ShardWriter(tmp_path / "y.safetensors", plan)
    w.write_tensor("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="not written"):
        w.close()
    w = ShardWriter(tmp_path / "z.safetensors", plan)
    with pytest.raises(RuntimeError, match="wrote 8 bytes, planned 8|planned 12"):
        w.write_tensor("a", torch.zeros(2))
        w.write_chunks("b", iter([torch.zeros(2)]))
    w.abort()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_write_error_reaches_the_caller() -> None:
    """A full disk in the writer thread surfaces as OSError from close(), not as a silent short file."""
    plan = [PlannedTensor("a", "F32", (1 << 20,))]
    w = ShardWriter("/dev/full", plan)
    with pytest.raises(OSError):
        w.write_tensor("a", torch.zeros(1 << 20))
        w.close()
    w.abort()


def test_writer_closes_once_and_refuses_late_writes(tmp_path: Path) -> None:
    plan = [PlannedTensor("a", "F32", (2,)), PlannedTensor("b", "F32", (2,))]
    w = ShardWriter(tmp_path / "x.safetensors", plan)
    w.write_tensor("a", torch.zeros(2))
    w.abort()
    w.abort()
    w.close()  # no second os.close of a descriptor number another file may own now
    with pytest.raises(RuntimeError, match="after close"):
        w.write_tensor("b", torch.zeros(2))


def test_writer_bad_plan_leaks_nothing(tmp_path: Path) -> None:
    """A plan that cannot be encoded fails before any file or thread exists."""
    import threading

    before = threading.active_count()
    with pytest.raises(KeyError):
        ShardWriter(tmp_path / "x.safetensors", [PlannedTensor("a", "F99", (2,))])
    assert threading.active_count() == before and not (tmp_path / "x.safetensors").exists()


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 300),
    data=st.data(),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
)
def test_read_rows_equals_stored(tmp_path_factory: pytest.TempPathFactory, rows, cols, data, dtype) -> None:
    """Rows read at any (unaligned) tensor offset into a reused, larger buffer are exactly the stored rows."""
    d = tmp_path_factory.mktemp("rows")
    t = torch.randn(rows, cols).to(dtype)
    save_file(
        {"pad": torch.zeros(data.draw(st.integers(0, 5000)), dtype=torch.uint8), "t": t}, str(d / "f.safetensors")
    )
    info = read_header(d / "f.safetensors").tensors["t"]
    r0 = data.draw(st.integers(0, rows - 1))
    r1 = data.draw(st.integers(r0 + 1, rows))
    buf = bytearray(rows * cols * 4 + 16)
    with open(d / "f.safetensors", "rb") as fh:
        assert torch.equal(read_rows(fh, info, r0, r1, buf), t[r0:r1])
        assert torch.equal(read_tensor(fh, info), t)
