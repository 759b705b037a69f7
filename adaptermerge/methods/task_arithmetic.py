"""The task-vector family on a list of same-shape tensors: task arithmetic, TIES, DARE, breadcrumbs, DELLA.

Every function here has one signature::

    fn(tensors: Sequence[Tensor], weights: Sequence[float], params: <Params>, generator=None) -> Tensor

``tensors[i]`` is task ``i``'s representation of one module in the chosen space (a dense ``out x in`` delta,
a core-space ``R x R`` core, or a KnOTS ``S V_i^T`` block; see :mod:`adaptermerge.methods.spaces`), ``weights[i]``
its weight. An adapter that does not touch the module is simply absent from the list. Inputs are never
modified; the result is a new tensor in fp32 (fp64 for fp64 inputs) with no NaN/Inf (a non-finite result
raises :class:`~adaptermerge.errors.NumericalError`).

Conventions shared by all methods (``tau_i = w_i * sparsify(delta_i)`` is task ``i``'s weighted, sparsified
task vector):

* linear methods: ``out = lambda * sum_i tau_i``;
* TIES-style methods: elect ``sign = +1 where sum_i tau_i >= 0 else -1`` (weights act before the vote, as in
  mergekit; zero goes positive), keep ``tau_i`` where ``sign(tau_i) == sign`` (zeros never agree), and
  ``out = lambda * sum_i kept_i / sum_i |w_i| [tau_i agrees]`` (``0/0 -> 0``), or without the division when
  ``normalize`` is false. For non-negative weights the divisor is mergekit's ``sum_i w_i [agrees]``; with a
  negative weight mergekit's signed divisor cancels the weight's sign (a single adapter at weight -1 comes out
  as +delta) and can vanish while the numerator does not, so we divide by ``|w_i|``.

Example:
    >>> import torch
    >>> d1 = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    >>> d2 = torch.tensor([[2.0, 1.0], [-1.0, 0.5]])
    >>> ties([d1, d2], [1.0, 1.0], TiesParams(density=1.0))
    tensor([[ 1.5000, -2.0000],
            [ 3.0000,  0.5000]])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from adaptermerge.cpu import single_threaded
from adaptermerge.errors import IncompatibleAdapters, NumericalError, UsageError
from adaptermerge.methods.catalog import SPACES, validate_declared
from adaptermerge.methods.registry import BaseMerge, Kind, Method, Param, RankRule, register
from adaptermerge.methods.sparsify import (
    CHUNK_ELEMENTS,
    TopK,
    breadcrumbs_rules,
    compute_dtype,
    dare_drop,
    della_drop,
    module_generator,
    trim_rule,
)

# ----------------------------------------------------------------------------------------------- parameters

P_LAMBDA = Param("lambda", float, 1.0, "scale of the merged task vector (lambda * merged)", attr="lambda_")
P_NORMALIZE = Param(
    "normalize",
    bool,
    True,
    "disjoint merge divides by the summed |weights| of the agreeing entries (--no-normalize: plain sum)",
)
P_SEED = Param(
    "seed",
    int,
    0,
    "random seed; each module draws from module_generator(seed, module name), byte-identical between runs",
    low=0,
)


def _density(default: float, help_: str) -> Param:
    return Param("density", float, default, help_, low=0.0, high=1.0, open_low=True)


P_DENSITY_TRIM = _density(0.2, "fraction of each task's entries kept, by magnitude (k = round(density * numel))")
P_DENSITY_DARE = _density(0.5, "keep probability of each entry; survivors are rescaled by 1/density")
P_DENSITY_BREAD = _density(0.9, "fraction of entries kept after dropping the gamma largest and the smallest")
P_DENSITY_DELLA = _density(0.5, "mean keep probability; ramped from density-epsilon to density+epsilon per row")
P_GAMMA = Param("gamma", float, 0.01, "fraction of largest entries dropped", low=0.0, high=1.0, open_high=True)
P_EPSILON = Param("epsilon", float, 0.15, "half-width of the keep-probability ramp", low=0.0, high=1.0, open_high=True)


def _validate(name: str, params: object, infos: tuple[Param, ...]) -> None:
    validate_declared(name, params, infos)


@dataclass(frozen=True)
class TaskArithmeticParams:
    """``task_arithmetic``: ``lambda``."""

    lambda_: float = 1.0

    def __post_init__(self) -> None:
        _validate("task_arithmetic", self, (P_LAMBDA,))


@dataclass(frozen=True)
class TiesParams:
    """``ties``: ``density`` (trim), ``lambda``, ``normalize`` (disjoint mean)."""

    density: float = 0.2
    lambda_: float = 1.0
    normalize: bool = True

    def __post_init__(self) -> None:
        _validate("ties", self, (P_DENSITY_TRIM, P_LAMBDA, P_NORMALIZE))


@dataclass(frozen=True)
class MagnitudePruneParams:
    """``magnitude_prune``: ``density``, ``lambda``."""

    density: float = 0.2
    lambda_: float = 1.0

    def __post_init__(self) -> None:
        _validate("magnitude_prune", self, (P_DENSITY_TRIM, P_LAMBDA))


@dataclass(frozen=True)
class DareParams:
    """``dare_linear`` / ``dare_ties``: ``density`` (keep probability), ``lambda``, ``normalize`` (ties only),
    ``seed`` (used when no generator is passed)."""

    density: float = 0.5
    lambda_: float = 1.0
    normalize: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        _validate("dare", self, (P_DENSITY_DARE, P_LAMBDA, P_NORMALIZE, P_SEED))


@dataclass(frozen=True)
class BreadcrumbsParams:
    """``breadcrumbs`` / ``breadcrumbs_ties``: ``density``, ``gamma`` (with ``density + gamma <= 1``), ``lambda``,
    ``normalize`` (ties only)."""

    density: float = 0.9
    gamma: float = 0.01
    lambda_: float = 1.0
    normalize: bool = True

    def __post_init__(self) -> None:
        _validate("breadcrumbs", self, (P_DENSITY_BREAD, P_GAMMA, P_LAMBDA, P_NORMALIZE))
        if self.density + self.gamma > 1.0 + 1e-12:
            raise UsageError(
                f"breadcrumbs: density + gamma must be <= 1 (keep density after dropping the gamma largest), "
                f"got density={self.density}, gamma={self.gamma}"
            )


@dataclass(frozen=True)
class DellaParams:
    """``della`` / ``della_linear``: ``density``, ``epsilon`` (with ``0 < density - epsilon`` and
    ``density + epsilon <= 1``), ``lambda``, ``normalize`` (della only), ``seed``."""

    density: float = 0.5
    epsilon: float = 0.15
    lambda_: float = 1.0
    normalize: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        _validate("della", self, (P_DENSITY_DELLA, P_EPSILON, P_LAMBDA, P_NORMALIZE, P_SEED))
        if self.density - self.epsilon <= 0.0 or self.density + self.epsilon > 1.0:
            raise UsageError(
                "della: keep probabilities run from density - epsilon to density + epsilon and must lie in (0, 1]; "
                f"got density={self.density}, epsilon={self.epsilon}"
            )


# ------------------------------------------------------------------------------------------- shared steps


def check_inputs(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> list[float]:
    """One weight per tensor, all finite; all tensors of one shape and finite. Returns the weights as floats."""
    if len(tensors) == 0:
        raise UsageError("a merge needs at least one task tensor")
    if len(tensors) != len(weights):
        raise UsageError(f"got {len(weights)} weights for {len(tensors)} task tensors")
    ws = [float(w) for w in weights]
    if not all(math.isfinite(w) for w in ws):
        raise UsageError(f"weights must be finite numbers, got {ws}")
    shape = tensors[0].shape
    for i, t in enumerate(tensors):
        if t.shape != shape:
            raise IncompatibleAdapters(f"task {i} has shape {tuple(t.shape)}, task 0 has {tuple(shape)}")
        # one cheap reduction; the elementwise check runs only when the sum is not finite (NaN/Inf or overflow)
        if not math.isfinite(float(t.sum())) and not bool(torch.isfinite(t).all()):
            raise NumericalError(f"task {i} contains NaN/Inf values")
    return ws


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Task arithmetic (Ilharco et al., ICLR 2023): ``sum_i w_i t_i``, accumulated in fp32 (fp64 for fp64)."""
    dt = compute_dtype(tensors[0])
    out = torch.zeros(tensors[0].shape, dtype=dt, device=tensors[0].device)
    for t, w in zip(tensors, weights, strict=True):
        if w != 0.0:
            out.add_(t.to(dt), alpha=w)
    return out


