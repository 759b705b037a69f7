"""evaluate: losses and accuracies equal hand computations; adapters switched on one base; checkpoints; retention."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from transformers import LlamaForCausalLM

from adaptermerge.errors import IncompatibleAdapters, UsageError
from adaptermerge.evaluation import EvalReport, _retention, char_accuracy, evaluate, exact_match, parse_named
from adaptermerge.surgery.merge import merge_into_base
from adaptermerge.synthetic import char_tokenizer, make_examples, save_tiny_base, tiny_llama_config, write_jsonl
from adaptermerge_cli.main import cli
from tests.helpers import adapter_on_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    w = tmp_path_factory.mktemp("evaluate")
    save_tiny_base(w / "base", init_range=0.2)
    write_jsonl(w / "upper.jsonl", make_examples("upper", 10, seed=3))
    write_jsonl(w / "shift.jsonl", make_examples("shift", 7, seed=3))
    adapter_on_folder(w / "base", w / "upper", 1, ["q_proj", "v_proj"])
    adapter_on_folder(w / "base", w / "shift", 2, ["o_proj", "down_proj"])
    return w


def _ids(prompt: str, completion: str = "") -> tuple[list[int], int]:
    """Hand tokenization: BOS, one id per character, EOS after a completion; and where the completion starts."""
    vocab = char_tokenizer().get_vocab()
    ids = [1] + [vocab[c] for c in prompt]
    start = len(ids)
    if completion:
        ids += [vocab[c] for c in completion] + [2]
    return ids, start


def _hand_loss(model: torch.nn.Module, rows: list[dict]) -> float:
    """One unpadded sequence at a time: sum of -log p(completion token and EOS) / their count."""
    total, count = 0.0, 0
    for r in rows:
        ids, start = _ids(r["prompt"], r["completion"])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        for pos in range(start, len(ids)):
            total -= float(logp[pos - 1, ids[pos]])
            count += 1
    return total / count


def _hand_greedy(model: torch.nn.Module, prompt: str, n_new: int) -> list[int]:
    """Greedy decoding without cache or padding: argmax of the full forward pass, token by token."""
    ids, _ = _ids(prompt)
    out = []
    for _ in range(n_new):
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if nxt == 2:
            break
        out.append(nxt)
        ids.append(nxt)
    return out


def test_losses_equal_hand_computation(work: Path) -> None:
    rep = evaluate(work / "base", [work / "upper", work / "shift"], {"upper": work / "upper.jsonl"}, batch_size=3)
    rows = [json.loads(line) for line in (work / "upper.jsonl").read_text().splitlines()]
    base = LlamaForCausalLM.from_pretrained(work / "base").eval()
    assert rep.scores["loss"]["base"]["upper"] == pytest.approx(_hand_loss(base, rows), rel=1e-5)
    for name in ("upper", "shift"):
        pm = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(work / "base"), str(work / name)).eval()
        assert rep.scores["loss"][name]["upper"] == pytest.approx(_hand_loss(pm, rows), rel=1e-5), name
    assert rep.models == ["base", "upper", "shift"] and rep.kinds["upper"] == "adapter"
    assert rep.scores["loss"]["upper"]["upper"] != rep.scores["loss"]["base"]["upper"]


def test_accuracies_equal_hand_greedy_decoding(work: Path, tmp_path: Path) -> None:
    """Completions are built from the base's own greedy output, so the scores are known and non-trivial."""
    base = LlamaForCausalLM.from_pretrained(work / "base").eval()
    tok = char_tokenizer()
    rows, expected_char, expected_exact = [], [], []
    for r in make_examples("upper", 60, seed=9):
        toks = _hand_greedy(base, r["prompt"], 4)
        if len(toks) < 4 or not all(4 <= t < len(tok) for t in toks):
            continue  # keep prompts whose first four greedy tokens are characters
        chars = tok.decode(toks)
        if len(rows) % 2 == 0:  # target = the first three predicted characters: prediction has one more
            rows.append({"prompt": r["prompt"], "completion": chars[:3]})
        else:  # an unrelated target of the same length
            rows.append({"prompt": r["prompt"], "completion": "~~~"})
        target = rows[-1]["completion"]
        pred = tok.decode(_hand_greedy(base, r["prompt"], len(target) + 1))
        expected_exact.append(pred == target)
        expected_char.append(sum(a == b for a, b in zip(pred, target)) / max(len(pred), len(target)))
        if len(rows) == 8:
            break
    assert len(rows) == 8
    write_jsonl(tmp_path / "t.jsonl", rows)
    rep = evaluate(work / "base", [], {"t": tmp_path / "t.jsonl"}, metrics=["exact", "char"], batch_size=3)
    assert rep.scores["char"]["base"]["t"] == pytest.approx(sum(expected_char) / len(rows))
    assert rep.scores["exact"]["base"]["t"] == pytest.approx(sum(expected_exact) / len(rows))
    assert rep.scores["char"]["base"]["t"] >= 0.75 / 2  # half the rows agree on three of four characters


