"""Task files: row forms, line-numbered errors before any model is loaded, labels on completions only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from adaptermerge.data import IGNORE_INDEX, InvalidData, prompt_and_target, read_task_file, tokenize_row, tokenize_task
from adaptermerge.synthetic import char_tokenizer
from adaptermerge_cli.main import cli


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_three_row_forms_and_blank_lines(tmp_path: Path) -> None:
    f = _write(
        tmp_path / "d.jsonl",
        [
            json.dumps({"prompt": "a=", "completion": "b"}),
            "",
            json.dumps({"text": "hello"}),
            json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
        ],
    )
    d = read_task_file(f)
    assert [(r.line, r.kind) for r in d.rows] == [(1, "completion"), (3, "text"), (4, "chat")]
    assert d.summary()["kinds"] == {"completion": 1, "text": 1, "chat": 1}
    assert read_task_file(f, max_rows=2).rows[-1].line == 3


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"prompt": "a"}), "must both be strings"),
        (json.dumps({"prompt": "a", "completion": ""}), "empty 'completion'"),
        (json.dumps({"text": 3}), "'text' must be a non-empty string"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "no 'assistant' message"),
        (json.dumps({"messages": [{"role": "user"}]}), "string 'role' and 'content'"),
        (json.dumps({"question": "a"}), "keys: question"),
    ],
)
def test_bad_rows_are_named_by_line(tmp_path: Path, line: str, reason: str) -> None:
    good = json.dumps({"prompt": "a=", "completion": "b"})
    f = _write(tmp_path / "d.jsonl", [good, good, line, good])
    with pytest.raises(InvalidData, match=rf"line 3: .*{reason}"):
        read_task_file(f)
    d = read_task_file(f, skip_bad=True)
    assert [r.line for r in d.rows] == [1, 2, 4] and [n for n, _ in d.bad] == [3]


def test_empty_and_all_bad_files_are_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidData, match="has no rows"):
        read_task_file(_write(tmp_path / "e.jsonl", ["", "  "]))
    with pytest.raises(InvalidData, match="no usable row .*line 1.*line 2"):
        read_task_file(_write(tmp_path / "b.jsonl", ["{", "{}"]), skip_bad=True)
    with pytest.raises(InvalidData, match="does not exist"):
        read_task_file(tmp_path / "missing.jsonl")


def test_many_bad_rows_are_summarised(tmp_path: Path) -> None:
    f = _write(tmp_path / "d.jsonl", ["{"] * 9)
    with pytest.raises(InvalidData, match=r"9 bad lines: line 1: .*line 5: .*\(and 4 more bad lines\)"):
        read_task_file(f)


def test_cli_reports_bad_data_before_loading_any_model(tmp_path: Path) -> None:
    """The base does not even exist: the data error comes first, one line, exit 1, nothing written."""
    f = _write(tmp_path / "d.jsonl", [json.dumps({"prompt": "a=", "completion": "b"}), '{"prompt": 1}'])
    res = CliRunner().invoke(
        cli, ["train", "--base", str(tmp_path / "nope"), "--data", str(f), "-o", str(tmp_path / "o")]
    )
    assert res.exit_code == 1, res.output
    msg = res.output.strip().splitlines()
    assert len(msg) == 1 and "line 2" in msg[0] and "must both be strings" in msg[0]
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.checkpoints").exists()


def test_completion_labels_cover_the_completion_and_eos_only(tmp_path: Path) -> None:
    tok = char_tokenizer()
    d = read_task_file(_write(tmp_path / "d.jsonl", [json.dumps({"prompt": "ab=", "completion": "xy"})]))
    t = tokenize_row(d.rows[0], tok, 64)
    assert t is not None
    assert tok.decode(t.input_ids) == "<s>ab=xy</s>"
    labelled = [i for i, lab in zip(t.input_ids, t.labels, strict=True) if lab != IGNORE_INDEX]
    assert tok.decode(labelled) == "xy</s>"
    assert tokenize_row(d.rows[0], tok, 4) is None  # the completion is cut off entirely
    ids, target = prompt_and_target(d.rows[0], tok)
    assert tok.decode(ids) == "<s>ab=" and target == "xy"


def test_chat_labels_cover_assistant_turns_only(tmp_path: Path) -> None:
    tok = char_tokenizer()
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "ok"},
    ]
    d = read_task_file(_write(tmp_path / "c.jsonl", [json.dumps({"messages": msgs})]))
    t = tokenize_row(d.rows[0], tok, 256)
    assert t is not None
    spans, cur = [], []
    for i, lab in zip(t.input_ids, t.labels, strict=True):
        if lab != IGNORE_INDEX:
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    spans += [tok.decode(cur)] if cur else []
    assert spans == ["yo</s>\n", "ok</s>\n"]
    ids, target = prompt_and_target(d.rows[0], tok)
    assert tok.decode(ids).endswith("user: again\nassistant: ") and target == "ok"


def test_chat_rows_need_a_chat_template(tmp_path: Path) -> None:
    tok = char_tokenizer()
    tok.chat_template = None
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    d = read_task_file(_write(tmp_path / "c.jsonl", [json.dumps(row)]))
    with pytest.raises(InvalidData, match="no chat_template"):
        tokenize_task(d, tok, 64)
