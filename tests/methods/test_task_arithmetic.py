"""The task-vector family: the issue's properties, dense references, hand-checked examples, parameter errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from adaptermerge.errors import IncompatibleAdapters, NumericalError, UsageError
from adaptermerge.methods.sparsify import (
    breadcrumbs_trim,
    dare_drop,
    della_drop,
    keep_count,
    magnitude_trim,
)
from adaptermerge.methods.task_arithmetic import (
    ELEMENTWISE_METHODS,
    BreadcrumbsParams,
    DareParams,
    DellaParams,
    MagnitudePruneParams,
    TaskArithmeticParams,
    TiesParams,
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    magnitude_prune,
    task_arithmetic,
    ties,
)
from tests.methods.helpers import SETTINGS, gen, reference_ties, task_tensors

BY_NAME = {m.name: m for m in ELEMENTWISE_METHODS}

# Parameters at which every method is the identity on one adapter of weight 1 (density 1, no outliers, no ramp).
IDENTITY_PARAMS = {
    "task_arithmetic": TaskArithmeticParams(),
    "ties": TiesParams(density=1.0),
    "dare_linear": DareParams(density=1.0),
    "dare_ties": DareParams(density=1.0),
    "magnitude_prune": MagnitudePruneParams(density=1.0),
    "breadcrumbs": BreadcrumbsParams(density=1.0, gamma=0.0),
    "breadcrumbs_ties": BreadcrumbsParams(density=1.0, gamma=0.0),
    "della": DellaParams(density=1.0, epsilon=0.0),
    "della_linear": DellaParams(density=1.0, epsilon=0.0),
}
LINEAR = ["task_arithmetic", "dare_linear", "magnitude_prune", "breadcrumbs", "della_linear"]
TIES_LIKE = ["ties", "dare_ties", "breadcrumbs_ties", "della"]
# Typical (sparsifying) parameters for the other properties.
SPARSE_PARAMS = {
    "task_arithmetic": TaskArithmeticParams(lambda_=0.7),
    "ties": TiesParams(density=0.4, lambda_=1.3),
    "dare_linear": DareParams(density=0.6),
    "dare_ties": DareParams(density=0.6),
    "magnitude_prune": MagnitudePruneParams(density=0.3),
    "breadcrumbs": BreadcrumbsParams(density=0.5, gamma=0.1),
    "breadcrumbs_ties": BreadcrumbsParams(density=0.5, gamma=0.1),
    "della": DellaParams(density=0.5, epsilon=0.2),
    "della_linear": DellaParams(density=0.5, epsilon=0.2),
}
SPARSIFY = {  # the per-task step of each method, for composing references
    "ties": lambda t, p, g: magnitude_trim(t, p.density),
    "magnitude_prune": lambda t, p, g: magnitude_trim(t, p.density),
    "dare_linear": lambda t, p, g: dare_drop(t, p.density, g),
    "dare_ties": lambda t, p, g: dare_drop(t, p.density, g),
    "breadcrumbs": lambda t, p, g: breadcrumbs_trim(t, p.density, p.gamma),
    "breadcrumbs_ties": lambda t, p, g: breadcrumbs_trim(t, p.density, p.gamma),
    "della": lambda t, p, g: della_drop(t, p.density, p.epsilon, g),
    "della_linear": lambda t, p, g: della_drop(t, p.density, p.epsilon, g),
    "task_arithmetic": lambda t, p, g: t.clone(),
}


def test_table_covers_the_issue():
    assert set(BY_NAME) == set(IDENTITY_PARAMS)


@pytest.mark.parametrize("name", sorted(IDENTITY_PARAMS))
@SETTINGS
@given(data=task_tensors(max_t=1))
def test_one_adapter_weight_one_density_one_is_the_identity(name, data):
    (x,), _ = data
    out = BY_NAME[name].fn([x], [1.0], IDENTITY_PARAMS[name], gen(0))
    assert torch.equal(out, x)


@pytest.mark.parametrize("name", LINEAR)
@SETTINGS
@given(data=task_tensors(min_t=2, max_t=2))
def test_linear_methods_weights_one_minus_one_give_the_difference(name, data):
    (d1, d2), _ = data
    out = BY_NAME[name].fn([d1, d2], [1.0, -1.0], IDENTITY_PARAMS[name], gen(0))
    assert torch.equal(out, d1 - d2)


@pytest.mark.parametrize("name", LINEAR)
@SETTINGS
@given(data=task_tensors(min_t=2, max_t=2), seed=st.integers(0, 1000))
def test_linear_methods_are_linear_in_the_weights_given_the_masks(name, data, seed):
    """At density < 1: f([d1, d2], [1, -1]) = lambda (s(d1) - s(d2)), the sparsified tasks drawn in list order."""
    (d1, d2), _ = data
    p = SPARSE_PARAMS[name]
    out = BY_NAME[name].fn([d1, d2], [1.0, -1.0], p, gen(seed))
    g = gen(seed)
    s1 = SPARSIFY[name](d1, p, g)
    s2 = SPARSIFY[name](d2, p, g)
    torch.testing.assert_close(out, p.lambda_ * (s1 - s2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", TIES_LIKE)
@SETTINGS
@given(data=task_tensors(), seed=st.integers(0, 1000), normalize=st.booleans())
def test_ties_family_equals_the_naive_reference(name, data, seed, normalize):
    """Election and disjoint merge against a per-entry Python loop of the spec, on the same sparsified tasks."""
    tensors, weights = data
    p = SPARSE_PARAMS[name]
    p = type(p)(**{**p.__dict__, "normalize": normalize})
    out = BY_NAME[name].fn(tensors, weights, p, gen(seed))
    g = gen(seed)
    sparse = [SPARSIFY[name](t, p, g) for t in tensors]
    torch.testing.assert_close(out, p.lambda_ * reference_ties(sparse, weights, normalize), rtol=1e-12, atol=1e-12)


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(2, 4), st.floats(0.1, 1.0), st.lists(st.floats(0.1, 3.0), min_size=4))
def test_ties_with_agreeing_signs_is_the_weighted_mean_of_the_trimmed(seed, t, density, ws):
    g = gen(seed)
    signs = torch.where(torch.rand(5, 6, generator=g) < 0.5, -1.0, 1.0).double()
    tensors = [signs * (torch.rand(5, 6, generator=g, dtype=torch.float64) + 0.01) for _ in range(t)]
    weights = ws[:t]
    trimmed = [magnitude_trim(x, density) for x in tensors]
    num = sum(w * x for w, x in zip(weights, trimmed))
    den = sum(w * (x != 0).double() for w, x in zip(weights, trimmed))
    expected = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)
    torch.testing.assert_close(ties(tensors, weights, TiesParams(density=density)), expected, rtol=1e-12, atol=1e-12)
    plain = ties(tensors, weights, TiesParams(density=density, normalize=False))
    torch.testing.assert_close(plain, num, rtol=1e-12, atol=1e-12)


def test_ties_hand_checked():
    """Three tasks, density 0.5 (2 of 4 kept each), weights 1, 1, 2.

    trimmed: t1 = [4, -3, 0, 0], t2 = [0, 2, 0, -5], t3 = [-1, 0, 0, 3] (|-1| = |1| tie: index 0 wins).
    weighted sums: [4 - 2, -3 + 2, 0, -5 + 6] = [2, -1, 0, 1] -> signs [+, -, +, +].
    agreeing: entry 0: t1 (4, w 1); entry 1: t1 (-3, w 1); entry 2: none; entry 3: t3 (3*2 = 6, w 2).
    disjoint mean: [4/1, -3/1, 0, 6/2] = [4, -3, 0, 3].
    """
    t1 = torch.tensor([4.0, -3.0, 1.0, 0.5])
    t2 = torch.tensor([0.1, 2.0, -1.0, -5.0])
    t3 = torch.tensor([-1.0, 0.2, 1.0, 3.0])
    out = ties([t1, t2, t3], [1.0, 1.0, 2.0], TiesParams(density=0.5))
    assert out.tolist() == [4.0, -3.0, 0.0, 3.0]
    out = ties([t1, t2, t3], [1.0, 1.0, 2.0], TiesParams(density=0.5, normalize=False, lambda_=0.5))
    assert out.tolist() == [2.0, -1.5, 0.0, 3.0]


def test_ties_zero_sum_elects_plus_like_mergekit():
    """Where the weighted task vectors cancel exactly, the elected sign is + (mergekit's ``get_mask``:
    ``sign = (sign_weight >= 0) * 2 - 1``): the positive entries are kept and the negative ones dropped."""
    x = torch.tensor([[1.5, -2.0, 0.25], [-0.5, 3.0, -1.0]], dtype=torch.float64)
    for name in TIES_LIKE:  # x - x = 0 exactly everywhere: each entry keeps the task whose entry is positive
        out = BY_NAME[name].fn([x, -x], [1.0, 1.0], IDENTITY_PARAMS[name], gen(0))
        assert torch.equal(out, x.abs()), name
    # 2 * x + 1 * (-2 x) = 0: x > 0 keeps task 1 (2x / 2), x < 0 keeps task 2 (-2x / 1)
    out = ties([x, -2 * x], [2.0, 1.0], TiesParams(density=1.0))
    assert torch.equal(out, torch.where(x > 0, x, -2 * x))
    torch.testing.assert_close(out, reference_ties([x, -2 * x], [2.0, 1.0]), rtol=0, atol=0)


def test_ties_negative_weight_keeps_its_sign():
    """One adapter at weight -1: the disjoint mean divides by |w| and returns -delta (mergekit's signed divisor
    would return +delta)."""
    x = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    assert torch.equal(ties([x], [-1.0], TiesParams(density=1.0)), -x)


def test_dare_density_one_equals_task_arithmetic_exactly():
    g = gen(0)
    tensors = [torch.randn(7, 5, generator=g) for _ in range(3)]
    w = [0.5, -1.25, 2.0]
    ta = task_arithmetic(tensors, w, TaskArithmeticParams(lambda_=0.8))
    assert torch.equal(dare_linear(tensors, w, DareParams(density=1.0, lambda_=0.8), gen(5)), ta)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_random_methods_are_byte_identical_per_seed(name):
    g = gen(0)
    tensors = [torch.randn(16, 12, generator=g) for _ in range(3)]
    w = [0.5, 0.3, 0.2]
    p = SPARSE_PARAMS[name]
    a = BY_NAME[name].fn(tensors, w, p, gen(42))
    b = BY_NAME[name].fn(tensors, w, p, gen(42))
    c = BY_NAME[name].fn(tensors, w, p, gen(43))
    assert a.numpy().tobytes() == b.numpy().tobytes()
    assert not torch.equal(a, c)
    # without a generator the params' seed is used, also deterministically
    assert torch.equal(BY_NAME[name].fn(tensors, w, p), BY_NAME[name].fn(tensors, w, p))


def test_dare_linear_is_unbiased():
    """The mean over 3000 fixed seeds of dare_linear is within 6 standard errors of task arithmetic."""
    g = gen(3)
    tensors = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    w = [0.7, -0.4]
    density = 0.4
    acc = torch.zeros(3, 4, dtype=torch.float64)
    n = 3000
    for s in range(n):
        acc += dare_linear(tensors, w, DareParams(density=density), gen(s))
    var = sum((wi * t) ** 2 for wi, t in zip(w, tensors)) * (1 - density) / density
    bound = 6 * torch.sqrt(var / n)
    assert bool(((acc / n - task_arithmetic(tensors, w)).abs() <= bound).all())


@pytest.mark.parametrize("name", ["magnitude_prune", "ties"])
@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), density=st.floats(0.001, 1.0))
def test_pruning_keeps_exactly_the_requested_fraction(name, seed, density):
    x = torch.randn(7, 9, generator=gen(seed), dtype=torch.float64)
    p = MagnitudePruneParams(density=density) if name == "magnitude_prune" else TiesParams(density=density)
    out = BY_NAME[name].fn([x], [1.0], p)
    assert int(torch.count_nonzero(out)) == keep_count(density, x.numel())


@pytest.mark.parametrize("name", sorted(IDENTITY_PARAMS))
def test_never_nan(name):
    """Zero tasks, zero weights, exact cancellation, tiny values: finite outputs, 0/0 -> 0."""
    x = torch.randn(4, 5, generator=gen(1))
    z = torch.zeros(4, 5)
    p = SPARSE_PARAMS[name]
    for tensors, w in [
        ([z], [1.0]),
        ([z, z], [1.0, 1.0]),
        ([x, x], [1.0, -1.0]),
        ([x, z], [0.0, 0.0]),
        ([x * 1e-30], [1e-9]),
    ]:
        out = BY_NAME[name].fn(tensors, w, p, gen(0))
        assert bool(torch.isfinite(out).all())
    assert not bool(BY_NAME[name].fn([z, z], [1.0, 1.0], p, gen(0)).any())


@pytest.mark.parametrize("name", sorted(IDENTITY_PARAMS))
def test_nan_input_is_refused(name):
    x = torch.randn(3, 3, generator=gen(0))
    x[1, 1] = float("nan")
    with pytest.raises(NumericalError):
        BY_NAME[name].fn([x], [1.0], IDENTITY_PARAMS[name], gen(0))


DETERMINISTIC = ["task_arithmetic", "ties", "magnitude_prune", "breadcrumbs", "breadcrumbs_ties"]


@pytest.mark.parametrize("name", DETERMINISTIC)
@SETTINGS
@given(data=task_tensors(min_t=2, max_t=4))
def test_permuting_adapters_changes_nothing(name, data):
    tensors, weights = data
    p = SPARSE_PARAMS[name]
    ref = BY_NAME[name].fn(tensors, weights, p)
    for perm in itertools.islice(itertools.permutations(range(len(tensors))), 1, 6):
        out = BY_NAME[name].fn([tensors[i] for i in perm], [weights[i] for i in perm], p)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della", "della_linear"])
@SETTINGS
@given(data=task_tensors(min_t=2, max_t=3), seed=st.integers(0, 1000))
def test_permuting_random_methods_only_moves_the_draws(name, data, seed):
    """A permutation changes which draws each task gets; with the draws moved along, nothing changes."""
    tensors, weights = data
    p = SPARSE_PARAMS[name]
    g = gen(seed)
    sparse = [SPARSIFY[name](t, p, g) for t in tensors]  # each task's draws, in the original order
    merge = "ties" if name in TIES_LIKE else "task_arithmetic"
    params = (
        TiesParams(density=1.0, lambda_=p.lambda_, normalize=p.normalize)
        if merge == "ties"
        else TaskArithmeticParams(p.lambda_)
    )
    ref = BY_NAME[name].fn(tensors, weights, p, gen(seed))
    torch.testing.assert_close(BY_NAME[merge].fn(sparse, weights, params), ref, rtol=1e-12, atol=1e-12)
    perm = list(reversed(range(len(tensors))))
    out = BY_NAME[merge].fn([sparse[i] for i in perm], [weights[i] for i in perm], params)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(IDENTITY_PARAMS))
def test_lambda_scales_the_result(name):
    g = gen(2)
    tensors = [torch.randn(5, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    p = SPARSE_PARAMS[name]
    base = type(p)(**{**p.__dict__, "lambda_": 1.0})
    scaled = type(p)(**{**p.__dict__, "lambda_": -2.5})
    out1 = BY_NAME[name].fn(tensors, [0.6, 0.4], base, gen(9))
    out2 = BY_NAME[name].fn(tensors, [0.6, 0.4], scaled, gen(9))
    torch.testing.assert_close(out2, -2.5 * out1, rtol=1e-12, atol=0)


def test_inputs_are_not_modified():
    g = gen(4)
    tensors = [torch.randn(6, 6, generator=g) for _ in range(3)]
    copies = [t.clone() for t in tensors]
    for m in ELEMENTWISE_METHODS:
        m.fn(tensors, [1.0, -0.5, 2.0], SPARSE_PARAMS[m.name], gen(0))
    assert all(torch.equal(a, b) for a, b in zip(tensors, copies))


def test_half_precision_inputs_accumulate_in_fp32():
    x = torch.randn(4, 4, generator=gen(0)).to(torch.bfloat16)
    out = ties([x, x], [0.5, 0.5], TiesParams(density=1.0))
    assert out.dtype == torch.float32
    assert torch.equal(out, x.float())


@pytest.mark.parametrize(
    "make",
    [
        lambda: TiesParams(density=0.0),
        lambda: TiesParams(density=1.5),
        lambda: TiesParams(density=float("nan")),
        lambda: TiesParams(lambda_=float("inf")),
        lambda: TiesParams(normalize="yes"),
        lambda: DareParams(density=-0.2),
        lambda: DareParams(seed=-1),
        lambda: DareParams(seed=1.5),
        lambda: BreadcrumbsParams(density=0.95, gamma=0.1),
        lambda: BreadcrumbsParams(gamma=1.0),
        lambda: DellaParams(density=0.1, epsilon=0.15),
        lambda: DellaParams(density=0.9, epsilon=0.15),
        lambda: DellaParams(epsilon=-0.01),
    ],
)
def test_bad_parameters_are_usage_errors(make):
    with pytest.raises(UsageError):
        make()


def test_bad_inputs():
    x = torch.zeros(2, 3)
    with pytest.raises(UsageError):
        ties([x, x], [1.0], TiesParams())
    with pytest.raises(UsageError):
        ties([], [], TiesParams())
    with pytest.raises(UsageError):
        ties([x], [float("nan")], TiesParams())
    with pytest.raises(IncompatibleAdapters):
        ties([x, torch.zeros(3, 2)], [1.0, 1.0], TiesParams())


def test_method_functions_match_the_table():
    assert BY_NAME["ties"].fn is ties and BY_NAME["della"].fn is della and BY_NAME["dare_ties"].fn is dare_ties
    assert BY_NAME["breadcrumbs"].fn is breadcrumbs and BY_NAME["breadcrumbs_ties"].fn is breadcrumbs_ties
    assert BY_NAME["magnitude_prune"].fn is magnitude_prune and BY_NAME["della_linear"].fn is della_linear


@pytest.mark.parametrize("name", sorted(SPARSE_PARAMS))
@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 12), cols=st.integers(1, 12), ties_=st.booleans())
def test_row_blocks_and_sampled_selection_change_nothing(name, seed, rows, cols, ties_):
    """Tiny blocks (one row each, selections scanned in 3-entry chunks, always bracketed) give the same bytes as
    whole-tensor processing, also with many equal magnitudes (ties straddling block boundaries)."""
    from adaptermerge.methods import sparsify, task_arithmetic

    g = gen(seed)
    if ties_:
        tensors = [torch.randint(-2, 3, (rows, cols), generator=g).double() for _ in range(3)]
    else:
        tensors = [torch.randn(rows, cols, generator=g, dtype=torch.float64) for _ in range(3)]
    w = [0.5, -1.0, 2.0]
    p = SPARSE_PARAMS[name]
    ref = BY_NAME[name].fn(tensors, w, p, gen(seed))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(task_arithmetic, "CHUNK_ELEMENTS", 1)
        mp.setattr(sparsify, "CHUNK_ELEMENTS", 3)
        mp.setattr(sparsify, "DIRECT_SELECT_MAX", 0)
        mp.setattr(sparsify, "_SAMPLE_TARGET", 4)
        out = BY_NAME[name].fn(tensors, w, p, gen(seed))
    assert torch.equal(out, ref)
