"""CPU threading for the many small operations of a module merge.

Measured on 2 shared, loaded cores (torch 2.13, CPU): a thin QR of 11008 x 58 takes 4 ms on one intra-op thread
and 80-300 ms on two; an SVD of 58 x 4096 5 ms against 1.2 s; cache-sized elementwise blocks 3-30x slower and
erratic. Each parallel region waits for every thread, and a descheduled thread stalls it. Small LAPACK calls and
the block-wise scans therefore run on one thread; large matrix products keep the caller's setting.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run the enclosed torch CPU ops on one intra-op thread, then restore the caller's setting.

    Used around small LAPACK calls (thin QR, SVD of sketch-sized matrices) and the block-wise scans and merges
    (many memory-bound ops of a few hundred KB), where synchronising threads costs more than it saves. The
    setting is process-global: do not merge modules from several Python threads at once.
    """
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
