"""Hypothesis: random canonical adapters round-trip exactly through save/load."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import adaptermerge
from adaptermerge import Adapter, LowRank


@st.composite
def adapters(draw) -> Adapter:
    n_mod = draw(st.integers(1, 5))
    layout = draw(st.sampled_from(["linear", "conv1d"]))
    with_bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for i in range(n_mod):
        r = draw(st.integers(1, 6))
        out, inn = draw(st.integers(1, 12)), draw(st.integers(1, 12))
        kind = "embedding" if (i == 0 and draw(st.booleans())) else layout
        modules[f"model.layers.{i}.proj"] = LowRank(
            A=torch.randn(r, inn, generator=g) * draw(st.floats(0.01, 100)),
            B=torch.randn(out, r, generator=g),
            layout=kind,
            bias=torch.randn(out, generator=g) if with_bias and kind != "embedding" else None,
        )
    return Adapter(modules=modules, base_model=draw(st.sampled_from([None, "org/base"])), task_type="CAUSAL_LM")


@settings(max_examples=40, deadline=None)
@given(adapters())
def test_save_load_is_exact(adapter: Adapter) -> None:
    with tempfile.TemporaryDirectory() as d:
        out = adapter.save(Path(d) / "a")
        back = adaptermerge.load_adapter(out)
    assert list(back.modules) == list(adapter.modules)
    assert back.base_model == adapter.base_model
    for name, m in adapter.modules.items():
        b = back.modules[name]
        assert b.layout == m.layout or (m.layout == "linear" and b.layout == "conv1d")
        assert torch.equal(b.A, m.A) and torch.equal(b.B, m.B)
        if m.bias is not None:
            assert torch.equal(b.bias, m.bias)
