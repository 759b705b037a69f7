"""TSV, Iso-C, Iso-CTS, WUDI: factored form equals the dense definition; each method's defining properties;
WUDI's closed form against gradient descent on the dense objective."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from adaptermerge.errors import UsageError
from adaptermerge.lowrank import LowRank
from adaptermerge.methods.spaces import merge_module
from adaptermerge.methods.subspace import (
    SUBSPACE_METHODS,
    IsoCParams,
    IsoCtsParams,
    TsvParams,
    WudiParams,
    iso_c,
    iso_c_matrices,
    iso_cts,
    iso_cts_matrices,
    iso_cts_split,
    polar,
    tsv,
    tsv_matrices,
    wudi,
    wudi_matrices,
)
from tests.methods.helpers import FEW, SETTINGS, dense_sum, gen, lowrank_terms, ranks_sum, rel

FACTORED = {"tsv": (tsv, tsv_matrices, TsvParams), "iso_c": (iso_c, iso_c_matrices, IsoCParams)}
FACTORED |= {"iso_cts": (iso_cts, iso_cts_matrices, IsoCtsParams), "wudi": (wudi, wudi_matrices, WudiParams)}


def _dense(terms):
    return [m.delta(torch.float64) for _, m in terms], [w for w, _ in terms]


def _budget(terms) -> int:
    out, inn = terms[0][1].shape
    return min(ranks_sum(terms), out, inn)


def _spectrum(x: torch.Tensor) -> torch.Tensor:
    s = torch.linalg.svdvals(x)
    return s[s > s[0] * 1e-9] if s.numel() and float(s[0]) > 0 else s[:0]


@pytest.mark.parametrize("name", sorted(FACTORED))
@SETTINGS
@given(terms=lowrank_terms())
def test_factored_form_equals_the_dense_definition(name, terms):
    fn, dense_fn, params_cls = FACTORED[name]
    b, a = fn(terms, params_cls())
    mats, ws = _dense(terms)
    expected = dense_fn(mats, ws, params_cls(), budget=_budget(terms))
    assert rel(b @ a, expected) < 1e-8
    assert b.shape[1] <= ranks_sum(terms)


@pytest.mark.parametrize("name", sorted(FACTORED))
@FEW
@given(terms=lowrank_terms(min_t=2, max_t=3))
def test_permuting_adapters_changes_nothing(name, terms):
    fn, _, params_cls = FACTORED[name]
    b, a = fn(terms, params_cls())
    for perm in itertools.permutations(range(len(terms))):
        pb, pa = fn([terms[i] for i in perm], params_cls())
        assert rel(pb @ pa, b @ a) < 1e-8


@pytest.mark.parametrize("name", ["tsv", "wudi"])
@SETTINGS
@given(terms=lowrank_terms(max_t=1))
def test_one_adapter_with_weight_one_is_returned(name, terms):
    fn, _, params_cls = FACTORED[name]
    (_, m) = terms[0]
    b, a = fn([(1.0, m)], params_cls())
    assert rel(b @ a, m.delta(torch.float64)) < 1e-9


def _block_tasks(t: int, r: int, seed: int) -> list[tuple[float, LowRank]]:
    """Tasks on disjoint row blocks and disjoint column blocks (orthogonal column and row spaces)."""
    g = gen(seed)
    out, inn = 3 * t * r, 2 * t * r + 1
    terms = []
    for i in range(t):
        b = torch.zeros(out, r, dtype=torch.float64)
        a = torch.zeros(r, inn, dtype=torch.float64)
        b[3 * r * i : 3 * r * (i + 1)] = torch.randn(3 * r, r, generator=g, dtype=torch.float64)
        a[:, 2 * r * i : 2 * r * (i + 1)] = torch.randn(r, 2 * r, generator=g, dtype=torch.float64)
        terms.append((0.5 + i, LowRank(A=a, B=b)))
    return terms


@pytest.mark.parametrize("name", ["tsv", "wudi"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_orthogonal_tasks_give_task_arithmetic(name, seed):
    """No interference: TSV's concatenated singular vectors are already orthonormal, and WUDI's objective is 0 at
    the sum. Both return sum_i w_i delta_i."""
    terms = _block_tasks(3, 2, seed)
    fn, _, params_cls = FACTORED[name]
    b, a = fn(terms, params_cls())
    assert rel(b @ a, dense_sum(terms)) < 1e-9


@SETTINGS
@given(terms=lowrank_terms(min_t=2))
def test_tsv_keeps_each_tasks_top_singular_values(terms):
    """The output's spectrum is exactly the kept per-task singular values (U and V are orthonormalised)."""
    b, a = tsv(terms, TsvParams())
    k = _budget(terms) // len(terms)
    kept = []
    for w, m in terms:
        s = _spectrum(w * m.delta(torch.float64))
        kept.append(s[:k])
    expected = torch.sort(torch.cat(kept), descending=True).values
    got = _spectrum(b @ a)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


