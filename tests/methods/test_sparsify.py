"""Sparsification steps: exact counts, tie handling, unbiasedness and reproducibility of the random drops."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from adaptermerge.errors import UsageError
from adaptermerge.methods import sparsify
from adaptermerge.methods.sparsify import (
    breadcrumbs_mask,
    breadcrumbs_trim,
    dare_drop,
    della_drop,
    della_keep_probabilities,
    keep_count,
    kth_largest,
    magnitude_trim,
    module_generator,
    topk_mask,
)
from tests.methods.helpers import SETTINGS, gen, reference_topk

densities = st.floats(0.0, 1.0)


@pytest.mark.parametrize(
    ("density", "numel", "k"),
    [(0.35, 10, 4), (0.25, 10, 3), (0.2, 7, 1), (0.5, 3, 2), (0.0, 5, 0), (1.0, 5, 5), (0.1, 4, 0), (0.3, 10, 3)],
)
def test_keep_count_rounds_half_up_on_the_decimal_value(density, numel, k):
    assert keep_count(density, numel) == k


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(1, 12), st.integers(1, 12), densities)
def test_magnitude_trim_keeps_exactly_k_largest(seed, m, n, density):
    x = torch.randn(m, n, generator=gen(seed), dtype=torch.float64)  # distinct magnitudes almost surely
    out = magnitude_trim(x, density)
    k = keep_count(density, x.numel())
    kept = out != 0
    assert int(kept.sum()) == k
    assert torch.equal(out[kept], x[kept])  # survivors unchanged (no rescale)
    if 0 < k < x.numel():
        assert float(x[kept].abs().min()) > float(x[~kept].abs().max())
    assert torch.equal(kept, reference_topk(x.abs(), k))


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(1, 40), st.integers(0, 40), st.integers(1, 4))
def test_topk_mask_ties_broken_by_index(seed, n, k, levels):
    """Few distinct magnitudes (many ties): still exactly k, and the first ones by index among equals."""
    a = torch.randint(0, levels, (n,), generator=gen(seed)).double()
    k = min(k, n)
    mask = topk_mask(a, k)
    assert int(mask.sum()) == k
    assert torch.equal(mask, reference_topk(a, k))


def test_topk_mask_example():
    a = torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0])
    assert topk_mask(a, 3).tolist() == [True, True, False, False, True]


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(2, 300), st.data())
def test_sampled_selection_path_equals_kthvalue(seed, n, data):
    """The bracketing path (forced on small tensors) returns exactly torch.kthvalue's value, ties included."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sparsify, "DIRECT_SELECT_MAX", 0)
        mp.setattr(sparsify, "_SAMPLE_TARGET", 8)
        mp.setattr(sparsify, "CHUNK_ELEMENTS", 5)
        _check_sampled(seed, n, data)


