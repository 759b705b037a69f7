"""The exact spaces: representations are exact, task arithmetic agrees across spaces, elementwise methods map
back to exact adapters of rank <= R, and the core space depends on the deltas only."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from adaptermerge.errors import IncompatibleAdapters, UsageError
from adaptermerge.lowrank import LowRank
from adaptermerge.methods.spaces import core_space, delta_space, knots_space, merge_module, project
from adaptermerge.methods.task_arithmetic import ELEMENTWISE_METHODS, DareParams, TaskArithmeticParams, TiesParams
from tests.methods.helpers import FEW, SETTINGS, dense_sum, gen, lowrank_terms, ranks_sum, rel
from tests.methods.test_task_arithmetic import IDENTITY_PARAMS, SPARSE_PARAMS

BY_NAME = {m.name: m for m in ELEMENTWISE_METHODS}
SPACES = ["delta", "core", "knots"]


def _orthonormal(q: torch.Tensor) -> bool:
    eye = torch.eye(q.shape[1], dtype=q.dtype)
    return bool(torch.allclose(q.T @ q, eye, atol=1e-10))


@SETTINGS
@given(terms=lowrank_terms())
def test_representations_are_exact(terms):
    mods = [m for _, m in terms]
    core = core_space(mods)
    knots = knots_space(mods)
    out, inn = mods[0].shape
    big_r = ranks_sum(terms)
    assert _orthonormal(core.left) and _orthonormal(core.right) and _orthonormal(knots.left)
    assert core.reps[0].shape[0] <= min(out, big_r) and core.reps[0].shape[1] <= min(inn, big_r)
    assert knots.reps[0].shape[0] <= min(out, big_r) and knots.reps[0].shape[1] == inn
    for m, mc, mk in zip(mods, core.reps, knots.reps):
        d = m.delta(torch.float64)
        assert rel(core.left @ mc @ core.right.T, d) < 1e-10
        assert rel(knots.left @ mk, d) < 1e-10


@SETTINGS
@given(terms=lowrank_terms(min_t=2))
def test_knots_reps_are_s_times_v_blocks(terms):
    """rep_i = S V_i^T: the concatenated reps have orthogonal rows with norms = the singular values of the
    concatenation [delta_1 .. delta_T]."""
    knots = knots_space([m for _, m in terms])
    cat = torch.cat(knots.reps, dim=1)
    gram = cat @ cat.T
    s = torch.linalg.svdvals(torch.cat([m.delta(torch.float64) for _, m in terms], dim=1))
    k = gram.shape[0]
    torch.testing.assert_close(gram, torch.diag(s[:k] ** 2), atol=1e-9 * float(s[0] ** 2), rtol=0)


@SETTINGS
@given(terms=lowrank_terms(), space=st.sampled_from(SPACES))
def test_task_arithmetic_is_the_same_exact_sum_in_every_space(terms, space):
    p = TaskArithmeticParams(lambda_=0.7)
    out = merge_module(terms, BY_NAME["task_arithmetic"], p, space=space)
    exact = 0.7 * dense_sum(terms)
    assert rel(out.B @ out.A, exact) < 1e-9
    assert out.rank <= min(ranks_sum(terms), *exact.shape)
    assert out.kept_energy == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("name", sorted(IDENTITY_PARAMS))
@pytest.mark.parametrize("space", SPACES)
@FEW
@given(terms=lowrank_terms(max_t=1))
def test_one_adapter_weight_one_density_one_returns_it_in_every_space(name, space, terms):
    ((_, m),) = terms
    out = merge_module([(1.0, m)], BY_NAME[name], IDENTITY_PARAMS[name], space=space, generator=gen(0))
    assert rel(out.B @ out.A, m.delta(torch.float64)) < 1e-9


@pytest.mark.parametrize("name", sorted(SPARSE_PARAMS))
@pytest.mark.parametrize("space", ["core", "knots"])
@FEW
@given(terms=lowrank_terms(min_t=2))
def test_small_spaces_map_back_exactly_at_rank_at_most_r(name, space, terms):
    """The adapter returned is exactly U merged V^T (core) / U merged (knots), never more than R."""
    method = BY_NAME[name]
    p = SPARSE_PARAMS[name]
    out = merge_module(terms, method, p, space=space, generator=gen(1))
    proj = project([m for _, m in terms], space)
    merged = method.fn(proj.reps, [w for w, _ in terms], p, gen(1))
    expected = proj.to_dense(merged)
    assert rel(out.B @ out.A, expected) < 1e-9 or float(expected.norm()) < 1e-12
    assert out.rank <= ranks_sum(terms)
    assert bool(torch.isfinite(out.B).all() and torch.isfinite(out.A).all())


@SETTINGS
@given(terms=lowrank_terms(min_t=2), seed=st.integers(0, 2**31 - 1))
def test_core_space_depends_on_the_deltas_only(terms, seed):
    """Re-splitting every adapter as (B G, G^-1 A) and reversing their order leaves TIES in core space unchanged
    (the balanced bases are functions of the deltas; sign flips of basis vectors do not change TIES)."""
    g = gen(seed)
    resplit = []
    for w, m in reversed(terms):
        q = torch.linalg.qr(torch.randn(m.rank, m.rank, generator=g, dtype=torch.float64)).Q
        d = torch.diag(torch.rand(m.rank, generator=g, dtype=torch.float64) + 0.5)
        gmat = q @ d
        resplit.append((w, LowRank(A=torch.linalg.solve(gmat, m.A), B=m.B @ gmat)))
    p = TiesParams(density=0.5)
    a = merge_module(terms, BY_NAME["ties"], p, space="core")
    b = merge_module(resplit, BY_NAME["ties"], p, space="core")
    assert rel(b.B @ b.A, a.B @ a.A) < 1e-7


def _eig_desc(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    vals, vecs = torch.linalg.eigh(m)
    return vals.flip(0), vecs.flip(1)


def _gram_roots(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d d^T)^(1/2) = U S U^T`` and ``(d^T d)^(1/2) = V S V^T`` from the dense SVD of ``d``."""
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    k = int((s > 1e-12 * s[0]).sum())
    u, s, v = u[:, :k], s[:k], vh[:k].T
    return (u * s) @ u.T, (v * s) @ v.T


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_core_space_bases_are_the_singular_vectors_of_the_stacked_factors(seed):
    """Against a dense reference: with every task balanced (B_i = U_i S_i^(1/2)), the stacked B's left singular
    vectors are the eigenvectors of sum_i (delta_i delta_i^T)^(1/2), the stacked A's right singular vectors those
    of sum_i (delta_i^T delta_i)^(1/2) (Panariello et al., 2025); the cores are U^T delta_i V."""
    g = gen(seed)
    mods = [LowRank(A=torch.randn(r, 12, generator=g, dtype=torch.float64),
                    B=torch.randn(10, r, generator=g, dtype=torch.float64)) for r in (2, 3)]  # fmt: skip
    deltas = [m.B @ m.A for m in mods]
    core = core_space(mods)
    roots = [_gram_roots(d) for d in deltas]
    for basis, side in ((core.left, 0), (core.right, 1)):
        vals, vecs = _eig_desc(sum(r[side] for r in roots))
        k = int((vals > 1e-9 * vals[0]).sum())
        assert k == 5 and basis.shape[1] == 5
        overlap = (basis.T @ vecs[:, :k]).abs()  # singular vectors up to sign: |U^T E| = I
        torch.testing.assert_close(overlap, torch.eye(k, dtype=torch.float64), atol=1e-8, rtol=0)
    for d, rep in zip(deltas, core.reps):
        torch.testing.assert_close(rep, core.left.T @ d @ core.right, atol=1e-10, rtol=0)