def test_tsv_keep_share():
    g = gen(5)
    terms = [(1.0, LowRank(A=torch.randn(4, 30, generator=g), B=torch.randn(20, 4, generator=g))) for _ in range(2)]
    b, _ = tsv(terms, TsvParams(keep=0.25))  # budget 8: 2 triplets per task
    assert b.shape[1] == 4
    b, _ = tsv(terms, TsvParams())  # default 1/T: 4 per task = everything
    assert b.shape[1] == 8


@SETTINGS
@given(terms=lowrank_terms(), lam=st.floats(0.1, 3.0))
def test_iso_c_flattens_the_non_zero_spectrum_of_the_sum(terms, lam):
    b, a = iso_c(terms, IsoCParams(lambda_=lam))
    total = dense_sum(terms)
    s_sum = _spectrum(total)
    s_out = _spectrum(b @ a)
    assert s_out.numel() == s_sum.numel()
    if s_sum.numel():
        torch.testing.assert_close(s_out, torch.full_like(s_out, lam * float(s_sum.mean())), rtol=1e-8, atol=0)
        # same column and row spaces as the sum: projecting the output onto them changes nothing
        u, _, vh = torch.linalg.svd(total)
        u, vh = u[:, : s_sum.numel()], vh[: s_sum.numel()]
        out = b @ a
        assert rel(u @ (u.T @ out) @ vh.T @ vh, out) < 1e-8


def test_iso_c_returns_an_isotropic_adapter_unchanged():
    g = gen(6)
    q1 = torch.linalg.qr(torch.randn(12, 3, generator=g, dtype=torch.float64)).Q
    q2 = torch.linalg.qr(torch.randn(9, 3, generator=g, dtype=torch.float64)).Q
    m = LowRank(A=q2.T * 2.0, B=q1 * 1.5)
    b, a = iso_c([(1.0, m)], IsoCParams())
    assert rel(b @ a, m.delta(torch.float64)) < 1e-12


@pytest.mark.parametrize(
    ("budget", "tasks", "fraction", "split"),
    [
        (48, 3, 0.8, (39, 3)),
        (16, 3, 0.8, (13, 1)),
        (10, 4, 0.8, (10, 0)),
        (12, 2, 0.5, (6, 3)),
        (9, 3, 0.0, (0, 3)),
        (2, 3, 0.0, (2, 0)),
    ],
)
def test_iso_cts_split_follows_the_reference_code(budget, tasks, fraction, split):
    assert iso_cts_split(budget, tasks, fraction) == split


@SETTINGS
@given(terms=lowrank_terms(min_t=2), fraction=st.floats(0.0, 1.0))
def test_iso_cts_is_isotropic_within_the_budget(terms, fraction):
    b, a = iso_cts(terms, IsoCtsParams(common_fraction=fraction))
    s = _spectrum(b @ a)
    assert 1 <= s.numel() <= _budget(terms)
    torch.testing.assert_close(s, torch.full_like(s, float(s.mean())), rtol=1e-8, atol=0)


