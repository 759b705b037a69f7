"""``train_adapter``: a LoRA or QLoRA adapter trained with transformers' ``Trainer`` on PEFT's ``get_peft_model``.

Nothing here is a training loop: transformers' ``Trainer`` runs the steps, checkpoints, resumes, evaluates
and (through accelerate) runs the same code under ``torchrun`` or ``accelerate launch`` with DDP or FSDP.
This module decides what the engines are given (the data with the loss on completions only, the PEFT
config, the 4-bit loading recipe) and what comes out (a PEFT folder with a model card and a replayable
recipe, written atomically by the main process).

Phases: check the settings and the output location, read the data files (bad rows fail here, before any
model is loaded), tokenize, load the base (4-bit for QLoRA) and wrap it with PEFT, train, save.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptermerge.data import TaskData, Tokenized, read_task_file, tokenize_task
from adaptermerge.errors import UsageError
from adaptermerge.io.atomic import atomic_dir, check_output_path
from adaptermerge.models import load_tokenizer, resolve_base, use_reference_4bit_kernel
from adaptermerge.train.config import MAX_LENGTH_CAP, TrainConfig
from adaptermerge.train.outputs import (
    RECIPE_NAME,
    SUMMARY_NAME,
    check_resume_recipe,
    train_card,
    train_recipe,
    write_recipe,
)

CHECKPOINT_SUFFIX = ".checkpoints"


@dataclass
class TrainResult:
    """What a training run produced and measured (the main process's view under DDP)."""

    output: Path | None
    steps: int
    train_loss: float | None  # mean loss of the last logging window
    eval_loss: float | None
    train_runtime: float
    tokens: int  # non-padding input tokens seen, all processes
    world_size: int
    log_history: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.train_runtime if self.train_runtime > 0 else 0.0


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def is_main_process() -> bool:
    """Rank 0 of a torchrun/accelerate launch, or a plain single process."""
    return int(os.environ.get("RANK", "0")) == 0


def train_adapter(
    base: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    eval_data: str | os.PathLike | None = None,
    config: TrainConfig | None = None,
    resume: bool = False,
    overwrite: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    keep_checkpoints: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    callbacks: Sequence[Any] = (),
    **settings: Any,
) -> TrainResult:
    """Train a LoRA (or, with ``quantize="nf4"``, QLoRA) adapter and save it as a PEFT folder.

    Args:
        base: a local model folder with its tokenizer, or a Hub id already in the local cache.
        data: JSONL task file (``prompt``/``completion``, ``text`` or chat ``messages`` rows;
            see :mod:`adaptermerge.data`). The loss is on completions / assistant turns only.
        out: output adapter folder (``PeftModel.from_pretrained`` loads it), with README.md (model card:
            data summary, hyperparameters, final losses), ``adaptermerge_train.yaml`` (replays the run)
            and ``training_summary.json`` (the loss log). Written atomically by the main process.
        eval_data: optional JSONL file for the eval loss (every ``save_steps`` and at the end).
        config: a :class:`TrainConfig`; or give its fields as keyword arguments (``rank=8, steps=100``).
        resume: continue from the last checkpoint in ``checkpoint_dir``.
        overwrite: replace a non-empty ``out`` and discard old checkpoints.
        checkpoint_dir: where Trainer checkpoints go (default: ``OUT.checkpoints`` beside ``out``); removed
            after a successful run unless ``keep_checkpoints``.
        progress: show a progress bar with the loss on stderr.
        log: where warnings and notes go (default: stderr, main process only).
        callbacks: extra ``transformers.TrainerCallback`` objects.

    Returns:
        A :class:`TrainResult` (losses, steps, tokens seen, runtime, warnings).

    Example:
        >>> import adaptermerge
        >>> r = adaptermerge.train_adapter("base", "math.jsonl", "adapters/math", rank=8, steps=200)  # doctest: +SKIP
        >>> r.train_loss, r.eval_loss  # doctest: +SKIP
    """
    say = log or (_stderr if is_main_process() else (lambda _m: None))
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers' own "Loading weights" bars
    cfg = _settings(config, settings)
    warnings = cfg.check()
    for w in warnings:
        say(f"warning: {w}")
    inputs = [p for p in (base, data, eval_data) if p is not None and Path(p).exists()]
    out_p = check_output_path(out, inputs, overwrite=overwrite)
    ckpt = Path(checkpoint_dir) if checkpoint_dir else out_p.parent / (out_p.name + CHECKPOINT_SUFFIX)
    last = _checkpoint_state(ckpt, resume, overwrite)

    inp = _read_inputs(base, data, eval_data, cfg)  # bad data fails here, before any model is loaded
    for note in inp.notes:
        say(f"warning: {note}")
    warnings += inp.notes

    recipe = train_recipe(base, inp.base, inp.train_rows, inp.eval_rows, cfg)
    if last is not None:
        check_resume_recipe(ckpt, recipe)
    model = _peft_model(inp.base, cfg)
    trainer = build_trainer(model, inp.tokenizer, inp.train_set, inp.eval_set, cfg, ckpt, progress, callbacks)
    if is_main_process():
        if overwrite and last is None:  # old checkpoints go only now that the inputs have been checked
            shutil.rmtree(ckpt, ignore_errors=True)
        ckpt.mkdir(parents=True, exist_ok=True)
        write_recipe(ckpt / RECIPE_NAME, recipe)
    trainer.train(resume_from_checkpoint=str(last) if last is not None else None)
    eval_loss = trainer.evaluate()["eval_loss"] if inp.eval_set is not None else None
    result = _result(trainer, eval_loss, warnings, inp)
    result.output = _save(trainer, out_p, overwrite, recipe, result)
    if is_main_process() and not keep_checkpoints:
        shutil.rmtree(ckpt, ignore_errors=True)
    return result


@dataclass
class _Inputs:
    """The checked data files, the base folder and tokenizer, and the tokenized examples."""

    base: Path
    tokenizer: Any
    train_rows: TaskData
    eval_rows: TaskData | None
    train_set: list[Tokenized]
    eval_set: list[Tokenized] | None
    max_length: int
    notes: list[str]


def _read_inputs(
    base: str | os.PathLike, data: str | os.PathLike, eval_data: str | os.PathLike | None, cfg: TrainConfig
) -> _Inputs:
    train_rows = read_task_file(data, skip_bad=cfg.skip_bad_rows)
    eval_rows = read_task_file(eval_data, skip_bad=cfg.skip_bad_rows) if eval_data is not None else None
    notes = [_skipped_note(d) for d in (train_rows, eval_rows) if d is not None and d.bad]
    base_p = resolve_base(base)
    tok = load_tokenizer(base_p)
    max_length = cfg.max_length or _model_max_length(base_p)
    train_set, cut = tokenize_task(train_rows, tok, max_length)
    eval_set = tokenize_task(eval_rows, tok, max_length)[0] if eval_rows is not None else None
    if cut:
        notes.append(f"{len(cut)} training rows have no completion token within --max-length {max_length}")
    return _Inputs(base_p, tok, train_rows, eval_rows, train_set, eval_set, max_length, notes)


def _settings(config: TrainConfig | None, settings: dict[str, Any]) -> TrainConfig:
    if config is not None and settings:
        raise UsageError("give either config=TrainConfig(...) or keyword settings, not both")
    if config is not None:
        return config
    return TrainConfig.from_dict(settings)


def _checkpoint_state(ckpt: Path, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint to resume from; refuse to mix runs (old checkpoints without --resume, or none with it)."""
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(ckpt)) if ckpt.is_dir() else None
    if resume:
        if overwrite:
            raise UsageError("`resume` continues the checkpoints that `overwrite` would discard; give one of them")
        if last is None:
            raise UsageError(f"`resume`: no checkpoint in {ckpt}; start without `resume`")
        return Path(last)
    if last is not None and not overwrite:
        raise UsageError(
            f"{ckpt} holds checkpoints of an earlier run; pass `resume` to continue it or `overwrite` to start over"
        )
    return None


def _skipped_note(d: TaskData) -> str:
    lines = ", ".join(str(n) for n, _ in d.bad[:10]) + (" ..." if len(d.bad) > 10 else "")
    return f"{d.path}: skipped {len(d.bad)} bad lines ({lines})"


def _model_max_length(base: Path) -> int:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(base)
    return min(MAX_LENGTH_CAP, int(getattr(cfg, "max_position_embeddings", MAX_LENGTH_CAP) or MAX_LENGTH_CAP))


def _peft_model(base: Path, cfg: TrainConfig) -> Any:
    """The base (4-bit for QLoRA, prepared with ``prepare_model_for_kbit_training``) wrapped by ``get_peft_model``."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    from adaptermerge.models import load_causal_lm

    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    model = load_causal_lm(base, quantize=cfg.quantize, dtype=dtype, device_map=_device_map(cfg))
    if cfg.quantize:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    lora = LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.targets, bias="none",
        task_type="CAUSAL_LM", use_dora=cfg.dora, use_rslora=cfg.rslora,
    )  # fmt: skip
    set_seed(cfg.seed)  # the LoRA initialisation draws from torch's generator
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:
        raise UsageError(f"`targets` {cfg.targets}: {' '.join(str(e).split())[:300]}") from None
    use_reference_4bit_kernel(model)
    return model


def _device_map(cfg: TrainConfig) -> Any:
    """4-bit weights must be placed when loading: this process's GPU under DDP, else the first GPU or the CPU."""
    import torch

    if not cfg.quantize:
        return None
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return {"": "cpu"}


class _Examples:
    """A map-style dataset over tokenized rows (what ``Trainer``'s dataloader indexes)."""

    def __init__(self, items: list[Tokenized]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        t = self.items[i]
        return {"input_ids": t.input_ids, "labels": t.labels}


def build_trainer(
    model: Any,
    tok: Any,
    train_set: list[Tokenized],
    eval_set: list[Tokenized] | None,
    cfg: TrainConfig,
    ckpt: Path,
    progress: bool,
    callbacks: Sequence[Any],
) -> Any:
    from transformers import DataCollatorForSeq2Seq, Trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from adaptermerge.data import IGNORE_INDEX
    from adaptermerge.train.progress import LossProgress

    args = training_arguments(cfg, ckpt, len(train_set), eval_set is not None)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_Examples(train_set),
        eval_dataset=_Examples(eval_set) if eval_set is not None else None,
        data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=IGNORE_INDEX),
        processing_class=tok,
        callbacks=[LossProgress(enabled=progress), *callbacks],
    )
    for cb in (PrinterCallback, ProgressCallback):  # results go to stdout, progress is ours (stderr)
        trainer.remove_callback(cb)
    return trainer


