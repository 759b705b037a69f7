"""A small on-disk cache of JSON answers that are slow to compute and fixed by their inputs.

Why: learning a checkpoint's layer kinds and tied weights means building its model class, and importing
transformers' modeling core for that takes 2.5-3 s, often most of a small merge. The answer depends only on
the transformers version, ``config.json`` and the stored weight names, so it is kept under a key hashed from
exactly those and read back as plain JSON (never pickle) by later runs.

Where: ``$ADAPTERMERGE_CACHE`` when set (``off`` or ``0`` turns the cache off), else
``$XDG_CACHE_HOME/adaptermerge`` (``~/.cache/adaptermerge``). An unreadable, unwritable or malformed entry
is never an error: the answer is computed again (and rewritten when possible). Entries are written
atomically (a temporary file renamed into place), so concurrent runs never read half an entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_OFF = ("off", "0", "false", "no")


def cache_dir() -> Path | None:
    """The cache folder, or None when ``ADAPTERMERGE_CACHE`` turns the cache off."""
    configured = os.environ.get("ADAPTERMERGE_CACHE")
    if configured is not None:
        return None if configured.strip().lower() in _OFF or not configured.strip() else Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "adaptermerge"


def cached_json(namespace: str, key: Any, compute: Callable[[], T], encode: Callable[[T], Any],
                decode: Callable[[Any], T | None]) -> T:  # fmt: skip
    """``compute()``, or the answer stored for ``key`` (any JSON-serialisable value) in ``namespace``.

    ``encode`` turns an answer into JSON data and ``decode`` turns stored data back, returning None for data it
    does not accept (an older layout, a hand-edited file): the answer is then computed again.
    """
    folder = cache_dir()
    if folder is None:
        return compute()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    path = folder / namespace / f"{digest}.json"
    stored = _read(path)
    if stored is not None:
        answer = decode(stored)
        if answer is not None:
            return answer
    answer = compute()
    _write(path, encode(answer))
    return answer


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write(path: Path, data: Any) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    except OSError:
        return  # a read-only or missing home: the cache is an optimisation, never a requirement
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except (OSError, TypeError, ValueError):
        with contextlib.suppress(OSError):
            os.unlink(tmp)
