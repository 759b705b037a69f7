"""The shared re-factoring step: a merged module's delta back to LoRA factors ``B @ A``.

Two inputs, one result type (:class:`Refactored`):

* :func:`refactor_dense` takes a dense ``out x in`` delta (what an elementwise method returns in
  ``--space delta``): exact SVD for small modules, randomized SVD with power iterations (Halko, Martinsson &
  Tropp, 2011, Alg. 4.4) for large ones.
* :func:`refactor_factored` takes stacked factors ``B @ A`` of rank ``<= R`` (core/KnOTS spaces, subspace
  methods): thin QR of both factors and an SVD of the small core (exact, never ``m x n``).

The rank: ``--rank K`` (default: the caller's ``default_rank``, normally the sum of the input ranks, always
capped at ``min(out, in)``; at full size the result is exact) or ``--energy F`` (the smallest ``k`` whose top
singular values keep ``F`` of ``||delta||_F^2``; capped by ``--rank`` when both are given). Singular values
at rounding-noise level are never kept. The kept energy ``||B A||_F^2 / ||delta||_F^2`` is reported exactly:
``B A = U_k U_k^T delta`` is an orthogonal projection of ``delta``, so its energy is ``sum_{j<k} s_j^2`` of the
decomposition actually used, and ``||delta||_F^2`` is summed directly (1.0 for a zero delta).

Factors are balanced: ``B = U_k S_k^(1/2)``, ``A = S_k^(1/2) V_k^T``.

Example:
    >>> import torch
    >>> d = torch.randn(40, 3, generator=torch.Generator().manual_seed(0)) @ torch.randn(3, 30)
    >>> r = refactor_dense(d, rank=3)
    >>> r.rank, round(r.kept_energy, 6), bool(torch.allclose(r.B @ r.A, d, atol=1e-4))
    (3, 1.0, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adaptermerge.cpu import single_threaded
from adaptermerge.errors import NumericalError, UsageError
from adaptermerge.lowrank import factored_svd

EXACT_MAX_DIM = 512
"""Modules with ``min(out, in)`` at most this use the exact SVD (LAPACK gesdd)."""
EXACT_RANK_FRACTION = 0.25
"""Also exact when the sketch width ``K + oversample`` reaches this fraction of ``min(out, in)``."""
OVERSAMPLE = 10
POWER_ITERATIONS = 2


@dataclass
class Refactored:
    """One module's factors and what the truncation kept.

    Attributes:
        B: ``out x k`` factor.
        A: ``k x in`` factor (``B @ A`` is the stored delta).
        rank: ``k``.
        kept_energy: ``||B A||_F^2 / ||delta||_F^2`` (1.0 for a zero delta).
        algorithm: ``exact`` (LAPACK SVD of the dense delta), ``randomized`` (sketch + power iterations) or
            ``factored`` (QR-core SVD of stacked factors).
        singular_values: the leading singular values of ``delta`` that were computed (all of them for the exact
            and factored paths, the sketch's for the randomized one), fp64.
    """

    B: torch.Tensor
    A: torch.Tensor
    rank: int
    kept_energy: float
    algorithm: str
    singular_values: torch.Tensor


def check_rank_energy(rank: int | None, energy: float | None) -> None:
    """``rank`` a positive integer, ``energy`` in ``(0, 1]`` (typed errors for user input)."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise UsageError(f"--rank must be a positive integer, got {rank!r}")
    if energy is not None and not (isinstance(energy, (int, float)) and math.isfinite(energy) and 0 < energy <= 1):
        raise UsageError(f"--energy must be in (0, 1], got {energy!r}")


def noise_floor(s: torch.Tensor, size_hint: int, scale: float = 0.0, dtype: torch.dtype = torch.float32) -> float:
    """Singular values at or below ``max(s_max, scale) * size_hint * eps(dtype)`` are rounding noise."""
    smax = float(s.max()) if s.numel() else 0.0
    return max(smax, scale) * max(size_hint, 1) * torch.finfo(dtype).eps


def choose_rank(s: torch.Tensor, total_sq: float, cap: int, energy: float | None, floor: float) -> tuple[int, bool]:
    """``k`` for a spectrum ``s`` (descending) of a matrix with ``||.||_F^2 = total_sq``.

    Without ``energy``: the number of values above ``floor``, at most ``cap``. With ``energy``: the smallest
    ``k`` with ``sum_{j<k} s_j^2 >= energy * total_sq`` (minus a 1e-12 relative tolerance, so that
    ``energy = 1`` stops at the numerical rank), at most ``cap``. Returns ``(k, reached)`` where ``reached``
    says whether the energy target was met within the values in ``s``.
    """
    nonnoise = int((s > floor).sum())
    k_max = min(cap, nonnoise)
    if energy is None:
        return k_max, True
    if total_sq <= 0.0:
        return 0, True
    cum = torch.cumsum(s.double() ** 2, 0)
    target = energy * total_sq * (1.0 - 1e-12)
    hit = int(torch.searchsorted(cum, torch.tensor(target, dtype=cum.dtype)).item())  # first index with cum >= target
    if hit < s.numel():
        return min(hit + 1, k_max), True
    return k_max, False


def randomized_svd(
    delta: torch.Tensor,
    width: int,
    power_iterations: int | None = None,
    generator: torch.Generator | None = None,
    hint: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized range finder with ``q`` power iterations (Halko et al., 2011, Alg. 4.4), then an exact SVD of
    the projection. Returns ``U (out x w), s (w), Vh (w x in)`` with ``U diag(s) Vh = Q Q^T delta`` exactly
    (``Q`` the orthonormal sketch basis, ``w`` its width).

    ``Y = delta Omega``, ``Omega ~ N(0, 1)^{in x width}`` from ``generator`` (seeded 0 when absent:
    deterministic). With a ``hint`` (``out x h``, e.g. the stacked ``B`` factors of the merged adapters, whose
    span holds most of a merged delta's energy) the sketch is ``Y = [hint, delta Omega]`` with ``Omega`` of
    ``max(OVERSAMPLE, width - h)`` columns: the known directions replace random ones. ``Q = qr(Y)``; ``q`` times
    ``Q = qr(delta qr(delta^T Q))``; ``u s Vh = svd(Q^T delta)``; ``U = Q u``. Default ``q``: 2, or 1 with a
    hint (on TIES/DARE/breadcrumbs merges of 3 rank-16 adapters both keep the optimal rank-48 energy to 3-4
    digits; plain ``q = 1`` loses up to 5% of it).
    """
    m, n = delta.shape
    full = min(m, n)
    q_iter = power_iterations if power_iterations is not None else (POWER_ITERATIONS if hint is None else 1)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    h = 0 if hint is None else min(hint.shape[1], full)
    cols = min(full, max(width, h + OVERSAMPLE if h else width)) - h
    omega = torch.randn(n, cols, generator=g, dtype=delta.dtype, device=g.device).to(delta.device)
    y = delta @ omega
    if h:
        y = torch.cat([hint[:, :h].to(delta.dtype), y], dim=1)
    q = _orth(y)
    for _ in range(q_iter):
        q = _orth(delta @ _orth(delta.T @ q))
    b = q.T @ delta  # w x in
    with single_threaded():  # svd(b) through b^T = Q2 R2: only the small w x w SVD
        q2, r2 = torch.linalg.qr(b.T)
        u, s, vh = torch.linalg.svd(r2.T, full_matrices=False)
    return q @ u, s, vh @ q2.T


def _orth(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of a tall-skinny matrix's columns (thin QR on one thread, see :mod:`adaptermerge.cpu`)."""
    with single_threaded():
        return torch.linalg.qr(y).Q


def _balanced(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = torch.sqrt(s[:k])
    return u[:, :k] * root, root.unsqueeze(1) * vh[:k]


def refactor_dense(
    delta: torch.Tensor,
    rank: int | None = None,
    energy: float | None = None,
    default_rank: int | None = None,
    *,
    oversample: int = OVERSAMPLE,
    power_iterations: int | None = None,
    exact_max_dim: int = EXACT_MAX_DIM,
    generator: torch.Generator | None = None,
    scale: float = 0.0,
    hint: torch.Tensor | None = None,
) -> Refactored:
    """Factor a dense ``out x in`` delta as ``B @ A`` of rank ``k``.

    Args:
        delta: the merged delta (fp32 or fp64; the factors come back in that dtype).
        rank: ``--rank K``; default ``default_rank`` (or ``min(out, in)`` when that is ``None``), capped at
            ``min(out, in)``. At ``min(out, in)`` the factorization is exact (all non-noise singular values).
        energy: ``--energy F``: smallest ``k`` keeping ``F`` of ``||delta||_F^2``, at most ``rank`` if given,
            else at most ``min(out, in)`` (the sketch grows by doubling until ``F`` is reached).
        default_rank: the rank when ``rank`` is not given (the caller passes the sum of the input ranks).
        oversample, power_iterations: randomized SVD settings (sketch width ``K + oversample``; power
            iterations default to 2, or 1 with a ``hint``).
        exact_max_dim: modules with ``min(out, in) <= exact_max_dim`` use the exact SVD.
        generator: for the randomized sketch (a fixed-seed generator when absent).
        scale: size of what was merged (e.g. ``sum_i |w_i| ||delta_i||_F``): singular values below
            ``max(s_max, scale) * sqrt(max(out, in)) * eps`` are rounding noise and never kept (entrywise
            rounding errors of a dense result add up like ``sqrt(size) * eps`` in its singular values; numpy's
            ``matrix_rank`` rule ``max(out, in)`` would drop genuine directions of a full-rank merge).
        hint: ``out x h`` columns spanning directions the result is expected to use (the merged adapters'
            stacked ``B`` factors); they seed the randomized sketch (:func:`randomized_svd`).

    Algorithm: exact LAPACK SVD when ``min(out, in) <= exact_max_dim`` or the sketch width is at least
    ``EXACT_RANK_FRACTION * min(out, in)``; otherwise :func:`randomized_svd`.
    """
    check_rank_energy(rank, energy)
    if delta.dim() != 2:
        raise UsageError(f"refactor_dense needs a 2-D delta, got shape {tuple(delta.shape)}")
    if not delta.is_floating_point() or delta.dtype not in (torch.float32, torch.float64):
        delta = delta.float()
    m, n = delta.shape
    full = min(m, n)
    total_sq = float(torch.sum(delta.double() ** 2)) if delta.dtype == torch.float64 else float(delta.norm()) ** 2
    if not math.isfinite(total_sq):
        raise NumericalError("the merged delta contains NaN/Inf; nothing can be re-factored")
    if rank is not None:
        cap = min(rank, full)
    elif energy is not None:
        cap = full
    else:
        cap = full if default_rank is None else max(0, min(default_rank, full))
    if full == 0 or cap == 0 or total_sq == 0.0:
        z = delta.new_zeros
        return Refactored(z(m, 0), z(0, n), 0, 1.0, "exact", torch.zeros(0, dtype=torch.float64))

    width = cap if energy is None else min(cap, max(default_rank or 1, 1))
    while True:
        sketch = min(width + oversample, full)
        if full <= exact_max_dim or sketch >= EXACT_RANK_FRACTION * full:
            if full <= exact_max_dim:
                with single_threaded():
                    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            else:
                u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            algorithm = "exact"
            computed_all = True
        else:
            u, s, vh = randomized_svd(delta, sketch, power_iterations, generator, hint)
            algorithm = "randomized"
            computed_all = u.shape[1] >= full
        floor = noise_floor(s, math.isqrt(max(m, n)) + 1, scale, dtype=delta.dtype)
        k, reached = choose_rank(s, total_sq, cap, energy, floor)
        if reached or computed_all or width >= cap:
            break
        width = min(2 * width, cap)

    kept = float(torch.sum(s[:k].double() ** 2))
    b, a = _balanced(u, s, vh, k)
    return Refactored(b, a, k, min(1.0, kept / total_sq), algorithm, s.double())


def refactor_factored(
    B: torch.Tensor,
    A: torch.Tensor,
    rank: int | None = None,
    energy: float | None = None,
    scale: float = 0.0,
) -> Refactored:
    """Re-factor ``B @ A`` (``out x R`` and ``R x in``) exactly, without the dense product.

    Thin QR of ``B`` and ``A^T`` and an SVD of the ``R x R`` core (:func:`adaptermerge.lowrank.factored_svd`)
    give the exact SVD. ``k``: the numerical rank (values above ``max(s_max, scale) * R * eps``; ``scale`` is
    the size of what was summed, so a sum that cancels comes out as rank 0), then ``--rank`` / ``--energy`` as in
    :func:`refactor_dense`. Cost ``O((out + in) R^2)``.
    """
    check_rank_energy(rank, energy)
    m, n = B.shape[0], A.shape[1]
    if B.shape[1] == 0:
        return Refactored(B.new_zeros(m, 0), A.new_zeros(0, n), 0, 1.0, "factored", torch.zeros(0, dtype=torch.float64))
    with single_threaded():
        fs = factored_svd(B, A)
    s = fs.S
    total_sq = float(torch.sum(s.double() ** 2))
    if not math.isfinite(total_sq):
        raise NumericalError("the merged factors contain NaN/Inf")
    floor = noise_floor(s, B.shape[1], scale, dtype=B.dtype)
    cap = s.numel() if rank is None else min(rank, s.numel())
    k, _ = choose_rank(s, total_sq, cap, energy, floor)
    with single_threaded():
        b, a = fs.factors(k)
    kept = float(torch.sum(s[:k].double() ** 2))
    ke = 1.0 if total_sq == 0.0 else min(1.0, kept / total_sq)
    return Refactored(b, a, k, ke, "factored", s.double())
