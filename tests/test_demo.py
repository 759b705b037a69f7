"""The offline demo runs end to end (fast mode): a table row per merge method, JSON, PNG, folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from adaptermerge.demo import MARKER, TASKS, _prepare, run_demo
from adaptermerge.errors import OutputExistsError
from adaptermerge.methods.registry import method_names
from adaptermerge_cli.main import cli


def test_demo_fast_end_to_end(tmp_path: Path) -> None:
    lines: list[str] = []
    d = run_demo(tmp_path / "demo", fast=True, echo=lines.append, progress=False)
    root = tmp_path / "demo"
    rows = d["models"]
    # a row for every registry method (named with its demo parameters), or the method's reason for refusing
    for name in method_names():
        assert any(r == name or r.startswith(name + "-") for r in rows) or name in d["skipped_methods"], name
    assert rows[:4] == ["base", *TASKS]
    assert {"linear", "linear-into-base", "linear-into-nf4-base"} <= set(rows)
    assert d["kinds"]["linear-into-nf4-base"] == "checkpoint"
    loss = d["scores"]["loss"]
    for t in TASKS:
        # the same exact sum three ways: stacked factors, re-ranked, merged into the checkpoint
        assert loss["cat"][t] == pytest.approx(loss["linear"][t], rel=1e-4)
        assert loss["linear-into-base"][t] == pytest.approx(loss["linear"][t], rel=1e-4)
        assert loss[t][t] < loss["base"][t]  # each adapter learned its task
    assert d["own_adapter"] == {t: t for t in TASKS}
    assert json.loads((root / "results.json").read_text())["models"] == rows
    assert (root / "results.png").read_bytes()[:4] == b"\x89PNG"
    for sub in ("base", "base-nf4", "adapters/reverse", "merges/linear", "merged/linear-into-nf4-base"):
        assert (root / sub).is_dir(), sub
    assert "quantization_config" in (root / "base-nf4" / "config.json").read_text()
    text = "\n".join(lines)
    assert "retention" in text and "linear-into-nf4-base" in text and lines[-1].startswith("done in")


def test_demo_output_folder_rules(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not empty"):
        _prepare(other, overwrite=False, s=None)  # type: ignore[arg-type]
    with pytest.raises(OutputExistsError, match="not an earlier demo folder"):
        _prepare(other, overwrite=True, s=None)  # type: ignore[arg-type]
    assert (other / "keep.txt").read_text() == "mine"
    res = CliRunner().invoke(cli, ["demo", "-o", str(other)])
    assert res.exit_code == 2 and "--overwrite" in res.output
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / MARKER).write_text("{}")
    (earlier / "old").write_text("x")
    from adaptermerge.demo import FAST

    _prepare(earlier, overwrite=True, s=FAST)
    assert not (earlier / "old").exists() and (earlier / MARKER).is_file()