@SETTINGS
@given(terms=lowrank_terms())
def test_iso_cts_with_everything_common_is_iso_c(terms):
    b1, a1 = iso_cts(terms, IsoCtsParams(common_fraction=1.0))
    b2, a2 = iso_c(terms, IsoCParams())
    assert rel(b1 @ a1, b2 @ a2) < 1e-9


def test_iso_cts_adds_task_specific_directions():
    """Two tasks, budget 8, fraction 0.5: 4 common directions of the sum + 2 of each task's residual."""
    g = gen(7)
    f64 = torch.float64
    terms = [
        (1.0, LowRank(A=torch.randn(4, 30, generator=g, dtype=f64), B=torch.randn(25, 4, generator=g, dtype=f64)))
        for _ in range(2)
    ]
    b, a = iso_cts(terms, IsoCtsParams(common_fraction=0.5))
    assert _spectrum(b @ a).numel() == 8
    b, a = iso_cts(terms, IsoCtsParams(common_fraction=0.25))  # 2 common + 3 each
    assert _spectrum(b @ a).numel() == 8


# -------------------------------------------------------------------------------------------------- WUDI


def wudi_objective(d: torch.Tensor, taus: list[torch.Tensor]) -> float:
    return float(sum(((d - t) @ t.T).norm() ** 2 / t.norm() ** 2 for t in taus if float(t.norm()) > 0))


def wudi_gradient_descent(taus: list[torch.Tensor], tol: float = 1e-13, max_iter: int = 500_000) -> torch.Tensor:
    """Plain gradient descent on sum_i ||(D - tau_i) tau_i^T||^2 / ||tau_i||^2 from the paper's start D = sum tau_i,
    gradient computed by autograd on the dense objective, step 1/L (L = the gradient's Lipschitz constant)."""
    d = sum(taus).clone().requires_grad_(True)
    hess = sum(2 * t.T @ t / t.norm() ** 2 for t in taus)
    step = 1.0 / float(torch.linalg.eigvalsh(hess).max())
    scale = float(sum(t.norm() for t in taus))
    for _ in range(max_iter):
        loss = sum(((d - t) @ t.T).pow(2).sum() / t.pow(2).sum() for t in taus)
        (grad,) = torch.autograd.grad(loss, d)
        if float(grad.norm()) < tol * scale:
            return d.detach()
        with torch.no_grad():
            d -= step * grad
    raise AssertionError("gradient descent did not converge")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wudi_closed_form_equals_gradient_descent(seed):
    """Small problem (7 x 6, ranks 1, 2, 2: the Gram sum is singular, so the pseudo-inverse matters)."""
    g = gen(seed)
    terms = []
    for r, w in zip((1, 2, 2), (1.0, 0.6, -0.8)):
        terms.append(
            (
                w,
                LowRank(
                    A=torch.randn(r, 6, generator=g, dtype=torch.float64),
                    B=torch.randn(7, r, generator=g, dtype=torch.float64),
                ),
            )
        )
    taus = [w * m.delta(torch.float64) for w, m in terms]
    gd = wudi_gradient_descent(taus)
    b, a = wudi(terms, WudiParams())
    assert rel(b @ a, gd) < 1e-9
    assert wudi_objective(b @ a, taus) <= wudi_objective(sum(taus), taus)


