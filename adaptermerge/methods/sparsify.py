"""Sparsification steps of the task-vector methods: magnitude trim, DARE, breadcrumbs, DELLA.

Each function takes one tensor (a dense delta, a core-space core or a KnOTS block) and returns a new tensor of
the same shape; inputs are never modified. Counts are exact:

* ``k = round(density * numel)`` with halves rounded up, computed on the decimal value of ``density`` (so
  ``0.35 * 10`` keeps 4, not 3 as float ``int()`` or banker's rounding might), see :func:`keep_count`.
* "the k largest by magnitude" is a total order: larger ``|x|`` first, equal magnitudes by lower flat
  (row-major) index first. Exactly ``k`` entries are selected, also when magnitudes tie at the threshold.

Random steps draw from a ``torch.Generator`` only (never the global RNG), so a seed gives the same bytes on
every run. :func:`module_generator` derives an independent generator per module from ``(seed, module name)``,
so the draws do not depend on the order in which modules are processed.

Example:
    >>> import torch
    >>> x = torch.tensor([[0.5, -3.0], [2.0, -0.1]])
    >>> magnitude_trim(x, density=0.5)
    tensor([[ 0., -3.],
            [ 2.,  0.]])
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

import torch
import torch.nn.functional as F

from adaptermerge.cpu import single_threaded
from adaptermerge.errors import UsageError

DIRECT_SELECT_MAX = 1 << 20
"""Up to this many entries the k-th largest magnitude is found with one ``torch.kthvalue``; above it a strided
sample brackets the threshold first (same exact result, about half the time on a 4096 x 4096 module)."""

CHUNK_ELEMENTS = 1 << 18
"""Entries per chunk of the chunked scans (1 MiB of fp32: stays in cache)."""

_SAMPLE_TARGET = 1 << 16


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for half/bfloat16/fp32 inputs, fp64 for fp64 inputs: accumulate in at least fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def keep_count(density: float, numel: int) -> int:
    """``k = round(density * numel)``, halves up, on the decimal value of ``density``; clamped to ``[0, numel]``.

    ``keep_count(0.35, 10) == 4``, ``keep_count(0.25, 10) == 3``, ``keep_count(0.2, 7) == 1``.
    """
    exact = Decimal(repr(float(density))) * numel
    k = int(exact.to_integral_value(rounding=ROUND_HALF_UP))
    return max(0, min(numel, k))


def _check_density(name: str, density: float) -> None:
    if not (isinstance(density, (int, float)) and math.isfinite(density) and 0.0 <= density <= 1.0):
        raise UsageError(f"{name}: density must be in [0, 1], got {density!r}")


def _next_prime(n: int) -> int:
    def is_prime(p: int) -> bool:
        if p < 2:
            return False
        return all(p % d for d in range(2, math.isqrt(p) + 1))

    while not is_prime(n):
        n += 1
    return n


def _bracketed_kth(flat: torch.Tensor, k: int, absolute: bool) -> tuple[torch.Tensor, int, int] | None:
    """k-th largest of ``flat`` (or of ``|flat|``) by bracketing, scanning in cache-sized chunks.

    Two order statistics ``lo <= hi`` of a strided sample bracket the answer; one scan counts ``#{> hi}`` and
    gathers the band ``lo <= v <= hi``; when ``#{> hi} < k <= #{> hi} + |band|`` (checked, not assumed) the
    answer is an order statistic of the band. Returns ``(t, #{>= t}, #{> t})`` or ``None`` when the bracket
    missed (the caller then selects on the whole tensor).
    """
    n = flat.numel()
    stride = _next_prime(max(2, n // _SAMPLE_TARGET))
    sample = flat[::stride]
    sample = sample.abs() if absolute else sample.contiguous()
    ns = sample.numel()
    pos = ns - k * ns / n  # ascending position of the k-th largest in the sample, 0-based (fractional)
    margin = 4.0 * math.sqrt(ns) + 16.0
    lo = torch.kthvalue(sample, min(ns, max(1, math.floor(pos - margin)))).values
    hi = torch.kthvalue(sample, min(ns, max(1, math.ceil(pos + margin) + 1))).values
    above = 0
    bands = []
    for start in range(0, n, CHUNK_ELEMENTS):
        v = flat[start : start + CHUNK_ELEMENTS]
        if absolute:
            v = v.abs()
        above += int(torch.count_nonzero(v > hi))
        bands.append(v[(v >= lo) & (v <= hi)])
    band = torch.cat(bands)
    if not above < k <= above + band.numel():
        return None
    t = torch.kthvalue(band, band.numel() - (k - above) + 1).values
    return t, above + int(torch.count_nonzero(band >= t)), above + int(torch.count_nonzero(band > t))


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest entry of a tensor (``1 <= k <= numel``), exactly, as a 0-d tensor.

    Small tensors: ``torch.kthvalue`` (the ``(n - k + 1)``-th smallest). Large tensors: bracketed by a strided
    sample (prime stride, so the sample does not align with the rows of a matrix), then an order statistic of
    the band between the brackets (about 1% of the entries), found in one chunked scan; falls back to the full
    ``kthvalue`` when the bracket misses. Both paths return the same value.
    """
    n = values.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    flat = values.reshape(-1)
    if n > DIRECT_SELECT_MAX:
        with single_threaded():
            found = _bracketed_kth(flat, k, absolute=False)
        if found is not None:
            return found[0]
    return torch.kthvalue(flat, n - k + 1).values


@dataclass(frozen=True)
class TopK:
    """The ``k`` largest entries of one tensor (by ``|x|`` when ``absolute``), as a rule applicable to any chunk.

    Selected: every entry above ``threshold``; of the entries equal to it, all when ``inclusive`` (then exactly
    ``k`` entries are ``>= threshold``), else exactly those at the flat indices ``ties`` (the first ones in
    row-major order). ``k = 0`` selects nothing, ``k = numel`` everything.
    """

    k: int
    numel: int
    threshold: torch.Tensor
    inclusive: bool
    ties: torch.Tensor
    absolute: bool

    def select(self, chunk: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``chunk`` where selected, 0 elsewhere, for the entries at flat indices ``start ..`` (row-major).

        Float operations only (``F.threshold`` at the largest float below the threshold, or at the threshold
        plus the tied entries, then ``copysign``): several times faster than boolean masks on CPU. May return
        ``chunk`` itself when everything is selected; callers must not modify the result in place.
        """
        if self.k <= 0:
            return torch.zeros_like(chunk)
        if self.k >= self.numel:
            return chunk
        v = chunk.abs() if self.absolute else chunk
        kept = F.threshold(v, self._cut, 0.0)
        if not self.inclusive and self.ties.numel():
            lo = int(torch.searchsorted(self.ties, start))
            hi = int(torch.searchsorted(self.ties, start + chunk.numel()))
            if hi > lo:
                idx = self.ties[lo:hi] - start
                kept.view(-1)[idx] = v.reshape(-1)[idx]
        return torch.copysign(kept, chunk) if self.absolute else kept

    @functools.cached_property
    def _cut(self) -> float:
        """``F.threshold`` keeps values ``> cut``: the largest float below the threshold when inclusive."""
        t = self.threshold
        return float(torch.nextafter(t, torch.tensor(-math.inf, dtype=t.dtype))) if self.inclusive else float(t)

    def mask(self, chunk: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Selection mask of ``chunk``, the entries at flat indices ``start .. start + chunk.numel()`` (row-major)."""
        if self.k <= 0:
            return torch.zeros(chunk.shape, dtype=torch.bool, device=chunk.device)
        if self.k >= self.numel:
            return torch.ones(chunk.shape, dtype=torch.bool, device=chunk.device)
        v = chunk.abs() if self.absolute else chunk
        if self.inclusive:
            return v >= self.threshold
        m = v > self.threshold
        if self.ties.numel():
            lo = int(torch.searchsorted(self.ties, start))
            hi = int(torch.searchsorted(self.ties, start + chunk.numel()))
            if hi > lo:
                m.view(-1)[self.ties[lo:hi] - start] = True
        return m


def select_topk(x: torch.Tensor, k: int, absolute: bool = True) -> TopK:
    """:class:`TopK` of the ``k`` largest ``|x|`` (or ``x``): exactly ``k`` entries, ties by lower flat index.

    ``t`` = the k-th largest value (:func:`kth_largest`'s algorithm, scanning ``x`` in chunks so that no
    full-size ``|x|`` is allocated for large tensors). If exactly ``k`` entries are ``>= t`` the rule is
    ``>= t``; otherwise ``> t`` plus the first ``k - #{> t}`` entries equal to ``t`` in row-major order (found
    by a chunked scan that stops early, so a mostly-zero tensor never builds an n-long index).
    """
    n = x.numel()
    dev = x.device
    empty = torch.zeros(0, dtype=torch.long, device=dev)
    zero = torch.zeros((), dtype=x.dtype, device=dev)
    if k <= 0 or k >= n:
        return TopK(max(0, min(k, n)), n, zero, True, empty, absolute)
    flat = x.reshape(-1)
    with single_threaded():
        return _select_topk(flat, n, k, absolute, empty)


def _select_topk(flat: torch.Tensor, n: int, k: int, absolute: bool, empty: torch.Tensor) -> TopK:
    found = _bracketed_kth(flat, k, absolute) if n > DIRECT_SELECT_MAX else None
    if found is None:
        v = flat.abs() if absolute else flat
        t = torch.kthvalue(v, n - k + 1).values
        n_ge, n_gt = int(torch.count_nonzero(v >= t)), int(torch.count_nonzero(v > t))
        del v
    else:
        t, n_ge, n_gt = found
    if n_ge == k:
        return TopK(k, n, t, True, empty, absolute)
    need = k - n_gt
    picked = []
    for start in range(0, n, CHUNK_ELEMENTS):
        v = flat[start : start + CHUNK_ELEMENTS]
        if absolute:
            v = v.abs()
        idx = torch.nonzero(v == t).squeeze(1)[:need]
        picked.append(idx + start)
        need -= idx.numel()
        if need == 0:
            break
    return TopK(k, n, t, False, torch.cat(picked), absolute)


def topk_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly ``k`` entries: the largest ``magnitude``, ties broken by lower flat index.

    ``topk_mask(a, j)`` is contained in ``topk_mask(a, k)`` for ``j <= k`` (the selections are prefixes of one
    total order), which :func:`breadcrumbs_mask` relies on.
    """
    a = magnitude.contiguous()
    return select_topk(a, k, absolute=False).mask(a, 0)


def trim_rule(x: torch.Tensor, density: float) -> TopK:
    """The selection of TIES's "trim": the ``k = round(density * numel)`` largest ``|x|`` (:func:`select_topk`)."""
    _check_density("magnitude trim", density)
    return select_topk(x, keep_count(density, x.numel()), absolute=True)


def magnitude_trim(x: torch.Tensor, density: float) -> torch.Tensor:
    """TIES step 1 "trim" (Yadav et al., 2023, Sec. 3): keep the ``k = round(density * numel)`` entries of
    largest ``|x|`` (ties by index, see module docstring), zero the rest. No rescaling."""
    x = x.contiguous()
    rule = trim_rule(x, density)
    return x.clone() if rule.k >= x.numel() else rule.select(x)


def breadcrumbs_rules(x: torch.Tensor, density: float, gamma: float) -> tuple[TopK, TopK]:
    """Model Breadcrumbs (Davari & Belilovsky, ECCV 2024, Sec. 3): drop the ``n_top = round(gamma * numel)``
    largest magnitudes (outliers) and the smallest, so that ``n_keep = round(density * numel)`` remain.

    Kept = ranks ``[n_top, n_top + n_keep)`` of the descending-magnitude order (ties by index) = the
    ``n_top + n_keep`` largest minus the ``n_top`` largest; returns those two selections. ``n_keep`` is capped
    at ``numel - n_top``. ``n_top == 0`` drops no outlier (mergekit's ``indices[n_bot:-0]`` is empty and zeroes
    the whole tensor in that case; we do not).
    """
    _check_density("breadcrumbs", density)
    if not (math.isfinite(gamma) and 0.0 <= gamma < 1.0):
        raise UsageError(f"breadcrumbs: gamma must be in [0, 1), got {gamma!r}")
    n = x.numel()
    n_top = keep_count(gamma, n)
    n_keep = min(keep_count(density, n), n - n_top)
    return select_topk(x, n_top + n_keep), select_topk(x, n_top)


def breadcrumbs_mask(x: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Boolean mask of the entries :func:`breadcrumbs_rules` keeps."""
    x = x.contiguous()
    upper, outliers = breadcrumbs_rules(x, density, gamma)
    keep = upper.mask(x)
    if outliers.k > 0:
        keep &= ~outliers.mask(x)
    return keep


def breadcrumbs_trim(x: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """``x`` with everything outside :func:`breadcrumbs_mask` zeroed (no rescaling, as in the paper)."""
    return torch.where(breadcrumbs_mask(x, density, gamma), x, torch.zeros((), dtype=x.dtype, device=x.device))


def module_generator(seed: int, module: str = "", device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded from ``(seed, module)``: ``sha256(f"{seed}:{module}")`` truncated to 63 bits.

    Independent streams per module, identical on every run and in any processing order.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {seed!r}")
    digest = hashlib.sha256(f"{seed}:{module}".encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def _uniform(shape: torch.Size, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, dtype=compute_dtype(like), device=generator.device)
    return u.to(like.device)


def dare_drop(x: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE "drop and rescale" (Yu et al., ICML 2024, Eq. 2-3): each entry is kept with probability ``density``
    (dropped with ``p = 1 - density``) and survivors are multiplied by ``1 / density``; ``E[out] = x``.

    One uniform draw ``u`` per entry in row-major order: kept iff ``u < density``. ``density == 1`` returns
    ``x`` exactly without drawing; ``density == 0`` returns zeros without drawing.
    """
    _check_density("dare", density)
    if density >= 1.0:
        return x.clone()
    if density <= 0.0:
        return torch.zeros_like(x)
    u = _uniform(x.shape, generator, x)
    keep = u.neg_().add_(density).clamp_min_(0.0).sign_()  # 1 where u < density, else 0 (float ops only)
    return keep.mul_(x).div_(density)


def della_keep_probabilities(x: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA MagPrune keep probabilities (Deep et al., 2024, Sec. 3.1), ramped by magnitude rank in each row.

    For a row of ``n`` entries ranked ``rank = 0 .. n-1`` by ascending ``|x|`` (equal magnitudes by column
    index), ``p = (density - epsilon) + 2 epsilon * rank / (n - 1)``: the smallest entry is kept with
    ``density - epsilon``, the largest with ``density + epsilon``, mean ``density``. A row is the last
    dimension (a delta's output row, ``out x in``: ranks run over the input features, as in mergekit); a 1-D
    tensor is one row. A row of one entry gets ``p = density``.
    """
    _check_della(density, epsilon)
    dt = compute_dtype(x)
    rows = x.reshape(-1, x.shape[-1]) if x.dim() > 0 else x.reshape(1, 1)
    n = rows.shape[-1]
    if n == 1:
        return torch.full(x.shape, density, dtype=dt, device=x.device)
    order = torch.argsort(rows.abs(), dim=-1, stable=True)
    ramp = torch.linspace(density - epsilon, density + epsilon, n, dtype=dt, device=x.device)
    probs = torch.empty(rows.shape, dtype=dt, device=x.device)
    probs.scatter_(-1, order, ramp.expand_as(probs))
    return probs.reshape(x.shape)


def _check_della(density: float, epsilon: float) -> None:
    _check_density("della", density)
    if not (math.isfinite(epsilon) and epsilon >= 0.0):
        raise UsageError(f"della: epsilon must be >= 0, got {epsilon!r}")
    if density - epsilon <= 0.0 or density + epsilon > 1.0:
        raise UsageError(
            f"della: keep probabilities run from density - epsilon to density + epsilon and must lie in (0, 1]; "
            f"got density={density}, epsilon={epsilon}"
        )


def della_drop(x: torch.Tensor, density: float, epsilon: float, generator: torch.Generator) -> torch.Tensor:
    """DELLA MagPrune drop and rescale: keep entry ``j`` with probability ``p_j`` from
    :func:`della_keep_probabilities`, rescale survivors by ``1 / p_j`` (the paper's rule; ``E[out] = x``).

    mergekit instead rescales the kept tensor to the L1 norm of the original (``rescale_norm``); see the docs.
    One uniform draw per entry in row-major order: kept iff ``u < p_j``.
    """
    p = della_keep_probabilities(x, density, epsilon)
    u = _uniform(x.shape, generator, x)
    keep = u.neg_().add_(p).clamp_min_(0.0).sign_()  # 1 where u < p, else 0
    return keep.mul_(x).div_(p)
