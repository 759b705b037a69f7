"""The canonical per-module form and the factored linear algebra on it.

A :class:`LowRank` holds ``A`` (r x in) and ``B`` (out x r) with the adapter's scaling already folded
in, so that ``delta = B @ A`` in the layout of the base weight it updates:

* ``linear``: nn.Linear weight, ``out x in``;
* ``conv1d``: GPT-2 ``Conv1D`` (``fan_in_fan_out``); the factors are in the nn.Linear layout
  (``out x in``) and the stored Conv1D weight (``in x out``) receives ``delta.T``;
* ``embedding``: nn.Embedding weight, ``num_embeddings x embedding_dim``.

Sums of low-rank products are combined and re-ranked without forming the dense ``out x in``
matrix: stack the factors, take thin QR decompositions of both stacks and an SVD of the small
``R x R`` core. Cost ``O((m + n) R^2)`` instead of ``O(m n min(m, n))``.

Example:
    >>> import torch
    >>> from adaptermerge.lowrank import LowRank, factored_svd
    >>> lr = LowRank(A=torch.randn(4, 32), B=torch.randn(16, 4))
    >>> U, S, Vh = factored_svd(lr.B, lr.A)
    >>> torch.allclose((U * S) @ Vh, lr.delta(), atol=1e-4)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

LAYOUTS = ("linear", "conv1d", "embedding")


@dataclass
class LowRank:
    """One module's low-rank update ``delta = B @ A`` with the scaling folded in.

    Attributes:
        A: ``r x in`` factor (fp32 by convention while in memory).
        B: ``out x r`` factor.
        layout: how ``delta`` maps onto the base weight: ``linear``, ``conv1d`` or ``embedding``.
        bias: optional ``(out,)`` bias update (PEFT ``lora_bias``), scaling folded in.
        magnitude: optional DoRA magnitude vector ``(out,)`` (absolute, not a delta).
        scale: the scaling that was folded into ``A`` when reading (``alpha / r``). Only
            factorization-dependent methods (PEFT's ``factor-linear``) use it, to recover PEFT's split.
    """

    A: torch.Tensor
    B: torch.Tensor
    layout: str = "linear"
    bias: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; expected one of {LAYOUTS}")

    @property
    def rank(self) -> int:
        """Number of rank-one terms stored (``A.shape[0]``)."""
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of ``delta`` (``out, in`` in the canonical layout)."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    @property
    def weight_shape(self) -> tuple[int, int]:
        """Shape of the base weight this updates, in its stored layout (``in x out`` for Conv1D)."""
        out, inn = self.shape
        return (inn, out) if self.layout == "conv1d" else (out, inn)

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense update in the canonical (``out x in``) layout. Use only where a dense matrix is needed."""
        return self.B.to(dtype) @ self.A.to(dtype)

    def weight_delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense update in the base weight's stored layout (transposed for Conv1D)."""
        d = self.delta(dtype)
        return d.T if self.layout == "conv1d" else d

    def frobenius_norm(self) -> float:
        """``||B @ A||_F`` computed from the ``r x r`` Gram matrices, without the dense product."""
        a = self.A.double()
        b = self.B.double()
        sq = torch.sum((b.T @ b) * (a @ a.T))
        return float(torch.sqrt(torch.clamp(sq, min=0.0)))

    def to(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> LowRank:
        """A copy with every tensor moved/cast."""

        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        return replace(self, A=mv(self.A), B=mv(self.B), bias=mv(self.bias), magnitude=mv(self.magnitude))

    def is_finite(self) -> bool:
        """True when no tensor holds NaN or Inf."""
        ts = [self.A, self.B, self.bias, self.magnitude]
        return all(bool(torch.isfinite(t).all()) for t in ts if t is not None)


@dataclass
class FactoredSVD:
    """Thin SVD ``U diag(S) Vh`` of ``B @ A`` kept in factored form (batched over leading dims).

    ``U = Qb @ Uc`` and ``Vh = Vhc @ Qa^T`` are formed on demand; :meth:`factors` forms only the kept
    columns, so truncation never materialises the full-width ``U``/``Vh``.
    """

    Qb: torch.Tensor
    Uc: torch.Tensor
    S: torch.Tensor
    Vhc: torch.Tensor
    Qa: torch.Tensor

    @property
    def U(self) -> torch.Tensor:
        return self.Qb @ self.Uc

    @property
    def Vh(self) -> torch.Tensor:
        return self.Vhc @ self.Qa.transpose(-1, -2)

    def factors(self, k: int, index: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank-``k`` factors ``B = U_k S_k^½``, ``A = S_k^½ Vh_k`` (of batch item ``index`` if given)."""
        qb, uc, s, vhc, qa = (self.Qb, self.Uc, self.S, self.Vhc, self.Qa)
        if index is not None:
            qb, uc, s, vhc, qa = qb[index], uc[index], s[index], vhc[index], qa[index]
        root = torch.sqrt(s[..., :k])
        B = qb @ (uc[..., :, :k] * root.unsqueeze(-2))
        A = (root.unsqueeze(-1) * vhc[..., :k, :]) @ qa.transpose(-1, -2)
        return B, A


def stack_factors(
    terms: Sequence[tuple[float, torch.Tensor, torch.Tensor]],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack weighted factors so that ``B_cat @ A_cat == sum_i w_i B_i @ A_i`` exactly.

    ``B_cat = [w_1 B_1 | w_2 B_2 | ...]`` (out x R) and ``A_cat = [A_1; A_2; ...]`` (R x in).
    The weight goes to the A side so that the concatenation matches PEFT's ``cat`` convention
    (it scales ``lora_A``).
    """
    if not terms:
        raise ValueError("stack_factors needs at least one term")
    a = torch.cat([w * A.to(device=device, dtype=dtype) for w, A, _ in terms], dim=0)
    b = torch.cat([B.to(device=device, dtype=dtype) for _, _, B in terms], dim=1)
    return b, a


def factored_svd(B: torch.Tensor, A: torch.Tensor) -> FactoredSVD:
    """Thin SVD of ``B @ A`` without forming it (works on batches ``(..., m, R)`` / ``(..., R, n)``).

    ``B = Q_B R_B`` and ``A^T = Q_A R_A`` (thin QR); ``R_B R_A^T = U_c S V_c^T`` (small SVD);
    then ``B @ A = (Q_B U_c) S (Q_A V_c)^T``.
    """
    qb, rb = torch.linalg.qr(B, mode="reduced")
    qa, ra = torch.linalg.qr(A.transpose(-1, -2), mode="reduced")
    core = rb @ ra.transpose(-1, -2)
    uc, s, vhc = torch.linalg.svd(core, full_matrices=False)
    return FactoredSVD(Qb=qb, Uc=uc, S=s, Vhc=vhc, Qa=qa)


def numerical_rank(S: torch.Tensor, size_hint: int, scale: float = 0.0) -> int:
    """Rank of a spectrum: the number of singular values above ``max(S_max, scale) * size_hint * eps``.

    ``scale`` is the size of what was summed (e.g. ``sum_i |w_i| ||delta_i||_F``): a sum that cancels
    to rounding noise then has rank 0 instead of keeping its noise.
    """
    if S.numel() == 0:
        return 0
    eps = torch.finfo(S.dtype).eps
    tol = max(float(S.max()), scale) * max(size_hint, 1) * eps
    return int((S > tol).sum())


def energy_rank(S: torch.Tensor, energy: float) -> int:
    """Smallest ``k`` whose top-``k`` singular values keep at least ``energy`` of ``sum S^2``."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    sq = S.double() ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 0
    cum = torch.cumsum(sq, 0) / total
    # Tolerate rounding so that energy=1.0 keeps the numerical rank, not a noise floor.
    k = int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=cum.dtype)).item()) + 1
    return min(k, S.numel())


def kept_energy(S: torch.Tensor, k: int) -> float:
    """Fraction of ``sum S^2`` in the top ``k`` singular values (1.0 for a zero spectrum)."""
    sq = S.double() ** 2
    total = float(sq.sum())
    return 1.0 if total == 0.0 else float(sq[:k].sum()) / total