def training_arguments(cfg: TrainConfig, ckpt: Path, n_examples: int, has_eval: bool) -> Any:
    """The ``TrainingArguments`` of a run (also used by the benchmark's hand-written twin)."""
    import torch
    from transformers import TrainingArguments

    steps = planned_steps(n_examples, cfg)
    save_steps = cfg.save_steps or max(1, steps // 4)
    return TrainingArguments(
        output_dir=str(ckpt),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        num_train_epochs=cfg.total_epochs,
        max_steps=cfg.steps or -1,
        logging_steps=max(1, min(10, steps // 10)),
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=2,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=save_steps if has_eval else None,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=cfg.bf16,
        gradient_checkpointing=cfg.gradient_checkpointing and not cfg.quantize,  # kbit prep enabled it already
        gradient_checkpointing_kwargs={"use_reentrant": False},
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,
        remove_unused_columns=False,
        # without a GPU, transformers builds its accelerate state for CPU DDP (gloo) only with use_cpu=True;
        # otherwise every torchrun process trains alone on all the data ("parallel_mode != DISTRIBUTED")
        use_cpu=not torch.cuda.is_available(),
    )


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def planned_steps(n_examples: int, cfg: TrainConfig) -> int:
    """Optimizer steps the run will take (Trainer's own count: batches per epoch / accumulation, rounded up)."""
    if cfg.steps:
        return cfg.steps
    batches = math.ceil(n_examples / (cfg.batch_size * world_size()))
    return max(1, math.ceil(math.ceil(batches / cfg.grad_accum) * cfg.total_epochs))


def _result(trainer: Any, eval_loss: float | None, warnings: list[str], inp: _Inputs) -> TrainResult:
    st = trainer.state
    losses = [h["loss"] for h in st.log_history if "loss" in h]
    runtime = next((h["train_runtime"] for h in reversed(st.log_history) if "train_runtime" in h), 0.0)
    data = {"train": inp.train_rows.summary(), "max_length": inp.max_length}
    if inp.eval_rows is not None:
        data["eval"] = inp.eval_rows.summary()
    return TrainResult(
        output=None,
        steps=st.global_step,
        train_loss=losses[-1] if losses else None,
        eval_loss=eval_loss,
        train_runtime=float(runtime),
        tokens=int(st.num_input_tokens_seen),
        world_size=trainer.args.world_size,
        log_history=list(st.log_history),
        warnings=warnings,
        data=data,
    )


def _save(trainer: Any, out: Path, overwrite: bool, recipe: dict, result: TrainResult) -> Path:
    """The PEFT folder, its model card, recipe and loss log, written atomically by the main process only."""
    import json

    acc = trainer.accelerator
    state = acc.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None  # FSDP gathers on every rank
    if trainer.is_world_process_zero():
        peft_model = acc.unwrap_model(trainer.model)
        with atomic_dir(out, overwrite=overwrite) as tmp:
            peft_model.save_pretrained(tmp, state_dict=state)
            _sort_target_modules(tmp / "adapter_config.json")
            (tmp / "README.md").write_text(train_card(recipe, result, peft_model), encoding="utf-8")
            write_recipe(tmp / RECIPE_NAME, recipe)
            summary = {
                "steps": result.steps, "train_loss": result.train_loss, "eval_loss": result.eval_loss,
                "train_runtime": result.train_runtime, "tokens": result.tokens, "world_size": result.world_size,
                "data": result.data, "warnings": result.warnings, "log_history": result.log_history,
            }  # fmt: skip
            (tmp / SUMMARY_NAME).write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    acc.wait_for_everyone()
    return out


def _sort_target_modules(config: Path) -> None:
    """PEFT resolves ``all-linear`` to a set of module names and saves it in set order, which differs from
    process to process (string hashing is randomised); sorted, the same run writes the same file."""
    import json

    cfg = json.loads(config.read_text(encoding="utf-8"))
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
        config.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
