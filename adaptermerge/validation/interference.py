"""Several adapters: can they be combined, and how much do their deltas interfere.

* Cosine similarity per shared module, in factored form: ``<B_i A_i, B_j A_j>_F = sum((B_i^T B_j) * (A_i A_j^T))``
  uses two r x r Gram products, never an ``out x in`` matrix.
* Sign conflicts (the interference TIES resolves): among the entries that are in the top ``density`` by
  magnitude of at least two adapters' weighted deltas, the fraction where those adapters disagree in sign.
  That needs entries, so it runs module by module: exactly on the dense delta when a module has at most
  ``max_entries`` entries (one fp32 delta in memory at a time, plus a byte-sized mask per adapter), and on a
  fixed-seed uniform sample of ``max_entries`` entries, each computed as a row-column dot product of the
  factors, for larger modules (the top-``density`` threshold then comes from the sample).

Reading the figures: cosine near 0 means nearly orthogonal updates (a linear sum keeps each one's effect);
near 1, the same direction (averaging avoids doubling it); negative, updates that cancel in a linear merge.
Two unrelated deltas disagree on about half of their shared top entries; fewer conflicts mean agreement.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations

import torch

from adaptermerge.adapter import Adapter
from adaptermerge.errors import AdapterMergeError
from adaptermerge.lowrank import LowRank
from adaptermerge.validation.report import Check

DENSITY = 0.2  # top fraction of entries compared for sign conflicts (TIES' default density)
MAX_ENTRIES = 1 << 22  # modules with more entries are sampled
OPPOSED = -0.3  # mean cosine below this is a warning: a linear merge cancels the adapters
CONFLICTED = 0.6  # sign conflicts above this (unrelated deltas give about 0.5) suggest TIES
DOMINANT = 3.0  # an adapter whose weighted delta norm is this many times another's dominates a merge


def check_combinable(adapters: Sequence[Adapter], names: Sequence[str]) -> Check:
    """combine.compatible: combine's own compatibility rules (bases, shapes, layouts, DoRA)."""
    from adaptermerge.combination import check_compatible

    try:
        check_compatible(adapters, names, allow_different_base=False)
    except AdapterMergeError as e:
        hint = "pass --allow-different-base to combine if they share weights" if "different bases" in str(e) else None
        return Check("combine.compatible", "fail", str(e), hint=hint, subject="adapters")
    shared = set.intersection(*(set(a.modules) for a in adapters))
    figures = {"adapters": list(names), "shared_modules": len(shared)}
    return Check(
        "combine.compatible", "pass", f"combinable: {len(shared)} modules shared by all", figures, subject="adapters"
    )


def cosine(x: LowRank, y: LowRank) -> float:
    """Cosine similarity of two deltas, from r x r Gram products (0 when one of them is zero)."""
    ip = float(torch.sum((x.B.double().T @ y.B.double()) * (x.A.double() @ y.A.double().T)))
    n = x.frobenius_norm() * y.frobenius_norm()
    return ip / n if n > 0 else 0.0


def sign_conflicts(
    deltas: Sequence[tuple[float, LowRank]], density: float = DENSITY, max_entries: int = MAX_ENTRIES, seed: int = 0
) -> tuple[float | None, int, bool]:
    """``(conflict rate, entries compared, sampled)`` for one module's weighted deltas.

    The rate is None when no entry is in the top ``density`` of two adapters at once.
    """
    m, n = deltas[0][1].shape
    sampled = m * n > max_entries
    if sampled:
        g = torch.Generator().manual_seed(seed)
        rows = torch.randint(0, m, (max_entries,), generator=g)
        cols = torch.randint(0, n, (max_entries,), generator=g)
    in_top, positive = [], []
    for w, lr in deltas:
        b, a = lr.B.float(), lr.A.float()
        vals = (b[rows] * a[:, cols].T).sum(1) if sampled else (b @ a).reshape(-1)
        vals = vals * w
        k = max(1, math.ceil(density * vals.numel()))
        thresh = torch.topk(vals.abs(), k, sorted=False).values.min()
        in_top.append(vals.abs() >= thresh)
        positive.append(vals > 0)
        del vals
    top = torch.stack(in_top)
    pos = torch.stack(positive) & top
    neg = ~torch.stack(positive) & top
    shared = top.sum(0) >= 2
    compared = int(shared.sum())
    if compared == 0:
        return None, 0, sampled
    conflict = shared & pos.any(0) & neg.any(0)
    return int(conflict.sum()) / compared, compared, sampled


