"""Progress bars: one rule for all long work. A bar shows on stderr when asked for and stderr is a terminal, so
pipes, logs and ``--json`` output stay clean; results go to stdout."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any


def bar(total: int | None = None, desc: str = "", unit: str = "it", enabled: bool = True, **kw: Any) -> Any:
    """A tqdm bar on stderr, shown only when ``enabled`` and stderr is a terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not (enabled and sys.stderr.isatty()), **kw)


def iterate(items: Iterable[Any], desc: str = "", unit: str = "it", enabled: bool = True, **kw: Any) -> Any:
    """``items`` wrapped in a bar by the same rule."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, file=sys.stderr, disable=not (enabled and sys.stderr.isatty()), **kw)