def elect_sign(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """TIES step 2 "elect" (Yadav et al., 2023, Eq. 2; mergekit's "sum" consensus on the weighted vectors):
    ``s = +1 where sum_i w_i t_i >= 0, else -1`` (zero sums elect +), as a float tensor of +-1."""
    total = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights, strict=True):
        if w != 0.0:
            total.add_(t, alpha=w)
    # copysign(1, total): +1 for total >= 0 (a sum started at +0.0 is never -0.0), -1 below
    return torch.copysign(torch.ones((), dtype=total.dtype, device=total.device), total)


def disjoint_merge(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], sign: torch.Tensor, normalize: bool
) -> torch.Tensor:
    """TIES step 3 "disjoint merge" (Yadav et al., 2023, Eq. 3) of ``tau_i = w_i t_i`` under the elected sign
    ``s = +-1``: the entries whose sign agrees with ``s`` (zeros never agree) are summed; with ``normalize`` the
    sum is divided by ``sum_i |w_i| [tau_i agrees]`` per entry, and entries where nothing agrees are 0
    (``0/0 -> 0``).

    Computed with float operations only: ``a_i = max(sign(w_i) s t_i, 0)`` is ``|t_i|`` where ``tau_i`` agrees,
    else 0; ``out = s * sum_i |w_i| a_i / sum_i |w_i| sign(a_i)``. Where nothing agrees the divisor is raised to
    ``min_i |w_i|`` (the numerator is 0 there), which leaves every other entry exact.
    """
    neg_sign = -sign if any(w < 0 for w in weights) else None
    num = torch.zeros_like(tensors[0])
    den = torch.zeros_like(tensors[0]) if normalize else None
    for t, w in zip(tensors, weights, strict=True):
        if w == 0.0:
            continue
        agreeing = torch.mul(t, sign if w > 0 else neg_sign).clamp_min_(0.0)  # |t| where w t agrees, else 0
        num.add_(agreeing, alpha=abs(w))
        if den is not None:
            den.add_(agreeing.sign_(), alpha=abs(w))
    num.mul_(sign)
    if den is not None:
        nonzero = [abs(w) for w in weights if w != 0.0]
        if nonzero:
            num.div_(den.clamp_min_(min(nonzero)))
    return num