def test_metric_definitions() -> None:
    assert exact_match([("abc", "abc"), (" abc ", "abc"), ("ab", "abc")]) == pytest.approx(2 / 3)
    assert char_accuracy([("abc", "abc"), ("abd", "abc"), ("abcd", "abc"), ("", "ab")]) == pytest.approx(
        (1 + 2 / 3 + 3 / 4 + 0) / 4
    )


def test_merged_checkpoint_row_equals_the_adapter_row(work: Path, tmp_path: Path) -> None:
    merge_into_base(work / "base", work / "upper", tmp_path / "merged")
    rep = evaluate(work / "base", [work / "upper", ("merged", tmp_path / "merged")], {"upper": work / "upper.jsonl"})
    assert rep.kinds["merged"] == "checkpoint"
    assert rep.scores["loss"]["merged"]["upper"] == pytest.approx(rep.scores["loss"]["upper"]["upper"], rel=1e-5)


def test_4bit_checkpoint_is_evaluated(work: Path, tmp_path: Path) -> None:
    merge_into_base(work / "base", work / "upper", tmp_path / "nf4", quantize="nf4")
    rep = evaluate(work / "base", [tmp_path / "nf4"], {"upper": work / "upper.jsonl"}, metrics=["loss", "char"])
    assert math.isfinite(rep.scores["loss"]["nf4"]["upper"]) and rep.kinds["nf4"] == "checkpoint"


def test_retention_formulas() -> None:
    r = EvalReport(
        metrics=["loss", "char"], tasks=["a", "b"], models=["base", "a", "b", "m"],
        kinds={"base": "base", "a": "adapter", "b": "adapter", "m": "adapter"},
        scores={
            "loss": {"base": {"a": 3.0, "b": 2.0}, "a": {"a": 1.0, "b": 2.5}, "b": {"a": 3.0, "b": 2.0}, "m": {"a": 2.0, "b": 2.0}},
            "char": {"base": {"a": 0.1, "b": 0.2}, "a": {"a": 0.8, "b": 0.1}, "b": {"a": 0.1, "b": 0.0}, "m": {"a": 0.4, "b": 0.1}},
        },
    )  # fmt: skip
    _retention(r)
    assert r.own == {"a": "a", "b": "b"}
    assert r.retention["loss"]["m"]["a"] == pytest.approx(0.5)  # (3 - 2) / (3 - 1)
    assert r.retention["loss"]["m"]["b"] is None  # b's adapter did not improve on the base
    assert r.retention["char"]["m"]["a"] == pytest.approx(0.5)  # 0.4 / 0.8
    assert r.retention["char"]["m"]["b"] is None  # own score 0
    assert r.to_dict()["mean_retention"]["char"]["m"] == pytest.approx(0.5)
    assert "(retention vs the task's own adapter)" in r.table()


def test_cli_table_json_and_plot(work: Path, tmp_path: Path) -> None:
    args = ["evaluate", str(work / "base"), str(work / "upper"), f"s={work / 'shift'}", "--task",
            f"upper={work / 'upper.jsonl'}", "--task", f"shift={work / 'shift.jsonl'}", "--quiet"]  # fmt: skip
    res = CliRunner().invoke(cli, [*args, "--plot", str(tmp_path / "c.png")])
    assert res.exit_code == 0, res.output
    assert "upper" in res.output and "adapter" in res.output and "chart:" in res.output
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = CliRunner().invoke(cli, [*args, "--json", "--metric", "loss", "--metric", "char", "--max-examples", "3"])
    d = json.loads(res.stdout)
    assert d["models"] == ["base", "upper", "s"] and d["own_adapter"] == {"upper": "upper"}
    assert set(d["scores"]) == {"loss", "char"} and d["examples"] == {"upper": 3, "shift": 3}
    # only 'upper' has an adapter of its name ('shift' was named 's'): retention is measured on 'upper' only
    assert all(set(d["retention"][m][row]) == {"upper"} for m in ("loss", "char") for row in d["models"])


def test_refusals(work: Path, tmp_path: Path) -> None:
    small = tmp_path / "small"
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(hidden=128)).save_pretrained(small)
    other = adapter_on_folder(small, tmp_path / "other", 3, ["q_proj"])
    with pytest.raises(IncompatibleAdapters, match="does not fit the base"):
        evaluate(work / "base", [other], {"upper": work / "upper.jsonl"})
    with pytest.raises(UsageError, match="at least one task"):
        evaluate(work / "base", [work / "upper"], {})
    with pytest.raises(UsageError, match="several models are named upper"):
        parse_named([work / "upper", f"upper={work / 'shift'}"])
    with pytest.raises(UsageError, match="unknown metric"):
        evaluate(work / "base", [], {"upper": work / "upper.jsonl"}, metrics=["bleu"])
    res = CliRunner().invoke(cli, ["evaluate", str(work / "base"), "--task", "upper"])
    assert res.exit_code == 2 and "NAME=FILE" in res.output
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n')
    res = CliRunner().invoke(cli, ["evaluate", str(work / "base"), "--task", f"x={tmp_path / 'bad.jsonl'}"])
    assert res.exit_code == 1 and "line 1" in res.output and len(res.output.strip().splitlines()) == 1
