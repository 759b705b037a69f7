"""Files: open source shards once, hash inputs, make outputs durable. One home for each of these.

* :class:`SourceFiles`: read-only handles on a checkpoint's shards, opened on first use and closed together
  (the executor, the 4-bit reader and ``extract`` read many tensors from few files).
* :func:`sha256_file` / :func:`sha256_files`: what recipes record about their inputs, so that a replay refuses
  inputs that changed. Read in 8 MiB blocks (hashlib releases the GIL, so hashing can run beside other work).
* :func:`fsync_file`: flush one file to disk. :func:`adaptermerge.io.atomic.atomic_dir` syncs every file of an
  output folder once before renaming it into place, skipping those already synced.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

BLOCK = 8 << 20


class SourceFiles:
    """Read-only handles on files of one folder, opened on first use; ``close()`` (or ``with``) closes them all."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._handles: dict[str, BinaryIO] = {}

    def get(self, name: str) -> BinaryIO:
        if name not in self._handles:
            self._handles[name] = open(self.folder / name, "rb")  # noqa: SIM115 - closed by close()
        return self._handles[name]

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles.clear()

    def __enter__(self) -> SourceFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 8 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def sha256_files(folder: str | os.PathLike, names: Iterable[str]) -> dict[str, str]:
    """File name -> hex SHA-256 for the named files of ``folder`` that exist."""
    p = Path(folder)
    return {n: sha256_file(p / n) for n in sorted(set(names)) if (p / n).is_file()}


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