def check_interference(
    adapters: Sequence[Adapter],
    names: Sequence[str],
    weights: Sequence[float],
    density: float = DENSITY,
    max_entries: int = MAX_ENTRIES,
) -> Check:
    """combine.interference: cosines, sign conflicts and relative sizes, with what they suggest."""
    modules = sorted(set().union(*(a.modules for a in adapters)))
    per: dict[str, dict] = {}
    pair_cos: dict[str, list[float]] = {f"{i}-{j}": [] for i, j in combinations(range(len(adapters)), 2)}
    conflicts: list[tuple[float, int]] = []
    sampled_any = False
    for mod in modules:
        have = [i for i, a in enumerate(adapters) if mod in a.modules]
        if len(have) < 2:
            continue
        cos = {}
        for i, j in combinations(have, 2):
            c = math.copysign(1.0, weights[i] * weights[j]) * cosine(adapters[i].modules[mod], adapters[j].modules[mod])
            cos[f"{i}-{j}"] = c
            pair_cos[f"{i}-{j}"].append(c)
        rate, compared, sampled = sign_conflicts(
            [(weights[i], adapters[i].modules[mod]) for i in have], density, max_entries
        )
        sampled_any |= sampled
        if rate is not None:
            conflicts.append((rate, compared))
        per[mod] = {"cosine": cos, "sign_conflict": rate, "sampled": sampled}
    if not per:
        return Check("combine.interference", "pass", "the adapters share no module: they cannot interfere",
                     {"modules": {}}, subject="adapters")  # fmt: skip
    all_cos = [c for v in pair_cos.values() for c in v]
    mean_cos = sum(all_cos) / len(all_cos)
    total = sum(n for _, n in conflicts)
    rate = sum(r * n for r, n in conflicts) / total if total else None
    sizes = [
        abs(w) * math.sqrt(sum(m.frobenius_norm() ** 2 for m in a.modules.values())) for a, w in zip(adapters, weights)
    ]
    figures = {
        "adapters": list(names),
        "weights": list(weights),
        "mean_cosine": mean_cos,
        "pairs": {p: {"mean_cosine": sum(v) / len(v), "min": min(v), "max": max(v)} for p, v in pair_cos.items() if v},
        "sign_conflict_rate": rate,
        "density": density,
        "sampled_modules": sum(v["sampled"] for v in per.values()),
        "weighted_delta_norms": sizes,
        "modules": per,
    }
    reading, status, hint = _reading(mean_cos, rate, sizes, names)
    msg = (
        f"{len(per)} shared modules: mean cosine {mean_cos:+.3f}"
        + (
            f", sign conflicts in {rate:.0%} of the shared top-{density:.0%} entries (unrelated deltas: about 50%)"
            if rate is not None
            else ""
        )
        + (" (sampled in large modules)" if sampled_any else "")
        + f"; {reading}"
    )
    return Check("combine.interference", status, msg, figures, hint=hint, subject="adapters")


def _reading(
    mean_cos: float, rate: float | None, sizes: list[float], names: Sequence[str]
) -> tuple[str, str, str | None]:
    """What the figures suggest for the choice of method and weights."""
    if mean_cos < OPPOSED:
        reading, status = "the updates point against each other, so a linear merge cancels part of both", "warn"
        hint = "prefer a sign-electing merge (TIES) or lower one adapter's weight; check each task after merging"
    elif abs(mean_cos) < 0.1:
        reading, status, hint = (
            "nearly orthogonal updates: a linear sum (task arithmetic) keeps each one's effect",
            "pass",
            None,
        )
    elif mean_cos > 0.5:
        reading, status = "similar updates: average them (weights summing to 1) rather than add them", "pass"
        hint = None
    else:
        reading, status, hint = "partly overlapping updates", "pass", None
    if rate is not None and rate > CONFLICTED and status == "pass":
        reading += "; sign conflicts above the level of unrelated deltas favour TIES-style sign election"
    big, small = max(sizes), min(sizes)
    if small > 0 and big / small > DOMINANT:
        i = sizes.index(big)
        reading += f"; {names[i]} is {big / small:.1f}x larger and dominates with these weights"
        hint = (hint + "; " if hint else "") + "weights proportional to 1/||delta|| equalise the adapters' influence"
    return reading, status, hint