def test_elementwise_methods_differ_across_spaces_by_design():
    g = gen(0)
    terms = [(0.5, LowRank(A=torch.randn(4, 24, generator=g), B=torch.randn(20, 4, generator=g))) for _ in range(3)]
    outs = {s: merge_module(terms, BY_NAME["ties"], TiesParams(density=0.3), space=s) for s in SPACES}
    dense = {s: o.B @ o.A for s, o in outs.items()}
    assert rel(dense["core"], dense["delta"]) > 1e-3 and rel(dense["knots"], dense["core"]) > 1e-3


def test_delta_space_default_rank_is_the_sum_of_input_ranks():
    g = gen(1)
    terms = [(1.0, LowRank(A=torch.randn(r, 30, generator=g), B=torch.randn(25, r, generator=g))) for r in (2, 3)]
    out = merge_module(terms, BY_NAME["ties"], TiesParams(density=0.5), space="delta")
    assert out.rank == 5 and 0 < out.kept_energy < 1
    full = merge_module(terms, BY_NAME["ties"], TiesParams(density=0.5), space="delta", rank=25)
    dense = BY_NAME["ties"].fn(delta_space([m for _, m in terms]).reps, [1.0, 1.0], TiesParams(density=0.5))
    assert rel(full.B @ full.A, dense) < 1e-5 and full.kept_energy == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("space", SPACES)
def test_dare_through_a_space_is_byte_identical_per_seed(space):
    g = gen(2)
    terms = [(0.5, LowRank(A=torch.randn(3, 40, generator=g), B=torch.randn(30, 3, generator=g))) for _ in range(2)]
    runs = [
        merge_module(terms, BY_NAME["dare_ties"], DareParams(density=0.5), space, generator=gen(7)) for _ in range(2)
    ]
    assert runs[0].A.numpy().tobytes() == runs[1].A.numpy().tobytes()
    assert runs[0].B.numpy().tobytes() == runs[1].B.numpy().tobytes()


def test_cancelling_sum_is_rank_zero_in_every_space():
    g = gen(3)
    m = LowRank(A=torch.randn(3, 10, generator=g), B=torch.randn(8, 3, generator=g))
    for space in SPACES:
        out = merge_module([(1.0, m), (-1.0, m)], BY_NAME["task_arithmetic"], TaskArithmeticParams(), space)
        assert out.rank == 0 and out.B.shape == (8, 0) and out.A.shape == (0, 10)


def test_bad_calls():
    m = LowRank(A=torch.zeros(2, 5), B=torch.zeros(4, 2))
    with pytest.raises(UsageError):
        project([m], "full")
    with pytest.raises(UsageError):
        merge_module([(1.0, m)], BY_NAME["ties"], TiesParams(), space="nope")
    with pytest.raises(UsageError):
        project([], "core")
    with pytest.raises(IncompatibleAdapters):
        project([m, LowRank(A=torch.zeros(2, 6), B=torch.zeros(4, 2))], "core")
    with pytest.raises(UsageError):
        delta_space([m]).to_factors(torch.zeros(4, 5))
