"""Prompt gradients: how each line's loss pulls the mixed tokens of the soft prompt, one backward pass per batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from .loss import FAST, LossOptions, PrefixCache, response_nll
from .tuner.model import as_tuner


@dataclass
class LineGradients:
    """Each line's gradient of its summed token NLL w.r.t. the mixed tokens, with its token count and persona row."""

    gradients: torch.Tensor  # (lines, tokens_per_code, hidden), float32
    tokens: torch.Tensor  # (lines,) response tokens in each line's loss
    persona_ids: torch.Tensor  # (lines,) rows of the persona table

    def persona_means(self) -> dict[int, torch.Tensor]:
        """Per persona row: gradient of its mean token loss, (tokens_per_code, hidden)."""
        out = {}
        for persona in sorted(set(self.persona_ids.tolist())):
            keep = self.persona_ids == persona
            out[persona] = self.gradients[keep].sum(0) / max(int(self.tokens[keep].sum()), 1)
        return out


def prompt_line_gradients(
    model,
    batches: Sequence[Mapping[str, torch.Tensor]],
    options: LossOptions = FAST,
    progress: bool = True,
    desc: str = "codebook init: gradients",
) -> LineGradients:
    """Every line's gradient w.r.t. the mixed tokens at the personas' current mixtures (one backward per batch).

    ``batches`` are collator batches (``persona_ids`` rows of the table). Model weights get no gradient.
    ``desc``: the progress bar's text.
    """
    tuner = as_tuner(model)
    options = replace(options, shared_prompt=False)  # each row's own prompt positions carry its own gradient
    layer = tuner.personamux_layer
    config = tuner.adapter_config()
    ph, per_code = config.placeholder_token_id, config.tokens_per_code
    captured: dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        if not torch.is_grad_enabled():
            return None  # the prefix, computed without gradient
        leaf = output.detach().requires_grad_(True)  # (rows, seq, hidden): gradient here, none into the weights
        captured["ids"], captured["embeds"] = args[0], leaf
        return leaf

    gradients, tokens, personas = [], [], []
    handle = layer.register_forward_hook(hook)
    cache = PrefixCache()
    was_training = tuner.training
    tuner.eval()
    try:
        for batch in tqdm(batches, desc=desc, disable=not progress):
            nll, counts = response_nll(tuner, batch, options=options, prefix_cache=cache)
            nll.sum().backward()  # rows are independent: each row's gradient is its own line's
            ids, grad = captured["ids"], captured["embeds"].grad  # grad: (rows, seq, hidden)
            for row in range(ids.shape[0]):
                positions = (ids[row] == ph).nonzero()[:, 0][-per_code:]  # the mixed tokens end the run
                gradients.append(grad[row, positions].detach().float())
            tokens.append(counts.detach().cpu().long())
            personas.append(batch["persona_ids"].detach().cpu())
    finally:
        handle.remove()
        tuner.train(was_training)
    return LineGradients(torch.stack(gradients).cpu(), torch.cat(tokens), torch.cat(personas))


def persona_prompt_gradients(
    model,
    batches: Sequence[Mapping[str, torch.Tensor]],
    options: LossOptions = FAST,
    progress: bool = True,
    desc: str = "codebook init: gradients",
) -> dict[int, torch.Tensor]:
    """Per persona row: gradient of its mean token loss w.r.t. the mixed tokens, (tokens_per_code, hidden)."""
    return prompt_line_gradients(model, batches, options, progress, desc).persona_means()
