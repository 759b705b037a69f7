"""Subspace methods in factored form: TSV-Merge, Iso-C, Iso-CTS, WUDI.

Each method has two entry points:

* ``<name>_matrices(mats, weights, params, budget=None) -> Tensor``: the definition on a list of dense
  same-shape matrices (``tau_i = w_i * mats[i]``), used on the small core-space cores and, in the tests, on
  full dense deltas as the reference.
* ``<name>(terms, params) -> (B, A)``: the adapter form, ``terms = [(w_i, LowRank_i)]`` of one module. It
  projects the tasks into the core space (:func:`adaptermerge.methods.spaces.core_space`:
  ``delta_i = U M_i V^T``, ``M_i`` of ``R_u x R_v``), applies ``<name>_matrices`` to the cores, and returns the
  exact factors of ``U M V^T`` (rank ``<= R``), never forming an ``out x in`` matrix.

The two agree exactly because every step is equivariant under orthonormal embeddings: for ``U``, ``V`` with
orthonormal columns, ``svd(U M V^T) = (U u) s (V v)^T``, ``polar(U X) = U polar(X)``, projections and Gram
matrices transform alike, and the rank budget is the same number ``min(R, out, in) = min(R_u, R_v)`` in both.

Weights scale the task vectors before the method (``tau_i = w_i delta_i``); ``lambda`` scales the result.
Singular values at rounding-noise level (``<= s_max * size * eps``) count as zero everywhere: a rank-r task
has r singular triplets, not ``min(out, in)``, and a zero direction has no defined singular vectors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adaptermerge.cpu import single_threaded
from adaptermerge.errors import NumericalError, UsageError
from adaptermerge.lowrank import LowRank
from adaptermerge.methods.catalog import validate_declared
from adaptermerge.methods.registry import BaseMerge, Kind, Method, Param, RankRule, register
from adaptermerge.methods.spaces import Projection, core_space
from adaptermerge.methods.task_arithmetic import P_LAMBDA, check_inputs

Terms = Sequence[tuple[float, LowRank]]

P_KEEP = Param(
    "keep",
    float,
    None,
    "share of the module's rank budget min(R, out, in) each task keeps (default 1/T)",
    low=0.0,
    high=1.0,
    open_low=True,
)
P_COMMON = Param(
    "common_fraction",
    float,
    0.8,
    "share of the rank budget taken by the top directions of the task-arithmetic sum",
    low=0.0,
    high=1.0,
)


@dataclass(frozen=True)
class TsvParams:
    """``tsv``: ``keep`` (share of the rank budget per task; ``None`` = ``1/T``), ``lambda``."""

    keep: float | None = None
    lambda_: float = 1.0

    def __post_init__(self) -> None:
        validate_declared("tsv", self, (P_KEEP, P_LAMBDA))


@dataclass(frozen=True)
class IsoCParams:
    """``iso_c``: ``lambda``."""

    lambda_: float = 1.0

    def __post_init__(self) -> None:
        validate_declared("iso_c", self, (P_LAMBDA,))


@dataclass(frozen=True)
class IsoCtsParams:
    """``iso_cts``: ``common_fraction`` (paper: 0.8), ``lambda``."""

    common_fraction: float = 0.8
    lambda_: float = 1.0

    def __post_init__(self) -> None:
        validate_declared("iso_cts", self, (P_COMMON, P_LAMBDA))


@dataclass(frozen=True)
class WudiParams:
    """``wudi``: ``lambda``."""

    lambda_: float = 1.0

    def __post_init__(self) -> None:
        validate_declared("wudi", self, (P_LAMBDA,))


# -------------------------------------------------------------------------------------------- linear algebra


def _noise(s: torch.Tensor, size: int, scale: float = 0.0) -> float:
    smax = float(s.max()) if s.numel() else 0.0
    return max(smax, scale) * max(size, 1) * torch.finfo(s.dtype).eps


def svd_triplets(x: torch.Tensor, k: int | None = None, scale: float = 0.0):
    """Thin SVD of ``x`` keeping at most ``k`` triplets with singular values above rounding noise."""
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    n = int((s > _noise(s, max(x.shape), scale)).sum())
    if k is not None:
        n = min(n, k)
    return u[:, :n], s[:n], vh[:n]


def polar(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor ``P Q^T`` of ``x = P diag(s) Q^T`` (thin SVD): the nearest matrix with
    orthonormal columns (rows, for a wide ``x``) in Frobenius norm. Used by TSV/Iso-CTS to orthogonalise the
    concatenated singular vectors."""
    if x.numel() == 0:
        return x.clone()
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def _weighted(mats: Sequence[torch.Tensor], weights: Sequence[float]) -> list[torch.Tensor]:
    ws = check_inputs(mats, weights)
    if mats[0].dim() != 2:
        raise UsageError(f"subspace methods take matrices, got shape {tuple(mats[0].shape)}")
    dt = torch.float64 if mats[0].dtype == torch.float64 else torch.float32
    return [w * m.to(dt) for w, m in zip(ws, mats, strict=True)]


