"""The judge: a causal LM of another family that scores text by its own likelihood.

Two uses (paper, Tables 4 and 5): the *generation loss* of an answer given the prompt it answers, and the
*discrimination* game, where the judge reads real lines of a persona and calls the least likely of four candidates
the fake one (see ``metrics.discrimination_trial``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..inputs import positions_from_mask

logger = logging.getLogger(__name__)


class Judge:
    """Mean token NLL of a target text after a context, in left-padded batches.

    Only the logits of the target positions are computed (``logits_to_keep``): with large vocabularies (Gemma 3 has
    262k tokens) the output layer would otherwise cost more than the rest of the model.
    """

    def __init__(
        self, model, tokenizer, batch_size: int = 8, max_context_tokens: int = 256, max_target_tokens: int = 96
    ) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size = batch_size
        self.max_context_tokens, self.max_target_tokens = max_context_tokens, max_target_tokens
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad if pad is not None else 0

    def _encode(self, context: str, target: str) -> tuple[list[int], list[int]]:
        ctx = self.tokenizer(context, add_special_tokens=True)["input_ids"]  # bos when the model wants one
        if len(ctx) > self.max_context_tokens:  # keep the start token and the end of the context
            ctx = ctx[:1] + ctx[len(ctx) - self.max_context_tokens + 1 :]
        tgt = self.tokenizer(target, add_special_tokens=False)["input_ids"][: self.max_target_tokens] if target else []
        return ctx, tgt

    @torch.no_grad()
    def continuation_nll(self, pairs: Sequence[tuple[str, str]], progress: bool = False) -> list[float]:
        """For each ``(context, target)``, the mean NLL per target token; NaN when the target has no tokens."""
        encoded = [self._encode(c, t) for c, t in pairs]
        out = [math.nan] * len(pairs)
        todo = sorted((i for i, (_, t) in enumerate(encoded) if t), key=lambda i: -sum(map(len, encoded[i])))
        device = next(self.model.parameters()).device
        batches = [todo[s : s + self.batch_size] for s in range(0, len(todo), self.batch_size)]
        for batch in tqdm(batches, desc="judge", disable=not progress, leave=False):
            rows = [encoded[i][0] + encoded[i][1] for i in batch]
            width = max(map(len, rows))
            keep = max(len(encoded[i][1]) for i in batch) + 1  # logits that predict the longest target
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (batch, width), left padded
            mask = torch.zeros_like(ids)
            for r, row in enumerate(rows):
                ids[r, width - len(row) :] = torch.tensor(row)
                mask[r, width - len(row) :] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), logits_to_keep=keep
            ).logits.float()  # (batch, keep, vocab): positions width-keep .. width-1
            for r, i in enumerate(batch):
                target = encoded[i][1]
                n = len(target)
                predicting = logits[r, keep - n - 1 : keep - 1]  # (n, vocab): each predicts the next target token
                labels = torch.tensor(target, device=device)
                out[i] = float(F.cross_entropy(predicting, labels, reduction="mean"))
        return out

    def generation_loss(
        self, prompts: Sequence[str], generations: Sequence[str], progress: bool = False
    ) -> list[float]:
        """Mean token NLL of each generation after the line it answers (NaN for an empty generation)."""
        return self.continuation_nll([(f"{p}\n", g) for p, g in zip(prompts, generations)], progress)

    def candidate_nlls(self, context: str, candidates: Sequence[str]) -> list[float]:
        """Mean token NLL of each candidate after the same context (``metrics.discrimination_trial``'s scorer)."""
        return self.continuation_nll([(context, c) for c in candidates])
