"""Hugging Face checkpoint folders: ``config.json`` + one or many ``*.safetensors`` (+ index).

Only headers are read here; tensor data is streamed by the surgery executor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptermerge.errors import InvalidCheckpoint
from adaptermerge.io.safetensors_header import Header, HeaderError, TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"


@dataclass
class Checkpoint:
    """A checkpoint folder's layout: which shard holds which tensor, and the model config."""

    path: Path
    config: dict[str, Any]
    shards: dict[str, Header]  # file name -> header
    weight_map: dict[str, str]  # tensor name -> file name
    index_metadata: dict[str, Any] = field(default_factory=dict)

    def info(self, name: str) -> TensorInfo:
        return self.shards[self.weight_map[name]].tensors[name]

    @property
    def quantization(self) -> dict[str, Any] | None:
        """``quantization_config`` from ``config.json``, if any."""
        return self.config.get("quantization_config")

    @property
    def total_bytes(self) -> int:
        return sum(h.file_size for h in self.shards.values())

    def bnb_4bit_modules(self) -> dict[str, str]:
        """Quantized weights stored the bitsandbytes way: weight name -> quant type (``nf4``/``fp4``)."""
        out = {}
        marker = ".quant_state.bitsandbytes__"
        for name in self.weight_map:
            if marker in name:
                base, qt = name.split(marker)
                out[base] = qt
        return out


def is_checkpoint(path: str | os.PathLike) -> bool:
    """A folder that looks like a transformers checkpoint (has safetensors model files)."""
    p = Path(path)
    return (
        p.is_dir()
        and ((p / INDEX_NAME).is_file() or any(p.glob("*.safetensors")))
        and not (p / "adapter_config.json").is_file()
    )


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read the headers of every shard of a checkpoint folder and check they agree with the index.

    Raises:
        InvalidCheckpoint: no safetensors files, corrupt headers, index naming missing files or tensors.
    """
    p = Path(path)
    if not p.is_dir():
        raise InvalidCheckpoint(f"{p} is not a folder; pass a Hugging Face checkpoint folder")
    config: dict[str, Any] = {}
    if (p / "config.json").is_file():
        try:
            config = json.loads((p / "config.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InvalidCheckpoint(f"{p / 'config.json'} is not valid JSON ({e})") from None
    index_meta: dict[str, Any] = {}
    if (p / INDEX_NAME).is_file():
        try:
            index = json.loads((p / INDEX_NAME).read_text(encoding="utf-8"))
            weight_map = dict(index["weight_map"])
            index_meta = dict(index.get("metadata") or {})
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InvalidCheckpoint(f"{p / INDEX_NAME} is not a valid index ({e})") from None
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(f.name for f in p.glob("*.safetensors"))
        if not files:
            if any(p.glob("*.bin")):
                raise InvalidCheckpoint(
                    f"{p} holds only pickle (.bin) weights, which are never loaded; convert them to safetensors first"
                )
            raise InvalidCheckpoint(f"{p} holds no *.safetensors files")
        weight_map = {}
    shards: dict[str, Header] = {}
    for f in files:
        fp = p / f
        if not fp.is_file():
            raise InvalidCheckpoint(f"{INDEX_NAME} names {f}, which is missing from {p}")
        try:
            shards[f] = read_header(fp)
        except HeaderError as e:
            raise InvalidCheckpoint(f"{fp}: {e}") from None
    if weight_map:
        for name, f in weight_map.items():
            if name not in shards[f].tensors:
                raise InvalidCheckpoint(f"{INDEX_NAME} maps {name} to {f}, which does not hold it")
    else:
        for f, h in shards.items():
            for name in h.tensors:
                if name in weight_map:
                    raise InvalidCheckpoint(f"tensor {name} appears in both {weight_map[name]} and {f}")
                weight_map[name] = f
    return Checkpoint(p, config, shards, weight_map, index_meta)


def _first(name: str) -> str:
    return name.split(".", 1)[0]


def choose_prefix_map(names: Iterable[str], keys: set[str]) -> tuple[str, str] | None:
    """A ``(strip, add)`` prefix pair such that every ``add + name[len(strip):] + '.weight'`` is a key.

    Tries, in order: no change; stripping a shared first component (task-model adapter on a bare-model
    checkpoint); adding a first component that checkpoint keys use (bare-model adapter on a task-model
    checkpoint).
    """
    names = list(names)
    if not names:
        return ("", "")
    options: list[tuple[str, str]] = [("", "")]
    firsts = {_first(n) for n in names}
    if len(firsts) == 1:
        options.append((firsts.pop() + ".", ""))
    for p in sorted({_first(k) for k in keys}):
        options.append(("", p + "."))
    for strip, add in options:
        if all(n.startswith(strip) and f"{add}{n[len(strip) :]}.weight" in keys for n in names):
            return strip, add
    return None


def map_name(name: str, strip: str, add: str) -> str:
    """``name`` with the prefix pair of :func:`choose_prefix_map` applied."""
    return add + name[len(strip) :] if name.startswith(strip) else name