def _finish(x: torch.Tensor, lambda_: float, method: str) -> torch.Tensor:
    if lambda_ != 1.0:
        x = x * lambda_
    if not bool(torch.isfinite(x).all()):
        raise NumericalError(f"{method} produced non-finite values; check the inputs for NaN/Inf")
    return x


def _budget(mats: Sequence[torch.Tensor], budget: int | None) -> int:
    full = min(mats[0].shape)
    return full if budget is None else max(0, min(int(budget), full))


# ------------------------------------------------------------------------------------------------- TSV


def tsv_matrices(
    mats: Sequence[torch.Tensor], weights: Sequence[float], params: TsvParams = TsvParams(), budget: int | None = None
) -> torch.Tensor:
    """TSV-Merge (Gargiulo et al., CVPR 2025, Sec. 4, "TSV-M") on dense matrices.

    1. per task ``tau_i = w_i mats_i = U_i S_i V_i^T``; keep its top ``k = floor(keep * budget)`` triplets
       (default ``floor(budget / T)``; fewer when ``tau_i`` has lower rank);
    2. concatenate ``U_cat = [U_1,k .. U_T,k]``, ``S_cat``, ``V_cat = [V_1,k .. V_T,k]``;
    3. orthogonalise: ``U_perp = polar(U_cat)``, ``V_perp = polar(V_cat)`` (``P Q^T`` of their SVDs);
    4. ``out = lambda * U_perp diag(S_cat) V_perp^T``.

    ``budget`` defaults to ``min(out, in)`` of the matrices (the reference code's ``s.shape[0]``).
    """
    taus = _weighted(mats, weights)
    t = len(taus)
    b = _budget(mats, budget)
    k = b // t if params.keep is None else math.floor(params.keep * b + 1e-9)
    us, ss, vhs = [], [], []
    for tau in taus:
        u, s, vh = svd_triplets(tau, k)
        us.append(u)
        ss.append(s)
        vhs.append(vh)
    s_cat = torch.cat(ss)
    if s_cat.numel() == 0:
        return torch.zeros_like(taus[0])
    u_perp = polar(torch.cat(us, dim=1))
    vh_perp = polar(torch.cat(vhs, dim=0))
    return _finish((u_perp * s_cat) @ vh_perp, params.lambda_, "tsv")


# ----------------------------------------------------------------------------------------------- Iso-C/CTS


def iso_c_matrices(
    mats: Sequence[torch.Tensor], weights: Sequence[float], params: IsoCParams = IsoCParams(), budget: int | None = None
) -> torch.Tensor:
    """Iso-C (Marczak et al., ICML 2025, Sec. 4.1) on dense matrices.

    ``sum_i tau_i = U S V^T`` with ``r`` non-zero singular values; ``out = lambda * mean(s_1..s_r) U_r V_r^T``
    (only the non-zero spectrum is made isotropic: a rank-R sum has R values, the rest are not directions).
    """
    taus = _weighted(mats, weights)
    total = torch.stack(taus).sum(0)
    scale = sum(float(t.norm()) for t in taus)
    u, s, vh = svd_triplets(total, None, scale)
    if s.numel() == 0:
        return torch.zeros_like(total)
    return _finish(s.mean() * (u @ vh), params.lambda_, "iso_c")


