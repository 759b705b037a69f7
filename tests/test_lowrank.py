"""Hypothesis property tests of the combination math, in factored form against dense references."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptermerge import Adapter, LowRank, combine
from adaptermerge.lowrank import energy_rank, factored_svd

SETTINGS = settings(max_examples=30, deadline=None)


@st.composite
def adapter_sets(draw, min_n: int = 1, max_n: int = 4, same_rank: bool = False):
    """Random adapters on shared module shapes (some modules missing from some adapters), fp64."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    n = draw(st.integers(min_n, max_n))
    shapes = {f"m{j}": (draw(st.integers(2, 24)), draw(st.integers(2, 24))) for j in range(draw(st.integers(1, 3)))}
    r_fixed = draw(st.integers(1, 5))
    adapters = []
    for i in range(n):
        mods = {}
        for j, (name, (out, inn)) in enumerate(shapes.items()):
            if i > 0 and j > 0 and draw(st.booleans()):
                continue  # module not touched by this adapter
            r = r_fixed if same_rank else draw(st.integers(1, 6))
            mods[name] = LowRank(
                A=torch.randn(r, inn, generator=g, dtype=torch.float64),
                B=torch.randn(out, r, generator=g, dtype=torch.float64),
            )
        adapters.append(Adapter(mods))
    weights = [draw(st.floats(-2, 2).filter(lambda x: abs(x) > 1e-3)) for _ in range(n)]
    return adapters, weights


def dense_sum(adapters, weights, name):
    terms = [w * a.modules[name].delta(torch.float64) for a, w in zip(adapters, weights) if name in a.modules]
    return sum(terms)


def rel(a, b):
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


def run(adapters, weights, **kw):
    return combine(adapters, weights, compute_dtype="float64", **kw)


@SETTINGS
@given(adapter_sets(max_n=1))
def test_identity_weight_one(data):
    adapters, _ = data
    out = run(adapters, [1.0], method="linear")
    for name, m in adapters[0].modules.items():
        assert rel(out.modules[name].delta(torch.float64), m.delta(torch.float64)) < 1e-6


@SETTINGS
@given(adapter_sets(max_n=1))
def test_negation(data):
    adapters, _ = data
    for method in ("linear", "cat"):
        out = run(adapters, [-1.0], method=method)
        for name, m in adapters[0].modules.items():
            assert rel(out.modules[name].delta(torch.float64), -m.delta(torch.float64)) < 1e-6


@SETTINGS
@given(adapter_sets(min_n=2), st.floats(-3, 3), st.floats(-3, 3))
def test_linear_is_linear_in_weights(data, alpha, beta):
    adapters, w = data
    w2 = [x * 0.5 + 0.1 for x in w]
    comb = [alpha * a + beta * b for a, b in zip(w, w2)]
    o1, o2, o3 = (
        run(adapters, w, method="linear"),
        run(adapters, w2, method="linear"),
        run(adapters, comb, method="linear"),
    )
    for name in o3.modules:
        d1 = o1.modules[name].delta(torch.float64) if name in o1.modules else 0
        d2 = o2.modules[name].delta(torch.float64) if name in o2.modules else 0
        expect = alpha * d1 + beta * d2
        assert float((o3.modules[name].delta(torch.float64) - expect).norm()) <= 1e-6 * (
            1 + float(torch.as_tensor(expect).norm())
        )


@SETTINGS
@given(adapter_sets(min_n=2))
def test_cat_and_linear_equal_dense_sum(data):
    adapters, w = data
    for method in ("linear", "cat"):
        out = run(adapters, w, method=method)
        for name in out.modules:
            assert rel(out.modules[name].delta(torch.float64), dense_sum(adapters, w, name)) < 1e-8, method
    cat = run(adapters, w, method="cat")
    for name, m in cat.modules.items():
        assert m.rank == sum(a.modules[name].rank for a in adapters if name in a.modules)


@SETTINGS
@given(adapter_sets(min_n=2))
def test_full_rank_svd_equals_sum(data):
    adapters, w = data
    out = run(adapters, w, method="svd", rank=10_000)
    for name in out.modules:
        assert rel(out.modules[name].delta(torch.float64), dense_sum(adapters, w, name)) < 1e-8