@SETTINGS
@given(terms=lowrank_terms(min_t=2))
def test_wudi_is_the_least_norm_minimiser(terms):
    """Optimality D Y = X (zero gradient) and rows of D inside range(Y) (least norm)."""
    taus = [w * m.delta(torch.float64) for w, m in terms]
    d = wudi_matrices([m.delta(torch.float64) for _, m in terms], [w for w, _ in terms])
    y = sum(t.T @ t / t.norm() ** 2 for t in taus)
    x = sum(t @ t.T @ t / t.norm() ** 2 for t in taus)
    scale = float(x.norm())
    # D = X Y^+ is exact up to rounding amplified by Y's conditioning on its range (eps * cond): with nearly
    # parallel row spaces Y is ill-conditioned and no float64 solver does better
    ev = torch.linalg.eigvalsh(y)
    live = ev[ev > y.shape[0] * torch.finfo(torch.float64).eps * ev.max()]
    tol = max(1e-8, 1e2 * torch.finfo(torch.float64).eps * float(live.max() / live.min()))
    assert float((d @ y - x).norm()) < tol * scale
    proj = y @ torch.linalg.pinv(y, hermitian=True)
    assert rel(d @ proj, d) < tol
    b, a = wudi(terms, WudiParams())
    assert rel(b @ a, d) < tol


# --------------------------------------------------------------------------------------------- all methods


@pytest.mark.parametrize("name", sorted(FACTORED))
def test_zero_adapters_and_zero_weights_give_zero_not_nan(name):
    fn, _, params_cls = FACTORED[name]
    z = LowRank(A=torch.zeros(2, 6), B=torch.zeros(5, 2))
    x = LowRank(A=torch.randn(2, 6, generator=gen(0)), B=torch.randn(5, 2, generator=gen(1)))
    for terms in ([(1.0, z)], [(1.0, z), (2.0, z)], [(0.0, x), (0.0, x)]):
        b, a = fn(terms, params_cls())
        assert bool(torch.isfinite(b).all() and torch.isfinite(a).all())
        assert not bool((b @ a).any())


@pytest.mark.parametrize("name", sorted(FACTORED))
def test_lambda_scales_the_result(name):
    g = gen(8)
    terms = [
        (
            0.7,
            LowRank(
                A=torch.randn(3, 10, generator=g, dtype=torch.float64),
                B=torch.randn(9, 3, generator=g, dtype=torch.float64),
            ),
        )
        for _ in range(2)
    ]
    fn, _, params_cls = FACTORED[name]
    b1, a1 = fn(terms, params_cls())
    b2, a2 = fn(terms, params_cls(lambda_=-1.5))
    assert rel(b2 @ a2, -1.5 * (b1 @ a1)) < 1e-10


@pytest.mark.parametrize("method", SUBSPACE_METHODS, ids=lambda m: m.name)
def test_factored_methods_accept_every_space_with_one_result(method):
    g = gen(9)
    terms = [
        (w, LowRank(A=torch.randn(r, 14, generator=g), B=torch.randn(11, r, generator=g)))
        for w, r in ((0.5, 2), (1.0, 3))
    ]
    outs = [merge_module(terms, method, method.params_cls(), space=s) for s in ("delta", "core", "knots")]
    assert all(torch.equal(o.B, outs[0].B) and torch.equal(o.A, outs[0].A) for o in outs)
    assert outs[0].rank <= 5


def test_polar_factor():
    x = torch.randn(8, 3, generator=gen(10), dtype=torch.float64)
    p = polar(x)
    torch.testing.assert_close(p.T @ p, torch.eye(3, dtype=torch.float64))
    # nearest orthonormal-column matrix: x = p h with h symmetric positive definite
    h = p.T @ x
    torch.testing.assert_close(h, h.T)
    assert float(torch.linalg.eigvalsh(h).min()) > 0


@pytest.mark.parametrize(
    "make",
    [
        lambda: TsvParams(keep=0.0),
        lambda: TsvParams(keep=1.5),
        lambda: IsoCtsParams(common_fraction=1.2),
        lambda: IsoCtsParams(common_fraction=float("nan")),
        lambda: WudiParams(lambda_=float("nan")),
        lambda: IsoCParams(lambda_="2"),
    ],
)
def test_bad_parameters_are_usage_errors(make):
    with pytest.raises(UsageError):
        make()