def iso_cts_split(budget: int, tasks: int, common_fraction: float) -> tuple[int, int]:
    """Iso-CTS sizes (reference code ``iso_cts``): ``k_c = floor(budget * common_fraction)``; the task-specific
    total ``round((budget - k_c) / T) * T`` is made divisible by ``T``; ``k_c = budget - that``. Returns
    ``(k_c, per_task)``.

    When that total exceeds the budget (``T > budget``, e.g. three adapters on a 2 x 2 module) the reference
    code's common size goes negative (``u[:, :-1]``); we use the largest multiple of ``T`` within the budget.
    """
    common = math.floor(budget * common_fraction + 1e-9)
    specific_total = round((budget - common) / tasks) * tasks
    if specific_total > budget:
        specific_total = (budget // tasks) * tasks
    return budget - specific_total, specific_total // tasks


def iso_cts_matrices(
    mats: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: IsoCtsParams = IsoCtsParams(),
    budget: int | None = None,
) -> torch.Tensor:
    """Iso-CTS (Marczak et al., ICML 2025, Sec. 4.2, Alg. 1) on dense matrices.

    1. common subspace: ``sum_i tau_i = U S V^T``; keep the top ``k_c`` triplets (:func:`iso_cts_split`);
    2. task-specific: ``tau_i - U_c U_c^T tau_i`` (the part outside the common left subspace), its top
       ``per_task`` triplets;
    3. concatenate common and task-specific ``U``, ``S``, ``V``; orthogonalise ``U`` and ``V`` with their polar
       factors;
    4. isotropic spectrum: ``out = lambda * mean(S_cat) U_perp V_perp^T``.

    Directions with zero singular value are not kept (a rank-r residual gives at most r), so the output
    rank can be below ``budget``; ``budget`` defaults to ``min(out, in)`` (the reference code's ``min(shape)``).
    """
    taus = _weighted(mats, weights)
    b = _budget(mats, budget)
    k_c, per_task = iso_cts_split(b, len(taus), params.common_fraction)
    total = torch.stack(taus).sum(0)
    scale = sum(float(t.norm()) for t in taus)
    u_c, s_c, vh_c = svd_triplets(total, k_c, scale)
    us, ss, vhs = [u_c], [s_c], [vh_c]
    if per_task > 0:
        for tau in taus:
            resid = tau - u_c @ (u_c.T @ tau)
            u, s, vh = svd_triplets(resid, per_task, float(tau.norm()))
            us.append(u)
            ss.append(s)
            vhs.append(vh)
    s_cat = torch.cat(ss)
    if s_cat.numel() == 0:
        return torch.zeros_like(total)
    u_perp = polar(torch.cat(us, dim=1))
    vh_perp = polar(torch.cat(vhs, dim=0))
    return _finish(s_cat.mean() * (u_perp @ vh_perp), params.lambda_, "iso_cts")


# ------------------------------------------------------------------------------------------------- WUDI


def wudi_matrices(
    mats: Sequence[torch.Tensor], weights: Sequence[float], params: WudiParams = WudiParams(), budget: int | None = None
) -> torch.Tensor:
    """WUDI-Merging (Cheng et al., ICML 2025, "Whoever Started the Interference Should End It: Guiding Data-Free
    Model Merging via Task Vectors", Eq. 10) solved in closed form.

    Objective: ``min_D  L(D) = sum_i ||(D - tau_i) tau_i^T||_F^2 / c_i``, ``c_i = ||tau_i||_F^2`` (tasks with
    ``c_i = 0`` do not enter). With ``G_i = tau_i^T tau_i``:
    ``L(D) = sum_i tr((D - tau_i) G_i (D - tau_i)^T) / c_i``, a convex quadratic with gradient
    ``dL/dD = 2 (D Y - X)``, ``Y = sum_i G_i / c_i``, ``X = sum_i tau_i G_i / c_i``. Minimisers solve ``D Y = X``.
    ``Y`` is singular outside ``span_i rowspace(tau_i)``, and the rows of ``X`` lie in that span, so
    ``D* = X Y^+`` solves it and is the minimiser of least norm (adding rows in ``null(Y)`` does not change
    ``L``). The paper runs Adam from ``D = sum_i tau_i``; gradient descent from there never leaves the span and
    converges to ``D*``. ``D*``'s columns lie in ``span_i colspace(tau_i)``, so for adapters ``D* = U M V^T``
    with an ``R x R`` core: the method lives in the core space. Solved in fp64 (``Y^+`` by
    ``torch.linalg.pinv(hermitian=True)``). ``out = lambda * D*``.
    """
    taus = _weighted(mats, weights)
    dt = taus[0].dtype
    n = taus[0].shape[1]
    y = torch.zeros(n, n, dtype=torch.float64, device=taus[0].device)
    x = torch.zeros(taus[0].shape, dtype=torch.float64, device=taus[0].device)
    for tau in taus:
        t = tau.double()
        c = float(torch.sum(t * t))
        if c == 0.0:
            continue
        g = t.T @ t
        y += g / c
        x += (t @ g) / c
    d = x @ torch.linalg.pinv(y, hermitian=True)
    return _finish(d.to(dt), params.lambda_, "wudi")


# -------------------------------------------------------------------------------------------- factored form


def core_factors(proj: Projection, core: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact balanced factors of ``U core V^T`` at its numerical rank: ``core = u s v^T`` (small SVD),
    ``B = U u sqrt(s)``, ``A = sqrt(s) v^T V^T``."""
    u, s, vh = svd_triplets(core)
    root = torch.sqrt(s)
    return proj.left @ (u * root), (root.unsqueeze(1) * vh) @ proj.right.T


def _factored(terms: Terms, fn, params) -> tuple[torch.Tensor, torch.Tensor]:
    if not terms:
        raise UsageError("a module merge needs at least one adapter touching the module")
    with single_threaded():  # everything here is a small LAPACK call or an R x R product
        proj = core_space([m for _, m in terms])
        budget = min(proj.reps[0].shape)
        core = fn(proj.reps, [w for w, _ in terms], params, budget)
        return core_factors(proj, core)


def tsv(terms: Terms, params: TsvParams = TsvParams()) -> tuple[torch.Tensor, torch.Tensor]:
    """TSV-Merge of one module in factored form (:func:`tsv_matrices` on the core-space cores)."""
    return _factored(terms, tsv_matrices, params)


def iso_c(terms: Terms, params: IsoCParams = IsoCParams()) -> tuple[torch.Tensor, torch.Tensor]:
    """Iso-C of one module in factored form (:func:`iso_c_matrices` on the cores)."""
    return _factored(terms, iso_c_matrices, params)


def iso_cts(terms: Terms, params: IsoCtsParams = IsoCtsParams()) -> tuple[torch.Tensor, torch.Tensor]:
    """Iso-CTS of one module in factored form (:func:`iso_cts_matrices` on the cores, budget ``min(R, out, in)``)."""
    return _factored(terms, iso_cts_matrices, params)


def wudi(terms: Terms, params: WudiParams = WudiParams()) -> tuple[torch.Tensor, torch.Tensor]:
    """WUDI of one module in factored form: the closed form :func:`wudi_matrices` on the ``R x R`` cores."""
    return _factored(terms, wudi_matrices, params)


# ------------------------------------------------------------------------------------------------ table


def _info(name: str, title: str, paper: str, url: str, formula: str, fn, cls: type, params: tuple) -> Method:
    """A subspace method's declaration: factored (exact in the core space), at its numerical rank."""
    return Method(
        name=name,
        title=title,
        paper=paper,
        url=url,
        formula=formula,
        kind=Kind.FACTORED,
        rank_rule=RankRule.EXACT,
        base_merge=BaseMerge.ADAPTER,
        fn=fn,
        params=params,
        params_cls=cls,
    )


SUBSPACE_METHODS: tuple[Method, ...] = (
    _info(
        "tsv",
        "Task Singular Vectors: each task's top singular triplets, orthogonalised, summed",
        "Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, CVPR 2025",
        "https://arxiv.org/abs/2412.00081",
        "tau_i = w_i delta_i = U_i S_i V_i^T, top k = floor(keep * min(R, out, in)) each (keep = 1/T); "
        "out = lambda * polar([U_1,k ..]) diag([S_1,k ..]) polar([V_1,k ..])^T, polar(X) = P Q^T of svd(X)",
        tsv,
        TsvParams,
        (P_KEEP, P_LAMBDA),
    ),
    _info(
        "iso_c",
        "Iso-C: the task-arithmetic sum with its non-zero singular values replaced by their mean",
        "Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces, "
        "ICML 2025",
        "https://arxiv.org/abs/2502.04959",
        "sum_i w_i delta_i = U S V^T (r non-zero values); out = lambda * mean(s_1..s_r) U_r V_r^T",
        iso_c,
        IsoCParams,
        (P_LAMBDA,),
    ),
    _info(
        "iso_cts",
        "Iso-CTS: common top directions of the sum plus each task's own, orthogonalised, isotropic spectrum",
        "Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces, "
        "ICML 2025",
        "https://arxiv.org/abs/2502.04959",
        "budget b = min(R, out, in); k_c = b - round((b - floor(b f)) / T) T common triplets of sum_i tau_i; "
        "(b - k_c)/T triplets of each tau_i - U_c U_c^T tau_i; out = lambda * mean(S_cat) polar(U_cat) polar(V_cat)^T",
        iso_cts,
        IsoCtsParams,
        (P_COMMON, P_LAMBDA),
    ),
    _info(
        "wudi",
        "WUDI: data-free interference minimisation, closed form in the core space",
        "Cheng et al., Whoever Started the Interference Should End It: Guiding Data-Free Model Merging via Task "
        "Vectors, ICML 2025",
        "https://arxiv.org/abs/2503.08099",
        "argmin_D sum_i ||(D - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2 = (sum_i tau_i G_i / c_i)(sum_i G_i / c_i)^+, "
        "G_i = tau_i^T tau_i, c_i = ||tau_i||_F^2, tau_i = w_i delta_i; out = lambda * D",
        wudi,
        WudiParams,
        (P_LAMBDA,),
    ),
)

for _m in SUBSPACE_METHODS:
    register(_m)
