"""Trained token rows (PEFT TrainableTokens) and their algebra: the data type and the weighted sum of row changes.

PEFT's ``trainable_token_indices`` trains a few rows of an embedding (and of a head tied to it). What is saved are
the new rows themselves; they replace the base rows, so a row *change* (what weights apply to) is relative to the
base model's row. Reading and writing the PEFT format is :mod:`adaptermerge.io.tokens`; folding rows into a
checkpoint is :mod:`adaptermerge.surgery.tokens`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from adaptermerge.errors import IncompatibleAdapters, UsageError


@dataclass
class TokenRows:
    """The trained rows of one module's weight (PEFT TrainableTokens).

    Attributes:
        indices: row numbers of the module's weight (dim 0: token ids of an embedding, output rows of a head),
            distinct, in the order of ``rows``.
        rows: ``len(indices) x dim``: the new rows. They replace the base rows; they are not added to them.
        input_embedding: the config's list form named this module, so PEFT found it as the model's input
            embedding; written back in the list form. False means "named explicitly" (the dict form).
    """

    indices: tuple[int, ...]
    rows: torch.Tensor
    input_embedding: bool = False

    @property
    def dim(self) -> int:
        return int(self.rows.shape[1])


BaseRows = Callable[[str, Sequence[int]], torch.Tensor]  # (module path, row ids) -> the base model's rows


def combine_token_rows(
    inputs: Sequence[dict[str, TokenRows]],
    weights: Sequence[float],
    base_rows: BaseRows | None,
    dtype: torch.dtype,
) -> dict[str, TokenRows]:
    """The weighted sum of the adapters' row changes, per module: ``row_t = base_t + sum_i w_i (v_it - base_t)``.

    An adapter that does not train token ``t`` contributes nothing there (its row is the base row), so the ids of
    the result are the union of the inputs' ids. The base rows drop out where the weights of the adapters that
    train ``t`` sum to 1 (``row_t = sum_i w_i v_it``); elsewhere they are needed, and ``base_rows`` reads them.
    Computed in fp64, rounded once to ``dtype``. No rank is involved, so truncating methods leave the rows exact.

    Raises:
        UsageError: base rows are needed and ``base_rows`` is None.
        IncompatibleAdapters: rows of one module with different widths.
    """
    out: dict[str, TokenRows] = {}
    for name in sorted({n for rows in inputs for n in rows}):
        terms = [(w, rows[name]) for w, rows in zip(weights, inputs, strict=True) if name in rows]
        dims = {tr.dim for _, tr in terms}
        if len(dims) != 1:
            raise IncompatibleAdapters(f"token rows of {name} have different widths {sorted(dims)} across adapters")
        ids = sorted({i for _, tr in terms for i in tr.indices})
        pos = {i: p for p, i in enumerate(ids)}
        acc = torch.zeros(len(ids), dims.pop(), dtype=torch.float64)
        wsum = torch.zeros(len(ids), dtype=torch.float64)
        for w, tr in terms:
            at = torch.tensor([pos[i] for i in tr.indices])
            acc.index_add_(0, at, w * tr.rows.double())
            wsum.index_add_(0, at, torch.full((len(at),), float(w), dtype=torch.float64))
        rest = 1.0 - wsum  # the base rows' coefficient
        need = (rest.abs() > 1e-9).nonzero().flatten()
        if need.numel():
            if base_rows is None:
                t = ids[int(need[0])]
                raise UsageError(
                    f"token {t} of {name}: the weights of the adapters that train it sum to {float(wsum[need[0]]):g}, "
                    "not 1, so its combined row needs the base model's own row; pass the base checkpoint "
                    "(`base`)"
                )
            base = base_rows(name, [ids[int(p)] for p in need]).double()
            acc[need] += rest[need].unsqueeze(1) * base
        out[name] = TokenRows(tuple(ids), acc.to(dtype), any(tr.input_embedding for _, tr in terms))
    return out
