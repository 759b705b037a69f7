"""The three exact spaces an elementwise method can run in, and the per-module merge driver.

For one module, tasks ``i = 1..T`` with ``delta_i = B_i A_i`` (``out x in``, rank ``r_i``, ``R = sum_i r_i``):

``delta``
    ``rep_i = delta_i`` (dense ``out x in``). The method's dense result goes back to an adapter through the
    shared re-factoring (:func:`adaptermerge.refactor.refactor_dense`): exact SVD or randomized SVD at
    ``--rank`` (default ``min(R, out, in)``) or ``--energy``.

``core`` (Panariello et al., "Accurate and Efficient Low-Rank Model Merging in Core Space", NeurIPS 2025)
    ``U`` = left singular vectors of ``[B_1 .. B_T]`` (``out x R_u``), ``V`` = right singular vectors of
    ``[A_1; ..; A_T]`` (``in x R_v``), ``R_u <= min(out, R)``, ``R_v <= min(in, R)``. Since ``range(B_i)``
    lies in ``range(U)`` and ``range(A_i^T)`` in ``range(V)``, ``delta_i = U M_i V^T`` exactly with the small
    core ``M_i = (U^T B_i)(A_i V)`` (``R_u x R_v``). ``rep_i = M_i``; a merged core ``M`` maps back to the exact
    adapter ``B = U M``, ``A = V^T`` of rank ``<= R`` (then compacted by a QR-core SVD). Never ``out x in``.

    The paper takes the bases from the stored factors. A LoRA split is only defined up to ``(B G, G^-1 A)``
    (and our reader folds ``alpha / r`` into ``A``), so we first balance each task (``B_i = U_i S_i^(1/2)``,
    ``A_i = S_i^(1/2) V_i^T`` from its own QR-core SVD): then ``U U^T``'s spectrum comes from
    ``sum_i (delta_i delta_i^T)^(1/2)`` and the space depends on the deltas alone (not on the factor split
    or the order of the adapters).

``knots`` (Stoica et al., "Model merging with SVD to tie the KnOTS", ICLR 2025)
    ``[delta_1 .. delta_T] = U S [V_1^T .. V_T^T]`` (thin SVD of the ``out x T*in`` concatenation, computed
    from the factors: ``[B_1 .. B_T] = Q_B R_B``, ``A_i^T = Q_i R_i``, SVD of the small core
    ``R_B blockdiag(R_i^T)``). ``rep_i = S V_i^T = U^T delta_i`` (``k x in``, ``k = min(out, R)``): the per-task
    blocks KnOTS merges (its code applies ``S`` to ``V`` before merging, ``s_on_V``). A merged block ``X`` maps
    back to ``B = U``, ``A = X`` exactly.

Linear methods give the same delta in every space (``sum_i w_i U M_i V^T = U (sum_i w_i M_i) V^T``);
elementwise methods (TIES, DARE, ...) differ by design: they act on different coordinates. Elementwise
methods are equivariant to flipping the sign of a basis vector (all tasks' coordinates flip together), so the
sign freedom of the SVD bases does not change their result; a repeated singular value of the stacked factors
leaves a rotation of the basis free, which does.

Example:
    >>> import torch
    >>> from adaptermerge.lowrank import LowRank
    >>> from adaptermerge.methods.task_arithmetic import ELEMENTWISE_METHODS
    >>> g = torch.Generator().manual_seed(0)
    >>> mods = [LowRank(A=torch.randn(r, 30, generator=g), B=torch.randn(20, r, generator=g)) for r in (2, 3)]
    >>> ta = next(m for m in ELEMENTWISE_METHODS if m.name == "task_arithmetic")
    >>> out = merge_module([(0.5, mods[0]), (2.0, mods[1])], ta, ta.params_cls(), space="core")
    >>> exact = 0.5 * mods[0].delta() + 2.0 * mods[1].delta()
    >>> out.rank, bool(torch.allclose(out.B @ out.A, exact, atol=1e-4))
    (5, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adaptermerge.cpu import single_threaded
from adaptermerge.errors import IncompatibleAdapters, UsageError
from adaptermerge.lowrank import LowRank, factored_svd
from adaptermerge.methods.registry import SPACES, Kind, Method
from adaptermerge.refactor import Refactored, refactor_dense, refactor_factored


@dataclass
class Projection:
    """Per-task representations of one module in a space, and the exact way back.

    Attributes:
        space: ``delta``, ``core`` or ``knots``.
        shape: ``(out, in)`` of the module's delta.
        reps: one tensor per task, all of one shape (``out x in``, ``R_u x R_v`` or ``k x in``).
        left: ``out x R_u`` orthonormal basis (core, knots); ``None`` for delta.
        right: ``in x R_v`` orthonormal basis (core); ``None`` otherwise.
        input_ranks: ``r_i`` per task.
    """

    space: str
    shape: tuple[int, int]
    reps: list[torch.Tensor]
    left: torch.Tensor | None
    right: torch.Tensor | None
    input_ranks: list[int]

    def to_factors(self, merged: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact factors ``(B, A)`` with ``B @ A`` = the delta that ``merged`` (a rep-shaped tensor) stands for.

        core: ``B = U M``, ``A = V^T``; knots: ``B = U``, ``A = X``; delta: refused (re-factor the dense result
        with :func:`adaptermerge.refactor.refactor_dense`).
        """
        if self.space == "core":
            return self.left @ merged, self.right.T.contiguous()
        if self.space == "knots":
            return self.left, merged
        raise UsageError("a delta-space result is dense; re-factor it with refactor_dense")

    def to_dense(self, merged: torch.Tensor) -> torch.Tensor:
        """The dense ``out x in`` delta of a merged rep (for tests and small modules only)."""
        if self.space == "delta":
            return merged
        b, a = self.to_factors(merged)
        return b @ a


