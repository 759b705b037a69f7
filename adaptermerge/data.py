"""Task files: JSON Lines rows for training and evaluation, checked before any model is loaded.

Three row forms, one per line (blank lines are ignored):

- ``{"prompt": "...", "completion": "..."}``: the loss (and any accuracy) is on the completion only;
- ``{"text": "..."}``: plain language modelling, the loss is on every token;
- ``{"messages": [{"role": "...", "content": "..."}, ...]}``: a conversation rendered with the tokenizer's
  chat template; the loss is on the assistant turns only.

Reading and checking the rows needs no tokenizer, so a bad file is reported (with line numbers) before a
model is loaded. Tokenizing is a separate step, because where a completion starts is a property of the
tokenizer: the prompt and the completion are tokenized separately and concatenated, exactly as
:mod:`adaptermerge.evaluation` feeds them, so training and evaluation see the same token sequences.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from adaptermerge.errors import InvalidData, UsageError

IGNORE_INDEX = -100  # label value the loss skips (transformers' and PyTorch's convention)
MAX_REPORTED = 5  # bad rows named in one error message


@dataclass(frozen=True)
class Row:
    """One usable row of a task file; ``kind`` is ``completion``, ``text`` or ``chat``."""

    line: int
    kind: str
    prompt: str = ""
    completion: str = ""
    text: str = ""
    messages: tuple[tuple[str, str], ...] = ()


@dataclass
class TaskData:
    """The rows of one task file, and the bad lines that were skipped (only with ``skip_bad``)."""

    path: Path
    rows: list[Row]
    bad: list[tuple[int, str]] = field(default_factory=list)
    selected: bool = False  # the rows are a chosen part of the file's rows (``lines`` says which)

    @property
    def lines(self) -> list[int]:
        """The file's line numbers of the rows (how a recipe names a selection)."""
        return [r.line for r in self.rows]

    def select(self, rows: list[Row]) -> TaskData:
        """The same file with only ``rows`` (e.g. the part of a task file a search tunes on)."""
        return TaskData(self.path, list(rows), self.bad, selected=True)

    @cached_property
    def sha256(self) -> str:
        from adaptermerge.io.files import sha256_file

        return sha256_file(self.path)

    def summary(self) -> dict[str, Any]:
        """Counts for model cards and reports: rows by kind, skipped lines."""
        return {
            "file": str(self.path),
            "sha256": self.sha256,
            "rows": len(self.rows),
            "kinds": dict(Counter(r.kind for r in self.rows)),
            "skipped_lines": [n for n, _ in self.bad],
        }