def ties_combine(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """TIES steps 2 and 3 on already sparsified tensors: :func:`elect_sign` then :func:`disjoint_merge`."""
    return disjoint_merge(tensors, weights, elect_sign(tensors, weights), normalize)


# Sparsified tasks, served row block by row block: the merge runs on cache-sized blocks (a few hundred KB per
# task) instead of whole out x in matrices, which saves most of the memory traffic and every full-size temporary.


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """2-D row-major view: ``(shape[0], prod(rest))``; a vector is one row."""
    if x.dim() >= 2:
        return x.reshape(x.shape[0], -1)
    return x.reshape(1, -1)


class _Masked:
    """A deterministic magnitude selection (``keep`` minus ``drop``), applied to each row block on demand."""

    def __init__(self, x: torch.Tensor, keep: TopK, drop: TopK | None = None) -> None:
        self.rows2d = _as_rows(x)
        self.keep = keep
        self.drop = drop if drop is not None and drop.k > 0 else None
        self.everything = keep.k >= keep.numel and self.drop is None

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        block = self.rows2d[r0:r1]
        if self.everything:
            return block
        start = r0 * self.rows2d.shape[1]
        kept = self.keep.select(block, start)
        if self.drop is not None:  # drop is a subset of keep: x - x = 0 exactly, x - 0 = x
            kept = kept - self.drop.select(block, start)
        return kept


class _Dense:
    """A task sparsified up front (random drops: one draw per entry in row-major order over the whole tensor)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.rows2d = _as_rows(x)

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        return self.rows2d[r0:r1]


def _merge(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    prepare: Callable[[torch.Tensor], _Masked | _Dense],
    combine: Callable[[list[torch.Tensor], Sequence[float]], torch.Tensor],
    lambda_: float,
    method: str,
) -> torch.Tensor:
    """Sparsify every task (``prepare``, in list order), then ``combine`` them row block by row block, times
    ``lambda``; refuse non-finite results."""
    dt = compute_dtype(tensors[0])
    xs = [t.to(dt).contiguous() for t in tensors]
    prepared = [prepare(x) for x in xs]
    out = torch.empty(xs[0].shape, dtype=dt, device=xs[0].device)
    with single_threaded():
        _merge_blocks(prepared, weights, combine, lambda_, method, out)
    return out


def _merge_blocks(prepared, weights, combine, lambda_: float, method: str, out: torch.Tensor) -> None:
    out2d = _as_rows(out)
    n_rows, n_cols = out2d.shape
    step = max(1, CHUNK_ELEMENTS // max(n_cols, 1))
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        block = combine([p.rows(r0, r1) for p in prepared], weights)
        if lambda_ != 1.0:
            block.mul_(lambda_)
        # the sum is finite iff every entry is (or the sum overflowed: then look at the entries)
        if not math.isfinite(float(block.sum())) and not bool(torch.isfinite(block).all()):
            raise NumericalError(f"{method} produced non-finite values; check the inputs for NaN/Inf")
        out2d[r0:r1] = block


def _linear(tensors, weights, prepare, lambda_: float, method: str) -> torch.Tensor:
    return _merge(tensors, weights, prepare, weighted_sum, lambda_, method)


def _ties(tensors, weights, prepare, lambda_: float, normalize: bool, method: str) -> torch.Tensor:
    return _merge(tensors, weights, prepare, lambda ts, ws: ties_combine(ts, ws, normalize), lambda_, method)


def _trim(density: float) -> Callable[[torch.Tensor], _Masked]:
    return lambda x: _Masked(x, trim_rule(x, density))


def _breadcrumbs(density: float, gamma: float) -> Callable[[torch.Tensor], _Masked]:
    return lambda x: _Masked(x, *breadcrumbs_rules(x, density, gamma))


def _dare(density: float, g: torch.Generator) -> Callable[[torch.Tensor], _Dense]:
    return lambda x: _Dense(dare_drop(x, density, g))  # every task draws, also at weight 0


def _della(density: float, epsilon: float, g: torch.Generator) -> Callable[[torch.Tensor], _Dense]:
    return lambda x: _Dense(della_drop(x, density, epsilon, g))


def _gen(generator: torch.Generator | None, seed: int) -> torch.Generator:
    """The caller's generator, else one from ``seed`` (callers merging many modules should pass
    ``module_generator(seed, module_name)`` so that modules draw independently)."""
    return generator if generator is not None else module_generator(seed, "")


# ---------------------------------------------------------------------------------------------- methods


def task_arithmetic(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: TaskArithmeticParams = TaskArithmeticParams(),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Task arithmetic (Ilharco et al., ICLR 2023): ``lambda * sum_i w_i delta_i``."""
    ws = check_inputs(tensors, weights)
    return _linear(tensors, ws, _Dense, params.lambda_, "task_arithmetic")


