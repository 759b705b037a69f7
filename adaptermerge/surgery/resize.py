"""Re-rank one adapter: the factored SVD of :mod:`adaptermerge.combination` with weight 1."""

from __future__ import annotations

import os

import torch

from adaptermerge.adapter import Adapter
from adaptermerge.combination import combine
from adaptermerge.errors import UsageError


def resize_adapter(
    adapter: Adapter | str | os.PathLike,
    rank: int | None = None,
    energy: float | None = None,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    progress: bool = False,
) -> Adapter:
    """Best rank-``rank`` approximation of each module (Eckart-Young), or the smallest rank keeping
    ``energy`` of ``||delta||_F^2`` (capped by ``rank`` when both are given). Ranks never grow.

    ``result.provenance["modules"]`` reports each module's new rank and kept energy.

    Example:
        >>> import torch
        >>> from adaptermerge import Adapter, LowRank
        >>> a = Adapter({"q": LowRank(torch.randn(8, 32), torch.randn(16, 8))})
        >>> resize_adapter(a, rank=4).ranks
        {'q': 4}
    """
    if rank is None and energy is None:
        raise UsageError("give `rank` K or `energy` F (or both)")
    result = combine(
        [adapter], [1.0], method="svd", rank=rank, energy=energy, device=device, dtype=dtype, progress=progress
    )
    result.provenance["operation"] = "resize"  # the card says so; the recipe replays it as a one-input svd combine
    return result