@dataclass(frozen=True)
class Tokenized:
    """Token ids of one row and its labels (``IGNORE_INDEX`` where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]


def read_task_file(path: str | os.PathLike, skip_bad: bool = False, max_rows: int | None = None) -> TaskData:
    """Read and check a JSONL task file.

    Args:
        path: the file.
        skip_bad: skip bad rows (they are listed in ``TaskData.bad``) instead of refusing the file.
        max_rows: keep only the first ``max_rows`` good rows (the result then counts as a selection of the file's
            rows: a recipe records their line numbers).

    Raises:
        InvalidData: the file is missing, empty, has no usable row, or (without ``skip_bad``) has a bad row;
            the message names the first bad lines and what is wrong with each.
    """
    p = Path(path)
    if not p.is_file():
        raise InvalidData(f"task file {p} does not exist or is not a file")
    rows: list[Row] = []
    bad: list[tuple[int, str]] = []
    with open(p, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rows.append(parse_row(line, n))
            except ValueError as e:
                bad.append((n, str(e)))
            if max_rows is not None and len(rows) >= max_rows:
                break
    if bad and not skip_bad:
        raise InvalidData(f"{p}: {_describe_bad(bad)}; fix these rows or pass `skip_bad_rows` to leave them out")
    if not rows:
        what = f"no usable row ({_describe_bad(bad)})" if bad else "no rows"
        raise InvalidData(f"{p} has {what}; expected JSON lines with prompt/completion, text or messages")
    return TaskData(p, rows, bad, selected=max_rows is not None and len(rows) >= max_rows)


def format_lines(lines: list[int]) -> str:
    """Line numbers as compact ranges: ``[1, 2, 3, 7, 9, 10] -> "1-3,7,9-10"`` (order kept)."""
    parts: list[str] = []
    i = 0
    while i < len(lines):
        j = i
        while j + 1 < len(lines) and lines[j + 1] == lines[j] + 1:
            j += 1
        parts.append(str(lines[i]) if i == j else f"{lines[i]}-{lines[j]}")
        i = j + 1
    return ",".join(parts)


def parse_lines(text: str | list[int]) -> list[int]:
    """The inverse of :func:`format_lines` (a list of numbers is taken as it is)."""
    if isinstance(text, list):
        return [int(n) for n in text]
    out: list[int] = []
    try:
        for part in str(text).split(","):
            lo, _, hi = part.strip().partition("-")
            out.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise UsageError(f"line numbers must look like 1-3,7,9-10, got {text!r}") from None
    return out


def read_task_lines(path: str | os.PathLike, lines: list[int]) -> TaskData:
    """The rows of a task file on the given line numbers (a selection a recipe recorded), in that order.

    Raises:
        InvalidData: the file is unreadable or bad (as :func:`read_task_file`), or a line holds no row.
    """
    data = read_task_file(path)
    by_line = {r.line: r for r in data.rows}
    missing = [n for n in lines if n not in by_line]
    if missing:
        raise InvalidData(f"{data.path}: no row on line {missing[0]}; the file changed since the selection was made")
    return data.select([by_line[n] for n in lines])


def _describe_bad(bad: list[tuple[int, str]]) -> str:
    shown = "; ".join(f"line {n}: {why}" for n, why in bad[:MAX_REPORTED])
    more = f" (and {len(bad) - MAX_REPORTED} more bad lines)" if len(bad) > MAX_REPORTED else ""
    return f"{len(bad)} bad line{'s' if len(bad) > 1 else ''}: {shown}{more}"


def parse_row(line: str, n: int) -> Row:
    """One JSONL line as a :class:`Row`; ``ValueError`` says what is wrong with it."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        return Row(n, "chat", messages=_parse_messages(obj["messages"]))
    if "prompt" in obj or "completion" in obj:
        prompt, completion = obj.get("prompt"), obj.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError("'prompt' and 'completion' must both be strings")
        if not completion:
            raise ValueError("empty 'completion' (nothing to learn or score)")
        return Row(n, "completion", prompt=prompt, completion=completion)
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise ValueError("'text' must be a non-empty string")
        return Row(n, "text", text=obj["text"])
    raise ValueError(f"no 'prompt'/'completion', 'text' or 'messages' field (keys: {', '.join(sorted(obj)) or 'none'})")