def ties(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: TiesParams = TiesParams(),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """TIES-Merging (Yadav et al., NeurIPS 2023): trim each delta to its top ``density`` by magnitude, elect the
    sign of ``sum_i w_i trimmed_i``, disjoint merge (mean over agreeing entries, or sum without normalize),
    times ``lambda``."""
    ws = check_inputs(tensors, weights)
    return _ties(tensors, ws, _trim(params.density), params.lambda_, params.normalize, "ties")


def magnitude_prune(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: MagnitudePruneParams = MagnitudePruneParams(),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Magnitude pruning then task arithmetic: ``lambda * sum_i w_i trim(delta_i, density)``."""
    ws = check_inputs(tensors, weights)
    return _linear(tensors, ws, _trim(params.density), params.lambda_, "magnitude_prune")


def dare_linear(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: DareParams = DareParams(),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE (Yu et al., ICML 2024) + task arithmetic: ``lambda * sum_i w_i dare(delta_i)``, where ``dare`` keeps
    each entry with probability ``density`` and rescales survivors by ``1/density``. Tasks draw in list order
    from ``generator``. ``density = 1`` equals :func:`task_arithmetic` exactly."""
    ws = check_inputs(tensors, weights)
    g = _gen(generator, params.seed)
    return _linear(tensors, ws, _dare(params.density, g), params.lambda_, "dare_linear")


def dare_ties(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: DareParams = DareParams(),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE (Yu et al., ICML 2024) + TIES election and disjoint merge of the dropped-and-rescaled deltas."""
    ws = check_inputs(tensors, weights)
    g = _gen(generator, params.seed)
    return _ties(tensors, ws, _dare(params.density, g), params.lambda_, params.normalize, "dare_ties")


def breadcrumbs(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: BreadcrumbsParams = BreadcrumbsParams(),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky, ECCV 2024): drop each delta's ``gamma`` largest and its smallest
    entries so that ``density`` remain, then ``lambda * sum_i w_i masked_i``."""
    ws = check_inputs(tensors, weights)
    return _linear(tensors, ws, _breadcrumbs(params.density, params.gamma), params.lambda_, "breadcrumbs")


def breadcrumbs_ties(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: BreadcrumbsParams = BreadcrumbsParams(),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Breadcrumbs masks, then TIES election and disjoint merge (mergekit's ``breadcrumbs_ties``)."""
    ws = check_inputs(tensors, weights)
    return _ties(
        tensors, ws, _breadcrumbs(params.density, params.gamma), params.lambda_, params.normalize, "breadcrumbs_ties"
    )


def della(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: DellaParams = DellaParams(),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DELLA-Merging (Deep et al., 2024): MagPrune (keep probability ramped by magnitude rank within each row
    from ``density - epsilon`` to ``density + epsilon``, survivors rescaled by ``1/p``), then TIES election and
    disjoint merge, times ``lambda``."""
    ws = check_inputs(tensors, weights)
    g = _gen(generator, params.seed)
    return _ties(tensors, ws, _della(params.density, params.epsilon, g), params.lambda_, params.normalize, "della")


def della_linear(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: DellaParams = DellaParams(),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DELLA MagPrune then task arithmetic: ``lambda * sum_i w_i magprune(delta_i)``."""
    ws = check_inputs(tensors, weights)
    g = _gen(generator, params.seed)
    return _linear(tensors, ws, _della(params.density, params.epsilon, g), params.lambda_, "della_linear")


# ------------------------------------------------------------------------------------------------ table

_TIES = "Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023"
_TIES_URL = "https://arxiv.org/abs/2306.01708"
_DARE = (
    "Yu et al., Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch, ICML 2024"
)
_DARE_URL = "https://arxiv.org/abs/2311.03099"
_BREAD = "Davari & Belilovsky, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks, ECCV 2024"
_BREAD_URL = "https://arxiv.org/abs/2312.06795"
_DELLA = "Deep et al., DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling, 2024"
_DELLA_URL = "https://arxiv.org/abs/2406.11617"
_TA = "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023"
_TA_URL = "https://arxiv.org/abs/2212.04089"

_MERGE = (
    "elect s = sign(sum_i tau_i) (0 -> +); out = lambda * sum_i tau_i [sign(tau_i) = s] / sum_i |w_i| [sign(tau_i) = s]"
    " (0/0 -> 0; no division with --no-normalize)"
)


def _info(
    name: str,
    title: str,
    paper: str,
    url: str,
    formula: str,
    fn: Callable,
    cls: type,
    params: tuple[Param, ...],
    stochastic: bool = False,
) -> Method:
    """An elementwise method's declaration: any space, re-factored at the end, added dense into a base."""
    return Method(
        name=name,
        title=title,
        paper=paper,
        url=url,
        formula=formula,
        kind=Kind.ELEMENTWISE,
        rank_rule=RankRule.REFACTOR,
        base_merge=BaseMerge.DENSE,
        fn=fn,
        params=params,
        spaces=SPACES,
        params_cls=cls,
    )


ELEMENTWISE_METHODS: tuple[Method, ...] = (
    _info(
        "task_arithmetic",
        "Weighted sum of the task vectors, scaled by lambda",
        _TA,
        _TA_URL,
        "out = lambda * sum_i w_i delta_i",
        task_arithmetic,
        TaskArithmeticParams,
        (P_LAMBDA,),
    ),
    _info(
        "ties",
        "TIES: trim by magnitude, elect sign, disjoint mean",
        _TIES,
        _TIES_URL,
        "tau_i = w_i * topk(delta_i, round(density * numel)); " + _MERGE,
        ties,
        TiesParams,
        (P_DENSITY_TRIM, P_LAMBDA, P_NORMALIZE),
    ),
    _info(
        "dare_linear",
        "DARE: random drop with 1/density rescale, then weighted sum",
        _DARE,
        _DARE_URL,
        "tau_i = w_i * m_i * delta_i / density, m_i ~ Bernoulli(density) per entry; out = lambda * sum_i tau_i",
        dare_linear,
        DareParams,
        (P_DENSITY_DARE, P_LAMBDA, P_SEED),
        stochastic=True,
    ),
    _info(
        "dare_ties",
        "DARE drop and rescale, then TIES election and disjoint merge",
        _DARE,
        _DARE_URL,
        "tau_i = w_i * m_i * delta_i / density, m_i ~ Bernoulli(density); " + _MERGE,
        dare_ties,
        DareParams,
        (P_DENSITY_DARE, P_LAMBDA, P_NORMALIZE, P_SEED),
        stochastic=True,
    ),
    _info(
        "magnitude_prune",
        "Magnitude pruning of each task vector, then weighted sum",
        _TIES + " (trim step)",
        _TIES_URL,
        "out = lambda * sum_i w_i * topk(delta_i, round(density * numel))",
        magnitude_prune,
        MagnitudePruneParams,
        (P_DENSITY_TRIM, P_LAMBDA),
    ),
    _info(
        "breadcrumbs",
        "Model Breadcrumbs: drop the largest gamma and the smallest entries, then weighted sum",
        _BREAD,
        _BREAD_URL,
        "tau_i = w_i * delta_i on magnitude ranks [round(gamma n), round(gamma n) + round(density n)); "
        "out = lambda * sum_i tau_i",
        breadcrumbs,
        BreadcrumbsParams,
        (P_DENSITY_BREAD, P_GAMMA, P_LAMBDA),
    ),
    _info(
        "breadcrumbs_ties",
        "Model Breadcrumbs masks, then TIES election and disjoint merge",
        _BREAD,
        _BREAD_URL,
        "tau_i = w_i * delta_i on magnitude ranks [round(gamma n), round(gamma n) + round(density n)); " + _MERGE,
        breadcrumbs_ties,
        BreadcrumbsParams,
        (P_DENSITY_BREAD, P_GAMMA, P_LAMBDA, P_NORMALIZE),
    ),
    _info(
        "della",
        "DELLA: magnitude-ranked keep probabilities with 1/p rescale, then TIES election and disjoint merge",
        _DELLA,
        _DELLA_URL,
        "p_jk = density - epsilon + 2 epsilon rank_k(|delta_i[j, :]|) / (n - 1); "
        "tau_i = w_i * m_i * delta_i / p, m_i ~ Bernoulli(p); " + _MERGE,
        della,
        DellaParams,
        (P_DENSITY_DELLA, P_EPSILON, P_LAMBDA, P_NORMALIZE, P_SEED),
        stochastic=True,
    ),
    _info(
        "della_linear",
        "DELLA magnitude-ranked drop with 1/p rescale, then weighted sum",
        _DELLA,
        _DELLA_URL,
        "p_jk = density - epsilon + 2 epsilon rank_k(|delta_i[j, :]|) / (n - 1); "
        "out = lambda * sum_i w_i * m_i * delta_i / p, m_i ~ Bernoulli(p)",
        della_linear,
        DellaParams,
        (P_DENSITY_DELLA, P_EPSILON, P_LAMBDA, P_SEED),
        stochastic=True,
    ),
)

for _m in ELEMENTWISE_METHODS:
    register(_m)
