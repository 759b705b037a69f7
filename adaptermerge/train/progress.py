"""A progress bar with the running loss, on stderr, from the main process only."""

from __future__ import annotations

import sys
from typing import Any

from transformers import TrainerCallback


class LossProgress(TrainerCallback):
    """tqdm bar over optimizer steps; the postfix shows the last logged loss (and eval loss); terminals only.

    It replaces transformers' ``ProgressCallback``/``PrinterCallback``, which print log dicts to stdout
    (where our results go). On resume the bar starts at the checkpoint's step.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar: Any = None
        self.postfix: dict[str, str] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from tqdm.auto import tqdm

        if state.is_world_process_zero:
            self.bar = tqdm(
                total=state.max_steps, initial=state.global_step, desc="training", unit="step", file=sys.stderr,
                disable=not (self.enabled and sys.stderr.isatty()), dynamic_ncols=True,
            )  # fmt: skip

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self.bar is None or not logs:
            return
        for key, label in (("loss", "loss"), ("eval_loss", "eval")):
            if key in logs:
                self.postfix[label] = f"{logs[key]:.4f}"
        self.bar.set_postfix(self.postfix, refresh=False)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