def _check_sampled(seed, n, data):
    g = gen(seed)
    kind = data.draw(st.sampled_from(["normal", "ties", "lowrank"]))
    if kind == "normal":
        a = torch.randn(n, generator=g).abs()
    elif kind == "ties":
        a = torch.randint(0, 3, (n,), generator=g).float()
    else:
        a = (torch.randn(n // 2 + 1, 1, generator=g) @ torch.randn(1, 2, generator=g)).abs().reshape(-1)
    k = data.draw(st.integers(1, a.numel()))
    assert float(kth_largest(a, k)) == float(torch.kthvalue(a, a.numel() - k + 1).values)
    assert torch.equal(topk_mask(a, k), reference_topk(a, k))


def test_sampled_selection_on_a_large_lowrank_module():
    """The default path above DIRECT_SELECT_MAX, on a rank-2 delta (structured rows), equals kthvalue."""
    g = gen(3)
    x = torch.randn(1100, 2, generator=g) @ torch.randn(2, 1000, generator=g)
    a = x.abs().reshape(-1)
    assert a.numel() > sparsify.DIRECT_SELECT_MAX
    for density in (0.01, 0.2, 0.5, 0.97):
        k = keep_count(density, a.numel())
        assert float(kth_largest(a, k)) == float(torch.kthvalue(a, a.numel() - k + 1).values)
    trimmed = magnitude_trim(x, 0.2)
    assert int(torch.count_nonzero(trimmed)) == keep_count(0.2, x.numel())


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(1, 10), st.integers(1, 10), densities, st.floats(0.0, 0.5))
def test_breadcrumbs_keeps_the_middle_of_the_magnitude_order(seed, m, n, density, gamma):
    x = torch.randn(m, n, generator=gen(seed), dtype=torch.float64)
    total = x.numel()
    n_top = keep_count(gamma, total)
    n_keep = min(keep_count(density, total), total - n_top)
    mask = breadcrumbs_mask(x, density, gamma)
    assert int(mask.sum()) == n_keep
    expected = reference_topk(x.abs(), n_top + n_keep) & ~reference_topk(x.abs(), n_top)
    assert torch.equal(mask, expected)
    out = breadcrumbs_trim(x, density, gamma)
    assert torch.equal(out[mask], x[mask]) and not bool(out[~mask].any())


def test_breadcrumbs_with_no_outlier_drops_nothing_large():
    """gamma * numel rounds to 0: mergekit zeroes the whole tensor (indices[n_bot:-0]); we keep the top density."""
    x = torch.tensor([[5.0, -4.0, 3.0, 0.5]])
    out = breadcrumbs_trim(x, density=0.5, gamma=0.01)
    assert out.tolist() == [[5.0, -4.0, 0.0, 0.0]]
    out = breadcrumbs_trim(x, density=0.5, gamma=0.25)  # drop the largest, then keep the next two
    assert out.tolist() == [[0.0, -4.0, 3.0, 0.0]]


def test_dare_density_one_and_zero_are_exact_and_draw_nothing():
    x = torch.randn(5, 7, generator=gen(0))
    g = gen(1)
    state = g.get_state()
    assert torch.equal(dare_drop(x, 1.0, g), x)
    assert torch.equal(dare_drop(x, 0.0, g), torch.zeros_like(x))
    assert torch.equal(g.get_state(), state)


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.floats(0.05, 0.95))
def test_dare_survivors_rescaled_and_reproducible(seed, density):
    x = torch.randn(6, 9, generator=gen(seed), dtype=torch.float64)
    a = dare_drop(x, density, gen(seed + 1))
    b = dare_drop(x, density, gen(seed + 1))
    assert torch.equal(a, b)  # same seed, same bytes
    kept = a != 0
    torch.testing.assert_close(a[kept], x[kept] / density, rtol=0, atol=0)


def test_dare_draws_depend_on_the_seed():
    x = torch.randn(20, 20, generator=gen(0))
    assert not torch.equal(dare_drop(x, 0.5, gen(1)), dare_drop(x, 0.5, gen(2)))


