"""The offline end-to-end demo: everything built from configs on this machine, nothing downloaded.

Run it with ``adaptermerge demo`` (or ``python -m adaptermerge.demo``). It

1. builds a tiny Llama-style base model from a config and saves it as a sharded checkpoint;
2. trains nothing but makes two PEFT LoRA adapters with random factors (different ranks and alphas,
   one with rsLoRA) the way users' adapters look on disk;
3. inspects one, combines both exactly (``linear``), re-ranks them (``svd``), and compares with
   PEFT's ``add_weighted_adapter``;
4. checks that PEFT loads the combined adapter and its logits equal base + the weighted deltas;
5. folds the combined adapter into the base checkpoint (streamed) and checks the logits again.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import click


def run_demo(workdir: str | os.PathLike | None = None, echo=click.echo) -> dict:
    """Run the demo in ``workdir`` (a fresh temporary folder by default); returns the key figures."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    import adaptermerge
    from adaptermerge.inspection import describe

    work = Path(workdir or tempfile.mkdtemp(prefix="adaptermerge-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip

    def base_model() -> LlamaForCausalLM:
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).eval()

    echo(f"[1/5] tiny Llama base (hidden 128, 4 layers) -> {work / 'base'}")
    base_model().save_pretrained(work / "base", max_shard_size="500KB")
    specs = {
        "math": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False),
        "code": LoraConfig(r=16, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "down_proj"], init_lora_weights=False),
    }  # fmt: skip
    paths = {}
    for i, (name, lc) in enumerate(specs.items()):
        torch.manual_seed(100 + i)
        pm = get_peft_model(base_model(), lc)
        with torch.no_grad():  # keep the deltas modest, as trained adapters are
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.05)
        paths[name] = work / f"adapter-{name}"
        pm.save_pretrained(paths[name])
    echo(f"[2/5] two PEFT adapters: math (r=8, alpha=16) and code (r=16, rsLoRA) in {work}")
    d = describe(paths["code"])
    echo(f"      inspect code: {d['num_modules']} modules, ranks {d['ranks']}, {d['num_parameters']:,} params")

    weights = [0.7, 0.3]
    exact = adaptermerge.combine([paths["math"], paths["code"]], weights, method="linear")
    out_lin = adaptermerge.save_combined(exact, work / "merged-linear", overwrite=True)
    svd = adaptermerge.combine([paths["math"], paths["code"]], weights, method="svd", rank=8)
    out_svd = adaptermerge.save_combined(svd, work / "merged-svd-r8", overwrite=True)
    energy = min(r["kept_energy"] for r in svd.provenance["modules"])
    echo(
        f"[3/5] combine 0.7*math + 0.3*code: linear (exact) -> {out_lin.name}; svd rank 8 -> {out_svd.name} (kept energy >= {energy:.3f})"
    )

    ids = torch.randint(3, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = PeftModel.from_pretrained(base_model(), str(paths["math"]), adapter_name="math")
    ref.load_adapter(str(paths["code"]), adapter_name="code")
    # PEFT copies the first adapter's config: with the rsLoRA adapter first, its 'cat' is over-scaled
    ref.add_weighted_adapter(["code", "math"], weights[::-1], "peft_cat", combination_type="cat")
    expected = {}
    for mname, mod in ref.base_model.model.named_modules():
        scaling = getattr(mod, "scaling", {})
        if hasattr(mod, "get_delta_weight") and ("math" in scaling or "code" in scaling):
            expected[mname] = sum(
                w * mod.get_delta_weight(a).double() for w, a in zip(weights, ["math", "code"]) if a in scaling
            )
    peft_err = []
    for mname, mod in ref.base_model.model.named_modules():
        if mname in expected:
            got = mod.get_delta_weight("peft_cat").double()
            peft_err.append(float((got - expected[mname]).norm() / expected[mname].norm()))
    ours = PeftModel.from_pretrained(base_model(), str(out_lin)).eval()
    base = base_model()
    with torch.no_grad():
        mods = dict(base.named_modules())
        for mname, dlt in expected.items():
            mods[mname].weight += dlt.float()
        logit_err = float((ours(input_ids=ids).logits - base(input_ids=ids).logits).abs().max())
    echo(
        f"[4/5] PEFT loads ours: max |logit diff| vs base + weighted deltas = {logit_err:.2e}; "
        f"PEFT's own 'cat' on the same inputs (rsLoRA adapter first) is off by {max(peft_err):.2f} relative"
    )
    from transformers import AutoModelForCausalLM

    from adaptermerge.surgery.merge import merge_into_base

    rep = merge_into_base(work / "base", out_lin, work / "merged-model", overwrite=True)
    merged = AutoModelForCausalLM.from_pretrained(work / "merged-model").eval()
    with torch.no_grad():
        merge_err = float((merged(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max())
    echo(
        f"[5/5] merged into the base checkpoint ({len(rep.modules)} modules, streamed): max |logit diff| vs PEFT running base + adapter = {merge_err:.2e}"
    )
    echo(f"done. Outputs in {work}")
    return {
        "merge_err": merge_err,
        "workdir": str(work),
        "logit_err": logit_err,
        "peft_cat_err": max(peft_err),
        "modules": len(exact.modules),
        "svd_min_energy": energy,
    }


if __name__ == "__main__":
    run_demo()
