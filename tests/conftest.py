"""Tiny deterministic models built from configs, and PEFT adapters made on them. Nothing is downloaded."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ["ADAPTERMERGE_CACHE"] = "off"  # every test asks transformers; tests/io/test_cache.py turns it on
warnings.filterwarnings("ignore")

# CI (.ci/run) draws the same hypothesis examples on every run, so a landing never depends on a lucky draw;
# local runs keep drawing new ones (that is how rare cases are found: rerun a failure's printed blob to reproduce)
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

from tests.helpers import make_adapter, tiny_gpt2, tiny_llama, use_reference_4bit_kernels  # noqa: E402

PACKED_4BIT_KERNEL = use_reference_4bit_kernels()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model (a base for evaluate, RegMean's statistics, tune or distill) fails the test: for inputs that
    must be refused before any model is loaded."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("adaptermerge.live.load_causal_lm", refuse)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for the test: tiny models gain nothing from a second thread, and on a busy machine OpenMP
    barriers stall it (modules that run models use ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    from adaptermerge.surgery.merge import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture
def llama_adapter(tmp_path: Path) -> Path:
    """A rank-4 PEFT adapter on q/v/o of a tiny Llama, non-zero B."""
    return make_adapter(
        tmp_path / "llama_a", tiny_llama, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], seed=1
    )


@pytest.fixture
def gpt2_adapter(tmp_path: Path) -> Path:
    return make_adapter(
        tmp_path / "gpt2_a",
        tiny_gpt2,
        r=4,
        lora_alpha=16,
        target_modules=["c_attn", "c_proj"],
        fan_in_fan_out=True,
        seed=2,
    )