def _mean_and_bound(draw, x: torch.Tensor, var: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(12345)  # fixed seeds: the outcome is deterministic, the bound is 6 standard errors
    acc = torch.zeros_like(x)
    for _ in range(n):
        acc += draw(x, g)
    return acc / n, 6.0 * torch.sqrt(var / n) + 1e-12


def test_dare_is_unbiased():
    """E[dare(x)] = x: the mean of 4000 draws is within 6 standard errors of x everywhere; without the 1/density
    rescale the mean would be density * x, off by 0.7 |x| (about 40 standard errors)."""
    x = torch.randn(4, 6, generator=gen(0), dtype=torch.float64)
    density = 0.3
    var = x**2 * (1 - density) / density
    mean, bound = _mean_and_bound(lambda t, g: dare_drop(t, density, g), x, var, 4000)
    assert bool(((mean - x).abs() <= bound).all())
    assert bool((bound < (1 - density) * x.abs()).all())  # the bound is tight enough to catch a missing rescale


def test_della_probabilities_ramp_within_each_row():
    x = torch.tensor([[0.1, -5.0, 2.0, 0.3], [1.0, 1.0, -1.0, 4.0]])
    p = della_keep_probabilities(x, density=0.5, epsilon=0.15)
    # row 0 ascending |x|: 0.1, 0.3, 2.0, 5.0 -> 0.35, 0.45, 0.55, 0.65
    torch.testing.assert_close(p[0], torch.tensor([0.35, 0.65, 0.55, 0.45]))
    # row 1: ties by column index: 1.0 (col 0) < 1.0 (col 1) < |-1.0| (col 2) < 4.0
    torch.testing.assert_close(p[1], torch.tensor([0.35, 0.45, 0.55, 0.65]))
    single = della_keep_probabilities(torch.tensor([[3.0], [-1.0]]), 0.4, 0.1)
    torch.testing.assert_close(single, torch.full((2, 1), 0.4))


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(1, 8), st.integers(2, 12), st.floats(0.2, 0.8), st.floats(0.0, 0.19))
def test_della_probabilities_properties(seed, m, n, density, epsilon):
    x = torch.randn(m, n, generator=gen(seed), dtype=torch.float64)
    p = della_keep_probabilities(x, density, epsilon)
    torch.testing.assert_close(p.mean(dim=1), torch.full((m,), density, dtype=p.dtype))
    torch.testing.assert_close(p.min(dim=1).values, torch.full((m,), density - epsilon, dtype=p.dtype))
    torch.testing.assert_close(p.max(dim=1).values, torch.full((m,), density + epsilon, dtype=p.dtype))
    order = torch.argsort(x.abs(), dim=1)
    assert bool((torch.diff(torch.gather(p, 1, order), dim=1) >= 0).all())  # larger magnitude, larger p
    out = della_drop(x, density, epsilon, gen(seed))
    kept = out != 0
    torch.testing.assert_close(out[kept], (x / p)[kept], rtol=0, atol=0)


def test_della_is_unbiased():
    x = torch.randn(3, 8, generator=gen(1), dtype=torch.float64)
    p = della_keep_probabilities(x, 0.4, 0.2)
    var = x**2 * (1 - p) / p
    mean, bound = _mean_and_bound(lambda t, g: della_drop(t, 0.4, 0.2, g), x, var, 4000)
    assert bool(((mean - x).abs() <= bound).all())


def test_module_generator_is_per_module_and_order_free():
    a1 = torch.rand(4, generator=module_generator(7, "layers.0.q"))
    torch.rand(4, generator=module_generator(7, "layers.1.q"))
    a2 = torch.rand(4, generator=module_generator(7, "layers.0.q"))
    assert torch.equal(a1, a2)
    assert not torch.equal(a1, torch.rand(4, generator=module_generator(7, "layers.1.q")))
    assert not torch.equal(a1, torch.rand(4, generator=module_generator(8, "layers.0.q")))


@pytest.mark.parametrize("seed", [-1, 1.5, True, "3"])
def test_module_generator_refuses_bad_seeds(seed):
    with pytest.raises(UsageError):
        module_generator(seed, "m")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda x: magnitude_trim(x, 1.5), "density"),
        (lambda x: magnitude_trim(x, float("nan")), "density"),
        (lambda x: breadcrumbs_mask(x, 0.5, 1.0), "gamma"),
        (lambda x: dare_drop(x, -0.1, gen(0)), "density"),
        (lambda x: della_keep_probabilities(x, 0.1, 0.1), "epsilon"),
        (lambda x: della_keep_probabilities(x, 0.9, 0.2), "epsilon"),
    ],
)
def test_bad_parameters_raise_usage_errors(call, match):
    with pytest.raises(UsageError, match=match):
        call(torch.ones(3, 3))