def _check_modules(mods: Sequence[LowRank]) -> tuple[int, int]:
    if not mods:
        raise UsageError("a module merge needs at least one adapter touching the module")
    shape = mods[0].shape
    for i, m in enumerate(mods):
        if m.shape != shape:
            raise IncompatibleAdapters(f"task {i} has a delta of shape {m.shape}, task 0 has {shape}")
    return shape


def _dtype(mods: Sequence[LowRank], dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    return (
        torch.float64 if all(m.A.dtype == torch.float64 and m.B.dtype == torch.float64 for m in mods) else torch.float32
    )


def delta_space(mods: Sequence[LowRank], dtype: torch.dtype | None = None) -> Projection:
    """``rep_i = B_i @ A_i`` (dense; T matrices of ``out x in``)."""
    shape = _check_modules(mods)
    dt = _dtype(mods, dtype)
    reps = [m.B.to(dt) @ m.A.to(dt) for m in mods]
    return Projection("delta", shape, reps, None, None, [m.rank for m in mods])


def _balanced(m: LowRank, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``B' = U S^(1/2)``, ``A' = S^(1/2) V^T`` with ``B' A' = B A`` (thin QR + SVD of the ``r x r`` core)."""
    fs = factored_svd(m.B.to(dt), m.A.to(dt))
    return fs.factors(fs.S.numel())


def _left_singular_basis(stack: torch.Tensor) -> torch.Tensor:
    """Left singular vectors of a tall-or-wide ``p x R`` matrix: ``p x min(p, R)``, via QR then a small SVD."""
    q, r = torch.linalg.qr(stack, mode="reduced")
    u, _, _ = torch.linalg.svd(r, full_matrices=False)
    return q @ u


def core_space(mods: Sequence[LowRank], dtype: torch.dtype | None = None) -> Projection:
    """Core space: ``delta_i = U M_i V^T`` with ``M_i = (U^T B_i)(A_i V)`` (``R_u x R_v``), exactly.

    ``U``: left singular vectors of the stacked balanced ``B`` factors; ``V``: right singular vectors of the
    stacked balanced ``A`` factors. Cost ``O((out + in) R^2)``.
    """
    shape = _check_modules(mods)
    dt = _dtype(mods, dtype)
    bal = [_balanced(m, dt) for m in mods]
    U = _left_singular_basis(torch.cat([b for b, _ in bal], dim=1))
    V = _left_singular_basis(torch.cat([a for _, a in bal], dim=0).T)
    reps = [(U.T @ b) @ (a @ V) for b, a in bal]
    return Projection("core", shape, reps, U, V, [m.rank for m in mods])


def knots_space(mods: Sequence[LowRank], dtype: torch.dtype | None = None) -> Projection:
    """KnOTS space: ``[delta_1 .. delta_T] = U S [V_1^T .. V_T^T]``, ``rep_i = S V_i^T = U^T delta_i``.

    From the factors: ``[B_1 .. B_T] = Q_B R_B``; ``A_i^T = Q_i R_i``; ``R_B blockdiag(R_i^T) = u s v^T``;
    ``U = Q_B u``; ``rep_i = (u^T R_B[:, cols_i]) A_i``. Cost ``O((out + T in) R^2)``.
    """
    shape = _check_modules(mods)
    dt = _dtype(mods, dtype)
    bs = [m.B.to(dt) for m in mods]
    as_ = [m.A.to(dt) for m in mods]
    qb, rb = torch.linalg.qr(torch.cat(bs, dim=1), mode="reduced")
    cols, blocks, start = [], [], 0
    for b, a in zip(bs, as_, strict=True):
        r = b.shape[1]
        cols.append(rb[:, start : start + r])
        _, ri = torch.linalg.qr(a.T, mode="reduced")
        blocks.append(cols[-1] @ ri.T)
        start += r
    u, _, _ = torch.linalg.svd(torch.cat(blocks, dim=1), full_matrices=False)
    U = qb @ u
    reps = [(u.T @ c) @ a for c, a in zip(cols, as_, strict=True)]
    return Projection("knots", shape, reps, U, None, [m.rank for m in mods])


def project(mods: Sequence[LowRank], space: str, dtype: torch.dtype | None = None) -> Projection:
    """The per-task representations of one module in ``space`` (``delta``, ``core`` or ``knots``)."""
    if space == "delta":
        return delta_space(mods, dtype)
    if space == "core":
        with single_threaded():
            return core_space(mods, dtype)
    if space == "knots":
        with single_threaded():
            return knots_space(mods, dtype)
    raise UsageError(f"unknown space {space!r}; choose one of: {', '.join(SPACES)}")


def merge_module(
    terms: Sequence[tuple[float, LowRank]],
    method: Method,
    params: object,
    space: str = "delta",
    generator: torch.Generator | None = None,
    rank: int | None = None,
    energy: float | None = None,
    dtype: torch.dtype | None = None,
    **refactor_options: object,
) -> Refactored:
    """Merge one module: project, run the method, map back to factors, re-factor.

    Args:
        terms: ``[(w_i, LowRank_i)]`` of the adapters touching the module.
        method: a registered :class:`~adaptermerge.methods.registry.Method` (elementwise or factored).
        params: its params dataclass.
        space: ``delta``, ``core`` or ``knots`` for elementwise methods. Factored methods compute in the core
            space, where they equal their dense definition, so every space gives them the same result.
        generator: for stochastic methods (use ``module_generator(seed, module_name)``).
        rank, energy: output rank rule (see :mod:`adaptermerge.refactor`); delta space defaults to
            ``min(R, out, in)``; core/knots/factored keep the exact numerical rank (``<= R``) unless given.
        dtype: compute dtype (default fp32, fp64 when every factor is fp64).
        refactor_options: passed to :func:`refactor_dense` (``oversample``, ``power_iterations``,
            ``exact_max_dim``, ``hint``). The delta space seeds the randomized sketch with the stacked ``B``
            factors of the inputs (``hint``), which lets one power iteration do the work of two.

    Returns:
        :class:`Refactored` (``B``, ``A``, ``rank``, ``kept_energy``, ``algorithm``).
    """
    if space not in SPACES:
        raise UsageError(f"unknown space {space!r}; choose one of: {', '.join(SPACES)}")
    mods = [m for _, m in terms]
    weights = [w for w, _ in terms]
    if method.kind is Kind.FACTORED:
        _check_modules(mods)
        dt = _dtype(mods, dtype)
        b, a = method.fn([(w, LowRank(A=m.A.to(dt), B=m.B.to(dt))) for w, m in terms], params)
        scale = abs(float(getattr(params, "lambda_", 1.0))) * sum(abs(w) * m.frobenius_norm() for w, m in terms)
        return refactor_factored(b, a, rank, energy, scale=scale)
    proj = project(mods, space, dtype)
    if space == "delta":
        merged = method.fn(proj.reps, weights, params, generator)
    else:
        with single_threaded():  # R x R cores / k x in blocks: small operations
            merged = method.fn(proj.reps, weights, params, generator)
    scale = abs(float(getattr(params, "lambda_", 1.0))) * sum(abs(w) * m.frobenius_norm() for w, m in terms)
    if space == "delta":
        out, inn = proj.shape
        default = min(sum(proj.input_ranks), out, inn)
        hint = torch.cat([m.B for m in mods], dim=1).to(merged.dtype)  # the merged adapters' column spaces
        options = {"hint": hint, **refactor_options}
        return refactor_dense(merged, rank, energy, default_rank=default, scale=scale, **options)
    b, a = proj.to_factors(merged)
    return refactor_factored(b, a, rank, energy, scale=scale)
