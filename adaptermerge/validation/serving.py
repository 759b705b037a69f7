"""``--for vllm|peft|transformers``: what the serving target accepts.

vLLM's rules are facts in :mod:`adaptermerge.guidelines`. For PEFT and transformers (which loads adapters
through PEFT, ``PreTrainedModel.load_adapter``), the installed PEFT parses the config itself: its
``LoraConfig`` validation runs, and fields it does not know are found. PEFT drops unknown fields with a
warning (``peft/config.py``, ``PeftConfigMixin.from_peft_type``), so an adapter saved by a newer PEFT can load
into an older one and silently lose a feature.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

from adaptermerge.adapter import Adapter
from adaptermerge.guidelines import serving_findings
from adaptermerge.validation.report import Check


def check_adapter_target(adapter: Adapter, folder: Path, target: str) -> Check:
    """serving.<target> for an adapter folder."""
    if target == "vllm":
        return _vllm(adapter, folder)
    return _peft_parse(folder, target)


def _vllm(adapter: Adapter, folder: Path) -> Check:
    found = serving_findings(adapter, "vllm")
    rank = next(f for f in found if f.code == "vllm_rank")
    figures = {"findings": [{"code": f.code, "level": f.level, "message": f.message} for f in found]}
    fails = [f for f in found if f.level == "fail"]
    if fails:
        hint = "; ".join(dict.fromkeys(f.hint for f in fails if f.hint)) or None
        return Check("serving.vllm", "fail", "; ".join(f.message for f in fails), figures, hint, str(folder))
    notes = [f.message for f in found if f.level == "note"]
    return Check(
        "serving.vllm", "pass", "vLLM accepts it: " + "; ".join(notes or [rank.message]), figures, None, str(folder)
    )


def _peft_parse(folder: Path, target: str) -> Check:
    import json

    import peft
    from peft import LoraConfig, PeftConfig

    name = f"serving.{target}"
    raw = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(k for k in raw if k not in known)
    figures = {"peft_version": peft.__version__, "saved_with_peft": raw.get("peft_version"), "unknown_fields": unknown}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            PeftConfig.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 - PEFT raises ValueError/TypeError/KeyError for bad configs
        msg = f"PEFT {peft.__version__} cannot read adapter_config.json: {' '.join(str(e).split())}"
        return Check(name, "fail", msg, figures, "fix the config or re-save the adapter with this PEFT", str(folder))
    via = "PEFT" if target == "peft" else "transformers (through PEFT's load_adapter)"
    if unknown:
        return Check(
            name,
            "warn",
            f"{via} {peft.__version__} ignores config fields it does not know: {', '.join(unknown)}",
            figures,
            f"install the PEFT version that saved it ({raw.get('peft_version') or 'newer'}) where it is served",
            str(folder),
        )
    return Check(name, "pass", f"{via} {peft.__version__} reads the config", figures, None, str(folder))
