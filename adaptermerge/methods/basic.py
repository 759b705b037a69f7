"""Exact linear combination, concatenation, SVD re-ranking, and PEFT's factor-wise ``linear``.

Each function takes ``terms = [(w_i, LowRank_i), ...]`` for one module (adapters that do not touch
the module are absent) and returns stacked factors ``(B, A)``; the registry's ``refactor`` rule then
decides the output rank. Scaling is already folded into every ``A``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from adaptermerge.errors import IncompatibleAdapters
from adaptermerge.methods._lazy import torch
from adaptermerge.methods.registry import BaseMerge, Kind, Method, RankRule, register

if TYPE_CHECKING:
    from adaptermerge.lowrank import LowRank

Terms = list[tuple[float, "LowRank"]]


def weighted_stack(terms: Terms, params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``B_cat = [B_1 | B_2 | ...]``, ``A_cat = [w_1 A_1; w_2 A_2; ...]``: ``B_cat A_cat = sum_i w_i B_i A_i``."""
    from adaptermerge.lowrank import stack_factors

    return stack_factors(
        [(w, m.A, m.B) for w, m in terms],
        dtype=params.get("compute_dtype") or torch.float32,
        device=params.get("device", "cpu"),
    )


def peft_factor_linear(terms: Terms, params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``combination_type="linear"``: factors averaged separately (keeps cross terms).

    With PEFT's raw factors ``A_i, B_i`` and scaling ``s_i``:
    ``A' = sum_i sign(w_i s_i) sqrt(|w_i s_i|) A_i`` and ``B' = sum_i sqrt(|w_i s_i|) B_i``.
    For embeddings PEFT's ``A`` is ``lora_embedding_A``, which is our canonical ``B`` transposed, so
    the sign goes to our ``B`` side there.
    """
    dtype = params.get("compute_dtype") or torch.float32
    device = params.get("device", "cpu")
    ranks = {m.rank for _, m in terms}
    if len(ranks) != 1:
        raise IncompatibleAdapters(
            f"factor-linear (PEFT's 'linear') needs equal ranks per module, got {sorted(ranks)}; "
            "use `method` linear (exact) or svd instead"
        )
    a_sum = b_sum = None
    for w, m in terms:
        ws = w * m.scale
        root = math.sqrt(abs(ws))
        sign = 1.0 if ws >= 0 else -1.0
        a_raw = m.A.to(device=device, dtype=dtype) / m.scale  # undo the folding: PEFT splits as (B, A)*s
        b_raw = m.B.to(device=device, dtype=dtype)
        if m.layout == "embedding":
            a_term, b_term = root * a_raw, sign * root * b_raw
        else:
            a_term, b_term = sign * root * a_raw, root * b_raw
        a_sum = a_term if a_sum is None else a_sum + a_term
        b_sum = b_term if b_sum is None else b_sum + b_term
    return b_sum, a_sum


register(
    Method(
        name="linear",
        title="Exact weighted sum of the adapters' deltas, stored at its numerical rank",
        paper=None,
        url=None,
        formula="delta = sum_i w_i * s_i * B_i @ A_i  (factored SVD keeps every singular value above rounding)",
        kind=Kind.FACTORED,
        rank_rule=RankRule.EXACT,
        base_merge=BaseMerge.STACKED,
        fn=weighted_stack,
    )
)
register(
    Method(
        name="cat",
        title="Concatenation of the weighted factors (rank = sum of ranks, no decomposition)",
        paper="PEFT add_weighted_adapter(combination_type='cat')",
        url="https://huggingface.co/docs/peft/main/en/package_reference/lora#peft.LoraModel.add_weighted_adapter",
        formula="A' = [w_1 s_1 A_1; w_2 s_2 A_2; ...],  B' = [B_1 | B_2 | ...]  =>  B'A' = sum_i w_i s_i B_i A_i",
        kind=Kind.FACTORED,
        rank_rule=RankRule.KEEP,
        base_merge=BaseMerge.STACKED,
        fn=weighted_stack,
    )
)
register(
    Method(
        name="svd",
        title="Best rank-k approximation (Eckart-Young) of the exact weighted sum",
        paper="Eckart & Young (1936), The approximation of one matrix by another of lower rank",
        url="https://doi.org/10.1007/BF02288367",
        formula="delta_k = U_k S_k V_k^T of sum_i w_i s_i B_i A_i;  k = --rank (default: largest input rank) or the smallest k keeping --energy of ||delta||_F^2",
        kind=Kind.FACTORED,
        rank_rule=RankRule.BEST_RANK,
        base_merge=BaseMerge.ADAPTER,
        fn=weighted_stack,
    )
)
register(
    Method(
        name="factor-linear",
        title="PEFT's combination_type='linear': factors averaged separately (adds cross terms B_i A_j)",
        paper="PEFT add_weighted_adapter(combination_type='linear'); see PEFT issue #3004",
        url="https://github.com/huggingface/peft/issues/3004",
        formula="A' = sum_i sign(w_i s_i) sqrt(|w_i s_i|) A_i,  B' = sum_i sqrt(|w_i s_i|) B_i  (B'A' != sum_i w_i s_i B_i A_i)",
        kind=Kind.FACTORED,
        rank_rule=RankRule.KEEP,
        base_merge=BaseMerge.ADAPTER,
        fn=peft_factor_linear,
        reports_error=True,
    )
)
