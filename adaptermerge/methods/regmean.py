"""RegMean (Jin et al., ICLR 2023): the merge of linear layers that knows what inputs each task feeds them.

For one linear module with base weight ``W0``, task ``i``'s weight ``W_i = W0 + D_i`` (``D_i = B_i A_i``) and
``X_i`` the module's inputs on task ``i``'s examples (one row per token), RegMean takes the weight that maps every
task's inputs as that task's own model does, in least squares::

    W* = argmin_W  sum_i w_i ||X_i W^T - X_i W_i^T||_F^2  =  (sum_i w_i W_i G_i) (sum_i w_i G_i)^-1,   G_i = X_i^T X_i

with the off-diagonal entries of every ``G_i`` scaled by ``alpha`` (the paper's 0.9; 1 is the plain least-squares
solution, 0 the per-feature weighted mean). The weights ``w_i`` (>= 0) weigh each task's squared error; equal
weights give the paper's merge, and the result does not change when every weight is scaled alike.

**The result is an exact adapter.** With ``G = sum_j w_j G_j``: ``W* = W0 G G^-1 + sum_i w_i D_i G_i G^-1``, so
``W* - W0 = sum_i B_i (w_i A_i G_i G^-1)``. The factors ``B' = [B_1 .. B_T]`` and ``A' = [w_1 A_1 G_1 G^-1; ..]``
give it exactly, with rank at most the sum of the adapters' ranks; ``lambda`` scales it. The dense ``out x in``
weight is never formed: the work is ``G`` (``in x in``) and a solve with ``sum r_i`` right-hand sides.

**A task whose adapter leaves the module** has ``W_i = W0`` there, as in the paper's merge of full models (every
model has every layer): its inputs enter ``G`` but it adds no ``D_i``, so it pulls the merge towards ``W0`` where
its inputs live. Data-free methods instead leave such an adapter out of the module.

**Singular G** (``alpha = 1`` with fewer tokens than features, or an input feature that is zero on every token):
the pseudo-inverse, from an eigendecomposition that drops eigenvalues below ``in * eps_fp32 * lambda_max`` (the
inputs are fp32 activations): directions no task's inputs visit keep the base weight. When ``alpha < 1`` and
every feature is non-zero somewhere, ``G >= (1 - alpha) diag(G) > 0`` is positive definite and a Cholesky solve
gives the same answer faster (used when the factorisation's smallest pivot is above the same threshold).

**Modules that are not linear layers** (LoRA on token embeddings) take the paper's rule for such weights: the
weighted mean ``sum_i w_i D_i / sum_j w_j`` over every task.

Terms: a data method's function receives one term per task, ``(w_i, LowRank_i or None, inputs_i)`` where
``inputs_i`` is a :class:`ModuleInputs` (``None`` for a module that is not a linear layer) and ``None`` stands for
a task whose adapter leaves the module; :mod:`adaptermerge.statistics` collects the inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adaptermerge.errors import NumericalError, UsageError
from adaptermerge.methods._lazy import torch
from adaptermerge.methods.catalog import validate_declared
from adaptermerge.methods.registry import BaseMerge, Kind, Method, Param, RankRule, register
from adaptermerge.methods.task_arithmetic import P_LAMBDA

if TYPE_CHECKING:
    from adaptermerge.lowrank import LowRank

P_ALPHA = Param(
    "alpha",
    float,
    0.9,
    "scale of the off-diagonal entries of each task's Gram matrix of module inputs (1: plain least squares; "
    "0: per-feature mean)",
    low=0.0,
    high=1.0,
)


@dataclass(frozen=True)
class RegMeanParams:
    """``regmean``: ``alpha`` (the paper's 0.9), ``lambda``."""

    alpha: float = 0.9
    lambda_: float = 1.0

    def __post_init__(self) -> None:
        validate_declared("regmean", self, (P_ALPHA, P_LAMBDA))


@dataclass
class ModuleInputs:
    """One task's inputs to one linear module, as their rows ``X`` (``tokens x in``) or their Gram ``X^T X``.

    The collector keeps the rows while there are fewer tokens than input features and switches to the Gram matrix
    when that is smaller (see :mod:`adaptermerge.statistics`): memory ``min(tokens, in) * in`` numbers. Several
    modules that read the same tensor (``q/k/v_proj``) share one object.
    """

    rows: Any = None  # torch.Tensor (tokens x in) or None
    gram: Any = None  # torch.Tensor (in x in) or None
    tokens: int = 0

    def __post_init__(self) -> None:
        if (self.rows is None) == (self.gram is None):
            raise ValueError("ModuleInputs holds either rows or a Gram matrix")
        if self.rows is not None and not self.tokens:
            self.tokens = int(self.rows.shape[0])

    @property
    def features(self) -> int:
        return int((self.rows if self.rows is not None else self.gram).shape[-1])

    @property
    def nbytes(self) -> int:
        t = self.rows if self.rows is not None else self.gram
        return int(t.numel() * t.element_size())

    def diagonal(self, device: Any = "cpu") -> torch.Tensor:
        """``diag(X^T X)`` in fp64."""
        if self.rows is not None:
            return (self.rows.to(device=device, dtype=torch.float64) ** 2).sum(0)
        return self.gram.to(device=device, dtype=torch.float64).diagonal().clone()

    def matrix(self, alpha: float, device: Any = "cpu") -> torch.Tensor:
        """``alpha * X^T X + (1 - alpha) * diag(X^T X)`` in fp64 (``in x in``)."""
        if self.rows is not None:
            x = self.rows.to(device=device, dtype=torch.float64)
            g = x.T @ x
        else:
            g = self.gram.to(device=device, dtype=torch.float64, copy=True)
        if alpha != 1.0:
            d = g.diagonal().clone()
            g.mul_(alpha)
            g.diagonal().add_((1.0 - alpha) * d)
        return g

    def times(self, a: torch.Tensor, alpha: float) -> torch.Tensor:
        """``a @ (alpha * X^T X + (1 - alpha) * diag)`` for ``a`` (``r x in``), in fp64 on ``a``'s device, without
        the ``in x in`` matrix when the rows are kept."""
        a = a.double()
        if self.rows is not None:
            x = self.rows.to(device=a.device, dtype=torch.float64)
            out = alpha * ((a @ x.T) @ x)
        else:
            out = alpha * (a @ self.gram.to(device=a.device, dtype=torch.float64))
        if alpha != 1.0:
            out += (1.0 - alpha) * a * self.diagonal(a.device)
        return out


Term = tuple[float, "LowRank | None", "ModuleInputs | None"]


def regmean(terms: Sequence[Term], params: RegMeanParams) -> tuple[torch.Tensor, torch.Tensor]:
    """RegMean's exact factors ``(B', A')`` for one module (see the module docstring), in the adapters' dtype and
    device (the algebra runs in fp64).

    ``terms``: one ``(w_i, LowRank_i or None, ModuleInputs_i or None)`` per task.
    """
    weights = _check_weights([w for w, _, _ in terms])
    alpha, scale = float(params.alpha), float(params.lambda_)
    present = [(w, m, x) for w, m, x in terms if m is not None]
    if not present:
        raise UsageError("regmean: no adapter touches this module")
    dtype, device = present[0][1].A.dtype, present[0][1].A.device
    if any(x is None for _, _, x in terms):
        b, a = _weighted_mean(present, sum(weights))
    else:
        b, a = _least_squares(terms, present, alpha)
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        raise NumericalError("regmean produced non-finite values; check the adapters and task inputs for NaN/Inf")
    return b.to(device=device, dtype=dtype), (scale * a).to(device=device, dtype=dtype)


def _check_weights(weights: list[float]) -> list[float]:
    if any(w < 0 for w in weights):
        raise UsageError(
            f"regmean weighs each task's squared error by its weight, so weights must be >= 0, got {weights}"
        )
    if sum(weights) <= 0:
        raise UsageError("regmean needs at least one positive weight")
    return weights


def _weighted_mean(present: list[Term], total: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Modules that are not linear layers: ``sum_i w_i D_i / sum_j w_j`` as stacked factors."""
    b = torch.cat([m.B.double() for _, m, _ in present], dim=1)
    a = torch.cat([(w / total) * m.A.double() for w, m, _ in present], dim=0)
    return b, a


def _least_squares(terms: Sequence[Term], present: list[Term], alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``B' = [B_i]``, ``A' = [w_i A_i G_i' G^+]`` with ``G = sum_j w_j G_j'`` over every task."""
    features = {x.features for _, _, x in terms} | {m.shape[1] for _, m, _ in present}
    if len(features) != 1:
        raise UsageError(f"regmean: the task inputs and the adapters disagree on the input width ({sorted(features)})")
    device = present[0][1].A.device
    g = None
    for w, _, x in terms:
        if w:
            g = w * x.matrix(alpha, device) if g is None else g.add_(w * x.matrix(alpha, device))
    p = torch.cat([w * x.times(m.A, alpha) for w, m, x in present], dim=0)  # R x in
    a = solve_gram(g, p)
    b = torch.cat([m.B.double() for _, m, _ in present], dim=1)
    return b, a


def solve_gram(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``p @ g^+`` for a symmetric positive semi-definite ``g`` (fp64): a Cholesky solve when ``g`` is safely
    positive definite, else the pseudo-inverse with eigenvalues below ``n * eps_fp32 * lambda_max`` dropped."""
    n = g.shape[0]
    tol = n * torch.finfo(torch.float32).eps
    lam_max = float(torch.linalg.matrix_norm(g, ord=2)) if n <= 64 else float(g.diagonal().sum())
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0 and lam_max > 0 and float(chol.diagonal().min()) ** 2 > tol * lam_max:
        return torch.cholesky_solve(p.T, chol).T
    vals, vecs = torch.linalg.eigh(g)
    top = float(vals.max()) if vals.numel() else 0.0
    keep = vals > tol * top
    if not bool(keep.any()):
        return torch.zeros_like(p)
    v = vecs[:, keep]
    return ((p @ v) / vals[keep]) @ v.T


register(
    Method(
        name="regmean",
        title="RegMean: the least-squares merge of each linear layer on every task's inputs (needs --base, --task)",
        paper="Jin et al. (ICLR 2023), Dataless Knowledge Fusion by Merging Weights of Language Models",
        url="https://arxiv.org/abs/2212.09849",
        formula="W* = (sum_i w_i W_i G_i)(sum_i w_i G_i)^-1, G_i = X_i^T X_i with off-diagonals * alpha;  "
        "delta = lambda * sum_i B_i (w_i A_i G_i G^-1)  (exact, rank <= sum of ranks; G singular: pseudo-inverse)",
        kind=Kind.FACTORED,
        rank_rule=RankRule.EXACT,
        base_merge=BaseMerge.STACKED,
        fn=regmean,
        params=(P_ALPHA, P_LAMBDA),
        data=("base", "tasks"),
        params_cls=RegMeanParams,
        relative_weights=True,
    )
)
