"""Mutation check: plant known bugs in the core, one at a time, and see whether the targeted tests catch each.

A fixed, declared list of small mistakes (the kind a refactor or a hurried fix makes: a dropped weight, a sign, a
transpose, an off-by-one, a wrong dtype) is applied one at a time to a temporary copy of the repository, never to
the working tree. For each, only the tests named for it run (``pytest -x``, in the copy, with the copy first on
``sys.path`` and on ``PYTHONPATH`` so that CLI subprocesses run the mutated code too). A mutation is **killed** when
a test fails, **survived** when they all pass. The script first runs every named test on the unmutated copy
(they must pass, else a kill would mean nothing). Before anything runs (and with ``--list``), each mutation's
original snippet must occur exactly once in its file and the mutated file must compile; a mutation that does not
apply is reported as **stale** and the script stops with exit status 2 (update the list).

Usage::

    python scripts/mutation_check.py                    # every mutation (about 10 min on 2 shared cores)
    python scripts/mutation_check.py --list             # the list, nothing run
    python scripts/mutation_check.py --only combine-bias-unweighted default-weights-one
    python scripts/mutation_check.py --skip-baseline --json mutations.json

The exit status is 0 when every mutation is killed, 1 when one survives (or its tests could not run, or the
unmutated tests fail), 2 when a mutation is stale (nothing is run). See docs/testing.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    """One planted bug: in ``file``, the exact ``original`` snippet (occurring once) becomes ``mutated``."""

    name: str
    file: str
    original: str
    mutated: str
    tests: tuple[str, ...]
    what: str


M = Mutation
MUTATIONS: list[Mutation] = [
    # ---------------------------------------------------------------- the audit's table (each survived once)
    M(
        "combine-bias-unweighted",
        "adaptermerge/combination.py",
        "bias = sum(wi * b.to(call.device, call.compute_dtype) for wi, b in bs) if bs else None",
        "bias = sum(b.to(call.device, call.compute_dtype) for wi, b in bs) if bs else None",
        ("tests/test_combine.py::test_lora_bias_combined_with_plain_adapter",),
        "combine sums lora_bias without the weights",
    ),
    M(
        "modules-to-save-first-adapter",
        "adaptermerge/combination.py",
        "acc = sum(w * t.double() for w, t in zip(weights, ts, strict=True)) / total",
        "acc = ts[0].double()",
        ("tests/test_combine.py::test_modules_to_save_are_the_normalised_weighted_average",),
        "modules_to_save tensors taken from the first adapter instead of averaged",
    ),
    M(
        "factor-linear-sign-dropped",
        "adaptermerge/methods/basic.py",
        "sign = 1.0 if ws >= 0 else -1.0",
        "sign = 1.0",
        ("tests/test_combine.py::test_factor_linear_is_peft_linear_for_weights_of_both_signs",),
        "factor-linear drops the sign of negative weights",
    ),
    M(
        "inspect-norm-doubled",
        "adaptermerge/inspection.py",
        'entry["delta_norm"] = m.frobenius_norm()',
        'entry["delta_norm"] = 2 * m.frobenius_norm()',
        ("tests/cli/test_inspect.py::test_inspect_figures_are_peft_s",),
        "inspect reports delta norms x2",
    ),
    M(
        "survival-scaled",
        "adaptermerge/surgery/quant.py",
        "res.delta_survival = rep.change_kept",
        "res.delta_survival = 0.7 * rep.change_kept",
        ("tests/surgery/test_quant.py::test_requantized_merge_no_worse_than_peft",),
        "the 4-bit 'delta survival' figure x0.7",
    ),
    M(
        "default-weights-one",
        "adaptermerge/combination.py",
        "return [1.0 / n] * n",
        "return [1.0] * n",
        (
            "tests/test_lowrank.py::test_default_weights_are_equal_and_sum_to_one",
            "tests/surgery/test_merge.py::test_several_adapters_default_weights_are_equal",
        ),
        "default weights 1 instead of 1/n",
    ),
    M(
        "combine-dtype-fp32",
        "adaptermerge/combination.py",
        "return dts.pop() if len(dts) == 1 else torch.float32",
        "return torch.float32",
        ("tests/test_combine.py::test_output_dtype_rules", "tests/test_combine.py::test_output_dtype_of_peft_folders"),
        "combine output dtype forced to fp32",
    ),
    M(
        "merge-ignores-rank-energy",
        "adaptermerge/surgery/merge.py",
        "        rank=opts.rank,\n        energy=opts.energy,\n        base=ckpt,",
        "        rank=None,\n        energy=None,\n        base=ckpt,",
        ("tests/surgery/test_merge.py::test_several_adapters_svd_rank_and_energy",),
        "merge with several adapters ignores --rank/--energy",
    ),
    M(
        "cli-weights-reversed",
        "cli/main.py",
        'vals.extend(x for x in args[i].split(",") if x)',
        'vals[:0] = [x for x in args[i].split(",") if x]',
        (
            "tests/cli/test_inspect.py::test_weights_normalization",
            "tests/test_combine.py::test_weights_with_equals_sign",
        ),
        "--weights 0.7 0.3 parsed reversed",
    ),
    # ---------------------------------------------------------------- more of the same classes
    M(
        "modules-to-save-not-normalised",
        "adaptermerge/combination.py",
        "acc = sum(w * t.double() for w, t in zip(weights, ts, strict=True)) / total",
        "acc = sum(w * t.double() for w, t in zip(weights, ts, strict=True))",
        ("tests/test_combine.py::test_modules_to_save_are_the_normalised_weighted_average",),
        "modules_to_save averaged without dividing by the sum of the weights",
    ),
    M(
        "factor-linear-embedding-sign-side",
        "adaptermerge/methods/basic.py",
        "a_term, b_term = root * a_raw, sign * root * b_raw",
        "a_term, b_term = sign * root * a_raw, root * b_raw",
        ("tests/test_combine.py::test_factor_linear_is_peft_linear_for_weights_of_both_signs",),
        "factor-linear puts the sign on the wrong factor of an embedding (PEFT stores them the other way round)",
    ),
    M(
        "factor-linear-error-sign",
        "adaptermerge/combination.py",
        "diff = LowRank(A=torch.cat([a, ea]), B=torch.cat([b, -eb], dim=1))",
        "diff = LowRank(A=torch.cat([a, ea]), B=torch.cat([b, eb], dim=1))",
        ("tests/test_combine.py::test_factor_linear_warns_with_measured_error",),
        "factor-linear's reported error measures the sum instead of the difference",
    ),
    M(
        "cli-parse-floats-reversed",
        "cli/main.py",
        'vals = [float(x) for x in value.split(",") if x.strip()]',
        'vals = [float(x) for x in value.split(",") if x.strip()][::-1]',
        ("tests/test_combine.py::test_weights_with_equals_sign",),
        "--weights 0.7,0.3 parsed reversed",
    ),
    M(
        "cli-merge-drops-rank",
        "cli/surgery_commands.py",
        "            rank=rank,\n            energy=energy,\n            dtype=dtype,\n            quantize=quantize,",
        "            rank=None,\n            energy=energy,\n            dtype=dtype,\n            quantize=quantize,",
        ("tests/surgery/test_merge.py::test_several_adapters_svd_rank_and_energy",),
        "the merge command does not pass --rank on",
    ),
    M(
        "svd-default-rank-min",
        "adaptermerge/combination.py",
        "default = max(t.ranks) if rule is RankRule.BEST_RANK else",
        "default = min(t.ranks) if rule is RankRule.BEST_RANK else",
        ("tests/test_combine.py::test_svd_default_rank_is_the_largest_input_rank_like_peft",),
        "svd's default rank is the smallest input rank instead of the largest",
    ),
    M(
        "linear-ignores-rank",
        "adaptermerge/combination.py",
        "if rule is RankRule.EXACT and rank is None and energy is None:",
        "if rule is RankRule.EXACT:",
        ("tests/test_lowrank.py::test_linear_with_rank_is_the_truncated_sum",),
        "linear ignores --rank/--energy (keeps the numerical rank)",
    ),
    M(
        "stack-weight-sign",
        "adaptermerge/lowrank.py",
        "a = torch.cat([w * A.to(device=device, dtype=dtype) for w, A, _ in terms], dim=0)",
        "a = torch.cat([abs(w) * A.to(device=device, dtype=dtype) for w, A, _ in terms], dim=0)",
        ("tests/test_lowrank.py::test_negation",),
        "the exact sum loses the sign of negative weights",
    ),
    # ---------------------------------------------------------------- lowrank.py
    M(
        "energy-rank-on-S",
        "adaptermerge/lowrank.py",
        "    sq = S.double() ** 2\n    total = float(sq.sum())\n    if total == 0.0:\n        return 0",
        "    sq = S.double()\n    total = float(sq.sum())\n    if total == 0.0:\n        return 0",
        ("tests/test_lowrank.py::test_energy_keeps_at_least_requested",),
        "the energy rank is computed on S instead of S^2",
    ),
    M(
        "kept-energy-on-S",
        "adaptermerge/lowrank.py",
        "    sq = S.double() ** 2\n    total = float(sq.sum())\n    return 1.0",
        "    sq = S.double()\n    total = float(sq.sum())\n    return 1.0",
        ("tests/test_lowrank.py::test_energy_keeps_at_least_requested",),
        "the reported kept energy is computed on S instead of S^2",
    ),
    M(
        "kept-energy-always-one",
        "adaptermerge/lowrank.py",
        "return 1.0 if total == 0.0 else float(sq[:k].sum()) / total",
        "return 1.0",
        ("tests/test_lowrank.py::test_energy_keeps_at_least_requested",),
        "the reported kept energy is always 1.0",
    ),
    M(
        "truncation-off-by-one",
        "adaptermerge/lowrank.py",
        "    return min(k, S.numel())",
        "    return min(k + 1, S.numel())",
        ("tests/test_lowrank.py::test_energy_keeps_at_least_requested",),
        "the energy truncation keeps one singular value too many",
    ),
    M(
        "factored-svd-core",
        "adaptermerge/lowrank.py",
        "core = rb @ ra.transpose(-1, -2)",
        "core = rb @ ra",
        ("tests/test_lowrank.py::test_factored_svd_matches_dense",),
        "the factored SVD's core misses a transpose",
    ),
    M(
        "conv1d-weight-shape",
        "adaptermerge/lowrank.py",
        'return (inn, out) if self.layout == "conv1d" else (out, inn)',
        "return (out, inn)",
        ("tests/surgery/test_merge.py::test_gpt2_conv1d_and_lora_bias",),
        "a Conv1D delta's stored shape is not transposed",
    ),
    M(
        "frobenius-squared",
        "adaptermerge/lowrank.py",
        "return float(torch.sqrt(torch.clamp(sq, min=0.0)))",
        "return float(torch.clamp(sq, min=0.0))",
        ("tests/cli/test_inspect.py::test_inspect_figures_are_peft_s",),
        "the factored Frobenius norm forgets the square root",
    ),
    # ---------------------------------------------------------------- io/adapter.py
    M(
        "rslora-sqrt-dropped",
        "adaptermerge/io/adapter.py",
        'scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r',
        "scale = alpha / r",
        ("tests/io/test_roundtrip.py::test_random_configs_round_trip_exactly",),
        "rsLoRA scaling alpha/sqrt(r) read as alpha/r",
    ),
    M(
        "pattern-match-order",
        "adaptermerge/io/adapter.py",
        "    for key in pattern_keys:\n        if re.match",
        "    for key in reversed(pattern_keys):\n        if re.match",
        (
            "tests/io/test_adapter.py::test_pattern_matching_like_peft",
            "tests/io/test_adapter.py::test_round_trip_matches_peft[overlapping-patterns]",
        ),
        "rank/alpha patterns matched last-first instead of PEFT's first-first",
    ),
    M(
        "embedding-read-transpose",
        "adaptermerge/io/adapter.py",
        'lr = LowRank(A=eb.float().T.contiguous() * scale, B=ea.float().T.contiguous(), layout="embedding", scale=scale)',
        'lr = LowRank(A=ea.float() * scale, B=eb.float(), layout="embedding", scale=scale)',
        ("tests/io/test_adapter.py::test_round_trip_matches_peft",),
        "embedding factors read without the transpose to the weight layout",
    ),
    M(
        "bias-scale-dropped",
        "adaptermerge/io/adapter.py",
        "bias=None if bias is None else bias.float() * scale,",
        "bias=None if bias is None else bias.float(),",
        ("tests/test_combine.py::test_lora_bias_combined_with_plain_adapter",),
        "lora_B bias read without the scaling",
    ),
    M(
        "save-fan-in-fan-out-always",
        "adaptermerge/io/adapter.py",
        '"fan_in_fan_out": any(m.layout == "conv1d" for m in adapter.modules.values()),',
        '"fan_in_fan_out": any(m.layout != "embedding" for m in adapter.modules.values()),',
        ("tests/io/test_roundtrip.py::test_save_load_is_exact",),
        "a Linear adapter is written with fan_in_fan_out (it comes back as Conv1D)",
    ),
    # ---------------------------------------------------------------- the merge executor and planner
    M(
        "merge-conv1d-no-transpose",
        "adaptermerge/surgery/executor.py",
        "ws.addmm_(aa.T, bb.T)",
        "ws.addmm_(bb, aa)",
        ("tests/surgery/test_merge.py::test_gpt2_conv1d_and_lora_bias",),
        "a Conv1D weight receives delta instead of delta^T",
    ),
    M(
        "dora-norm-axis",
        "adaptermerge/surgery/executor.py",
        'dim = 0 if lr.layout == "conv1d" else 1',
        'dim = 1 if lr.layout == "conv1d" else 0',
        ("tests/surgery/test_merge.py::test_dora_matches_peft",),
        "the DoRA norm is taken over the wrong axis",
    ),
    M(
        "merge-rounds-to-bf16",
        "adaptermerge/surgery/executor.py",
        'writer.write_tensor(job.out.name, new.to("cpu", want))',
        'writer.write_tensor(job.out.name, new.to("cpu", torch.bfloat16).to(want))',
        ("tests/surgery/test_merge.py::test_dora_matches_peft",),
        "a merged weight is rounded to bf16 before the stored dtype",
    ),
    M(
        "quantize-from-unrounded",
        "adaptermerge/surgery/quant.py",
        "dense = merged.to(stored)",
        "dense = merged.clone()",
        ("tests/surgery/test_quantize_archs.py::test_quantize_equals_transformers",),
        "--quantize quantizes the fp32 merge, not the weight rounded to the stored dtype (bf16 bases)",
    ),
    M(
        "report-norm-squared",
        "adaptermerge/surgery/executor.py",
        "        wn = math.sqrt(wsq)\n",
        "        wn = wsq\n",
        ("tests/surgery/test_merge.py::test_report_delta_norms_are_peft_delta_over_weight",),
        "the streamed merge reports norm(delta) / norm(W)^2",
    ),
    M(
        "merge-rows-block-offset",
        "adaptermerge/surgery/executor.py",
        "self._add_delta(ws, job.module, b[r0:r1], a, False, ST_TO_TORCH[job.src.dtype])",
        "self._add_delta(ws, job.module, b[r0 - b0 : r1 - b0], a, False, ST_TO_TORCH[job.src.dtype])",
        ("tests/surgery/test_merge.py::test_small_buffers_change_nothing",),
        "the streamed merge adds the wrong rows of B @ A after the first read block",
    ),
    M(
        "planner-prefix-not-added",
        "adaptermerge/io/checkpoint.py",
        "    return add + name[len(strip) :] if name.startswith(strip) else name",
        "    return name[len(strip) :] if name.startswith(strip) else name",
        ("tests/surgery/test_merge.py::test_bare_adapter_on_task_checkpoint",),
        "the planner strips the adapter's prefix but does not add the checkpoint's",
    ),
    # ---------------------------------------------------------------- bnb4 codec
    M(
        "bnb4-dequant-nibble-order",
        "adaptermerge/io/bnb4.py",
        "pairs = torch.stack([qmap.repeat_interleave(16), qmap.repeat(16)], dim=1).contiguous()",
        "pairs = torch.stack([qmap.repeat(16), qmap.repeat_interleave(16)], dim=1).contiguous()",
        ("tests/io/test_bnb4.py::test_dequantize_equals_bitsandbytes",),
        "4-bit codes unpacked low nibble first",
    ),
    M(
        "bnb4-pack-nibble-order",
        "adaptermerge/io/bnb4.py",
        "torch.bitwise_or(pairs[:, 0] << 4, pairs[:, 1], out=out)",
        "torch.bitwise_or(pairs[:, 1] << 4, pairs[:, 0], out=out)",
        ("tests/io/test_bnb4.py::test_plain_path_is_bitsandbytes_quantize_4bit",),
        "4-bit codes packed low nibble first",
    ),
    M(
        "bnb4-nested-offset",
        "adaptermerge/io/bnb4.py",
        "return code8.index_select(0, absmax.to(torch.int32)) * per_block + offset",
        "return code8.index_select(0, absmax.to(torch.int32)) * per_block",
        ("tests/io/test_bnb4.py::test_dequantize_equals_bitsandbytes",),
        "double-quantized scales decoded without the nested offset",
    ),
    M(
        "bnb4-encode-midpoint-up",
        "adaptermerge/io/bnb4.py",
        "pos += x.view(-1) > book.cell_bound.index_select(0, cell)",
        "pos += x.view(-1) >= book.cell_bound.index_select(0, cell)",
        ("tests/io/test_bnb4.py::test_values_on_the_code_book_midpoints_encode_like_bitsandbytes",),
        "the table-lookup encoder sends a value exactly on a midpoint to the upper code (bitsandbytes: the lower)",
    ),
    M(
        "bnb4-optimized-error-of-plain",
        "adaptermerge/io/bnb4.py",
        "    report.sq_error = float(err.sum(dtype=torch.float64))\n",
        "    report.sq_error = plain.sq_error\n",
        (
            "tests/io/test_bnb4.py::test_optimize_scales_lowers_error",
            "tests/surgery/test_quant.py::test_requantized_merge_no_worse_than_peft",
        ),
        "with optimize_scales the error report keeps the plain path's error, not that of the codes written",
    ),
    M(
        "bnb4-survival-of-plain-codes",
        "adaptermerge/io/bnb4.py",
        "report.change_error_dot = final.change_dot",
        "report.change_error_dot = plain.change_dot",
        ("tests/surgery/test_quant.py::test_requantized_merge_no_worse_than_peft",),
        "with optimize_scales the 4-bit 'delta survival' is measured on the plain path's codes, not those written",
    ),
    # ---------------------------------------------------------------- task-vector methods (methods/)
    M(
        "ties-zero-elected-negative",
        "adaptermerge/methods/task_arithmetic.py",
        "return torch.copysign(torch.ones((), dtype=total.dtype, device=total.device), total)",
        "return torch.where(total > 0, 1.0, -1.0).to(total.dtype)",
        ("tests/methods/test_task_arithmetic.py::test_ties_zero_sum_elects_plus_like_mergekit",),
        "TIES elects - where the weighted sum is exactly 0 (mergekit's rule, sum >= 0, elects +)",
    ),
    M(
        "ties-sign-unweighted",
        "adaptermerge/methods/task_arithmetic.py",
        "total.add_(t, alpha=w)",
        "total.add_(t)",
        (
            "tests/methods/test_task_arithmetic.py::test_ties_hand_checked",
            "tests/methods/test_task_arithmetic.py::test_ties_family_equals_the_naive_reference",
        ),
        "TIES elects the sign of the unweighted sum of the tasks instead of the weighted one",
    ),
    M(
        "dare-no-rescale",
        "adaptermerge/methods/sparsify.py",
        "return keep.mul_(x).div_(density)",
        "return keep.mul_(x)",
        (
            "tests/methods/test_sparsify.py::test_dare_survivors_rescaled_and_reproducible",
            "tests/methods/test_sparsify.py::test_dare_is_unbiased",
        ),
        "DARE drops entries without rescaling the survivors by 1/density (biased towards 0)",
    ),
    M(
        "trim-keeps-k-plus-one",
        "adaptermerge/methods/sparsify.py",
        "return select_topk(x, keep_count(density, x.numel()), absolute=True)",
        "return select_topk(x, keep_count(density, x.numel()) + 1, absolute=True)",
        (
            "tests/methods/test_sparsify.py::test_magnitude_trim_keeps_exactly_k_largest",
            "tests/methods/test_task_arithmetic.py::test_pruning_keeps_exactly_the_requested_fraction",
        ),
        "the TIES/magnitude trim keeps k + 1 entries instead of k = round(density * numel)",
    ),
    M(
        "topk-ties-one-extra",
        "adaptermerge/methods/sparsify.py",
        "idx = torch.nonzero(v == t).squeeze(1)[:need]",
        "idx = torch.nonzero(v == t).squeeze(1)[: need + 1]",
        ("tests/methods/test_sparsify.py::test_topk_mask_ties_broken_by_index",),
        "the top-k selection keeps one entry too many when magnitudes tie at the threshold",
    ),
    M(
        "core-space-basis-transposed",
        "adaptermerge/methods/spaces.py",
        "    return q @ u\n",
        "    return q @ u.T\n",
        ("tests/methods/test_spaces.py::test_core_space_bases_are_the_singular_vectors_of_the_stacked_factors",),
        "the core space's basis is Q u^T instead of Q u (the right span, but not the singular vectors of the "
        "stacked factors: elementwise methods act on other coordinates)",
    ),
    M(
        "core-space-map-back-transposed",
        "adaptermerge/methods/spaces.py",
        "return self.left @ merged, self.right.T.contiguous()",
        "return self.left @ merged.T, self.right.T.contiguous()",
        ("tests/methods/test_spaces.py::test_task_arithmetic_is_the_same_exact_sum_in_every_space",),
        "a merged core-space core maps back as U M^T V^T instead of U M V^T",
    ),
    M(
        "refactor-energy-of-the-sketch",
        "adaptermerge/refactor.py",
        "return Refactored(b, a, k, min(1.0, kept / total_sq), algorithm, s.double())",
        "return Refactored(b, a, k, min(1.0, kept / float(torch.sum(s.double() ** 2))), algorithm, s.double())",
        ("tests/methods/test_refactor.py::test_randomized_truncation_is_close_to_the_best",),
        "the re-factoring reports kept energy against the computed (sketch's) spectrum instead of ||delta||_F^2 "
        "(over-reports on the randomized path)",
    ),
    # ---------------------------------------------------------------- the registry and recipes
    M(
        "recipe-replay-uses-defaults",
        "adaptermerge/recipe.py",
        "**spec.resolve_params(own)}",
        "**spec.resolve_params({})}",
        (
            "tests/methods/test_registry.py::test_recipe_schema_checks_the_method_parameters",
            "tests/methods/test_combine_methods.py::test_recipe_replays_the_method_parameters",
        ),
        "a recipe replay ignores the recorded method parameters and runs with the registry's Param defaults",
    ),
    M(
        "params-falsy-value-dropped",
        "adaptermerge/methods/registry.py",
        "for p in self.params if resolved.get(p.name) is not None})",
        "for p in self.params if resolved.get(p.name)})",
        ("tests/methods/test_combine_methods.py::test_recipe_replays_the_method_parameters",),
        "a falsy method parameter (normalize=false, gamma=0, seed=0) is dropped and the params dataclass default "
        "runs instead, while the recipe records the value given",
    ),
    # ---------------------------------------------------------------- PEFT config, cache, planner ties, headers
    M(
        "peft-suffix-without-dot",
        "adaptermerge/io/peft_config.py",
        'module_name == t or module_name.endswith("." + t)',
        "module_name == t or module_name.endswith(t)",
        ("tests/io/test_peft_config.py::test_the_plain_names_shortcut_agrees_with_peft",),
        "the plain target-list shortcut matches a bare suffix (target 'proj' matches 'q_proj'); PEFT needs a dot",
    ),
    M(
        "peft-shortcut-ignores-exclude",
        "adaptermerge/io/peft_config.py",
        '        and not config.get("exclude_modules")\n',
        "",
        ("tests/io/test_peft_config.py::test_target_matching_is_peft_own",),
        "the plain-names shortcut is taken when exclude_modules is set, so excluded modules count as targeted",
    ),
    M(
        "cache-key-ignores-weight-names",
        "adaptermerge/surgery/arch.py",
        'key = ["model-facts/1", version("transformers"), config_key, sorted(present)]',
        'key = ["model-facts/1", version("transformers"), config_key]',
        ("tests/io/test_cache.py::test_cache_key_includes_the_stored_weight_names",),
        "the model-facts cache key ignores the stored weight names (two checkpoints of one config share an entry)",
    ),
    M(
        "cache-key-ignores-transformers-version",
        "adaptermerge/surgery/arch.py",
        'key = ["model-facts/1", version("transformers"), config_key, sorted(present)]',
        'key = ["model-facts/1", config_key, sorted(present)]',
        ("tests/io/test_cache.py::test_cache_key_includes_the_transformers_version",),
        "the model-facts cache key ignores the transformers version (an entry from another version is read)",
    ),
    M(
        "untied-head-takes-stored-change",
        "adaptermerge/surgery/plan.py",
        "jobs.append(_job(out, d.ckpt.weight_map[stored], info, d.changes.get(absent), d.adapter, absent))",
        "jobs.append(_job(out, d.ckpt.weight_map[stored], info, d.changes.get(stored), d.adapter, absent))",
        (
            "tests/surgery/test_plan.py::test_plan_unties_a_tied_head_with_its_own_job",
            "tests/surgery/test_merge.py::test_tied_checkpoints_behave_like_the_trained_peft_model",
        ),
        "an untied head gets the stored member's change (an embedding delta is merged twice: into the head too)",
    ),
    M(
        "untied-head-change-lost",
        "adaptermerge/surgery/plan.py",
        "jobs.append(_job(out, d.ckpt.weight_map[stored], info, d.changes.get(absent), d.adapter, absent))",
        "jobs.append(_job(out, d.ckpt.weight_map[stored], info, None, d.adapter, absent))",
        ("tests/surgery/test_merge.py::test_tied_checkpoints_behave_like_the_trained_peft_model",),
        "an untied head is written as the shared tensor without its own LoRA delta (merged not at all)",
    ),
    M(
        "header-overlap-accepted",
        "adaptermerge/io/safetensors_header.py",
        "        if ti.start != pos:\n",
        "        if ti.start > pos:\n",
        ("tests/io/test_safetensors_header.py::test_refused_like_safetensors",),
        "a safetensors header whose byte ranges overlap is accepted (only gaps are refused)",
    ),
    M(
        "4bit-members-in-file-order",
        "adaptermerge/surgery/quant.py",
        "        return [ShardPlan(s.file, _members_together(s.jobs), s.metadata) for s in plan.shards]\n",
        "        return plan.shards\n",
        ("tests/surgery/test_quant.py::test_group_members_written_together",),
        "re-quantized groups written in the base's file order: every group's codes wait in memory (RSS grows with the model)",
    ),
]


# --------------------------------------------------------------------------------------------------------------


def check_snippets(root: Path, mutations: list[Mutation]) -> dict[str, str]:
    """Why each mutation that does not apply cleanly to the files under ``root`` does not (empty: all apply).

    A mutation applies when its original snippet occurs exactly once in its file, the mutated text differs
    from it, and the mutated file still compiles (a syntax error would "kill" a mutation without testing
    anything)."""
    problems: dict[str, str] = {}
    for m in mutations:
        path = root / m.file
        if not path.is_file():
            problems[m.name] = f"{m.file} does not exist"
            continue
        text = path.read_text(encoding="utf-8")
        n = text.count(m.original)
        if n != 1:
            problems[m.name] = f"original snippet found {n} times in {m.file} (must be exactly once)"
        elif m.mutated == m.original:
            problems[m.name] = "the mutated snippet equals the original"
        else:
            try:
                compile(text.replace(m.original, m.mutated), str(path), "exec")
            except SyntaxError as e:
                problems[m.name] = f"the mutated {m.file} does not compile: {e}"
    return problems


def tree_files(root: Path) -> list[str]:
    """The files git would carry: tracked, and untracked ones that are not ignored."""
    p = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    return [f for f in p.stdout.split("\0") if f and (root / f).is_file()]


def make_copy(dest: Path) -> None:
    """Copy the working tree to ``dest``; ``adaptermerge_cli`` (``cli/`` in the tree) becomes a link to ``cli``."""
    for f in tree_files(ROOT):
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)
    (dest / "adaptermerge_cli").symlink_to("cli", target_is_directory=True)


def env_for(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def check_imports(copy: Path) -> None:
    """Both packages must come from the copy (ahead of the editable install of the working tree)."""
    code = "import adaptermerge, adaptermerge_cli; print(adaptermerge.__file__); print(adaptermerge_cli.__file__)"
    p = subprocess.run([sys.executable, "-c", code], cwd=copy, env=env_for(copy), capture_output=True, text=True)
    files = p.stdout.split()
    if p.returncode != 0 or len(files) != 2 or not all(Path(f).resolve().is_relative_to(copy.resolve()) for f in files):
        raise SystemExit(f"the copy's packages are not the ones imported there: {p.stdout} {p.stderr}")


def run_tests(copy: Path, tests: list[str], timeout: float) -> tuple[str, float, str]:
    """``(outcome, seconds, first failing test or detail)``; outcome: passed, failed, error or timeout."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:warnings", "-rf", "--hypothesis-seed=0", *tests]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=copy, env=env_for(copy), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - t0, f"no result within {timeout:.0f} s"
    dt = time.perf_counter() - t0
    out = p.stdout + p.stderr
    if p.returncode == 0:
        return "passed", dt, ""
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
    if p.returncode in (1, 2) and (failed or "error" in out.lower()):
        return "failed", dt, failed[0] if failed else out.strip().splitlines()[-1]
    return "error", dt, f"pytest exit {p.returncode}: {out.strip().splitlines()[-1] if out.strip() else ''}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="print the mutations and exit")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutations")
    ap.add_argument("--skip-baseline", action="store_true", help="do not run the targeted tests unmutated first")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per pytest run (default 900)")
    ap.add_argument("--json", dest="json_path", help="also write the results to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy (printed)")
    args = ap.parse_args(argv)

    chosen = MUTATIONS
    if args.only:
        unknown = set(args.only) - {m.name for m in MUTATIONS}
        if unknown:
            ap.error(f"unknown mutation(s): {', '.join(sorted(unknown))}")
        chosen = [m for m in MUTATIONS if m.name in args.only]
    names = [m.name for m in MUTATIONS]
    assert len(names) == len(set(names)), "mutation names must be unique"
    problems = check_snippets(ROOT, chosen)
    if args.list:
        for m in chosen:
            flag = f"  <-- {problems[m.name]}" if m.name in problems else ""
            print(f"{m.name:34} {m.file:34} {m.what}{flag}")
            for t in m.tests:
                print(f"{'':34}   {t}")
    if problems:
        print(f"\n{len(problems)} mutation(s) do not apply to the current code: update their snippets", file=sys.stderr)
        for name, why in problems.items():
            print(f"  stale: {name}: {why}", file=sys.stderr)
        return 2
    if args.list:
        print(f"\n{len(chosen)} mutations, every snippet found once")
        return 0

    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="mutation_check_"))
    copy = tmp / "repo"
    copy.mkdir()
    results: list[dict] = []
    try:
        make_copy(copy)
        check_imports(copy)
        print(f"mutation check: {len(chosen)} mutations, copy of {ROOT} in {copy}", flush=True)
        problems = check_snippets(copy, chosen)
        if problems:  # checked on the working tree already; the copy must agree
            raise SystemExit(f"the copy differs from the working tree: {problems}")
        live = chosen
        if not args.skip_baseline and live:
            tests = sorted({t for m in live for t in m.tests})
            print(f"baseline: {len(tests)} targeted tests, unmutated ...", flush=True)
            outcome, dt, detail = run_tests(copy, tests, args.timeout * 2)
            print(f"baseline {outcome} in {dt:.0f} s {detail}", flush=True)
            if outcome != "passed":
                print("the targeted tests fail without any mutation: fix them first", file=sys.stderr)
                return 1
        for i, m in enumerate(live, 1):
            path = copy / m.file
            original = path.read_text(encoding="utf-8")
            try:
                path.write_text(original.replace(m.original, m.mutated), encoding="utf-8")
                outcome, dt, detail = run_tests(copy, list(m.tests), args.timeout)
            finally:
                path.write_text(original, encoding="utf-8")
            verdict = {"failed": "killed", "timeout": "killed (timeout)", "passed": "SURVIVED"}.get(outcome, "ERROR")
            print(f"[{i:2d}/{len(live)}] {verdict:16} {m.name:34} {dt:6.1f} s  {detail}", flush=True)
            results.append({**asdict(m), "outcome": verdict, "seconds": round(dt, 1), "detail": detail})
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    total = time.perf_counter() - t_start
    bad = [r for r in results if not r["outcome"].startswith("killed")]
    killed = len(results) - len(bad)
    print(f"\n{killed} of {len(results)} mutations killed in {total:.0f} s")
    for r in bad:
        print(f"  {r['outcome']}: {r['name']} ({r['file']}): {r['what']} {r['detail']}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"seconds": round(total), "results": results}, indent=2) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
