"""Strategies and dense references shared by the method tests (small tensors, fp64 where exactness is checked)."""

from __future__ import annotations

import torch
from hypothesis import settings
from hypothesis import strategies as st

from adaptermerge.lowrank import LowRank

SETTINGS = settings(max_examples=25, deadline=None)
FEW = settings(max_examples=10, deadline=None)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@st.composite
def task_tensors(draw, min_t: int = 1, max_t: int = 4, dtype: torch.dtype = torch.float64, max_dim: int = 9):
    """``T`` same-shape random matrices (distinct magnitudes almost surely) and non-zero weights."""
    seed = draw(st.integers(0, 2**31 - 1))
    t = draw(st.integers(min_t, max_t))
    shape = (draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim)))
    g = gen(seed)
    tensors = [torch.randn(shape, generator=g, dtype=dtype) for _ in range(t)]
    weights = [draw(st.floats(-2, 2).filter(lambda x: abs(x) > 1e-2)) for _ in range(t)]
    return tensors, weights


@st.composite
def lowrank_terms(draw, min_t: int = 1, max_t: int = 4, max_dim: int = 12, max_rank: int = 4):
    """Weighted LoRA factors of one module, mixed ranks, fp64 (R may exceed out or in)."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = gen(seed)
    t = draw(st.integers(min_t, max_t))
    out, inn = draw(st.integers(2, max_dim)), draw(st.integers(2, max_dim))
    terms = []
    for _ in range(t):
        r = draw(st.integers(1, max_rank))
        w = draw(st.floats(-2, 2).filter(lambda x: abs(x) > 1e-2))
        terms.append(
            (
                w,
                LowRank(
                    A=torch.randn(r, inn, generator=g, dtype=torch.float64),
                    B=torch.randn(out, r, generator=g, dtype=torch.float64),
                ),
            )
        )
    return terms


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / max(float(b.double().norm()), 1e-300))


def dense_sum(terms) -> torch.Tensor:
    return sum(w * m.delta(torch.float64) for w, m in terms)


def ranks_sum(terms) -> int:
    return sum(m.rank for _, m in terms)


def reference_topk(a: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly k entries: larger magnitude first, equal magnitudes by lower flat index (a stable sort)."""
    flat = a.reshape(-1)
    order = torch.argsort(-flat, stable=True)
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.reshape(a.shape)


def reference_ties(trimmed: list[torch.Tensor], weights: list[float], normalize: bool = True) -> torch.Tensor:
    """TIES election + disjoint merge, one entry at a time in plain Python (the spec, written naively)."""
    out = torch.zeros_like(trimmed[0], dtype=torch.float64)
    flat = [t.reshape(-1).tolist() for t in trimmed]
    res = out.view(-1)
    for j in range(res.numel()):
        taus = [w * f[j] for w, f in zip(weights, flat)]
        elected = 1.0 if sum(taus) >= 0 else -1.0
        num = sum(x for x in taus if x * elected > 0)
        den = sum(abs(w) for w, x in zip(weights, taus) if x * elected > 0)
        res[j] = (num / den if den > 0 else 0.0) if normalize else num
    return out
