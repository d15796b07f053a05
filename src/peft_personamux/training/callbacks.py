"""Callbacks of the two stages: the stage 1 switch from bias warm-up to joint training, the stage 2 row mask, and the
loss log with its curve."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from transformers import TrainerCallback

from ..files import LOSS_CURVE_NAME, LOSS_LOG_NAME
from .plots import STAGE_KEY, plot_loss_curve

logger = logging.getLogger(__name__)


class StageSwitchCallback(TrainerCallback):
    """Stage 1 schedule: bias only for ``warmup_epochs``, then W, b and all mixtures.

    The optimizer must be built while everything requires grad (`build_codebook_trainer` does it); frozen
    parameters then get no gradient, and Adam skips them until the switch.
    """

    def __init__(self, warmup_epochs: float = 1.0, on_switch: Callable[[Any], dict] | None = None) -> None:
        if not warmup_epochs >= 0:
            raise ValueError(f"`warmup_epochs` must be >= 0, got {warmup_epochs!r}.")
        self.warmup_epochs = warmup_epochs
        self.on_switch = on_switch  # run once when the joint stage starts in this run (not on resume past it)
        self.in_warmup: bool | None = None

    def _apply(self, model, state, warmup: bool, fresh: bool = True) -> None:
        if warmup == self.in_warmup:
            return
        if warmup:
            model.train_bias_only()
        else:
            model.train_codebook()
        self.in_warmup = warmup
        stage = "bias_warmup" if warmup else "codebook"
        state.log_history.append({STAGE_KEY: stage, "step": state.global_step, "epoch": state.epoch or 0.0})
        logger.info("Persona-Mux stage 1: %s from step %d.", stage, state.global_step)
        if not warmup and fresh and self.on_switch is not None:
            state.log_history.append({"step": state.global_step, **self.on_switch(model)})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.in_warmup = None
        # on resume, epoch is restored; a run resumed inside the joint stage already has its codebook start
        self._apply(model, state, (state.epoch or 0.0) < self.warmup_epochs, fresh=state.global_step == 0)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.in_warmup and (state.epoch or 0.0) >= self.warmup_epochs:
            self._apply(model, state, False)


class TrainPersonasCallback(TrainerCallback):
    """Stage 2: only the rows of ``names`` train (applied again at train begin, after any checkpoint load)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.train_personas(self.names)


class LossLogCallback(TrainerCallback):
    """Append every log entry to ``output_dir/loss_log.jsonl``; plot ``loss_curve.png`` when training ends."""

    def __init__(self, log_name: str = LOSS_LOG_NAME, plot_name: str = LOSS_CURVE_NAME, title: str = "") -> None:
        self.log_name, self.plot_name, self.title = log_name, plot_name, title

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or not args.output_dir:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        with open(os.path.join(args.output_dir, self.log_name), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and args.output_dir:
            plot_loss_curve(state.log_history, os.path.join(args.output_dir, self.plot_name), self.title)