def _parse_messages(msgs: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be an object with string 'role' and 'content'")
        out.append((m["role"], m["content"]))
    if not any(role == "assistant" for role, _ in out):
        raise ValueError("the conversation has no 'assistant' message (nothing to learn or score)")
    return tuple(out)


# --- tokenizing ---------------------------------------------------------------------------------------------


def named_tasks(tasks: Any) -> list[tuple[str, Any]]:
    """``{name: data}`` or ``(name, data)`` pairs as a list of ``(name, data)``, in order; a name given twice is
    refused (tables and recipes key the tasks by name)."""
    pairs = [(str(n), d) for n, d in (tasks.items() if isinstance(tasks, Mapping) else tasks)]
    names = [n for n, _ in pairs]
    if dup := sorted({n for n in names if names.count(n) > 1}):
        raise UsageError(f"task {dup[0]!r} is given twice; name every task once")
    return pairs


def check_tokenizer(data: TaskData, tokenizer: Any) -> None:
    """Refuse chat rows when the tokenizer has no chat template (before any model is loaded)."""
    if any(r.kind == "chat" for r in data.rows) and not getattr(tokenizer, "chat_template", None):
        raise InvalidData(
            f"{data.path} has chat rows ('messages') but the tokenizer has no chat_template; "
            "set one (tokenizer.chat_template = ...; save_pretrained) or convert the rows to prompt/completion"
        )


def prompt_and_target(row: Row, tokenizer: Any) -> tuple[list[int], str]:
    """The prompt's token ids and the target text to generate (completion rows and chat rows ending in an answer).

    Used by the accuracy metrics: the model is fed the prompt and its greedy continuation is compared with
    the target.
    """
    if row.kind == "completion":
        return encode(tokenizer, row.prompt, special=True), row.completion
    if row.kind == "chat" and row.messages[-1][0] == "assistant":
        prefix = _render(tokenizer, row.messages[:-1], generation_prompt=True)
        return encode(tokenizer, prefix, special=False), row.messages[-1][1]
    raise UsageError(
        f"line {row.line}: accuracy metrics need prompt/completion rows or conversations ending with an "
        "assistant message; use `metric` loss for text rows"
    )


def tokenize_row(row: Row, tokenizer: Any, max_length: int) -> Tokenized | None:
    """Token ids and labels of one row, truncated to ``max_length``; ``None`` if no labelled token is left."""
    if row.kind == "completion":
        prompt = encode(tokenizer, row.prompt, special=True)
        answer = encode(tokenizer, row.completion, special=False) + _eos(tokenizer)
        ids, labels = prompt + answer, [IGNORE_INDEX] * len(prompt) + answer
    elif row.kind == "text":
        ids = encode(tokenizer, row.text, special=True) + _eos(tokenizer)
        labels = list(ids)
    else:
        ids, labels = _tokenize_chat(row, tokenizer)
    ids, labels = ids[:max_length], labels[:max_length]
    if all(t == IGNORE_INDEX for t in labels[1:]):  # the first label is never predicted
        return None
    return Tokenized(ids, labels)


def tokenize_task(data: TaskData, tokenizer: Any, max_length: int) -> tuple[list[Tokenized], list[int]]:
    """Tokenize every row; returns the examples and the lines whose labelled part ``max_length`` cut off."""
    check_tokenizer(data, tokenizer)
    out, cut = [], []
    for row in data.rows:
        t = tokenize_row(row, tokenizer, max_length)
        if t is None:
            cut.append(row.line)
        else:
            out.append(t)
    if not out:
        raise InvalidData(
            f"{data.path}: every row's completion lies beyond `max_length` {max_length} tokens; raise `max_length`"
        )
    return out, cut


def encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    """Token ids of ``text`` (with the tokenizer's BOS/EOS rules when ``special``)."""
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _eos(tokenizer: Any) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return [] if eos is None else [int(eos)]


def _render(tokenizer: Any, messages: tuple[tuple[str, str], ...], generation_prompt: bool = False) -> str:
    msgs = [{"role": r, "content": c} for r, c in messages]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)


def _tokenize_chat(row: Row, tokenizer: Any) -> tuple[list[int], list[int]]:
    """Render the conversation and label the assistant turns' tokens.

    Each assistant turn ``i`` spans the characters between the rendering of ``messages[:i]`` with the
    generation prompt and the rendering of ``messages[:i+1]``; a template that does not render
    conversations as prefixes of each other has no such spans, and is refused rather than guessed.
    """
    full = _render(tokenizer, row.messages)
    spans = []
    for i, (role, _) in enumerate(row.messages):
        if role != "assistant":
            continue
        start = _render(tokenizer, row.messages[:i], generation_prompt=True)
        end = _render(tokenizer, row.messages[: i + 1])
        if not (end.startswith(start) and full.startswith(end)):
            raise InvalidData(
                f"line {row.line}: the tokenizer's chat template does not render this conversation turn by turn "
                "(prefixes differ), so the assistant tokens cannot be located; convert the rows to prompt/completion"
            )
        spans.append((len(start), len(end)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [
        tok if any(a <= s < b for a, b in spans) else IGNORE_INDEX
        for tok, (s, _) in zip(ids, enc["offset_mapping"], strict=True)
    ]
    return ids, labels