@SETTINGS
@given(adapter_sets(min_n=2), st.integers(1, 6))
def test_svd_truncation_is_eckart_young(data, k):
    adapters, w = data
    out = run(adapters, w, method="svd", rank=k)
    for name, m in out.modules.items():
        dense = dense_sum(adapters, w, name)
        s = torch.linalg.svdvals(dense)
        kk = m.rank
        assert kk == min(k, sum(a.modules[name].rank for a in adapters if name in a.modules), *dense.shape)
        resid = float((dense - m.delta(torch.float64)).norm())
        predicted = float(s[kk:].pow(2).sum().sqrt())
        assert abs(resid - predicted) <= 1e-8 * (1 + float(s[0]))
        # matches dense truncated SVD when the gap at k is clear
        if kk < len(s) and s[kk - 1] - s[kk] > 1e-6 * s[0]:
            u, sv, vh = torch.linalg.svd(dense, full_matrices=False)
            assert rel(m.delta(torch.float64), (u[:, :kk] * sv[:kk]) @ vh[:kk]) < 1e-6


@SETTINGS
@given(adapter_sets(min_n=2), st.permutations(range(4)))
def test_permutation_invariance(data, perm):
    adapters, w = data
    order = [p for p in perm if p < len(adapters)]
    out1 = run(adapters, w, method="linear")
    out2 = run([adapters[p] for p in order], [w[p] for p in order], method="linear")
    for name in out1.modules:
        assert rel(out2.modules[name].delta(torch.float64), out1.modules[name].delta(torch.float64)) < 1e-8


@SETTINGS
@given(adapter_sets(min_n=2), st.floats(0.05, 1.0), st.sampled_from(["svd", "linear"]))
def test_energy_keeps_at_least_requested(data, energy, method):
    """The stored rank is the smallest k whose top-k singular values (dense SVD here) keep ``energy`` of the
    squared norm; the stored delta keeps that energy, and the report gives the rank and energy really stored."""
    adapters, w = data
    out = run(adapters, w, method=method, energy=energy)
    reports = {rep["name"]: rep for rep in out.provenance["modules"]}
    for name, rep in reports.items():
        dense = dense_sum(adapters, w, name)
        s2 = torch.linalg.svdvals(dense).pow(2)
        share = torch.cumsum(s2, 0) / s2.sum()
        k = int((share < energy - 1e-9).sum()) + 1  # smallest k with share[k-1] >= energy
        if name not in out.modules:
            continue  # only a sum that cancels is dropped (checked by the cancellation tests)
        got = out.modules[name]
        assert got.rank == rep["rank"]
        # ties within rounding may move k by one; the energy rule then still holds for what was stored
        kept = 1 - float((dense - got.delta(torch.float64)).pow(2).sum() / s2.sum())
        assert abs(rep["kept_energy"] - kept) <= 1e-8
        assert kept >= energy - 1e-9
        assert got.rank == k or abs(float(share[got.rank - 1]) - energy) < 1e-9
        if got.rank > 1:  # minimal: one fewer component would not be enough
            assert float(share[got.rank - 2]) < energy + 1e-9


@SETTINGS
@given(adapter_sets(min_n=2), st.integers(1, 6))
def test_linear_with_rank_is_the_truncated_sum(data, k):
    """``linear`` with ``rank`` truncates the exact sum like ``svd`` does: Eckart-Young residual, rank min(k, R)."""
    adapters, w = data
    out = run(adapters, w, method="linear", rank=k)
    for name, m in out.modules.items():
        dense = dense_sum(adapters, w, name)
        s = torch.linalg.svdvals(dense)
        assert m.rank == min(k, sum(a.modules[name].rank for a in adapters if name in a.modules), *dense.shape)
        resid = float((dense - m.delta(torch.float64)).norm())
        assert abs(resid - float(s[m.rank :].pow(2).sum().sqrt())) <= 1e-8 * (1 + float(s[0]))


@SETTINGS
@given(adapter_sets(min_n=1), st.sampled_from(["linear", "cat", "svd"]))
def test_default_weights_are_equal_and_sum_to_one(data, method):
    """Without weights, each of n adapters weighs 1/n: the result is the mean of the deltas."""
    adapters, _ = data
    out = combine(adapters, compute_dtype="float64", method=method, **({"rank": 10_000} if method == "svd" else {}))
    n = len(adapters)
    for name in {m for a in adapters for m in a.modules}:
        assert rel(out.modules[name].delta(torch.float64), dense_sum(adapters, [1.0 / n] * n, name)) < 1e-8


@SETTINGS
@given(adapter_sets(min_n=1, max_n=1))
def test_factored_svd_matches_dense(data):
    adapters, _ = data
    for m in adapters[0].modules.values():
        f = factored_svd(m.B, m.A)
        assert torch.allclose(
            f.S, torch.linalg.svdvals(m.delta(torch.float64))[: f.S.numel()], atol=1e-9 * (1 + float(f.S.max()))
        )


def test_energy_rank_edges():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert energy_rank(s, 1.0) == 3
    assert energy_rank(s, 9 / 14) == 1
    assert energy_rank(s, 9 / 14 + 1e-6) == 2
