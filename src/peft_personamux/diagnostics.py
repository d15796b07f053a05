"""Persona-identity diagnostic: does a persona's own mixture explain its held-out lines better than another's?

Training loss can fall while the mixtures carry nothing persona-specific (the bias tokens alone lower it). On
held-out lines of pretraining personas this compares the loss with each line's own mixture to the loss with the
mixture of another persona (a fixed derangement of the personas). The gap ``shuffled - own`` must grow during
stage 1; if it stays near zero, the codebook has not learned personas, whatever the training loss says.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence

import torch
from transformers import TrainerCallback

from .loss import FAST, LossOptions, PrefixCache, response_nll
from .tuner.model import as_tuner

logger = logging.getLogger(__name__)

IDENTITY_KEYS = ("identity_own_loss", "identity_shuffled_loss", "identity_gap")


def derangement(n: int, seed: int = 0) -> torch.Tensor:
    """A permutation of ``range(n)`` with no fixed point (n >= 2)."""
    if n < 2:
        raise ValueError(f"A derangement needs at least 2 items, got {n}.")
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g)
        if bool((perm != torch.arange(n)).all()):
            return perm


@torch.no_grad()
def identity_gap(
    model,
    batches: Sequence[Mapping[str, torch.Tensor]],
    seed: int = 0,
    options: LossOptions = FAST,
    prefix_cache: PrefixCache | None = None,
) -> dict[str, float]:
    """Mean token loss with own mixtures, with deranged mixtures, and their gap (shuffled - own)."""
    tuner = as_tuner(model)
    table = tuner.mixture_table()
    rows = sorted({int(p) for b in batches for p in b["persona_ids"].tolist()})
    if len(rows) < 2:
        raise ValueError("The identity diagnostic needs held-out lines of at least 2 personas.")
    perm = derangement(len(rows), seed)
    other = {r: rows[int(perm[i])] for i, r in enumerate(rows)}
    was_training = tuner.training
    tuner.eval()
    own_sum = shuffled_sum = 0.0
    tokens = 0
    try:
        for batch in batches:
            ids = batch["persona_ids"]
            swapped = torch.tensor([other[int(p)] for p in ids.tolist()], device=ids.device)
            nll, count = response_nll(tuner, batch, options=options, prefix_cache=prefix_cache)
            nll_other, _ = response_nll(
                tuner, batch, mixtures=table[swapped], options=options, prefix_cache=prefix_cache
            )
            own_sum += float(nll.sum())
            shuffled_sum += float(nll_other.sum())
            tokens += int(count.sum())
    finally:
        tuner.train(was_training)
    own, shuffled = own_sum / max(tokens, 1), shuffled_sum / max(tokens, 1)
    return dict(zip(IDENTITY_KEYS, (own, shuffled, shuffled - own)))


class IdentityDiagnosticCallback(TrainerCallback):
    """Log the identity gap every ``every`` optimizer steps (and at the end) into the Trainer's log history."""

    def __init__(self, batches: Sequence[Mapping[str, torch.Tensor]], every: int, seed: int = 0) -> None:
        if every < 1:
            raise ValueError(f"`every` must be a positive integer, got {every!r}.")
        self.batches, self.every, self.seed = list(batches), every, seed
        self._cache = PrefixCache()

    def _log(self, args, state, model) -> None:
        device = next(model.parameters()).device
        batches = [{k: v.to(device) for k, v in b.items()} for b in self.batches]
        values = identity_gap(model, batches, self.seed, prefix_cache=self._cache)
        entry = {"step": state.global_step, "epoch": state.epoch, **{k: round(v, 5) for k, v in values.items()}}
        state.log_history.append(entry)
        logger.info("identity diagnostic at step %d: %s", state.global_step, entry)
        if state.is_world_process_zero and args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, "identity_log.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self._log(args, state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every != 0:
            self._log(args, state, model)
