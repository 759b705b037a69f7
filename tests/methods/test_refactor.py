"""The shared re-factoring: exact at full size, randomized close to the exact truncation, exact kept energy,
smallest rank for an energy target, deterministic, typed errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from adaptermerge.errors import NumericalError, UsageError
from adaptermerge.refactor import randomized_svd, refactor_dense, refactor_factored
from tests.methods.helpers import SETTINGS, gen, rel


def _decaying(m: int, n: int, seed: int, decay: float = 0.9, dtype=torch.float64) -> torch.Tensor:
    g = gen(seed)
    u = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=dtype)).Q
    v = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=dtype)).Q
    s = decay ** torch.arange(min(m, n), dtype=dtype)
    return (u * s) @ v.T


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(1, 30), st.integers(1, 30))
def test_full_size_is_exact(seed, m, n):
    d = torch.randn(m, n, generator=gen(seed), dtype=torch.float64)
    r = refactor_dense(d, rank=min(m, n))
    assert rel(r.B @ r.A, d) < 1e-10
    assert r.kept_energy == pytest.approx(1.0, abs=1e-12)


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(1, 6))
def test_low_rank_delta_is_recovered_exactly_by_the_randomized_path(seed, true_rank):
    """Forced randomized path (exact_max_dim=0) on a rank-r 120 x 90 matrix at rank r: exact up to rounding."""
    g = gen(seed)
    d = torch.randn(120, true_rank, generator=g, dtype=torch.float64) @ torch.randn(
        true_rank, 90, generator=g, dtype=torch.float64
    )
    r = refactor_dense(d, rank=true_rank, exact_max_dim=0, oversample=4)
    assert r.algorithm == "randomized"
    assert r.rank == true_rank
    assert rel(r.B @ r.A, d) < 1e-10


@pytest.mark.parametrize("k", [1, 5, 20])
def test_randomized_truncation_is_close_to_the_best(k):
    d = _decaying(300, 200, seed=k)
    s = torch.linalg.svdvals(d)
    best = float((s[:k] ** 2).sum() / (s**2).sum())
    r = refactor_dense(d, rank=k, exact_max_dim=0)
    assert r.algorithm == "randomized" and r.rank == k
    assert r.kept_energy >= best * (1 - 1e-3)
    # the reported energy is the exact energy of what is stored
    assert r.kept_energy == pytest.approx(float((r.B @ r.A).norm() ** 2 / d.norm() ** 2), rel=1e-9)
    # and what is stored is a projection of d: the residual is orthogonal to it
    resid = d - r.B @ r.A
    assert abs(float(torch.sum(resid * (r.B @ r.A)))) < 1e-9 * float(d.norm() ** 2)


@pytest.mark.parametrize("energy", [0.3, 0.75, 0.95, 1.0])
@pytest.mark.parametrize("exact_max_dim", [512, 0])
def test_energy_picks_the_smallest_rank(energy, exact_max_dim):
    d = _decaying(150, 100, seed=1, decay=0.8)
    s = torch.linalg.svdvals(d).double()
    cum = torch.cumsum(s**2, 0) / (s**2).sum()
    expected = int((cum < energy * (1 - 1e-12)).sum()) + 1
    r = refactor_dense(d, energy=energy, default_rank=2, exact_max_dim=exact_max_dim)
    nonnoise = int((s > s[0] * (math.isqrt(150) + 1) * torch.finfo(torch.float64).eps).sum())
    assert r.rank == min(expected, nonnoise)
    assert r.kept_energy >= energy * (1 - 1e-9)


def test_energy_is_capped_by_rank():
    d = _decaying(60, 50, seed=2, decay=0.95)
    r = refactor_dense(d, rank=3, energy=0.99)
    assert r.rank == 3 and r.kept_energy < 0.99


def test_default_rank_and_its_cap():
    d = torch.randn(20, 8, generator=gen(0), dtype=torch.float64)
    assert refactor_dense(d, default_rank=5).rank == 5
    assert refactor_dense(d, default_rank=50).rank == 8
    assert refactor_dense(d, rank=50).rank == 8


def test_zero_delta_is_rank_zero():
    r = refactor_dense(torch.zeros(6, 4), rank=3)
    assert r.rank == 0 and r.B.shape == (6, 0) and r.A.shape == (0, 4) and r.kept_energy == 1.0
    r = refactor_factored(torch.zeros(6, 2), torch.zeros(2, 4))
    assert r.rank == 0 and r.B.shape == (6, 0) and r.A.shape == (0, 4)


def test_randomized_path_is_deterministic():
    d = _decaying(260, 300, seed=3, dtype=torch.float32)
    a = refactor_dense(d, rank=10, exact_max_dim=0)
    b = refactor_dense(d, rank=10, exact_max_dim=0)
    assert a.B.numpy().tobytes() == b.B.numpy().tobytes() and a.A.numpy().tobytes() == b.A.numpy().tobytes()


def test_randomized_svd_reconstructs_the_projection():
    d = torch.randn(50, 40, generator=gen(4), dtype=torch.float64)
    u, s, vh = randomized_svd(d, 12, power_iterations=1)
    q = u  # orthonormal
    assert torch.allclose(q.T @ q, torch.eye(12, dtype=torch.float64), atol=1e-12)
    assert rel((u * s) @ vh, q @ (q.T @ d)) < 1e-12


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(1, 8), st.integers(0, 10))
def test_factored_refactor_equals_the_dense_truncation(seed, r, k):
    g = gen(seed)
    b = torch.randn(15, r, generator=g, dtype=torch.float64)
    a = torch.randn(r, 12, generator=g, dtype=torch.float64)
    k = k or None
    f = refactor_factored(b, a, rank=k)
    d = refactor_dense(b @ a, rank=k or 12)
    assert f.rank == d.rank == min(k or r, r)
    assert rel(f.B @ f.A, d.B @ d.A) < 1e-9
    assert f.kept_energy == pytest.approx(d.kept_energy, abs=1e-9)


@pytest.mark.parametrize("rank", [0, -1, 1.5, True, "3"])
def test_bad_rank(rank):
    with pytest.raises(UsageError):
        refactor_dense(torch.ones(3, 3), rank=rank)


@pytest.mark.parametrize("energy", [0.0, -0.1, 1.5, float("nan")])
def test_bad_energy(energy):
    with pytest.raises(UsageError):
        refactor_dense(torch.ones(3, 3), energy=energy)
    with pytest.raises(UsageError):
        refactor_factored(torch.ones(3, 1), torch.ones(1, 3), energy=energy)


def test_non_finite_delta_is_refused():
    d = torch.ones(4, 4)
    d[0, 0] = float("inf")
    with pytest.raises(NumericalError):
        refactor_dense(d)
    with pytest.raises(UsageError):
        refactor_dense(torch.ones(2, 2, 2))


def test_hint_seeds_the_sketch():
    """A hint spanning the dominant directions makes the sketch near-optimal without power iterations, and the
    stored factors are still the exact projection of the delta."""
    g = gen(11)
    u = torch.linalg.qr(torch.randn(300, 6, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(250, 6, generator=g, dtype=torch.float64)).Q
    d = (u * torch.tensor([9.0, 8, 7, 6, 5, 4], dtype=torch.float64)) @ v.T
    d += 0.01 * torch.randn(300, 250, generator=g, dtype=torch.float64)
    s = torch.linalg.svdvals(d)
    best = float((s[:6] ** 2).sum() / (s**2).sum())
    hint = u @ torch.randn(6, 6, generator=g, dtype=torch.float64)  # same span, other basis
    r = refactor_dense(d, rank=6, exact_max_dim=0, hint=hint, power_iterations=0)
    assert r.algorithm == "randomized" and r.rank == 6
    assert r.kept_energy >= best * (1 - 1e-3)
    assert r.kept_energy == pytest.approx(float((r.B @ r.A).norm() ** 2 / d.norm() ** 2), rel=1e-9)
    u_, s_, vh_ = randomized_svd(d, 16, power_iterations=1, hint=hint)
    assert u_.shape[1] == 16
    assert rel((u_ * s_) @ vh_, u_ @ (u_.T @ d)) < 1e-12
