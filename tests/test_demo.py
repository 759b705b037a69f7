"""The offline demo runs end to end and its checks hold."""

from pathlib import Path

from adaptermerge.demo import run_demo


def test_demo(tmp_path: Path) -> None:
    lines: list[str] = []
    res = run_demo(tmp_path / "demo", echo=lines.append)
    assert res["logit_err"] < 1e-4 and res["merge_err"] < 1e-4
    assert res["peft_cat_err"] > 1.0  # PEFT's inherited rsLoRA over-scaling, shown by the demo
    assert (tmp_path / "demo" / "merged-model" / "config.json").is_file()
    assert lines[-1].startswith("done.")
