"""Atomic output folders and the rules that protect inputs."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from adaptermerge.errors import OutputExistsError, UsageError
from adaptermerge.io.files import fsync_file


def check_output_path(
    out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False
) -> Path:
    """Refuse an output that is an input, lies inside one, contains one, or exists without ``overwrite``."""
    out_p = Path(out).resolve()
    for inp in inputs:
        in_p = Path(inp).resolve()
        if out_p == in_p or in_p in out_p.parents or out_p in in_p.parents:
            raise UsageError(f"output {out} overlaps the input {inp}; choose an output folder outside every input")
    if out_p.exists():
        if not out_p.is_dir():
            raise OutputExistsError(f"output {out} exists and is not a folder; remove it or choose another path")
        if any(out_p.iterdir()) and not overwrite:
            raise OutputExistsError(f"output folder {out} exists and is not empty; pass `overwrite` to replace it")
    return out_p


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


class Staging(type(Path())):  # type: ignore[misc]
    """The temporary folder :func:`atomic_dir` yields: a Path that also records files already made durable."""

    synced: set[str]

    def mark_synced(self, path: str | os.PathLike) -> None:
        """``path`` (inside this folder) was fsynced by its writer: the final sync skips it."""
        self.synced.add(str(Path(path).resolve()))


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Staging]:
    """Yield a temporary sibling folder; on success every file in it is fsynced once (those its writers already
    synced are skipped) and it replaces ``out`` in one rename.

    A crash or an exception leaves ``out`` untouched and removes the temporary folder, so no
    half-written output ever carries the final name.
    """
    out_p = Path(out).resolve()
    check_output_path(out_p, overwrite=overwrite)
    out_p.parent.mkdir(parents=True, exist_ok=True)
    tmp = Staging(tempfile.mkdtemp(prefix=f".{out_p.name}.partial-", dir=out_p.parent))
    tmp.synced = set()
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; outputs get the usual permissions
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file() and str(f.resolve()) not in tmp.synced:
                fsync_file(f)
        if out_p.exists() and _exchange(tmp, out_p):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the replaced output
            return
        old = None
        if out_p.exists():
            old = out_p.parent / f".{out_p.name}.old-{os.getpid()}"
            os.replace(out_p, old)
        os.replace(tmp, out_p)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
