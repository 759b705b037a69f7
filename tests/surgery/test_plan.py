"""The merge planner (headers only, no tensor data) and the atomic output folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import adaptermerge
from adaptermerge.io.atomic import _exchange, atomic_dir
from adaptermerge.io.checkpoint import open_checkpoint
from adaptermerge.surgery.plan import plan_merge
from tests.helpers import make_adapter, tiny_llama


def actions(plan) -> dict[str, tuple[str, str | None, str | None]]:
    return {j.out.name: (j.action, j.module, j.src.name if j.src else None) for s in plan.shards for j in s.jobs}


def test_plan_names_every_tensor_once(tmp_path: Path) -> None:
    tiny_llama().save_pretrained(tmp_path / "base", max_shard_size="60KB")
    a = make_adapter(tmp_path / "a", tiny_llama, r=2, target_modules=["q_proj", "down_proj"])
    ckpt = open_checkpoint(tmp_path / "base")
    plan = plan_merge(ckpt, adaptermerge.load_adapter(a))
    acts = actions(plan)
    assert set(acts) == set(ckpt.weight_map) and len(plan.shards) == len(ckpt.shards)
    merged = {k for k, (act, _, _) in acts.items() if act == "merge"}
    assert merged == {f"model.layers.{i}.{m}.weight" for i in range(3) for m in ("self_attn.q_proj", "mlp.down_proj")}
    assert all(act == "copy" for k, (act, _, _) in acts.items() if k not in merged)
    assert not plan.untie and plan.total_bytes == sum(ckpt.info(k).nbytes for k in ckpt.weight_map)
    # a dtype change turns copies into conversions and changes the planned sizes
    plan16 = plan_merge(ckpt, adaptermerge.load_adapter(a), out_dtype="BF16")
    assert {act for act, _, _ in actions(plan16).values()} == {"convert", "merge"}
    assert plan16.total_bytes * 2 == plan.total_bytes


def test_plan_unties_a_tied_head_with_its_own_job(tmp_path: Path) -> None:
    tiny_llama(tie=True).save_pretrained(tmp_path / "base")
    a = make_adapter(tmp_path / "a", lambda s: tiny_llama(s, tie=True), r=2, target_modules=["embed_tokens"])
    ckpt = open_checkpoint(tmp_path / "base")
    assert "lm_head.weight" not in ckpt.weight_map
    plan = plan_merge(ckpt, adaptermerge.load_adapter(a))
    acts = actions(plan)
    assert plan.untie
    assert acts["model.embed_tokens.weight"] == ("merge", "model.embed_tokens", "model.embed_tokens.weight")
    assert acts["lm_head.weight"] == ("copy", None, "model.embed_tokens.weight")  # the head keeps W


def test_exchange_swaps_two_folders(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b" / "y").write_text("b")
    if not _exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available on this system")
    assert (tmp_path / "a" / "y").read_text() == "b" and (tmp_path / "b" / "x").read_text() == "a"


def test_overwrite_replaces_in_one_step_and_failure_keeps_the_old(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("crash")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert oct(os.stat(out).st_mode & 0o777) != oct(0o700)
